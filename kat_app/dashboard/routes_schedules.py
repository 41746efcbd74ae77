"""Schedules: create, list, pause, resume, trigger, delete (API and pages)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Request

from kat_app.dashboard.bodies import ScheduleRequest
from kat_app.dashboard.web import Web
from kat_core.errors import Invalid


def router(web: Web) -> APIRouter:
    r = APIRouter()
    svc = web.svc
    render = web.render
    redirect = web.redirect
    page_form = web.page_form
    api_read = web.api_read
    api_write = web.api_write
    page_read = web.page_read

    @r.get("/api/schedules", dependencies=[Depends(api_read)])
    def api_schedules() -> dict[str, Any]:
        return svc.list_schedules()

    @r.post("/api/schedules", status_code=201)
    def api_schedule_create(body: ScheduleRequest, who: str = Depends(api_write)) -> dict[str, Any]:
        return svc.create_schedule(body.cron, body.profile, body.overrides, name=body.name, backend=body.backend,
                                   only_if_data_changed=body.only_if_data_changed, who=who)

    @r.get("/api/schedules/{schedule_id}", dependencies=[Depends(api_read)])
    def api_schedule(schedule_id: str) -> dict[str, Any]:
        return svc.get_schedule(schedule_id)

    @r.post("/api/schedules/{schedule_id}/{action}", dependencies=[Depends(api_write)])
    def api_schedule_action(schedule_id: str, action: Literal["pause", "resume", "trigger"]) -> dict[str, Any]:
        return {"pause": svc.pause_schedule, "resume": svc.resume_schedule,
                "trigger": svc.trigger_schedule}[action](schedule_id)

    @r.delete("/api/schedules/{schedule_id}", dependencies=[Depends(api_write)])
    def api_schedule_delete(schedule_id: str) -> dict[str, Any]:
        svc.delete_schedule(schedule_id)
        return {"schedule_id": schedule_id, "deleted": True}

    @r.get("/schedules", include_in_schema=False, dependencies=[Depends(page_read)])
    def schedules_page(request: Request):
        return schedules_view(request, {}, None)

    def schedules_view(request: Request, values: dict[str, str], error: str | None, status: int = 200):
        return render(request, "schedules.html", status, **svc.list_schedules(), profiles=svc.profiles(),
                      backends=svc.backends(), values=values, error=error)

    @r.post("/schedules", include_in_schema=False)
    async def schedule_create_page(request: Request):
        form = await page_form(request)
        try:
            created = svc.create_schedule(form.get("cron", ""), form.get("profile", ""), form.get("overrides", ""),
                                          name=form.get("name"), backend=form.get("backend", "local"),
                                          only_if_data_changed=form.get("only_if_data_changed") == "on",
                                          who="dashboard")
        except Invalid as e:
            return schedules_view(request, form, str(e), 422)
        return redirect("/schedules", f"Schedule {created['schedule_id']} created.")

    @r.post("/schedules/{schedule_id}/{action}", include_in_schema=False)
    async def schedule_action_page(request: Request, schedule_id: str,
                                   action: Literal["pause", "resume", "trigger", "delete"]):
        await page_form(request)
        if action == "delete":
            svc.delete_schedule(schedule_id)
            return redirect("/schedules", f"Schedule {schedule_id} deleted.")
        {"pause": svc.pause_schedule, "resume": svc.resume_schedule, "trigger": svc.trigger_schedule}[action](
            schedule_id)
        done = {"pause": "paused", "resume": "resumed", "trigger": "triggered: its run appears on the Runs page "
                "in a moment"}[action]
        return redirect("/schedules", f"Schedule {schedule_id} {done}.")

    return r

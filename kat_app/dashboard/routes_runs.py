"""Runs: the API and the pages (list, new-run form, detail, cancel, files)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse

from kat_app.dashboard.bodies import RunRequest
from kat_app.dashboard.web import Web
from kat_core.errors import Conflict, Invalid, NotFound


def router(web: Web) -> APIRouter:
    r = APIRouter()
    svc = web.svc
    render = web.render
    redirect = web.redirect
    file_response = web.file_response
    page_form = web.page_form
    api_read = web.api_read
    api_write = web.api_write
    page_read = web.page_read

    @r.get("/api/runs", dependencies=[Depends(api_read)])
    def api_runs(backend: Literal["local", "kubeflow"] | None = None, limit: int = Query(100, ge=1, le=1000)):
        return svc.list_runs(backend, limit)

    @r.post("/api/runs", status_code=201)
    def api_submit(body: RunRequest, who: str = Depends(api_write)) -> dict[str, Any]:
        return svc.submit_run(body.profile, body.overrides, body.backend, name=body.name, who=who)

    @r.get("/api/runs/{run_id}", dependencies=[Depends(api_read)])
    def api_run(run_id: str) -> dict[str, Any]:
        return svc.get_run(run_id)

    @r.post("/api/runs/{run_id}/cancel", dependencies=[Depends(api_write)])
    def api_cancel(run_id: str) -> dict[str, Any]:
        return svc.cancel_run(run_id)

    @r.get("/api/runs/{run_id}/stages", dependencies=[Depends(api_read)])
    def api_stages(run_id: str) -> dict[str, Any]:
        return {"run_id": run_id, "stages": svc.run_stages(run_id)}

    @r.get("/api/runs/{run_id}/log", dependencies=[Depends(api_read)])
    def api_log(run_id: str, stage: str | None = None, lines: int = 200) -> dict[str, Any]:
        return svc.run_log(run_id, stage, lines)

    @r.get("/api/runs/{run_id}/metrics", dependencies=[Depends(api_read)])
    def api_metrics(run_id: str) -> dict[str, Any]:
        return {"run_id": run_id, "stages": svc.run_metrics(run_id)}

    @r.get("/api/runs/{run_id}/report", dependencies=[Depends(api_read)])
    def api_report(run_id: str) -> dict[str, Any]:
        report = svc.run_report(run_id)
        if report is None:
            raise NotFound(f"run {run_id} has no evaluation report (yet)")
        return report

    @r.get("/api/runs/{run_id}/lineage", dependencies=[Depends(api_read)])
    def api_lineage(run_id: str) -> dict[str, Any]:
        return svc.run_lineage(run_id)

    @r.get("/api/runs/{run_id}/files/{stage}/{output}/{path:path}", dependencies=[Depends(api_read)])
    def api_file(run_id: str, stage: str, output: str, path: str):
        return file_response(svc.run_file(run_id, stage, output, path))

    @r.get("/runs", include_in_schema=False, dependencies=[Depends(page_read)])
    def runs_page(request: Request, limit: int = 100):
        limit = max(1, min(int(limit), 1000))
        return render(request, "runs.html", **svc.list_runs(None, limit), limit=limit)

    @r.get("/runs/new", include_in_schema=False, dependencies=[Depends(page_read)])
    def new_run_page(request: Request, profile: str = "smoke"):
        if profile not in svc.profiles():
            profile = svc.profiles()[0]
        return new_run_form(request, profile, {}, "", "local", "", None)

    def new_run_form(request: Request, profile: str, values: dict[str, str], extra: str, backend: str, name: str,
                     error: str | None, status: int = 200) -> HTMLResponse:
        fields = svc.config_fields(profile)
        sections: dict[str, list[dict[str, Any]]] = {}
        for f in fields:
            f = {**f, "given": values.get(f["key"], f["value"])}
            f["changed"] = f["given"] != f["value"]
            sections.setdefault(f["section"], []).append(f)
        return render(request, "run_new.html", status, profile=profile, profiles=svc.profiles(), sections=sections,
                      extra=extra, backend=backend, backends=svc.backends(), name=name, error=error)

    @r.post("/runs/new", include_in_schema=False)
    async def new_run_submit(request: Request):
        form = await page_form(request)
        profile, backend = form.get("profile", ""), form.get("backend", "local")
        values = {k.removeprefix("cfg."): v for k, v in form.items() if k.startswith("cfg.")}
        extra, name = form.get("extra", ""), form.get("name", "")
        if profile not in svc.profiles():
            raise Invalid(f"unknown profile {profile!r}")
        try:
            overrides = svc.overrides_from_form(profile, values, extra)
            run = svc.submit_run(profile, overrides, backend, name=name, who="dashboard")
        except Invalid as e:
            return new_run_form(request, profile, values, extra, backend, name, str(e), 422)
        return redirect(f"/runs/{run['run_id']}", f"Run {run['run_id']} submitted ({backend}, profile {profile}).")

    @r.get("/runs/{run_id}", include_in_schema=False, dependencies=[Depends(page_read)])
    def run_page(request: Request, run_id: str, stage: str | None = None):
        run = svc.get_run(run_id)
        log_tail = svc.run_log(run_id, stage if stage in {s["name"] for s in run["stages"]} else None, 60)
        return render(request, "run.html", run=run, log=log_tail, metrics=svc.run_metrics(run_id),
                      report=svc.run_report(run_id), lineage=svc.run_lineage(run_id))

    @r.post("/runs/{run_id}/cancel", include_in_schema=False)
    async def run_cancel(request: Request, run_id: str):
        await page_form(request)
        try:
            svc.cancel_run(run_id)
        except Conflict as e:
            return redirect(f"/runs/{run_id}", str(e), "error")
        return redirect(f"/runs/{run_id}", f"Run {run_id} cancelled.")

    @r.get("/runs/{run_id}/files/{stage}/{output}/{path:path}", include_in_schema=False,
             dependencies=[Depends(page_read)])
    def run_file_page(request: Request, run_id: str, stage: str, output: str, path: str, raw: bool = False):
        target = svc.run_file(run_id, stage, output, path)
        if target.suffix.lower() == ".md" and not raw:  # a report as a page; ?raw=1 for the file itself
            from markdown_it import MarkdownIt

            # html=False: HTML inside the file is shown as text, never run
            body = MarkdownIt("commonmark", {"html": False}).enable("table").render(target.read_text(errors="replace"))
            return render(request, "markdown.html", title=f"{run_id} · {stage}/{output}/{path}", body=body,
                          raw=f"{request.url.path}?raw=1")
        return file_response(target)

    return r

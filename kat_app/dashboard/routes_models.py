"""Models: versions, aliases, history, compare, the gate, promote and roll back (API and pages)."""

from __future__ import annotations

import urllib.parse
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse

from kat_app.dashboard.bodies import PromoteRequest, RollbackRequest
from kat_app.dashboard.web import Web
from kat_app.service import MODEL_NAME
from kat_core.errors import Conflict, Invalid


def router(web: Web) -> APIRouter:
    r = APIRouter()
    svc = web.svc
    render = web.render
    redirect = web.redirect
    page_form = web.page_form
    api_read = web.api_read
    api_write = web.api_write
    page_read = web.page_read

    @r.get("/api/models", dependencies=[Depends(api_read)])
    def api_models() -> dict[str, Any]:
        return {"models": svc.models()}

    @r.get("/api/models/{name}/versions", dependencies=[Depends(api_read)])
    def api_versions(name: str) -> dict[str, Any]:
        return {"name": name, "versions": svc.versions(name)}

    @r.get("/api/models/{name}/versions/{version}", dependencies=[Depends(api_read)])
    def api_version(name: str, version: int) -> dict[str, Any]:
        return svc.version(name, version)

    @r.get("/api/models/{name}/aliases", dependencies=[Depends(api_read)])
    def api_aliases(name: str) -> dict[str, Any]:
        return {"name": name, "aliases": svc.aliases(name)}

    @r.get("/api/models/{name}/history", dependencies=[Depends(api_read)])
    def api_history(name: str) -> dict[str, Any]:
        return {"name": name, "events": svc.history(name)}

    @r.get("/api/models/{name}/compare", dependencies=[Depends(api_read)])
    def api_compare(name: str, a: int = Query(ge=1), b: int = Query(ge=1)) -> dict[str, Any]:
        return svc.compare(name, a, b)

    @r.get("/api/models/{name}/gate", dependencies=[Depends(api_read)])
    def api_gate(name: str, version: int = Query(ge=1)) -> dict[str, Any]:
        return svc.gate_preview(name, version)

    @r.post("/api/models/{name}/promote")
    def api_promote(name: str, body: PromoteRequest, who: str = Depends(api_write)) -> dict[str, Any]:
        return svc.promote(name, body.version, body.reason, body.who or who, force=body.force)

    @r.post("/api/models/{name}/rollback")
    def api_rollback(name: str, body: RollbackRequest, who: str = Depends(api_write)) -> dict[str, Any]:
        return svc.rollback(name, body.reason, body.who or who)

    @r.get("/models", include_in_schema=False, dependencies=[Depends(page_read)])
    def models_page(request: Request, name: str | None = None):
        # only names the model routes take: one registered elsewhere as "KAT v2" would make this page a 422
        names = [n for n in svc.model_names() if MODEL_NAME.match(n)]
        current = name or (names[0] if names else None)
        if not current:
            return render(request, "models.html", names=[], name=None, versions=[], aliases={}, history=[])
        overview = svc.model_overview(current)
        return render(request, "models.html", names=names, name=current, versions=overview["versions"],
                      aliases=overview["aliases"], history=list(reversed(overview["history"])))

    @r.get("/models/{name}/compare", include_in_schema=False, dependencies=[Depends(page_read)])
    def compare_page(request: Request, name: str, a: int = Query(ge=1), b: int = Query(ge=1)):
        return render(request, "compare.html", name=name, c=svc.compare(name, a, b), a=a, b=b,
                      versions=svc.versions(name), aliases=svc.aliases(name))

    @r.get("/models/{name}/compare.png", include_in_schema=False, dependencies=[Depends(page_read)])
    def compare_png(name: str, a: int = Query(ge=1), b: int = Query(ge=1)):
        return FileResponse(svc.compare_plot(name, a, b), media_type="image/png")

    @r.post("/models/{name}/promote", include_in_schema=False)
    async def promote_page(request: Request, name: str):
        form = await page_form(request)
        try:
            version = int(form.get("version", ""))
        except ValueError:
            raise Invalid("choose the version to promote") from None
        reason, force = form.get("reason", "").strip(), form.get("force") == "on"
        if not reason:
            return redirect(f"/models?name={urllib.parse.quote(name)}", "A reason is required to promote.", "error")
        if form.get("confirm") != "yes":
            return render(request, "confirm.html", action="promote", name=name, version=version, reason=reason,
                          force=force, gate=svc.gate_preview(name, version), aliases=svc.aliases(name))
        try:
            result = svc.promote(name, version, reason, form.get("who") or "dashboard", force=force)
        except Conflict as e:
            return redirect(f"/models?name={urllib.parse.quote(name)}", str(e), "error")
        event = result["event"]
        message = f"{name} v{version} " + ("is the champion now." if event else "already was the champion.")
        return redirect(f"/models?name={urllib.parse.quote(name)}", message)

    @r.post("/models/{name}/rollback", include_in_schema=False)
    async def rollback_page(request: Request, name: str):
        form = await page_form(request)
        reason = form.get("reason", "").strip()
        if not reason:
            return redirect(f"/models?name={urllib.parse.quote(name)}", "A reason is required to roll back.", "error")
        if form.get("confirm") != "yes":
            return render(request, "confirm.html", action="rollback", name=name, version=None, reason=reason,
                          force=False, gate=None, aliases=svc.aliases(name))
        try:
            result = svc.rollback(name, reason, form.get("who") or "dashboard")
        except Conflict as e:
            return redirect(f"/models?name={urllib.parse.quote(name)}", str(e), "error")
        event = result["event"]
        return redirect(f"/models?name={urllib.parse.quote(name)}",
                        f"{name}: champion v{event['previous']} -> v{event['version']} (rolled back).")

    return r

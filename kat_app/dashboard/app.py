"""The dashboard's web layer: routes only. Every answer comes from `Service` (kat_app/service/),
which the CLI calls too; this module adds authentication, CSRF checks, forms and rendering.

Authentication (see `security`): API clients send `Authorization: Bearer <token>`; browsers sign in once
with the token and then carry a session cookie. Every mutation needs the token (or a session plus the
CSRF token of its form); reads need it too unless the service runs with `open_reads`. Files of a run are
served only from inside that run's stage outputs; HTML among them is sandboxed.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import urllib.parse
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, ConfigDict, Field

from kat_app import schedules
from kat_app.dashboard import charts
from kat_app.jobs import RunWorker
from kat_app.security import (
    CSRF_FIELD,
    CSRF_HEADER,
    SESSION_COOKIE,
    TOKEN_ENV,
    TOKEN_FILE,
    csrf_token,
    load_token,
    redact_text,
    same,
    session_value,
)
from kat_app.service import Service
from kat_core.errors import Conflict, Invalid, KatError, NotFound
from kat_core.platform import kat_home

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
FLASH_COOKIE = "kat_flash"
PAGE_CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; object-src 'none'; "
            "frame-ancestors 'none'; form-action 'self'; base-uri 'none'")
# run artifacts (e.g. Great Expectations data docs) are shown in an opaque origin: their scripts cannot act
# as the signed-in user
ARTIFACT_CSP = "sandbox allow-scripts allow-popups; default-src 'self' 'unsafe-inline' data: https:"


# ---- request bodies of the API ---------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunRequest(_Body):
    profile: str = Field(min_length=1, max_length=200)
    overrides: list[str] = Field(default_factory=list, max_length=200)
    backend: Literal["local", "kubeflow"] = "local"
    name: str | None = Field(None, max_length=100)


class ConfigCheck(_Body):
    profile: str = Field(min_length=1, max_length=200)
    overrides: list[str] = Field(default_factory=list, max_length=200)


class PromoteRequest(_Body):
    version: int = Field(ge=1)
    reason: str = Field(min_length=1, max_length=500)
    force: bool = False
    who: str | None = Field(None, max_length=100)


class RollbackRequest(_Body):
    reason: str = Field(min_length=1, max_length=500)
    who: str | None = Field(None, max_length=100)


class ScheduleRequest(_Body):
    cron: str = Field(min_length=1, max_length=100)
    profile: str = Field(min_length=1, max_length=200)
    overrides: list[str] = Field(default_factory=list, max_length=200)
    name: str | None = Field(None, max_length=100)
    backend: Literal["local", "kubeflow"] = "local"
    only_if_data_changed: bool = False


class LoginRequired(Exception):
    def __init__(self, next_url: str):
        self.next_url = next_url


def _status_of(error: KatError) -> int:
    return 404 if isinstance(error, NotFound) else 409 if isinstance(error, Conflict) else 422 \
        if isinstance(error, Invalid) else 400


def _safe_next(url: str | None) -> str:
    """Only a path on this site (no scheme, no host, no //): nowhere else to be sent after signing in."""
    if not url or not url.startswith("/") or url.startswith("//") or "\\" in url:
        return "/runs"
    return url


def _warm_up(svc: Service, worker: Any) -> None:
    try:
        svc.models()
    except Exception as e:  # the pages say what is wrong when they ask
        log.warning("MLflow at %s: %s", svc.tracking_uri, e)
    if worker is not None:
        worker.start()


def create_app(home: str | Path | None = None, *, token: str | None = None, open_reads: bool = False,
               worker: bool = True, concurrency: int = 1, scheduler: bool = True, secure_cookies: bool = False,
               service: Service | None = None) -> FastAPI:
    """The dashboard app. `worker` runs queued local runs (at most `concurrency` at once); `scheduler` fires
    schedules (one process per KAT_HOME). Without `token`, KAT_API_TOKEN or $KAT_HOME/api_token is used
    (created when missing)."""
    svc = service or Service(home)
    if token is None:
        token, _ = load_token(svc.home)
    if not token:
        raise KatError("the dashboard needs an API token")
    session = session_value(token)
    csrf = csrf_token(token, session)
    state: dict[str, Any] = {"worker": None, "scheduler": False}

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        if worker:
            state["worker"] = RunWorker(svc.home, concurrency=concurrency)
            svc.worker = state["worker"]
        # open the MLflow store first (its first use creates or migrates the schema: seconds), then start
        # runs: a run's first stage must not create the same SQLite schema at the same time
        threading.Thread(target=_warm_up, args=(svc, state["worker"]), name="kat-warm-up", daemon=True).start()
        if scheduler:
            try:
                schedules.start_live(svc.home)
                state["scheduler"] = True
            except KatError as e:
                log.warning("not firing schedules here: %s", e)
        try:
            yield
        finally:
            if state["worker"] is not None and state["worker"].is_alive():
                state["worker"].stop()
            if state["scheduler"]:
                schedules.stop_live(svc.home)

    app = FastAPI(title="KAT dashboard", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json",
                  lifespan=lifespan)
    app.state.service = svc
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.globals.update(timeline=charts.timeline, line_chart=charts.line_chart,
                                 curve_groups=charts.curve_groups, quote=urllib.parse.quote)
    templates.env.filters["num"] = lambda v, d=3: "-" if v is None else (f"{v:.{d}f}" if isinstance(v, float) else v)
    templates.env.filters["short"] = lambda v, n=12: "-" if not v else str(v)[:n]

    # ---- who is asking --------------------------------------------------------------------------------------

    def has_session(request: Request) -> bool:
        return same(request.cookies.get(SESSION_COOKIE), session)

    def has_bearer(request: Request) -> bool:
        scheme, _, credential = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and same(credential.strip(), token)

    def api_read(request: Request) -> None:
        if open_reads or has_bearer(request) or has_session(request):
            return
        raise HTTPException(401, "the API token is required: send 'Authorization: Bearer <token>'",
                            headers={"WWW-Authenticate": "Bearer"})

    def api_write(request: Request) -> str:
        if has_bearer(request):
            return "api"
        if has_session(request):
            if same(request.headers.get(CSRF_HEADER), csrf):
                return "dashboard"
            raise HTTPException(403, "a signed-in browser must send the page's CSRF token (X-CSRF-Token)")
        raise HTTPException(401, "the API token is required: send 'Authorization: Bearer <token>'",
                            headers={"WWW-Authenticate": "Bearer"})

    def page_read(request: Request) -> None:
        if not (open_reads or has_session(request)):
            raise LoginRequired(str(request.url.path) + (f"?{request.url.query}" if request.url.query else ""))

    async def page_form(request: Request) -> dict[str, str]:
        """The posted form of a signed-in browser with a valid CSRF token, else 401/403."""
        if not has_session(request):
            raise HTTPException(401, "sign in with the API token first")
        form = await request.form()
        if not same(str(form.get(CSRF_FIELD, "")), csrf):
            raise HTTPException(403, "the form's CSRF token is missing or wrong; reload the page and try again")
        return {k: str(v) for k, v in form.items()}

    def render(request: Request, template: str, status: int = 200, /, **context: Any) -> HTMLResponse:
        flash = request.cookies.get(FLASH_COOKIE)
        kind, _, message = urllib.parse.unquote(flash or "").partition(":")
        response = templates.TemplateResponse(request, template, {
            "csrf": csrf if has_session(request) else "", "signed_in": has_session(request),
            "open_reads": open_reads, "flash": {"kind": kind, "message": message} if flash else None,
            "nav": template.split(".")[0], **context}, status_code=status)
        if flash:
            response.delete_cookie(FLASH_COOKIE)
        return response

    def redirect(url: str, message: str | None = None, kind: str = "ok") -> RedirectResponse:
        response = RedirectResponse(url, status_code=303)
        if message:
            response.set_cookie(FLASH_COOKIE, urllib.parse.quote(f"{kind}:{redact_text(message)[:400]}"),
                                httponly=True, samesite="strict", secure=secure_cookies, max_age=60)
        return response

    # ---- errors ---------------------------------------------------------------------------------------------

    def wants_json(request: Request) -> bool:
        return request.url.path.startswith("/api")

    @app.exception_handler(KatError)
    async def kat_error(request: Request, error: KatError):
        message = redact_text(str(error))
        if wants_json(request):
            return JSONResponse({"detail": message}, status_code=_status_of(error))
        return render(request, "error.html", _status_of(error), message=message)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, error: RequestValidationError):
        problems = []
        for e in error.errors():
            where = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body", "query", "path"))
            problems.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
        message = "invalid request: " + "; ".join(problems)
        if wants_json(request):
            return JSONResponse({"detail": message}, status_code=422)
        return render(request, "error.html", 422, message=message)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        if wants_json(request):
            return JSONResponse({"detail": error.detail}, status_code=error.status_code, headers=error.headers)
        if error.status_code == 401:
            return render(request, "login.html", 401, next=_safe_next(request.url.path), message=error.detail)
        return render(request, "error.html", error.status_code, message=error.detail)

    @app.exception_handler(LoginRequired)
    async def login_required(_request: Request, error: LoginRequired):
        return RedirectResponse(f"/login?next={urllib.parse.quote(_safe_next(error.next_url))}", status_code=303)

    @app.middleware("http")
    async def headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy", PAGE_CSP)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "same-origin"
        response.headers.setdefault("X-Frame-Options", "DENY")
        if not request.url.path.startswith("/static"):
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    def file_response(path: Path) -> FileResponse:
        response = FileResponse(path)
        if path.suffix.lower() in (".html", ".htm", ".svg", ".xml"):
            response.headers["Content-Security-Policy"] = ARTIFACT_CSP
        return response

    # ---- the REST API ---------------------------------------------------------------------------------------

    @app.get("/api/health")
    @app.get("/healthz", include_in_schema=False)
    def api_health() -> dict[str, Any]:
        running = state["worker"] is not None and state["worker"].is_alive()
        return {"ok": True, "worker": running, "scheduler": state["scheduler"]}

    @app.get("/api/backends", dependencies=[Depends(api_read)])
    def api_backends() -> dict[str, Any]:
        return {name: {"available": why is None, "reason": why} for name, why in svc.backends().items()}

    @app.get("/api/profiles", dependencies=[Depends(api_read)])
    def api_profiles() -> dict[str, Any]:
        return {"profiles": svc.profiles()}

    @app.get("/api/profiles/{profile}", dependencies=[Depends(api_read)])
    def api_profile(profile: str) -> dict[str, Any]:
        return {"profile": profile, "fields": svc.config_fields(profile)}

    @app.post("/api/config/check", dependencies=[Depends(api_read)])
    def api_config_check(body: ConfigCheck) -> dict[str, Any]:
        return {"ok": True, **svc.check_config(body.profile, body.overrides)}

    @app.get("/api/runs", dependencies=[Depends(api_read)])
    def api_runs(backend: Literal["local", "kubeflow"] | None = None, limit: int = Query(100, ge=1, le=1000)):
        return svc.list_runs(backend, limit)

    @app.post("/api/runs", status_code=201)
    def api_submit(body: RunRequest, who: str = Depends(api_write)) -> dict[str, Any]:
        return svc.submit_run(body.profile, body.overrides, body.backend, name=body.name, who=who)

    @app.get("/api/runs/{run_id}", dependencies=[Depends(api_read)])
    def api_run(run_id: str) -> dict[str, Any]:
        return svc.get_run(run_id)

    @app.post("/api/runs/{run_id}/cancel", dependencies=[Depends(api_write)])
    def api_cancel(run_id: str) -> dict[str, Any]:
        return svc.cancel_run(run_id)

    @app.get("/api/runs/{run_id}/stages", dependencies=[Depends(api_read)])
    def api_stages(run_id: str) -> dict[str, Any]:
        return {"run_id": run_id, "stages": svc.run_stages(run_id)}

    @app.get("/api/runs/{run_id}/log", dependencies=[Depends(api_read)])
    def api_log(run_id: str, stage: str | None = None, lines: int = 200) -> dict[str, Any]:
        return svc.run_log(run_id, stage, lines)

    @app.get("/api/runs/{run_id}/metrics", dependencies=[Depends(api_read)])
    def api_metrics(run_id: str) -> dict[str, Any]:
        return {"run_id": run_id, "stages": svc.run_metrics(run_id)}

    @app.get("/api/runs/{run_id}/report", dependencies=[Depends(api_read)])
    def api_report(run_id: str) -> dict[str, Any]:
        report = svc.run_report(run_id)
        if report is None:
            raise NotFound(f"run {run_id} has no evaluation report (yet)")
        return report

    @app.get("/api/runs/{run_id}/lineage", dependencies=[Depends(api_read)])
    def api_lineage(run_id: str) -> dict[str, Any]:
        return svc.run_lineage(run_id)

    @app.get("/api/runs/{run_id}/files/{stage}/{output}/{path:path}", dependencies=[Depends(api_read)])
    def api_file(run_id: str, stage: str, output: str, path: str):
        return file_response(svc.run_file(run_id, stage, output, path))

    @app.get("/api/models", dependencies=[Depends(api_read)])
    def api_models() -> dict[str, Any]:
        return {"models": svc.models()}

    @app.get("/api/models/{name}/versions", dependencies=[Depends(api_read)])
    def api_versions(name: str) -> dict[str, Any]:
        return {"name": name, "versions": svc.versions(name)}

    @app.get("/api/models/{name}/versions/{version}", dependencies=[Depends(api_read)])
    def api_version(name: str, version: int) -> dict[str, Any]:
        return svc.version(name, version)

    @app.get("/api/models/{name}/aliases", dependencies=[Depends(api_read)])
    def api_aliases(name: str) -> dict[str, Any]:
        return {"name": name, "aliases": svc.aliases(name)}

    @app.get("/api/models/{name}/history", dependencies=[Depends(api_read)])
    def api_history(name: str) -> dict[str, Any]:
        return {"name": name, "events": svc.history(name)}

    @app.get("/api/models/{name}/compare", dependencies=[Depends(api_read)])
    def api_compare(name: str, a: int = Query(ge=1), b: int = Query(ge=1)) -> dict[str, Any]:
        return svc.compare(name, a, b)

    @app.get("/api/models/{name}/gate", dependencies=[Depends(api_read)])
    def api_gate(name: str, version: int = Query(ge=1)) -> dict[str, Any]:
        return svc.gate_preview(name, version)

    @app.post("/api/models/{name}/promote")
    def api_promote(name: str, body: PromoteRequest, who: str = Depends(api_write)) -> dict[str, Any]:
        return svc.promote(name, body.version, body.reason, body.who or who, force=body.force)

    @app.post("/api/models/{name}/rollback")
    def api_rollback(name: str, body: RollbackRequest, who: str = Depends(api_write)) -> dict[str, Any]:
        return svc.rollback(name, body.reason, body.who or who)

    @app.get("/api/schedules", dependencies=[Depends(api_read)])
    def api_schedules() -> dict[str, Any]:
        return svc.list_schedules()

    @app.post("/api/schedules", status_code=201)
    def api_schedule_create(body: ScheduleRequest, who: str = Depends(api_write)) -> dict[str, Any]:
        return svc.create_schedule(body.cron, body.profile, body.overrides, name=body.name, backend=body.backend,
                                   only_if_data_changed=body.only_if_data_changed, who=who)

    @app.get("/api/schedules/{schedule_id}", dependencies=[Depends(api_read)])
    def api_schedule(schedule_id: str) -> dict[str, Any]:
        return svc.get_schedule(schedule_id)

    @app.post("/api/schedules/{schedule_id}/{action}", dependencies=[Depends(api_write)])
    def api_schedule_action(schedule_id: str, action: Literal["pause", "resume", "trigger"]) -> dict[str, Any]:
        return {"pause": svc.pause_schedule, "resume": svc.resume_schedule,
                "trigger": svc.trigger_schedule}[action](schedule_id)

    @app.delete("/api/schedules/{schedule_id}", dependencies=[Depends(api_write)])
    def api_schedule_delete(schedule_id: str) -> dict[str, Any]:
        svc.delete_schedule(schedule_id)
        return {"schedule_id": schedule_id, "deleted": True}

    @app.get("/api/datasets", dependencies=[Depends(api_read)])
    def api_datasets() -> dict[str, Any]:
        return {"datasets": svc.datasets()}

    # ---- pages ----------------------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    def home_page() -> RedirectResponse:
        return RedirectResponse("/runs", status_code=303)

    @app.get("/login", include_in_schema=False)
    def login_page(request: Request, next: str = "/runs"):
        return render(request, "login.html", next=_safe_next(next), message=None)

    @app.post("/login", include_in_schema=False)
    async def login(request: Request):
        form = await request.form()
        next_url = _safe_next(str(form.get("next", "/runs")))
        if not same(str(form.get("token", "")).strip(), token):
            return render(request, "login.html", 401, next=next_url, message="That is not the API token.")
        response = redirect(next_url, "Signed in.")
        response.set_cookie(SESSION_COOKIE, session, httponly=True, samesite="strict", secure=secure_cookies,
                            max_age=7 * 24 * 3600)
        return response

    @app.post("/logout", include_in_schema=False)
    async def logout(request: Request):
        await page_form(request)
        response = redirect("/login", "Signed out.")
        response.delete_cookie(SESSION_COOKIE)
        return response

    @app.get("/runs", include_in_schema=False, dependencies=[Depends(page_read)])
    def runs_page(request: Request, limit: int = 100):
        limit = max(1, min(int(limit), 1000))
        return render(request, "runs.html", **svc.list_runs(None, limit), limit=limit)

    @app.get("/runs/new", include_in_schema=False, dependencies=[Depends(page_read)])
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

    @app.post("/runs/new", include_in_schema=False)
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

    @app.get("/runs/{run_id}", include_in_schema=False, dependencies=[Depends(page_read)])
    def run_page(request: Request, run_id: str, stage: str | None = None):
        run = svc.get_run(run_id)
        log_tail = svc.run_log(run_id, stage if stage in {s["name"] for s in run["stages"]} else None, 60)
        return render(request, "run.html", run=run, log=log_tail, metrics=svc.run_metrics(run_id),
                      report=svc.run_report(run_id), lineage=svc.run_lineage(run_id))

    @app.post("/runs/{run_id}/cancel", include_in_schema=False)
    async def run_cancel(request: Request, run_id: str):
        await page_form(request)
        try:
            svc.cancel_run(run_id)
        except Conflict as e:
            return redirect(f"/runs/{run_id}", str(e), "error")
        return redirect(f"/runs/{run_id}", f"Run {run_id} cancelled.")

    @app.get("/runs/{run_id}/files/{stage}/{output}/{path:path}", include_in_schema=False,
             dependencies=[Depends(page_read)])
    def run_file_page(run_id: str, stage: str, output: str, path: str):
        return file_response(svc.run_file(run_id, stage, output, path))

    @app.get("/models", include_in_schema=False, dependencies=[Depends(page_read)])
    def models_page(request: Request, name: str | None = None):
        names = svc.model_names()
        current = name or (names[0] if names else None)
        if not current:
            return render(request, "models.html", names=[], name=None, versions=[], aliases={}, history=[])
        overview = svc.model_overview(current)
        return render(request, "models.html", names=names, name=current, versions=overview["versions"],
                      aliases=overview["aliases"], history=list(reversed(overview["history"])))

    @app.get("/models/{name}/compare", include_in_schema=False, dependencies=[Depends(page_read)])
    def compare_page(request: Request, name: str, a: int = Query(ge=1), b: int = Query(ge=1)):
        return render(request, "compare.html", name=name, c=svc.compare(name, a, b), a=a, b=b,
                      versions=svc.versions(name), aliases=svc.aliases(name))

    @app.get("/models/{name}/compare.png", include_in_schema=False, dependencies=[Depends(page_read)])
    def compare_png(name: str, a: int = Query(ge=1), b: int = Query(ge=1)):
        return FileResponse(svc.compare_plot(name, a, b), media_type="image/png")

    @app.post("/models/{name}/promote", include_in_schema=False)
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

    @app.post("/models/{name}/rollback", include_in_schema=False)
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

    @app.get("/schedules", include_in_schema=False, dependencies=[Depends(page_read)])
    def schedules_page(request: Request):
        return schedules_view(request, {}, None)

    def schedules_view(request: Request, values: dict[str, str], error: str | None, status: int = 200):
        return render(request, "schedules.html", status, **svc.list_schedules(), profiles=svc.profiles(),
                      backends=svc.backends(), values=values, error=error)

    @app.post("/schedules", include_in_schema=False)
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

    @app.post("/schedules/{schedule_id}/{action}", include_in_schema=False)
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

    @app.get("/data", include_in_schema=False, dependencies=[Depends(page_read)])
    def data_page(request: Request):
        return render(request, "data.html", datasets=svc.datasets())

    return app


def serve(host: str = "127.0.0.1", port: int = 8080, home: str | Path | None = None, *, open_reads: bool = False,
          concurrency: int = 1, access_log: bool = False, secure_cookies: bool = False) -> None:
    """Run the dashboard (and the run worker and the scheduler) until interrupted."""
    import uvicorn


    home_dir = Path(home).resolve() if home else kat_home()
    token, created = load_token(home_dir)
    if created:  # the one time the token is shown: on the terminal of whoever started the service
        print(f"kat serve: generated an API token (saved to {home_dir / TOKEN_FILE}, mode 0600; "
              f"or set {TOKEN_ENV}):\n  {token}", file=sys.stderr, flush=True)
    app = create_app(home_dir, token=token, open_reads=open_reads, concurrency=concurrency,
                     secure_cookies=secure_cookies)
    print(f"kat serve: http://{host}:{port}/  (KAT_HOME {home_dir}; reads "
          f"{'open' if open_reads else 'need the token'}; {concurrency} local run(s) at a time)",
          file=sys.stderr, flush=True)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=access_log)

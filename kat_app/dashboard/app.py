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
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from kat_app import schedules
from kat_app.dashboard import (
    charts,
    routes_auth,
    routes_data,
    routes_models,
    routes_platform,
    routes_runs,
    routes_schedules,
)
from kat_app.dashboard.web import LoginRequired, Web, safe_next
from kat_app.jobs import RunWorker
from kat_app.security import (
    TOKEN_ENV,
    TOKEN_FILE,
    load_token,
    redact_text,
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
# the largest request body taken (413 above it): the forms and JSON bodies are a few KB; FastAPI reads a
# route's body before its token check runs, so without a ceiling anyone could make the service hold any amount
MAX_BODY = 1 << 20


# ---- request bodies of the API ---------------------------------------------------------------------------


def _status_of(error: KatError) -> int:
    return 404 if isinstance(error, NotFound) else 409 if isinstance(error, Conflict) else 422 \
        if isinstance(error, Invalid) else 400


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

    app = FastAPI(title="KAT dashboard", docs_url=None, redoc_url=None, openapi_url=None,  # served below
                  lifespan=lifespan, max_body_size=MAX_BODY)
    app.state.service = svc
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.globals.update(timeline=charts.timeline, line_chart=charts.line_chart,
                                 curve_groups=charts.curve_groups, quote=urllib.parse.quote)
    templates.env.filters["num"] = lambda v, d=3: "-" if v is None else (f"{v:.{d}f}" if isinstance(v, float) else v)
    templates.env.filters["short"] = lambda v, n=12: "-" if not v else str(v)[:n]

    web = Web(svc, templates, token, open_reads=open_reads, secure_cookies=secure_cookies, state=state)
    render = web.render

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
            return render(request, "login.html", 401, next=safe_next(request.url.path), message=error.detail)
        return render(request, "error.html", error.status_code, message=error.detail)

    @app.exception_handler(LoginRequired)
    async def login_required(_request: Request, error: LoginRequired):
        return RedirectResponse(f"/login?next={urllib.parse.quote(safe_next(error.next_url))}", status_code=303)

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

    for make in (routes_platform.router, routes_runs.router, routes_models.router, routes_schedules.router,
                 routes_data.router, routes_auth.router):
        app.include_router(make(web))

    # FastAPI's own openapi_url answers anyone; the schema is read like the rest of the API
    @app.get("/api/openapi.json", include_in_schema=False, dependencies=[Depends(web.api_read)])
    def openapi_schema() -> dict[str, Any]:
        return app.openapi()

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


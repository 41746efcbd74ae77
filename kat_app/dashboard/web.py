"""Who is asking, and how a page answers: the dashboard's access checks (FastAPI dependencies, typed: a read
needs nothing back, a write names who made it) and its rendering helpers, shared by every router."""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates

from kat_app.security import (
    CSRF_FIELD,
    CSRF_HEADER,
    SESSION_COOKIE,
    csrf_token,
    redact_text,
    same,
    session_value,
)
from kat_app.service import Service

FLASH_COOKIE = "kat_flash"
# run artifacts (e.g. Great Expectations data docs) are shown in an opaque origin: their scripts cannot act
# as the signed-in user
ARTIFACT_CSP = "sandbox allow-scripts allow-popups; default-src 'self' 'unsafe-inline' data: https:"


class LoginRequired(Exception):
    def __init__(self, next_url: str):
        self.next_url = next_url


def safe_next(url: str | None) -> str:
    """Only a path on this site (no scheme, no host, no //): nowhere else to be sent after signing in."""
    if not url or not url.startswith("/") or url.startswith("//") or "\\" in url:
        return "/runs"
    return url


@dataclass
class Web:
    """One dashboard's service, token and templates; its methods are the routers' dependencies and helpers."""

    svc: Service
    templates: Jinja2Templates
    token: str
    open_reads: bool = False
    secure_cookies: bool = False
    state: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.session = session_value(self.token)
        self.csrf = csrf_token(self.token, self.session)

    def has_session(self, request: Request) -> bool:
        return same(request.cookies.get(SESSION_COOKIE), self.session)

    def has_bearer(self, request: Request) -> bool:
        scheme, _, credential = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and same(credential.strip(), self.token)

    def api_read(self, request: Request) -> None:
        if self.open_reads or self.has_bearer(request) or self.has_session(request):
            return
        raise HTTPException(401, "the API token is required: send 'Authorization: Bearer <token>'",
                            headers={"WWW-Authenticate": "Bearer"})

    def api_write(self, request: Request) -> str:
        if self.has_bearer(request):
            return "api"
        if self.has_session(request):
            if same(request.headers.get(CSRF_HEADER), self.csrf):
                return "dashboard"
            raise HTTPException(403, "a signed-in browser must send the page's CSRF token (X-CSRF-Token)")
        raise HTTPException(401, "the API token is required: send 'Authorization: Bearer <token>'",
                            headers={"WWW-Authenticate": "Bearer"})

    def page_read(self, request: Request) -> None:
        if not (self.open_reads or self.has_session(request)):
            raise LoginRequired(str(request.url.path) + (f"?{request.url.query}" if request.url.query else ""))

    async def page_form(self, request: Request) -> dict[str, str]:
        """The posted form of a signed-in browser with a valid CSRF token, else 401/403."""
        if not self.has_session(request):
            raise HTTPException(401, "sign in with the API token first")
        form = await request.form()
        if not same(str(form.get(CSRF_FIELD, "")), self.csrf):
            raise HTTPException(403, "the form's CSRF token is missing or wrong; reload the page and try again")
        return {k: str(v) for k, v in form.items()}

    def render(self, request: Request, template: str, status: int = 200, /, **context: Any) -> HTMLResponse:
        flash = request.cookies.get(FLASH_COOKIE)
        kind, _, message = urllib.parse.unquote(flash or "").partition(":")
        response = self.templates.TemplateResponse(request, template, {
            "csrf": self.csrf if self.has_session(request) else "", "signed_in": self.has_session(request),
            "open_reads": self.open_reads, "flash": {"kind": kind, "message": message} if flash else None,
            "nav": template.split(".")[0], **context}, status_code=status)
        if flash:
            response.delete_cookie(FLASH_COOKIE)
        return response

    def redirect(self, url: str, message: str | None = None, kind: str = "ok") -> RedirectResponse:
        response = RedirectResponse(url, status_code=303)
        if message:
            response.set_cookie(FLASH_COOKIE, urllib.parse.quote(f"{kind}:{redact_text(message)[:400]}"),
                                httponly=True, samesite="strict", secure=self.secure_cookies, max_age=60)
        return response

    @staticmethod
    def file_response(path: Path) -> FileResponse:
        response = FileResponse(path)
        # every file, not only *.html: browsers run .shtml, .xhtml, .svgz, ... as documents too, and under the
        # pages' policy (script-src 'self') such a file could load a script from the run's files
        response.headers["Content-Security-Policy"] = ARTIFACT_CSP
        return response


"""Signing in and out, and the front door."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse

from kat_app.dashboard.web import Web, safe_next
from kat_app.security import SESSION_COOKIE, same


def router(web: Web) -> APIRouter:
    r = APIRouter()
    render = web.render
    redirect = web.redirect
    page_form = web.page_form
    token, session, secure_cookies = web.token, web.session, web.secure_cookies

    @r.get("/", include_in_schema=False)
    def home_page() -> RedirectResponse:
        return RedirectResponse("/runs", status_code=303)

    @r.get("/login", include_in_schema=False)
    def login_page(request: Request, next: str = "/runs"):
        return render(request, "login.html", next=safe_next(next), message=None)

    @r.post("/login", include_in_schema=False)
    async def login(request: Request):
        form = await request.form()
        next_url = safe_next(str(form.get("next", "/runs")))
        if not same(str(form.get("token", "")).strip(), token):
            return render(request, "login.html", 401, next=next_url, message="That is not the API token.")
        response = redirect(next_url, "Signed in.")
        response.set_cookie(SESSION_COOKIE, session, httponly=True, samesite="strict", secure=secure_cookies,
                            max_age=7 * 24 * 3600)
        return response

    @r.post("/logout", include_in_schema=False)
    async def logout(request: Request):
        await page_form(request)
        response = redirect("/login", "Signed out.")
        response.delete_cookie(SESSION_COOKIE)
        return response

    return r

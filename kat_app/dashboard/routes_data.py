"""Datasets: the synthesized datasets and their validation (API and page)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from kat_app.dashboard.web import Web


def router(web: Web) -> APIRouter:
    r = APIRouter()
    svc = web.svc
    render = web.render
    api_read = web.api_read
    page_read = web.page_read

    @r.get("/api/datasets", dependencies=[Depends(api_read)])
    def api_datasets() -> dict[str, Any]:
        return {"datasets": svc.datasets()}

    @r.get("/data", include_in_schema=False, dependencies=[Depends(page_read)])
    def data_page(request: Request):
        return render(request, "data.html", datasets=svc.datasets())

    return r

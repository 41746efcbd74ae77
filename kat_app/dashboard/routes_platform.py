"""The platform's own answers: health, back ends, profiles and config checks."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from kat_app.dashboard.bodies import ConfigCheck
from kat_app.dashboard.web import Web


def router(web: Web) -> APIRouter:
    r = APIRouter()
    svc = web.svc
    api_read = web.api_read
    state = web.state

    @r.get("/api/health")
    @r.get("/healthz", include_in_schema=False)
    def api_health() -> dict[str, Any]:
        running = state["worker"] is not None and state["worker"].is_alive()
        return {"ok": True, "worker": running, "scheduler": state["scheduler"]}

    @r.get("/api/backends", dependencies=[Depends(api_read)])
    def api_backends() -> dict[str, Any]:
        return {name: {"available": why is None, "reason": why} for name, why in svc.backends().items()}

    @r.get("/api/profiles", dependencies=[Depends(api_read)])
    def api_profiles() -> dict[str, Any]:
        return {"profiles": svc.profiles()}

    @r.get("/api/profiles/{profile}", dependencies=[Depends(api_read)])
    def api_profile(profile: str) -> dict[str, Any]:
        return {"profile": profile, "fields": svc.config_fields(profile)}

    @r.post("/api/config/check", dependencies=[Depends(api_read)])
    def api_config_check(body: ConfigCheck) -> dict[str, Any]:
        return {"ok": True, **svc.check_config(body.profile, body.overrides)}

    return r

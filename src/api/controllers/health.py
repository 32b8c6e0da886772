"""Liveness and readiness."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Response, get
from litestar.datastructures import State

from api.services import Services


class HealthController(Controller):
    path = "/"
    tags = ["operations"]

    @get("/health", summary="Liveness: the process answers", exclude_from_auth=True)
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @get(
        "/ready",
        sync_to_thread=True,
        summary="Readiness: store reachable, projections caught up",
        exclude_from_auth=True,
    )
    def ready(self, state: State) -> Response[dict[str, Any]]:
        services: Services = state.services
        checks: dict[str, Any] = {}
        ok = True
        try:
            checks.update(services.ready_check())
        except Exception as e:  # readiness reports, it does not raise
            checks["store"] = f"unreachable: {type(e).__name__}"
            ok = False
        projections = services.waiter.status()
        checks["projections"] = projections
        if not projections.get("caught_up", False):
            ok = False
        return Response({"status": "ready" if ok else "not ready", "checks": checks}, status_code=200 if ok else 503)

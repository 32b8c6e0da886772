"""The Litestar application factory."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
from litestar import Litestar, Router
from litestar.datastructures import State
from litestar.di import Provide
from litestar.middleware import DefineMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import ScalarRenderPlugin, SwaggerRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme

from api.auth import PUBLIC_PATHS, TokenAuthentication
from api.controllers.common import provide_actor, provide_services
from api.controllers.connections import ConnectionController, OAuthCallbackController
from api.controllers.health import HealthController
from api.controllers.identity import AuthController, TeamController, UserController
from api.controllers.integrations import IntegrationController
from api.controllers.proxy import ProxyController
from api.controllers.sharing import SharingController
from api.errors import EXCEPTION_HANDLERS
from api.guards import check_input
from api.proxy_endpoint import proxy_route
from api.proxy_endpoint import serve as serve_proxy
from api.services import Services

log = logging.getLogger("integrations.api")


class ServiceApp(Litestar):
    """Litestar, with the request proxy's front door: a proxied request (``api.proxy_endpoint.
    proxy_route``) is served without Litestar's router, middleware stack and handler layer, which
    were the largest per-call costs left on the proxy's path after the upstream call (ADR 0013
    §11). Everything else goes through Litestar as usual."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            route = proxy_route(scope)
            if route is not None:
                scope["app"] = scope["litestar_app"] = self
                scope.setdefault("state", {})
                await serve_proxy(self, route[0], route[1], scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def create_app(services: Services) -> Litestar:
    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        services.loop = asyncio.get_running_loop()
        await anyio.to_thread.run_sync(services.on_start)
        if services.freeze_heap_after_start:
            # What startup loaded (modules, routes, caches) lives as long as the process: frozen,
            # it is no longer walked by every full collection. Measured in a proxy worker under
            # load: full collections paused the loop 53-76 ms each, 1-3 ms once frozen, and the
            # c=64 p99 fell from 61-77 ms to 34-44 ms (docs/benchmarks.md). Not for apps that
            # come and go in one process (tests): what is frozen is never collected.
            gc.collect()
            gc.freeze()
        tasks = [asyncio.create_task(job(), name=getattr(job, "__name__", "background")) for job in services.background]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if services.connections is not None:
                await services.connections.aclose()
            if services.upstream is not None:
                await services.upstream.aclose()
            await anyio.to_thread.run_sync(services.on_stop)

    openapi = OpenAPIConfig(
        title="Informer Integrations API",
        version="1.0.0",
        description="Integrations, sharing, connections and an authenticated request proxy (event-sourced).",
        path="/schema",
        render_plugins=[ScalarRenderPlugin(), SwaggerRenderPlugin(path="/swagger")],
        components=Components(
            security_schemes={
                "bearer": SecurityScheme(
                    type="http", scheme="bearer", description="An API token from POST /api/users/{id}/tokens"
                ),
                "session": SecurityScheme(type="apiKey", name="integrations_session", security_scheme_in="cookie"),
            }
        ),
        security=[{"bearer": []}, {"session": []}],
    )
    api = Router(
        path="/",
        route_handlers=[
            IntegrationController,
            SharingController,
            ConnectionController,
            OAuthCallbackController,
            ProxyController,
            UserController,
            TeamController,
            AuthController,
        ],
        dependencies={
            "services": Provide(provide_services, sync_to_thread=False),
            "actor": Provide(provide_actor, sync_to_thread=False),
        },
    )
    return ServiceApp(
        route_handlers=[api, HealthController],
        lifespan=[lifespan],
        state=State({"services": services}),
        middleware=[DefineMiddleware(TokenAuthentication, exclude=[f"^{p}" for p in PUBLIC_PATHS])],
        before_request=check_input,
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        openapi_config=openapi,
        request_max_body_size=services.config.max_body_bytes,
        debug=False,
    )

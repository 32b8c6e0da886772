"""The request proxy's two ways in (Informer contract §3.7): ``POST /request`` and ``/proxy/{path}``.

``/request`` takes an axios-style JSON body; ``/proxy/...`` is a streaming pass-through. Both
routes are declared here, for routing, the OpenAPI document, authentication and the error
handlers. Each is answered by its :class:`api.proxy_endpoint.ProxyEndpoint` route middleware at
the ASGI level, so the handler functions below are never called (ADR 0013).
"""

from __future__ import annotations

from litestar import Controller, Response, post, route
from litestar.enums import HttpMethod
from litestar.middleware import DefineMiddleware
from litestar.params import FromPath, JSONBody

from api.proxy_endpoint import ProxyEndpoint, ProxyRequestBody


def _served_by_endpoint() -> AssertionError:
    return AssertionError("answered by the ProxyEndpoint route middleware")


class ProxyController(Controller):
    path = "/api/integrations/{ident:str}"
    tags = ["proxy"]

    @post(
        "/request",
        summary="Call the integration's API with its credentials (Informer contract)",
        description="The upstream's status, filtered headers and body come back as the response itself.",
        middleware=[DefineMiddleware(ProxyEndpoint, kind="request")],
    )
    async def request_call(self, ident: FromPath[str], data: JSONBody[ProxyRequestBody]) -> Response[bytes]:
        raise _served_by_endpoint()

    @route(
        "/proxy/{path:path}",
        http_method=[
            HttpMethod.GET,
            HttpMethod.HEAD,
            HttpMethod.POST,
            HttpMethod.PUT,
            HttpMethod.PATCH,
            HttpMethod.DELETE,
            # Taken only to be refused (PX-2): otherwise Litestar answers OPTIONS itself (204 +
            # Allow) and TRACE with a 405. Other unknown methods: see ``api.errors``.
            HttpMethod.OPTIONS,
            HttpMethod.TRACE,
        ],
        summary="Streaming pass-through to the integration's API",
        description=(
            "GET, HEAD, POST, PUT, PATCH and DELETE are forwarded. OPTIONS (a CORS preflight is never "
            "forwarded with the integration's credentials), TRACE and any other method answer 400 "
            "`method_not_allowed` and nothing is sent upstream."
        ),
        request_max_body_size=None,  # streamed: constant memory whatever the size
        opt={"streamed_body": True},  # not read by the input check (api.guards)
        middleware=[DefineMiddleware(ProxyEndpoint, kind="pass_through")],
    )
    async def pass_through(self, ident: FromPath[str], path: FromPath[str]) -> Response[bytes]:
        raise _served_by_endpoint()

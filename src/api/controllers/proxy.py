"""The request proxy's two ways in (Informer contract §3.7): ``POST /request`` and ``/proxy/{path}``.

``/request`` takes an axios-style JSON body; ``/proxy/...`` is a streaming pass-through. Both
routes are declared here for the OpenAPI document only: the application's front door
(``api.app.ServiceApp``) serves every request to them through :mod:`api.proxy_endpoint` before
Litestar's router sees it, so the handler functions below are never called (ADR 0013 §11).
"""

from __future__ import annotations

from litestar import Controller, Response, post, route
from litestar.enums import HttpMethod
from litestar.params import FromPath, JSONBody

from api.proxy_endpoint import ProxyRequestBody


def _served_by_endpoint() -> AssertionError:
    return AssertionError("answered by the proxy's front door (api.app.ServiceApp)")


class ProxyController(Controller):
    path = "/api/integrations/{ident:str}"
    tags = ["proxy"]

    @post(
        "/request",
        summary="Call the integration's API with its credentials (Informer contract)",
        description="The upstream's status, filtered headers and body come back as the response itself.",
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
            # Refused with a 400 by the front door (PX-2), as is any other method.
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
    )
    async def pass_through(self, ident: FromPath[str], path: FromPath[str]) -> Response[bytes]:
        raise _served_by_endpoint()

"""The request proxy's two ways in (Informer contract §3.7): ``POST /request`` and ``/proxy/{path}``.

``/request`` takes an axios-style JSON body; ``/proxy/...`` is a streaming pass-through whose
path and query come from the *raw* request target (``raw_path``): the decoded path Litestar
routes on has already turned ``%2e%2e`` into ``..`` and ``%2F`` into ``/``, and the upstream must
see exactly what the confinement rules checked.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, post, route
from litestar.enums import HttpMethod
from litestar.params import FromPath, JSONBody
from litestar.response import Stream
from msgspec import Meta

from api import proxy
from api.services import Services
from domain.access import Actor
from domain.errors import ValidationFailed, field_error
from domain.paths import PathRejected

ParamValue = str | int | float | bool | None | list[str | int | float | bool | None]


class ProxyRequestBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``POST /api/integrations/{id}/request`` (axios-style)."""

    url: Annotated[str, Meta(max_length=8192)] = ""
    method: Annotated[str, Meta(max_length=16)] = "GET"
    params: Annotated[dict[str, ParamValue], Meta(max_length=200)] | None = None
    data: Any = None
    headers: Annotated[dict[str, str], Meta(max_length=100)] | None = None


def _encode_data(data: Any, headers: dict[str, str]) -> bytes | None:
    """axios' rules: a string goes as is, anything else as JSON, or form-encoded when the caller's
    Content-Type says so."""
    if data is None:
        return None
    content_type = next((v for k, v in headers.items() if k.lower() == "content-type"), None)
    if isinstance(data, str):
        if content_type is None:
            headers["Content-Type"] = "text/plain; charset=utf-8"
        return data.encode()
    if content_type and content_type.split(";")[0].strip().lower() == "application/x-www-form-urlencoded":
        if not isinstance(data, dict):
            raise ValidationFailed("A form-encoded body must be an object.", [field_error("data", "not an object")])
        import httpx

        return str(httpx.QueryParams({k: "" if v is None else str(v) for k, v in data.items()})).encode()
    if content_type is None:
        headers["Content-Type"] = "application/json"
    return msgspec.json.encode(data)


def _raw_proxy_target(request: Request[Any, Any, Any]) -> str:
    """The part of the raw request target after ``/proxy/`` (+ ``?query``), undecoded."""
    raw = request.scope.get("raw_path") or request.scope["path"].encode()
    text = raw.decode("latin-1") if isinstance(raw, bytes | bytearray) else str(raw)
    text = text.partition("?")[0]  # some servers (httpx's ASGI transport) leave the query in raw_path
    parts = text.split("/", 4)  # "", "api", "integrations", <ident>, "proxy/<rest>"
    if len(parts) < 5 or not (parts[4] == "proxy" or parts[4].startswith("proxy/")):
        raise PathRejected("the request path is malformed")
    rest = parts[4][len("proxy/") :] if parts[4].startswith("proxy/") else ""
    query = request.scope.get("query_string") or b""
    if query:
        rest += "?" + query.decode("latin-1")
    return rest


async def _read_all(request: Request[Any, Any, Any]) -> bytes:
    chunks = [chunk async for chunk in request.stream()]
    return b"".join(chunks)


def _streamed_body(request: Request[Any, Any, Any]) -> AsyncIterator[bytes]:
    async def body() -> AsyncIterator[bytes]:
        async for chunk in request.stream():
            if chunk:
                yield chunk

    return body()


class ProxyController(Controller):
    path = "/api/integrations/{ident:str}"
    tags = ["proxy"]

    # Both handlers take the services and the actor from the request instead of the app's
    # ``services``/``actor`` dependencies: with two dependencies Litestar resolves them in an anyio
    # task group (two tasks) on every request, a measurable share of a proxied call (benchmarks).

    @post("/request", summary="Call the integration's API with its credentials (Informer contract)")
    async def request_call(
        self,
        request: Request[Actor, Any, Any],
        ident: FromPath[str],
        data: JSONBody[ProxyRequestBody],
    ) -> Response[bytes] | Stream:
        services: Services = request.app.state.services
        actor = request.user
        headers = dict(data.headers or {})
        for name, value in headers.items():
            proxy.check_caller_header(name, value)
        content = _encode_data(data.data, headers)
        call = proxy.Call(
            ident=ident,
            method=data.method,
            relative=data.url,
            params=data.params,
            headers=headers.items(),
            body=proxy.Body(content, len(content) if content is not None else None),
        )
        return await proxy.forward(services, actor, call)

    @route(
        "/proxy/{path:path}",
        http_method=[
            HttpMethod.GET,
            HttpMethod.HEAD,
            HttpMethod.POST,
            HttpMethod.PUT,
            HttpMethod.PATCH,
            HttpMethod.DELETE,
        ],
        summary="Streaming pass-through to the integration's API",
        request_max_body_size=None,  # streamed: constant memory whatever the size
        opt={"streamed_body": True},  # not read by the input check (api.guards)
    )
    async def pass_through(
        self,
        request: Request[Actor, Any, Any],
        ident: FromPath[str],
        path: FromPath[str],
    ) -> Response[bytes] | Stream:
        services: Services = request.app.state.services
        actor = request.user
        relative = _raw_proxy_target(request)
        length_header = request.headers.get("content-length")
        chunked = "chunked" in request.headers.get("transfer-encoding", "").lower()
        length = int(length_header) if length_header and length_header.isdigit() else None
        if length is None and not chunked:
            body = proxy.Body(None)
        elif length is not None and length <= services.proxy.replay_buffer_bytes:
            content = await _read_all(request)  # small: buffered, so a 401 can be replayed
            body = proxy.Body(content, len(content))
        else:
            body = proxy.Body(_streamed_body(request), length)
        call = proxy.Call(
            ident=ident,
            method=request.method,
            relative=relative,
            params=None,
            headers=request.headers.items(),
            body=body,
        )
        return await proxy.forward(services, actor, call)

"""The proxy's two routes, served at the ASGI level before Litestar's router (ADR 0013 §11).

The routes are declared as ordinary Litestar handlers in ``api.controllers.proxy`` (so the
OpenAPI document shows them), but the application's front door (``api.app.ServiceApp``) hands
every request that :func:`proxy_route` recognises to :func:`serve`, and the handler functions are
never called. That skips Litestar's router, its middleware stack and what it does per request
between middleware and a handler (the request object, the signature model and its kwargs, the
response object and its conversion to ASGI messages), which together were the largest share of a
proxied call's CPU after the upstream call itself (``bench/proxy.py``).

What the skipped layers did and the proxy needs is done here, from the same functions: the
caller's authentication (:func:`api.auth.authenticate`, as the authentication middleware calls
it), the ``before_request`` input checks (:func:`api.guards.check_raw`, the body checks), the body
size limit (413) and the JSON decoding of ``POST /request`` (400 with details, as Litestar's own
decoding answers). Errors raised before the answer starts are rendered by the error handlers of
:mod:`api.errors` (:func:`api.errors.error_response`), exactly as for any handler.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any

import msgspec
from litestar import Litestar, Request
from litestar.connection import ASGIConnection
from litestar.exceptions import ValidationException
from litestar.response import Stream
from litestar.types import Receive, Scope, Send
from litestar.utils import normalize_path
from msgspec import Meta

from api import proxy
from api.auth import authenticate
from api.errors import ApiError, error_response
from api.guards import MAX_JSON_DEPTH, check_depth, check_nul, check_raw, too_deep
from api.services import Services
from domain.errors import ValidationFailed, field_error
from domain.paths import PathRejected

ParamValue = str | int | float | bool | None | list[str | int | float | bool | None]
DEFAULT_MEDIA_TYPE = "application/octet-stream"


class ProxyRequestBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``POST /api/integrations/{id}/request`` (axios-style)."""

    url: Annotated[str, Meta(max_length=8192)] = ""
    method: Annotated[str, Meta(max_length=16)] = "GET"
    params: Annotated[dict[str, ParamValue], Meta(max_length=200)] | None = None
    data: Any = None
    headers: Annotated[dict[str, str], Meta(max_length=100)] | None = None


def encode_data(data: Any, headers: dict[str, str]) -> bytes | None:
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


class AnswerCut(Exception):
    """The upstream's answer could not be relayed to its end once it had started (deadline, size
    cap, network): raised to the ASGI server, which cuts the caller's connection."""


class ClientDisconnected(Exception):
    """The caller went away while its request body was being read."""


async def _read_body(receive: Receive, limit: int | None) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if limit is not None and size > limit:
                raise ApiError(413, "The request body is too large.")
            chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks) if len(chunks) != 1 else chunks[0]


class _StreamedBody:
    """The request body as a one-shot async iterator (constant memory), and whether it ended."""

    def __init__(self, receive: Receive) -> None:
        self.receive = receive
        self.done = False
        self.ended = asyncio.Event()  # set with ``done``: ``receive`` is free for someone else

    async def chunks(self) -> AsyncIterator[bytes]:
        while not self.done:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected
            self.done = not message.get("more_body", False)
            if self.done:
                self.ended.set()
            chunk = message.get("body", b"")
            if chunk:
                yield chunk


def raw_proxy_target(scope: Scope) -> str:
    """The part of the raw request target after ``/proxy/`` (+ ``?query``), undecoded: the decoded
    path Litestar routes on has already turned ``%2e%2e`` into ``..`` and ``%2F`` into ``/``, and
    the upstream must see exactly what the confinement rules checked."""
    raw = scope.get("raw_path") or scope["path"].encode()
    text = raw.decode("latin-1") if isinstance(raw, bytes | bytearray) else str(raw)
    text = text.partition("?")[0]  # some servers (httpx's ASGI transport) leave the query in raw_path
    root = scope.get("root_path") or ""
    if root and text.startswith(root):  # served under a prefix: the path after it
        text = text[len(root) :]
    parts = text.split("/", 4)  # "", "api", "integrations", <ident>, "proxy/<rest>"
    if len(parts) < 5 or not (parts[4] == "proxy" or parts[4].startswith("proxy/")):
        raise PathRejected("the request path is malformed")
    rest = parts[4][len("proxy/") :] if parts[4].startswith("proxy/") else ""
    query = scope.get("query_string") or b""
    if query:
        rest += "?" + query.decode("latin-1")
    return rest


def _headers(scope: Scope) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]


_ROUTE = re.compile(r"/api/integrations/([^/]+)/(?:(request)|proxy(?:/.*)?)", re.DOTALL)


def proxy_route(scope: Scope) -> tuple[str, str] | None:
    """``(kind, ident)`` when the request is one of the proxy's (``"request"`` for ``POST
    .../request``, ``"pass_through"`` for every method under ``.../proxy``), else ``None``: the
    same requests Litestar's router sends to the two routes of ``api.controllers.proxy``, plus the
    methods it would refuse under ``/proxy`` with a 405 (they get the proxy's 400, PX-2)."""
    path: str = scope["path"]
    if root := scope.get("root_path"):  # served under a prefix: routed on the rest, as Litestar does
        path = path.split(root, maxsplit=1)[-1]
    if "//" in path or path.endswith("/"):
        # Litestar routes on the path with repeated slashes collapsed and the trailing ones
        # stripped (``litestar.utils.normalize_path``): ``.../x//request/`` reaches ``/request``.
        path = normalize_path(path)
    if not path.startswith("/api/integrations/"):
        return None
    match = _ROUTE.fullmatch(path)
    if match is None:
        return None
    if match.group(2) is None:
        return "pass_through", match.group(1)
    return ("request", match.group(1)) if scope["method"] == "POST" else None


async def serve(app: Litestar, kind: str, ident: str, scope: Scope, receive: Receive, send: Send) -> None:
    """One proxied request, from the caller's credentials to the last byte of the answer (see the
    module docstring); any error before the answer starts leaves through the error handlers."""
    started = False

    async def send_tracked(message: Any) -> None:
        nonlocal started
        started = True
        await send(message)

    services: Services = app.state.services
    try:
        if kind == "pass_through" and scope["method"] not in proxy.METHODS:
            # Refused before anything else, credentials included: a browser's CORS preflight
            # (OPTIONS) carries none, and the answer reveals nothing about the integration.
            raise proxy.method_refused(scope["method"])
        scope["user"], scope["auth"] = await authenticate(services, ASGIConnection(scope, receive, send))
        check_raw(scope)
        await _serve(services, kind, ident, scope, receive, send_tracked)
    except Exception as exc:
        if started:  # the answer is under way: the server cuts the connection, never a half answer
            raise AnswerCut("the answer was cut after it started") from exc
        if isinstance(exc, TimeoutError):  # the deadline, before anything went out
            exc = ApiError(504, "The upstream did not answer in time.", code="upstream_timeout")
        request: Request[Any, Any, Any] = Request(scope, receive, send)
        response = error_response(request, exc)
        await response.to_asgi_response(app=None, request=request)(scope, receive, send)


async def _serve(services: Services, kind: str, ident: str, scope: Scope, receive: Receive, send: Send) -> None:
    body: _StreamedBody | None = None
    try:
        if kind == "request":
            call = await _request_call(services, scope, receive, ident)
        else:
            call, body = await _pass_through_call(services, scope, receive, ident)
        answer = await proxy.forward(services, scope["user"], call)
    except ClientDisconnected:
        return  # nobody to answer
    if answer.stream is None and answer.content is None:
        await _send_headers_only(answer, scope["method"] == "HEAD", send)
    elif answer.stream is None:
        await _send_whole(answer, send)
    else:
        try:
            # The overall deadline bounds the whole relay, sending to the caller included: a caller
            # that reads slowly must not hold the slots and the upstream connection past it.
            async with asyncio.timeout_at(answer.deadline):
                await _send_stream(answer, body, scope, receive, send)
        finally:
            if answer.close is not None:
                answer.close()  # also when the relay never started (its head could not be sent)


async def _send_stream(
    answer: proxy.Answer, body: _StreamedBody | None, scope: Scope, receive: Receive, send: Send
) -> None:
    if body is not None and not body.done:
        await _send_stream_plain(answer, body, receive, send)
        return
    # Litestar's streaming response, which also stops relaying when the caller goes away.
    stream = Stream(answer.stream, status_code=answer.status, headers=answer.headers, media_type=_media_type(answer))
    request: Request[Any, Any, Any] = Request(scope, receive, send)
    asgi = stream.to_asgi_response(app=None, request=request, is_head_response=scope["method"] == "HEAD")
    await asgi(scope, receive, send)


async def _request_call(services: Services, scope: Scope, receive: Receive, ident: str) -> proxy.Call:
    raw = await _read_body(receive, services.config.max_body_bytes)
    check_nul(raw)
    try:
        data = msgspec.json.decode(raw, type=ProxyRequestBody)
    except msgspec.ValidationError as e:
        raise ValidationException(detail=str(e)[:300], extra=[{"message": str(e)[:300], "key": "body"}]) from None
    except msgspec.DecodeError:
        raise ValidationException(detail="The request body is not valid JSON.") from None
    except RecursionError:
        raise too_deep() from None
    if data.data is not None:
        check_depth(data.data, MAX_JSON_DEPTH - 1)  # the rest of the body is flat by its type
    headers = dict(data.headers or {})
    for name, value in headers.items():
        proxy.check_caller_header(name, value)
    content = encode_data(data.data, headers)
    return proxy.Call(
        ident=ident,
        method=data.method,
        relative=data.url,
        params=data.params,
        headers=headers.items(),
        body=proxy.Body(content, len(content) if content is not None else None),
    )


async def _pass_through_call(
    services: Services, scope: Scope, receive: Receive, ident: str
) -> tuple[proxy.Call, _StreamedBody | None]:
    method = scope["method"]
    relative = raw_proxy_target(scope)
    headers = _headers(scope)
    length: int | None = None
    chunked = False
    for name, value in headers:
        lower = name.lower()
        if lower == "content-length":
            length = int(value) if value.isdigit() else None
        elif lower == "transfer-encoding":
            chunked = "chunked" in value.lower()
    streamed: _StreamedBody | None = None
    if length is None and not chunked:
        body = proxy.Body(None)
    elif length is not None and length <= services.proxy.replay_buffer_bytes:
        content = await _read_body(receive, None)  # small: buffered, so a 401 can be replayed
        body = proxy.Body(content, len(content))
    else:
        streamed = _StreamedBody(receive)
        body = proxy.Body(streamed.chunks(), length)
    return proxy.Call(ident=ident, method=method, relative=relative, params=None, headers=headers, body=body), streamed


def _media_type(answer: proxy.Answer) -> str:
    return answer.headers.get("content-type") or DEFAULT_MEDIA_TYPE


def _encoded(answer: proxy.Answer) -> list[tuple[bytes, bytes]]:
    out = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in answer.headers.items()]
    if "content-type" not in answer.headers:
        out.append((b"content-type", DEFAULT_MEDIA_TYPE.encode()))
    return out


async def _send_whole(answer: proxy.Answer, send: Send) -> None:
    content = answer.content or b""
    headers = _encoded(answer)
    headers.append((b"content-length", str(len(content)).encode()))
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    await send({"type": "http.response.body", "body": content, "more_body": False})


async def _send_headers_only(answer: proxy.Answer, head_request: bool, send: Send) -> None:
    """No body (HEAD, 204, 304): the upstream's headers as they are. Its Content-Length (the size
    of a body it did not send) only in the answer to a caller's own HEAD: after a 204 or 304, or
    when ``POST /request`` asked for a HEAD, it would promise bytes that never come."""
    keep_length = head_request and answer.status not in (204, 304)
    headers = [
        (k.encode("latin-1"), v.encode("latin-1"))
        for k, v in answer.headers.items()
        if keep_length or k != "content-length"
    ]
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _send_stream_plain(answer: proxy.Answer, body: _StreamedBody, receive: Receive, send: Send) -> None:
    """The relay of an answer that came while the upload still owns ``receive``. Once the upload
    has ended, a watcher takes ``receive`` over and ends the relay when the caller goes away (the
    ASGI server drops what is sent to a gone caller without a word). A caller gone during the
    upload ends it too. Either way nothing is left to answer, and nothing is logged."""
    iterator = answer.stream
    assert iterator is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        await body.ended.wait()  # the upload owns ``receive`` until it has ended
        while (await receive())["type"] != "http.disconnect":
            pass
        gone = True
        if answer.close is not None:
            answer.close()  # the relay's next read fails at once

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        await send({"type": "http.response.start", "status": answer.status, "headers": _encoded(answer)})
        async for chunk in iterator:
            if gone:
                return
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    except Exception as exc:
        if gone or isinstance(exc, ClientDisconnected):
            return
        raise
    finally:
        watcher.cancel()
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()

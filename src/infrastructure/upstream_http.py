"""The request proxy's outbound HTTP/1.1 client: a keep-alive pool of asyncio protocols, responses
parsed by llhttp (``httptools``, the parser uvicorn serves with), under the egress policy.

Why our own (ADR 0015): the proxy's hot path is one small request and one small answer per call,
and a general client's machinery was the largest share of a proxied call's CPU after the server
itself (aiohttp's request path was about 75 µs of 400 per call at concurrency 64, ``bench/proxy.py
--profile``). This client does only what the proxy needs: one head written with the body in one
``write``, the answer's head parsed in C, the connection back in the pool the moment the answer is
complete. What it does *not* do is as deliberate: no redirects, no cookies, no decompression, no
environment proxies, no HTTP/2, no pipelining.

The egress rules are those of :mod:`infrastructure.egress`: an IP literal is checked before each
request (non-canonical forms connect to the address they denote, when it is allowed), a name is
resolved once per new connection, every answer checked, and the connection made to a checked
address (TLS SNI and certificate checks still use the name). Errors are the ``httpx`` exceptions
the proxy already answers: ``ConnectError``/``ConnectTimeout`` (502), ``ReadError``/
``WriteError``/``RemoteProtocolError`` (502, or a cut stream once the body is flowing),
``UnsupportedProtocol`` (400-class: not an http(s) URL); :class:`~infrastructure.egress.
EgressDenied` passes through. An error of the caller's own upload body (the caller went away)
surfaces as that error.

Connection reuse is safe by construction: a connection goes back to the pool only when the answer
was complete, the request (body included) fully written, both sides said keep-alive and no stray
byte followed the answer. A pooled connection the server closed while idle is dropped when its
close arrives; if the server closes one just as a request is written to it (the keep-alive race),
the request is sent once more on a new connection when nothing of an answer arrived, the body can
be sent again and the method is idempotent (or the request carries an ``Idempotency-Key``), the
rule of Go's ``net/http``.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import AsyncIterator, Mapping
from importlib import metadata
from typing import Any

import httptools
import httpx
import yarl

from infrastructure.egress import DEFAULT_LIMITS, EgressPolicy, Resolver, resolve_name, ssl_context, system_resolver

HIGH_WATER = 256 * 1024  # buffered answer bytes above which reading from the upstream pauses
LOW_WATER = 64 * 1024
DNS_TTL = 10.0  # seconds a checked answer is reused for new connections to the same name
IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})  # sent with Content-Length: 0 when bodiless


def _user_agent() -> str:
    try:
        return f"informer-integrations/{metadata.version('informer-integrations')}"
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare source tree
        return "informer-integrations"


USER_AGENT = _user_agent()


class UpstreamHeaders:
    """An answer's headers, in order, names as sent: ``get`` (case-insensitive, the first value)
    and ``items()`` (every pair)."""

    __slots__ = ("_items", "_lower")

    def __init__(self) -> None:
        self._items: list[tuple[str, str]] = []
        self._lower: list[str] = []

    def _add(self, name: str, value: str) -> None:
        self._items.append((name, value))
        self._lower.append(name.lower())

    def get(self, name: str, default: str | None = None) -> str | None:
        name = name.lower()
        for i, lower in enumerate(self._lower):
            if lower == name:
                return self._items[i][1]
        return default

    def items(self) -> list[tuple[str, str]]:
        return list(self._items)

    def __repr__(self) -> str:  # names only: values may be secrets of the upstream's
        return f"UpstreamHeaders({[name for name, _ in self._items]!r})"


class UpstreamResponse:
    """One answer, its body arriving: ``status_code``, ``headers``, the raw body (transfer coding
    removed, content coding kept) through ``aread``/``aiter_raw``, and ``aclose``. The body is
    buffered up to :data:`HIGH_WATER` bytes ahead of the reader; past that the upstream waits."""

    __slots__ = ("_buffered", "_chunks", "_conn", "_done", "_error", "_paused", "_waiter", "headers", "status_code")

    def __init__(self, conn: _Connection, status: int, headers: UpstreamHeaders) -> None:
        self._conn: _Connection | None = conn
        self.status_code = status
        self.headers = headers
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._done = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False

    # -- fed by the connection ------------------------------------------------------------------

    def _feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        if self._buffered > HIGH_WATER and not self._paused and self._conn is not None:
            self._paused = True
            self._conn.pause_reading()
        self._wake()

    def _finish(self) -> None:
        self._done = True
        self._unpause()
        self._conn = None  # the connection may serve another request from now on
        self._wake()

    def _fail(self, error: BaseException) -> None:
        if not self._done:
            self._error = error
            self._done = True
            self._conn = None
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _unpause(self) -> None:
        if self._paused:
            self._paused = False
            if self._conn is not None:
                self._conn.resume_reading()

    def _take(self) -> bytes:
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        if self._paused and self._buffered < LOW_WATER:
            self._unpause()
        return chunk

    async def _wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    # -- read by the proxy ----------------------------------------------------------------------

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        while True:
            if self._chunks:
                yield self._take()
            elif self._error is not None:
                raise self._error
            elif self._done:
                return
            else:
                await self._wait()

    async def aread(self) -> bytes:
        while not self._done:
            await self._wait()
        if self._error is not None:
            raise self._error
        chunks, self._chunks, self._buffered = self._chunks, collections.deque(), 0
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def aclose(self) -> None:
        """Done with this answer. Unread to its end, the connection cannot carry another request
        and is closed."""
        self.abandon()

    def abandon(self) -> None:
        """:meth:`aclose`, callable from synchronous code."""
        if not self._done:
            conn = self._conn
            self._fail(httpx.ReadError("the answer was closed before its end"))
            if conn is not None:
                conn.abort()
        self._chunks.clear()


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: at most one request at a time."""

    def __init__(self, pool: GuardedUpstream, key: tuple[str, str, int]) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._eof = False
        self.reused = False  # served a request before the current one
        self.idle_since = 0.0
        # the current exchange
        self._parser: Any = None
        self._head_waiter: asyncio.Future[UpstreamResponse] | None = None
        self._headers = UpstreamHeaders()
        self._response: UpstreamResponse | None = None
        self._head_only = False  # a HEAD: the answer ends with its headers
        self._until_close = False  # no length, not chunked: the body ends when the connection does
        self._interim = False  # a 1xx answer is being parsed
        self._head_bytes = 0
        self._fields_bytes = 0
        self.received = False  # any byte of an answer arrived
        self._complete = True  # the answer ended
        self._keep_alive = False
        self._uploaded = True  # the request (body included) is fully written
        self._upload: asyncio.Task[None] | None = None
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None

    # -- asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._complete or self._parser is None:  # a byte nobody asked for: never reuse this one
            self.abort()
            return
        self.received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._protocol_error("the upstream switched protocols")
            return
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__ or e.__cause__
            if isinstance(cause, httpx.HTTPError):
                self._protocol_error(str(cause))
            else:
                self._protocol_error(f"bad answer: {type(cause or e).__name__}")
            return
        except httptools.HttpParserError as e:
            self._protocol_error(f"malformed answer: {str(e)[:200]}")
            return
        if self._complete:
            # Only now, with the whole segment parsed: a stray byte after the answer in the same
            # segment has had its say (``on_message_begin``), so the connection is never pooled
            # with bytes of an answer nobody asked for.
            self._release_if_done()
        elif self._response is None:
            self._head_bytes += len(data)
            if self._head_bytes > self.pool.max_header_bytes:
                self._protocol_error("the answer's headers are larger than allowed")

    def eof_received(self) -> bool:
        # The peer's orderly end: a FIN, or over TLS its close_notify. Only after it may a body
        # framed by the close count as whole; a bare FIN under TLS may be a truncation (RFC 8446
        # §6.1). asyncio's TLS layer calls this after either, so ask the TLS object: after a
        # close_notify a read ends cleanly (b""), after a bare FIN it wants more data.
        ssl_object = self.transport.get_extra_info("ssl_object") if self.transport is not None else None
        if ssl_object is None:
            self._eof = True
        else:
            try:
                self._eof = ssl_object.read(1) == b""
            except ssl.SSLError:
                self._eof = False
        return False  # close; connection_lost decides whether the answer was whole

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._closed(self)
        response = self._response
        if not self._complete:
            self._complete = True
            if response is not None and self._until_close and exc is None and self._eof:
                # The body was "until the connection closes", and it was closed in order (over
                # TLS: with close_notify; a bare FIN could be a truncation attack, RFC 8446 §6.1).
                response._finish()
            else:
                error = httpx.ReadError(
                    "the upstream closed the connection"
                    + (" before answering" if response is None else " before the answer's end")
                )
                self._fail(error)
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_exception(httpx.WriteError("the upstream closed the connection"))
            drain.exception()  # retrieved: the uploader may have gone already

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    # -- llhttp callbacks -----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete:  # a second answer on one request: never reused, never read
            self._keep_alive = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._complete:
            return
        self._fields_bytes += len(name) + len(value) + 4
        if self._fields_bytes > self.pool.max_header_bytes:
            raise httpx.RemoteProtocolError("the answer's headers are larger than allowed")
        self._headers._add(name.decode("latin-1"), value.decode("latin-1"))

    def on_headers_complete(self) -> None:
        if self._complete:
            return
        parser = self._parser
        status = parser.get_status_code()
        if status == 101:
            raise httpx.RemoteProtocolError("the upstream switched protocols")
        if status >= 600:  # three digits, but no status HTTP defines (nor an ASGI server can send)
            raise httpx.RemoteProtocolError("the upstream answered with an undefined status")
        if status < 200:  # 100 Continue, 103 Early Hints: not the answer
            self._interim = True
            self._headers = UpstreamHeaders()
            self._fields_bytes = 0
            return
        headers = self._headers
        response = UpstreamResponse(self, status, headers)
        self._response = response
        self._keep_alive = bool(parser.should_keep_alive())
        waiter = self._head_waiter
        if waiter is not None:
            self._head_waiter = None
            if not waiter.done():
                waiter.set_result(response)
        if self._head_only:
            self._message_complete()  # released (or closed) once the segment is parsed
        elif status not in (204, 304) and headers.get("content-length") is None:
            # Chunked framing only when chunked is the last coding (RFC 9112 §6.3); otherwise the
            # body ends with the connection.
            encoding = headers.get("transfer-encoding")
            self._until_close = encoding is None or encoding.rsplit(",", 1)[-1].strip().lower() != "chunked"

    def on_body(self, body: bytes) -> None:
        response = self._response
        if response is None or self._complete:  # a body after a HEAD answer
            self._keep_alive = False
            return
        response._feed(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            self._head_bytes = 0
            return
        if self._complete:
            return
        if not self._parser.should_keep_alive():
            self._keep_alive = False
        self._message_complete()

    # -- the exchange ---------------------------------------------------------------------------

    def _message_complete(self) -> None:
        self._complete = True
        if self._response is not None:
            self._response._finish()
        if not self._uploaded:  # answered before the upload ended: the rest is not wanted
            self.abort()

    def _release_if_done(self) -> None:
        if not (self._complete and self._uploaded) or self.closed:
            return
        self._parser = None
        if self._keep_alive:
            self.pool._release(self)
        else:
            self.close()

    async def exchange(
        self, head: bytes, content: bytes | AsyncIterator[bytes] | None, length: int | None, head_only: bool
    ) -> UpstreamResponse:
        loop = asyncio.get_running_loop()
        transport = self.transport
        if self.closed or transport is None or transport.is_closing():
            raise _Stale
        self._parser = httptools.HttpResponseParser(self)
        self._headers = UpstreamHeaders()
        self._response = None
        self._until_close = self._interim = self.received = self._complete = False
        self._head_bytes = self._fields_bytes = 0
        self._head_only = head_only
        waiter: asyncio.Future[UpstreamResponse] = loop.create_future()
        self._head_waiter = waiter
        if content is None or isinstance(content, bytes | bytearray | memoryview):
            self._uploaded = True
            transport.write(head + content if content else head)
        else:
            self._uploaded = False
            transport.write(head)
            self._upload = loop.create_task(self._send_body(content, length))
        try:
            return await waiter
        except BaseException:
            # Cancelled (the caller's deadline) or failed. Before the answer's head, the
            # connection is still this request's: it goes. After it, the connection may already
            # serve another request; only an answer not read to its end takes its connection along.
            if self._head_waiter is waiter:  # no head yet (a cancelled wait cancels the waiter too)
                self._head_waiter = None
                self.abort()
            elif waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                waiter.result().abandon()
            raise

    async def _send_body(self, chunks: AsyncIterator[bytes], length: int | None) -> None:
        transport = self.transport
        assert transport is not None
        sent = 0
        try:
            async for chunk in chunks:
                if not chunk:
                    continue
                if self.closed:
                    return
                sent += len(chunk)
                if length is None:
                    transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
                else:
                    if sent > length:
                        raise httpx.WriteError("the request body is longer than its Content-Length")
                    transport.write(chunk)
                if self._write_paused:
                    self._drain = asyncio.get_running_loop().create_future()
                    try:
                        await self._drain
                    finally:
                        self._drain = None
            if length is None:
                transport.write(b"0\r\n\r\n")
            elif sent != length:
                raise httpx.WriteError("the request body is shorter than its Content-Length")
        except asyncio.CancelledError:
            self.abort()
            raise
        except BaseException as e:  # the caller's upload failed (it went away) or the write did
            self._fail(e)
            self.abort()
            return
        finally:
            self._upload = None
        self._uploaded = True
        self._release_if_done()

    def _fail(self, error: BaseException) -> None:
        waiter = self._head_waiter
        if waiter is not None:
            self._head_waiter = None
            if not waiter.done():
                waiter.set_exception(error)
        elif self._response is not None:
            self._response._fail(error)

    def _protocol_error(self, message: str) -> None:
        self._complete = True
        self._fail(httpx.RemoteProtocolError(message))
        self.abort()

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.pool._closed(self)  # counts as gone now, not when the close completes
            if self.transport is not None:
                self.transport.close()

    def abort(self) -> None:
        """Close now, unsent bytes dropped; any upload stops."""
        upload = self._upload
        if upload is not None and upload is not asyncio.current_task():
            upload.cancel()
        if not self.closed:
            self.closed = True
            self.pool._closed(self)
            if self.transport is not None:
                self.transport.abort()


def _host_header(url: yarl.URL) -> str:
    """The target's host and explicit port, as written; never its userinfo."""
    host = url.raw_host or ""
    if ":" in host:
        host = f"[{host}]"
    port = url.explicit_port
    return host if port is None else f"{host}:{port}"


class _Stale(Exception):
    """A pooled connection turned out to be closed before anything was written to it."""


class GuardedUpstream:
    """The pool: keep-alive connections per (scheme, host, port), at most
    ``limits.max_connections`` open in all (a caller waits for room within its own deadline), at
    most ``limits.max_keepalive_connections`` idle per server, an idle one closed after
    ``limits.keepalive_expiry`` seconds. ``timeout.connect`` bounds each connection attempt; every
    other wait runs under the caller's overall deadline (the proxy's ``asyncio.timeout_at``), so a
    second timer per request would only repeat it. Used from one event loop."""

    def __init__(
        self,
        policy: EgressPolicy,
        timeout: httpx.Timeout,
        *,
        resolver: Resolver | None = None,
        verify: ssl.SSLContext | bool = True,
        limits: httpx.Limits = DEFAULT_LIMITS,
        max_header_bytes: int = 65536,
    ) -> None:
        self._policy = policy
        self._resolver = resolver or system_resolver
        self._ssl = ssl_context(verify)
        self._connect_timeout = timeout.connect
        self._max = limits.max_connections or 0
        self._max_idle = limits.max_keepalive_connections  # None: no limit; 0: none kept
        self._expiry = limits.keepalive_expiry if limits.keepalive_expiry is not None else 15.0
        self.max_header_bytes = max_header_bytes
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._open: set[_Connection] = set()
        self._connecting = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._dns: dict[tuple[str, int], tuple[float, list[str]]] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._closing = False

    async def send(
        self,
        method: str,
        url: yarl.URL | httpx.URL | str,
        headers: Mapping[str, str],
        content: bytes | AsyncIterator[bytes] | None,
    ) -> UpstreamResponse:
        """One request. ``url`` is sent exactly as given: a ``yarl.URL`` (the proxy builds and
        checks the one sent), or text parsed with ``encoded=True`` (no re-quoting, no dot-segment
        folding)."""
        target = url if isinstance(url, yarl.URL) else yarl.URL(str(url), encoded=True)
        scheme = target.scheme
        host = target.raw_host
        if scheme not in ("http", "https") or not host:
            raise httpx.UnsupportedProtocol("only absolute http(s) URLs")
        if not host.isascii():  # an internationalised name: DNS, TLS and Host use its ASCII form
            try:
                host = host.encode("idna").decode("ascii")
            except UnicodeError:
                raise httpx.UnsupportedProtocol("the host is not a valid internationalised name") from None
            target = target.with_host(host)
        port = target.explicit_port or (443 if scheme == "https" else 80)
        key = (scheme, host, port)
        length, head = self._head(method, target, headers, content)
        streamed = content is not None and not isinstance(content, bytes | bytearray | memoryview)
        replayable = not streamed and (
            method in IDEMPOTENT or any(k.lower() in ("idempotency-key", "x-idempotency-key") for k in headers)
        )
        fresh_only = False
        for _ in range(3):
            conn = None if fresh_only else self._take_idle(key)
            if conn is None:
                conn = await self._connect(key, fresh_only)
            try:
                return await conn.exchange(head, content, length, method == "HEAD")
            except _Stale:
                continue  # nothing was written: always safe to send on another connection
            except httpx.ReadError:
                if not conn.reused or conn.received or not replayable or fresh_only:
                    raise
                # The keep-alive race: the server closed a pooled connection as the request went
                # out, and nothing of an answer came. Once more, on a new connection; the other
                # idle ones to that server are as old, so they go too.
                fresh_only = True
                self._discard_idle(key)
        raise httpx.ConnectError("the upstream closed every connection before a request could be sent")

    def _head(
        self, method: str, url: yarl.URL, headers: Mapping[str, str], content: bytes | AsyncIterator[bytes] | None
    ) -> tuple[int | None, bytes]:
        target = url.raw_path_qs or "/"
        if not target.startswith("/"):
            target = "/" + target
        lines = [f"{method} {target} HTTP/1.1", f"Host: {_host_header(url)}"]
        length: int | None = None
        agent = accept = False
        for name, value in headers.items():
            lower = name.lower()
            if lower == "host" or lower == "transfer-encoding":
                continue  # ours: the target's host, and the framing below
            if lower == "content-length":
                length = int(value) if value.isdigit() else None
                continue
            agent = agent or lower == "user-agent"
            accept = accept or lower == "accept"
            lines.append(f"{name}: {value}")
        if not agent:
            lines.append(f"User-Agent: {USER_AGENT}")
        if not accept:
            lines.append("Accept: */*")
        if content is None:
            length = None
            if method in BODY_METHODS:
                lines.append("Content-Length: 0")
        elif isinstance(content, bytes | bytearray | memoryview):
            length = len(content)
            lines.append(f"Content-Length: {length}")
        elif length is not None:
            lines.append(f"Content-Length: {length}")
        else:
            lines.append("Transfer-Encoding: chunked")
        lines.append("\r\n")
        text = "\r\n".join(lines)
        # One check for every line: a CR, LF or NUL inside a name or value (or a space in the
        # target) would split the request; refuse it rather than send it.
        breaks = len(lines)
        if text.count("\n") != breaks or text.count("\r") != breaks or "\x00" in text or " " in target:
            raise httpx.LocalProtocolError("a request header or the target holds a line break or NUL")
        try:
            # Header values are bytes on the wire; ASGI hands the caller's over as latin-1 text,
            # so latin-1 sends every byte back as it came (RFC 9110 obs-text included).
            return length, text.encode("latin-1")
        except UnicodeEncodeError:
            raise httpx.LocalProtocolError("a request header holds characters beyond Latin-1") from None

    # -- the pool -------------------------------------------------------------------------------

    def _take_idle(self, key: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        now = asyncio.get_running_loop().time()
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            if now - conn.idle_since > self._expiry:
                conn.close()
                continue
            conn.reused = True
            return conn
        return None

    def _discard_idle(self, key: tuple[str, str, int]) -> None:
        for conn in self._idle.pop(key, []):
            conn.close()

    def _release(self, conn: _Connection) -> None:
        if self._closing:
            conn.close()
            return
        loop = asyncio.get_running_loop()
        conn.idle_since = loop.time()
        idle = self._idle.setdefault(conn.key, [])
        idle.append(conn)
        if self._max_idle is not None and len(idle) > self._max_idle:
            idle.pop(0).close()
        if self._waiters:
            self._wake_one()
        if self._sweeper is None:
            self._sweeper = loop.call_later(self._expiry, self._sweep)

    def _closed(self, conn: _Connection) -> None:
        self._open.discard(conn)
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)
        if self._waiters:
            self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _sweep(self) -> None:
        self._sweeper = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        remaining = False
        for key, idle in list(self._idle.items()):
            for conn in [c for c in idle if now - c.idle_since > self._expiry]:
                conn.close()  # leaves ``idle`` itself
            if idle:
                remaining = True
            else:
                self._idle.pop(key, None)
        if remaining and not self._closing:
            self._sweeper = loop.call_later(self._expiry, self._sweep)

    async def _room(self, key: tuple[str, str, int], fresh_only: bool) -> _Connection | None:
        """Wait until one more connection may be opened (within the caller's deadline), or until
        a connection to this server is released meanwhile (returned, to be used instead)."""
        while self._max and len(self._open) + self._connecting >= self._max:
            if not fresh_only:
                conn = self._take_idle(key)
                if conn is not None:
                    return conn
            victim = next((idle for idle in self._idle.values() if idle), None)
            if victim is not None:  # an idle connection to another server makes room
                victim[0].close()  # leaves the idle list and the open count at once
                continue
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # woken, then cancelled in the same turn: pass the room on
                raise
            finally:
                if not waiter.done():
                    waiter.cancel()
        return None

    async def _connect(self, key: tuple[str, str, int], fresh_only: bool = False) -> _Connection:
        """A new connection, or a pooled one released while waiting for room."""
        scheme, host, port = key
        pooled = await self._room(key, fresh_only)
        if pooled is not None:
            return pooled
        self._connecting += 1
        connected = False
        try:
            addresses = await self._addresses(host, port)
            loop = asyncio.get_running_loop()
            error: Exception | None = None
            for address in addresses:
                try:
                    async with asyncio.timeout(self._connect_timeout):
                        _, conn = await loop.create_connection(
                            lambda: _Connection(self, key),
                            address,
                            port,
                            ssl=self._ssl if scheme == "https" else None,
                            server_hostname=host if scheme == "https" else None,
                        )
                except TimeoutError:
                    error = httpx.ConnectTimeout(f"connecting to {host!r} timed out")
                except OSError as e:  # refused, unreachable, TLS handshake or certificate failure
                    error = httpx.ConnectError(f"cannot connect to {host!r}: {type(e).__name__}: {e}"[:300])
                else:
                    if self._closing:
                        conn.close()
                        raise httpx.ConnectError("the client is closing")
                    self._open.add(conn)
                    connected = True
                    return conn
            assert error is not None
            raise error
        finally:
            self._connecting -= 1
            if not connected and self._waiters:
                self._wake_one()  # failed or cancelled: the room this attempt held is free again

    async def _addresses(self, host: str, port: int) -> list[str]:
        """Checked addresses to connect to: a literal's own (checked on every request), or a
        name's resolved once and every answer checked (kept :data:`DNS_TTL` seconds)."""
        literal = self._policy.literal_addresses(host)
        if literal is not None:
            return literal
        loop = asyncio.get_running_loop()
        cached = self._dns.get((host, port))
        if cached is not None and cached[0] > loop.time():
            return cached[1]
        addresses = await resolve_name(self._policy, self._resolver, host, port, httpx.ConnectError)
        if len(self._dns) >= 4096:
            self._dns.clear()
        self._dns[(host, port)] = (loop.time() + DNS_TTL, addresses)
        return addresses

    async def aclose(self) -> None:
        self._closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self._open):
            conn.abort()
        self._idle.clear()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.cancel()
        self._waiters.clear()

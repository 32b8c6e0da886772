"""The request proxy's outbound HTTP/1.1 client (``GuardedUpstream``) against real local servers.

Every test talks to a raw HTTP/1.1 server on 127.0.0.1, scripted per test: it records the raw
bytes of every connection, the requests it parsed from them, how many connections it accepted and
how many were open at once, and answers with whatever bytes the test writes. Nothing of the client
is mocked; its private pool state (``_open``, ``_idle``) and a response's ``_buffered`` are only read,
where nothing public shows them. Each test runs on the stock asyncio loop and on uvloop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import pytest
import uvloop
import yarl

from infrastructure.egress import EgressDenied, EgressPolicy
from infrastructure.upstream_http import HIGH_WATER, USER_AGENT, GuardedUpstream, UpstreamResponse

LOOPBACK = EgressPolicy(["127.0.0.1"])
TIMEOUT = httpx.Timeout(5.0, connect=2.0)
HANG = 2.0  # seconds after which a wait counts as a hang
READ_CHUNK = 256 * 1024  # the most one read of a transport hands the protocol (asyncio and uvloop)


# --------------------------------------------------------------------------------------------------
# Running on both event loops
# --------------------------------------------------------------------------------------------------


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Callable[[], Awaitable[None]]], None]:
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop

    def runner(main: Callable[[], Awaitable[None]]) -> None:
        async def guarded() -> None:
            async with asyncio.timeout(15):  # a hang fails the test instead of blocking the run
                await main()

        with asyncio.Runner(loop_factory=factory) as r:
            r.run(guarded())

    return runner


# --------------------------------------------------------------------------------------------------
# A scriptable raw HTTP/1.1 server
# --------------------------------------------------------------------------------------------------


@dataclass
class Request:
    conn: int  # index of the connection it arrived on
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    head: bytes
    body: bytes = b""
    chunked: bool = False
    complete: bool = False

    def values(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def header(self, name: str, default: str | None = None) -> str | None:
        found = self.values(name)
        return found[0] if found else default


class Peer:
    """The server's side of one accepted connection."""

    def __init__(self, server: RawServer, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.server = server
        self.index = index
        self.reader = reader
        self.writer = writer
        self.raw = bytearray()  # every byte received on this connection
        self._buf = bytearray()
        self.requests: list[Request] = []
        self.eof = asyncio.Event()  # the client closed (or reset) its side
        self.done = asyncio.Event()  # the server is done with it (closed)
        self.sent = 0

    async def _fill(self) -> bool:
        if self.eof.is_set():
            return False
        try:
            data = await self.reader.read(1 << 16)
        except OSError:
            data = b""
        if not data:
            self.eof.set()
            return False
        self.raw += data
        self._buf += data
        return True

    async def _until(self, sep: bytes) -> bytes | None:
        while (i := self._buf.find(sep)) < 0:
            if not await self._fill():
                return None
        out = bytes(self._buf[: i + len(sep)])
        del self._buf[: i + len(sep)]
        return out

    async def _exactly(self, n: int) -> bytes | None:
        while len(self._buf) < n:
            if not await self._fill():
                return None
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def read_head(self) -> Request | None:
        head = await self._until(b"\r\n\r\n")
        if head is None:
            return None
        lines = head[:-4].decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ", 2)
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.append((name, value.strip()))
        request = Request(self.index, method, target, version, headers, head)
        self.requests.append(request)
        self.server.requests.append(request)
        return request

    async def read_body(self, request: Request) -> bool:
        if "chunked" in (request.header("transfer-encoding") or "").lower():
            request.chunked = True
            body = bytearray()
            while True:
                line = await self._until(b"\r\n")
                if line is None:
                    return False
                size = int(line.split(b";")[0].strip(), 16)
                if size == 0:
                    while (trailer := await self._until(b"\r\n")) != b"\r\n":
                        if trailer is None:
                            return False
                    break
                data = await self._exactly(size + 2)
                if data is None:
                    return False
                assert data.endswith(b"\r\n"), "bad chunk framing"
                body += data[:-2]
                request.body = bytes(body)
        elif (length := request.header("content-length")) is not None:
            data = await self._exactly(int(length))
            if data is None:
                return False
            request.body = data
        request.complete = True
        return True

    async def read_request(self) -> Request | None:
        """The next whole request, or None when the client closed (possibly mid-request)."""
        request = await self.read_head()
        if request is None or not await self.read_body(request):
            return None
        return request

    async def send(self, *parts: bytes, pause: float = 0.0) -> bool:
        """Write each part (as its own TCP write, ``pause`` seconds apart); False if the client went."""
        for i, part in enumerate(parts):
            if i and pause:
                await asyncio.sleep(pause)
            if self.writer.transport.is_closing():
                return False
            self.writer.write(part)
            try:
                await self.writer.drain()
            except OSError:
                return False
            self.sent += len(part)
        return True

    async def wait_eof(self) -> None:
        """Read and discard until the client closes."""
        while await self._fill():
            self._buf.clear()

    def close(self) -> None:
        self.writer.close()

    def reset(self) -> None:
        """Close with a TCP RST (SO_LINGER 0)."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


Handler = Callable[[Peer], Awaitable[None]]


class RawServer:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.peers: list[Peer] = []
        self.requests: list[Request] = []
        self.open_now = 0
        self.max_open = 0
        self.errors: list[BaseException] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def accepted(self) -> int:
        return len(self.peers)

    @property
    def received(self) -> int:
        return sum(len(p.raw) for p in self.peers)

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = Peer(self, len(self.peers), reader, writer)
        self.peers.append(peer)
        self.open_now += 1
        self.max_open = max(self.max_open, self.open_now)
        task = asyncio.get_running_loop().create_task(self._run(peer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, peer: Peer) -> None:
        writer = peer.writer
        try:
            await self.handler(peer)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.errors.append(e)
        finally:
            self.open_now -= 1
            writer.close()
            peer.done.set()

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._server.close()
        for peer in self.peers:
            peer.writer.transport.abort()
        if self._tasks:  # handlers see their connection gone and end; a stuck one is cancelled
            _, stuck = await asyncio.wait(list(self._tasks), timeout=1)
            for task in stuck:
                task.cancel()
            await asyncio.gather(*stuck, return_exceptions=True)
        await self._server.wait_closed()
        if exc_type is None and self.errors:
            raise self.errors[0]


def response(
    status: int = 200,
    body: bytes = b"",
    headers: tuple[tuple[str, str], ...] | list[tuple[str, str]] = (),
    *,
    version: str = "HTTP/1.1",
    length: bool = True,
) -> bytes:
    reasons = {200: "OK", 204: "No Content", 304: "Not Modified", 413: "Content Too Large"}
    lines = [f"{version} {status} {reasons.get(status, 'Whatever')}"]
    lines += [f"{n}: {v}" for n, v in headers]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def serve(answer: Callable[[Request], bytes]) -> Handler:
    """Keep-alive: answer every request with ``answer(request)`` until the client closes."""

    async def handler(peer: Peer) -> None:
        while (request := await peer.read_request()) is not None:
            if not await peer.send(answer(request)):
                return

    return handler


def echo(request: Request) -> bytes:
    return response(200, f"{request.method} {request.target}".encode())


def upstream(**kw: object) -> GuardedUpstream:
    limits = kw.pop("limits", httpx.Limits(max_connections=100, max_keepalive_connections=100, keepalive_expiry=30))
    policy = kw.pop("policy", LOOPBACK)
    return GuardedUpstream(policy, TIMEOUT, limits=limits, **kw)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def setup(handler: Handler, **kw: object) -> AsyncIterator[tuple[RawServer, GuardedUpstream]]:
    async with RawServer(handler) as server:
        client = upstream(**kw)
        try:
            yield server, client
        finally:
            await client.aclose()


@dataclass
class Got:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    response: UpstreamResponse = field(repr=False)


async def fetch(
    client: GuardedUpstream,
    method: str,
    url: str | yarl.URL,
    headers: dict[str, str] | None = None,
    content: bytes | AsyncIterator[bytes] | None = None,
) -> Got:
    r = await client.send(method, url, headers or {}, content)
    try:
        body = await r.aread()
    finally:
        await r.aclose()
    return Got(r.status_code, r.headers.items(), body, r)


@contextlib.asynccontextmanager
async def pool_sampler(client: GuardedUpstream) -> AsyncIterator[list[int]]:
    """The most connections the client held open or was opening, sampled every loop iteration."""
    most = [0]

    async def sample() -> None:
        while True:
            most[0] = max(most[0], len(client._open) + client._connecting)
            await asyncio.sleep(0)

    task = asyncio.create_task(sample())
    try:
        yield most
    finally:
        task.cancel()


async def eventually(check: Callable[[], bool], what: str) -> None:
    """Wait (a hang guard, not a speed check) until ``check()`` holds."""
    try:
        async with asyncio.timeout(HANG):
            while not check():
                await asyncio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"never happened: {what}") from None


async def dropped_then_replaced(server: RawServer, client: GuardedUpstream, path: str, body: bytes, why: str) -> None:
    """The client closed the first connection (``why``), the pool forgot it, and a request to
    ``path`` (answered ``body``) goes out on a second, new connection."""
    await wait(server.peers[0].eof, why)
    await eventually(lambda: not client._open, "the pool forgets the connection")
    assert (await fetch(client, "GET", server.url + path)).body == body
    assert server.accepted == 2


async def wait(event: asyncio.Event, what: str) -> None:
    await eventually(event.is_set, what)


def idle_count(client: GuardedUpstream) -> int:
    return sum(len(v) for v in client._idle.values())


# --------------------------------------------------------------------------------------------------
# Keep-alive and framing of answers
# --------------------------------------------------------------------------------------------------


def test_sequential_requests_reuse_one_connection(run) -> None:
    async def main() -> None:
        async with setup(serve(echo)) as (server, client):
            for i in range(20):
                got = await fetch(client, "GET", f"{server.url}/item/{i}")
                assert (got.status, got.body) == (200, f"GET /item/{i}".encode())
            assert server.accepted == 1
            assert [r.target for r in server.requests] == [f"/item/{i}" for i in range(20)]
            assert len(client._open) == 1 and idle_count(client) == 1

    run(main)


def _varied_answer(request: Request) -> list[bytes]:
    """The request's own id (its path and X-Id) in the body, framed in one of several ways."""
    ident = request.target.encode()
    body = ident + b"|" + (request.header("x-id") or "").encode()
    kind = int(hashlib.sha256(ident).hexdigest(), 16) % 4
    if kind == 0:
        return [response(200, body, [("X-Echo", request.target)])]
    if kind == 1:  # head and body as separate writes
        whole = response(200, body, [("X-Echo", request.target)])
        cut = whole.index(b"\r\n\r\n") + 4
        return [whole[:cut], whole[cut:]]
    if kind == 2:  # chunked, two chunks, separate writes
        head = f"HTTP/1.1 200 OK\r\nX-Echo: {request.target}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        half = len(body) // 2
        return [head, b"%x\r\n%s\r\n" % (half, body[:half]), b"%x\r\n%s\r\n0\r\n\r\n" % (len(body) - half, body[half:])]
    # a larger body, split mid-way
    big = body + b"." * 20000
    whole = response(200, big, [("X-Echo", request.target)])
    return [whole[:100], whole[100:]]


def _concurrent_handler(delay: bool) -> Handler:
    async def handler(peer: Peer) -> None:
        rng = random.Random(peer.index)
        while (request := await peer.read_request()) is not None:
            if delay and rng.random() < 0.3:
                await asyncio.sleep(rng.random() * 0.003)
            if not await peer.send(*_varied_answer(request), pause=0.0005 if rng.random() < 0.2 else 0.0):
                return

    return handler


@pytest.mark.parametrize("max_connections", [8, 100], ids=["pool-8", "pool-100"])
def test_concurrent_requests_each_get_their_own_answer(run, max_connections: int) -> None:
    async def main() -> None:
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=100, keepalive_expiry=30)
        async with setup(_concurrent_handler(delay=True), limits=limits) as (server, client):
            mismatches: list[str] = []

            async def worker(t: int) -> None:
                for i in range(20):
                    ident = f"/id/{t}/{i}"
                    got = await fetch(client, "GET", server.url + ident, {"X-Id": f"{t}.{i}"})
                    expected = f"{ident}|{t}.{i}".encode()
                    if got.status != 200 or not got.body.startswith(expected) or dict(got.headers)["X-Echo"] != ident:
                        mismatches.append(f"{ident}: {got.status} {got.body[:40]!r} {dict(got.headers)}")
                    if len(got.body) not in (len(expected), len(expected) + 20000):
                        mismatches.append(f"{ident}: body length {len(got.body)}")

            async with pool_sampler(client) as most:
                await asyncio.gather(*(worker(t) for t in range(64)))
            assert mismatches == []
            assert len(server.requests) == 64 * 20
            assert most[0] <= max_connections
            if max_connections >= 64:  # no waiting for room: keep-alive reuses, not one per request
                assert server.accepted <= 64

    run(main)


def test_concurrent_requests_with_cancellations_never_cross(run) -> None:
    """Requests cut by their deadline at random points (before the head, mid-body) must not
    hand their connection, or a stale answer, to anyone else."""

    async def main() -> None:
        limits = httpx.Limits(max_connections=16, max_keepalive_connections=16, keepalive_expiry=30)
        async with setup(_concurrent_handler(delay=True), limits=limits) as (server, client):
            mismatches: list[str] = []
            unexpected: list[BaseException] = []
            done = 0

            async def worker(t: int) -> None:
                nonlocal done
                rng = random.Random(t)
                for i in range(20):
                    ident = f"/id/{t}/{i}"
                    deadline = rng.random() * 0.004 if rng.random() < 0.3 else None
                    try:
                        async with asyncio.timeout(deadline):
                            got = await fetch(client, "GET", server.url + ident, {"X-Id": f"{t}.{i}"})
                    except TimeoutError:
                        continue
                    except Exception as e:
                        unexpected.append(e)
                        continue
                    done += 1
                    if not got.body.startswith(f"{ident}|{t}.{i}".encode()):
                        mismatches.append(f"{ident}: {got.body[:40]!r}")

            async with pool_sampler(client) as most:
                await asyncio.gather(*(worker(t) for t in range(64)))
            assert mismatches == []
            assert unexpected == []
            assert done > 64 * 20 // 2
            assert most[0] <= 16

    run(main)


def test_head_answer_with_length_has_no_body_and_connection_is_reused(run) -> None:
    async def handler(peer: Peer) -> None:
        while (request := await peer.read_request()) is not None:
            if request.method == "HEAD":
                await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1024\r\nContent-Type: text/plain\r\n\r\n")
            else:
                await peer.send(response(200, b"x" * 1024))

    async def main() -> None:
        async with setup(handler) as (server, client):
            head = await fetch(client, "HEAD", server.url + "/h")
            assert head.status == 200 and head.body == b""
            assert dict(head.headers)["Content-Length"] == "1024"
            got = await fetch(client, "GET", server.url + "/g")
            assert got.body == b"x" * 1024
            head = await fetch(client, "HEAD", server.url + "/h2")
            assert head.body == b""
            assert server.accepted == 1
            assert [r.method for r in server.requests] == ["HEAD", "GET", "HEAD"]

    run(main)


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n",
        b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\n\r\n',
        b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 1024\r\n\r\n',  # the entity's length
    ],
    ids=["204", "304", "304-with-length"],
)
def test_bodiless_statuses_then_reuse(run, answer: bytes) -> None:
    async def handler(peer: Peer) -> None:
        while (request := await peer.read_request()) is not None:
            await peer.send(answer if request.target == "/empty" else response(200, b"after"))

    async def main() -> None:
        async with setup(handler) as (server, client):
            first = await fetch(client, "GET", server.url + "/empty")
            assert first.status == int(answer[9:12]) and first.body == b""
            second = await fetch(client, "GET", server.url + "/next")
            assert (second.status, second.body) == (200, b"after")
            assert server.accepted == 1

    run(main)


CHUNKED_PARTS = [
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n",
    b"5;name=value\r\nhel",
    b"lo\r\n",
    b"6\r\n wor",
    b"ld\r\n1",
    b"0\r\n" + b"0123456789abcdef" + b"\r\n",
    b"0\r\nX-Sum: abc\r\n",
    b"\r\n",
]
CHUNKED_BODY = b"hello world0123456789abcdef"


@pytest.mark.parametrize("reader", ["aread", "aiter_raw"])
def test_chunked_answer_split_across_writes(run, reader: str) -> None:
    async def handler(peer: Peer) -> None:
        while (request := await peer.read_request()) is not None:
            if request.target == "/chunked":
                await peer.send(*CHUNKED_PARTS, pause=0.005)
            else:
                await peer.send(response(200, b"plain"))

    async def main() -> None:
        async with setup(handler) as (server, client):
            r = await client.send("GET", server.url + "/chunked", {}, None)
            assert r.status_code == 200 and r.headers.get("transfer-encoding") == "chunked"
            if reader == "aread":
                body = await r.aread()
            else:
                body = b"".join([chunk async for chunk in r.aiter_raw()])
            await r.aclose()
            assert body == CHUNKED_BODY
            got = await fetch(client, "GET", server.url + "/plain")
            assert got.body == b"plain"
            assert server.accepted == 1

    run(main)


@pytest.mark.parametrize("reader", ["aread", "aiter_raw"])
def test_body_until_close_is_read_whole_and_connection_not_reused(run, reader: str) -> None:
    async def handler(peer: Peer) -> None:
        request = await peer.read_request()
        if request is None:
            return
        if peer.index == 0:
            await peer.send(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", b"part one, ", b"part two", pause=0.01)
            return  # closing ends the body
        await peer.send(response(200, b"second"))
        await peer.wait_eof()

    async def main() -> None:
        async with setup(handler) as (server, client):
            r = await client.send("GET", server.url + "/a", {}, None)
            if reader == "aread":
                body = await r.aread()
            else:
                body = b"".join([chunk async for chunk in r.aiter_raw()])
            await r.aclose()
            assert body == b"part one, part two"
            got = await fetch(client, "GET", server.url + "/b")
            assert got.body == b"second"
            assert server.accepted == 2
            assert [r.conn for r in server.requests] == [0, 1]

    run(main)


@pytest.mark.parametrize(
    "first",
    [
        response(200, b"closing", [("Connection", "close")]),
        response(200, b"old", version="HTTP/1.0"),
        b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nold",
    ],
    ids=["connection-close", "http-1.0", "http-1.0-bare"],
)
def test_answers_that_end_the_connection_are_not_reused(run, first: bytes) -> None:
    """The server keeps its side open: the client itself must close the connection."""

    async def handler(peer: Peer) -> None:
        while (request := await peer.read_request()) is not None:
            await peer.send(first if request.target == "/first" else response(200, b"fresh"))

    async def main() -> None:
        async with setup(handler) as (server, client):
            got = await fetch(client, "GET", server.url + "/first")
            assert got.status == 200 and got.body in (b"closing", b"old")
            await wait(server.peers[0].eof, "the client closes the connection it may not reuse")
            got = await fetch(client, "GET", server.url + "/second")
            assert got.body == b"fresh"
            assert server.accepted == 2
            assert [len(p.requests) for p in server.peers] == [1, 1]

    run(main)


@pytest.mark.parametrize("split", [False, True], ids=["one-write", "separate-writes"])
def test_interim_answers_are_skipped(run, split: bool) -> None:
    interim = [
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n",
    ]
    final = response(200, b"final body", [("X-Final", "yes")])

    async def handler(peer: Peer) -> None:
        while await peer.read_request() is not None:
            if split:
                await peer.send(*interim, final, pause=0.01)
            else:
                await peer.send(b"".join(interim) + final)

    async def main() -> None:
        async with setup(handler) as (server, client):
            for _ in range(2):
                got = await fetch(client, "POST", server.url + "/upload", content=b"data")
                assert got.status == 200 and got.body == b"final body"
                names = [n.lower() for n, _ in got.headers]
                assert "x-final" in names and "link" not in names
            assert server.accepted == 1

    run(main)


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
    ],
    ids=["with-upgrade", "bare"],
)
def test_switching_protocols_is_a_protocol_error(run, answer: bytes) -> None:
    async def handler(peer: Peer) -> None:
        if await peer.read_request() is not None:
            await peer.send(answer)
            await peer.wait_eof()

    async def main() -> None:
        async with setup(handler) as (server, client):
            with pytest.raises(httpx.RemoteProtocolError):
                await client.send("GET", server.url + "/ws", {"Upgrade": "websocket", "Connection": "Upgrade"}, None)
            await wait(server.peers[0].eof, "the connection is closed")

    run(main)


@pytest.mark.parametrize(
    "answer",
    [
        b"SMTP READY\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
        b"\x00\x01\x02\r\n\r\n",
    ],
    ids=["not-http", "bad-status", "bad-header", "binary"],
)
def test_malformed_answer_is_a_protocol_error(run, answer: bytes) -> None:
    async def handler(peer: Peer) -> None:
        if await peer.read_request() is not None:
            await peer.send(answer)
            await peer.wait_eof()

    async def main() -> None:
        async with setup(handler) as (server, client):
            with pytest.raises(httpx.RemoteProtocolError):
                await client.send("GET", server.url + "/", {}, None)
            await wait(server.peers[0].eof, "the connection is closed")
            await eventually(lambda: not client._open, "the pool forgets the connection")

    run(main)


def _big_head() -> bytes:
    pads = "".join(f"X-Pad-{i}: {'v' * 100}\r\n" for i in range(40))  # about 4.4 KiB
    return f"HTTP/1.1 200 OK\r\n{pads}Content-Length: 2\r\n\r\nok".encode()


@pytest.mark.parametrize("split", [False, True], ids=["one-write", "many-writes"])
def test_headers_larger_than_allowed_are_refused(run, split: bool) -> None:
    async def handler(peer: Peer) -> None:
        if await peer.read_request() is not None:
            head = _big_head()
            parts = [head[i : i + 512] for i in range(0, len(head), 512)] if split else [head]
            await peer.send(*parts, pause=0.002)
            await peer.wait_eof()

    async def main() -> None:
        async with setup(handler, max_header_bytes=1024) as (server, client):
            with pytest.raises(httpx.RemoteProtocolError):
                r = await client.send("GET", server.url + "/", {}, None)
                await r.aclose()  # only reached when the answer was (wrongly) accepted
            await wait(server.peers[0].eof, "the connection is closed")

    run(main)


def test_large_headers_within_the_default_limit_are_fine(run) -> None:
    async def main() -> None:
        async with setup(serve(lambda request: _big_head())) as (server, client):
            got = await fetch(client, "GET", server.url + "/")
            assert got.body == b"ok" and len(got.headers) == 41

    run(main)


def test_header_stream_that_never_ends_is_cut(run) -> None:
    async def handler(peer: Peer) -> None:
        if await peer.read_request() is not None:
            await peer.send(b"HTTP/1.1 200 OK\r\n")
            i = 0
            while await peer.send(f"X-Forever-{i}: {'z' * 50}\r\n".encode()):
                i += 1
                await asyncio.sleep(0.001)

    async def main() -> None:
        async with setup(handler, max_header_bytes=1024) as (server, client):
            with pytest.raises(httpx.RemoteProtocolError):
                await client.send("GET", server.url + "/", {}, None)
            await wait(server.peers[0].done, "the server notices the connection closed")

    run(main)


# --------------------------------------------------------------------------------------------------
# Connections that break
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["fin", "rst"])
def test_server_closing_before_answering_a_fresh_connection_is_a_read_error(run, how: str) -> None:
    async def handler(peer: Peer) -> None:
        if await peer.read_request() is not None:
            peer.reset() if how == "rst" else peer.close()

    async def main() -> None:
        async with setup(handler) as (server, client):
            with pytest.raises(httpx.ReadError):
                await client.send("GET", server.url + "/", {}, None)
            assert server.accepted == 1  # a fresh connection: not retried
            assert not client._open

    run(main)


@pytest.mark.parametrize("reader", ["aread", "aiter_raw"])
def test_body_shorter_than_its_length_is_a_read_error(run, reader: str) -> None:
    async def handler(peer: Peer) -> None:
        if await peer.read_request() is not None:
            await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", b"only forty bytes" * 2, pause=0.01)

    async def main() -> None:
        async with setup(handler) as (server, client):
            r = await client.send("GET", server.url + "/", {}, None)
            assert r.status_code == 200
            received = b""
            with pytest.raises(httpx.ReadError):
                if reader == "aread":
                    await r.aread()
                else:
                    async for chunk in r.aiter_raw():
                        received += chunk
            if reader == "aiter_raw":
                assert received == b"only forty bytes" * 2
            await r.aclose()
            assert not client._open and idle_count(client) == 0

    run(main)


def _race_handler(how: str) -> Handler:
    """Connection 0 answers its first request with keep-alive, then closes as the second arrives;
    every later connection answers normally."""

    async def handler(peer: Peer) -> None:
        if peer.index == 0:
            request = await peer.read_request()
            if request is None:
                return
            await peer.send(response(200, b"first"))
            if await peer.read_request() is not None:
                peer.reset() if how == "rst" else peer.close()
            return
        while (request := await peer.read_request()) is not None:
            await peer.send(response(200, b"retried " + request.body))

    return handler


@pytest.mark.parametrize("how", ["fin", "rst"])
@pytest.mark.parametrize(
    ("method", "headers"),
    [
        ("GET", {}),
        ("PUT", {}),
        ("DELETE", {}),
        ("POST", {"Idempotency-Key": "k1"}),
        ("POST", {"x-idempotency-key": "k"}),
    ],
    ids=["GET", "PUT", "DELETE", "POST-idempotency-key", "POST-x-idempotency-key"],
)
def test_keepalive_race_is_retried_once_for_replayable_requests(run, how: str, method: str, headers: dict) -> None:
    async def main() -> None:
        async with setup(_race_handler(how)) as (server, client):
            assert (await fetch(client, "GET", server.url + "/one")).body == b"first"
            content = b"payload" if method != "GET" else None
            got = await fetch(client, method, server.url + "/two", headers, content)
            assert got.status == 200 and got.body == b"retried " + (content or b"")
            assert server.accepted == 2
            assert [(r.conn, r.method, r.target) for r in server.requests] == [
                (0, "GET", "/one"),
                (0, method, "/two"),
                (1, method, "/two"),
            ]
            assert server.requests[2].body == (content or b"")

    run(main)


@pytest.mark.parametrize("how", ["fin", "rst"])
@pytest.mark.parametrize("method", ["POST", "PATCH"])
def test_keepalive_race_is_not_retried_for_non_idempotent_requests(run, how: str, method: str) -> None:
    async def main() -> None:
        async with setup(_race_handler(how)) as (server, client):
            assert (await fetch(client, "GET", server.url + "/one")).body == b"first"
            with pytest.raises(httpx.ReadError):
                await client.send(method, server.url + "/two", {}, b"charge the card")
            await asyncio.sleep(0.05)  # room for a (wrong) retry's connection to be accepted
            assert server.accepted == 1
            assert [(r.method, r.target) for r in server.requests] == [("GET", "/one"), (method, "/two")]

    run(main)


def test_keepalive_race_is_not_retried_for_streamed_bodies(run) -> None:
    async def main() -> None:
        async def body() -> AsyncIterator[bytes]:
            yield b"streamed"

        async with setup(_race_handler("fin")) as (server, client):
            assert (await fetch(client, "GET", server.url + "/one")).body == b"first"
            with pytest.raises(httpx.ReadError):
                await client.send("PUT", server.url + "/two", {}, body())
            await asyncio.sleep(0.05)
            assert server.accepted == 1

    run(main)


def test_idle_connection_closed_by_server_is_replaced(run) -> None:
    async def handler(peer: Peer) -> None:
        if (request := await peer.read_request()) is not None:
            await peer.send(response(200, request.target.encode()))  # keep-alive, then close while idle

    async def main() -> None:
        async with setup(handler) as (server, client):
            for i in range(3):
                got = await fetch(client, "POST", f"{server.url}/{i}", content=b"x")  # not replayable
                assert got.body == f"/{i}".encode()
                await asyncio.sleep(0.1)
            assert server.accepted == 3
            assert [len(p.requests) for p in server.peers] == [1, 1, 1]

    run(main)


def test_stray_bytes_while_idle_drop_the_connection(run) -> None:
    async def handler(peer: Peer) -> None:
        while await peer.read_request() is not None:
            await peer.send(response(200, b"ok"))
            if peer.index == 0:
                await asyncio.sleep(0.02)
                await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil")

    async def main() -> None:
        async with setup(handler) as (server, client):
            assert (await fetch(client, "GET", server.url + "/a")).body == b"ok"
            await wait(server.peers[0].eof, "the client drops a connection that spoke unasked")
            got = await fetch(client, "GET", server.url + "/b")
            assert got.body == b"ok"
            assert server.accepted == 2

    run(main)


@pytest.mark.parametrize(
    "stray",
    [
        b"HTTP/1.1 200 OK\r\nX-Smuggled: 1\r\n",
        b"HTTP/1.1 2",
        b"HTTP/1.1 200 OK\r\nX-Smuggled: 1\r\nContent-Length: 4\r\n\r\n",
    ],
    ids=["partial-head", "partial-status", "whole-head"],
)
def test_stray_bytes_right_after_the_answer_drop_the_connection(run, stray: bytes) -> None:
    """A second answer glued to the first in one TCP segment: the connection is not reused, and
    the first answer's headers are its own."""

    async def handler(peer: Peer) -> None:
        while await peer.read_request() is not None:
            await peer.send(response(200, b"ok") + (stray if peer.index == 0 else b""))

    async def main() -> None:
        async with setup(handler) as (server, client):
            got = await fetch(client, "GET", server.url + "/a")
            assert got.body == b"ok"
            assert [n for n, _ in got.headers] == ["Content-Length"]
            got = await fetch(client, "GET", server.url + "/b")
            assert got.body == b"ok"
            assert server.accepted == 2, "the connection that carried stray bytes was reused"

    run(main)


# --------------------------------------------------------------------------------------------------
# The request as sent
# --------------------------------------------------------------------------------------------------


def test_request_head_defaults(run) -> None:
    async def main() -> None:
        async with setup(serve(echo)) as (server, client):
            await fetch(client, "GET", server.url + "/path?q=1")
            request = server.requests[0]
            assert request.head.startswith(b"GET /path?q=1 HTTP/1.1\r\n")
            assert request.values("host") == [f"127.0.0.1:{server.port}"]
            assert request.values("user-agent") == [USER_AGENT]
            assert USER_AGENT.startswith("informer-integrations")
            assert request.values("accept") == ["*/*"]
            assert request.values("content-length") == [] and request.values("transfer-encoding") == []

    run(main)


def test_request_head_caller_headers(run) -> None:
    async def main() -> None:
        async with setup(serve(echo)) as (server, client):
            headers = {
                "Host": "evil.example",
                "HOST": "evil2.example",
                "User-Agent": "caller/1",
                "accept": "application/json",
                "X-Custom": "v a l",
                "Transfer-Encoding": "chunked",
                "Content-Length": "999",
            }
            await fetch(client, "POST", server.url + "/p", headers, b"12345")
            request = server.requests[0]
            assert request.values("host") == [f"127.0.0.1:{server.port}"]
            assert request.values("user-agent") == ["caller/1"]
            assert request.values("accept") == ["application/json"]
            assert request.values("x-custom") == ["v a l"]
            assert request.values("content-length") == ["5"]
            assert request.values("transfer-encoding") == []
            assert request.body == b"12345"
            assert server.peers[0].raw.endswith(b"\r\n\r\n12345")

    run(main)


@pytest.mark.parametrize(
    ("method", "length"),
    [("POST", ["0"]), ("PUT", ["0"]), ("PATCH", ["0"]), ("GET", []), ("DELETE", []), ("OPTIONS", [])],
)
def test_bodiless_requests_content_length(run, method: str, length: list[str]) -> None:
    async def main() -> None:
        async with setup(serve(echo)) as (server, client):
            got = await fetch(client, method, server.url + "/x", {"Content-Length": "12"})
            assert got.status == 200
            request = server.requests[0]
            assert request.method == method
            assert request.values("content-length") == length
            assert request.values("transfer-encoding") == []
            assert server.peers[0].raw == request.head  # nothing after the head

    run(main)


@pytest.mark.parametrize("form", ["yarl", "str"])
def test_target_is_sent_exactly_as_given(run, form: str) -> None:
    async def main() -> None:
        async with setup(serve(echo)) as (server, client):
            text = f"{server.url}/a%2Fb/../c/./d?x=%20&y=a%2Bb#fragment"
            url = yarl.URL(text, encoded=True) if form == "yarl" else text
            await fetch(client, "GET", url)
            assert server.requests[0].target == "/a%2Fb/../c/./d?x=%20&y=a%2Bb"
            await fetch(client, "GET", server.url)  # an empty path is "/"
            assert server.requests[1].target == "/"

    run(main)


def test_host_header_carries_no_userinfo(run) -> None:
    async def main() -> None:
        async with setup(serve(echo)) as (server, client):
            await fetch(client, "GET", f"http://user:secret@127.0.0.1:{server.port}/x")
            assert server.requests[0].values("host") == [f"127.0.0.1:{server.port}"]
            assert b"secret" not in server.peers[0].raw

    run(main)


@pytest.mark.parametrize(
    "headers",
    [
        {"X-A": "a\r\nX-Injected: 1"},
        {"X-A": "a\nb"},
        {"X-A": "a\rb"},
        {"X-A": "a\x00b"},
        {"X-A\r\nX-Injected": "v"},
        {"X-\nA": "v"},
        {"X-\rA": "v"},
        {"X-\x00A": "v"},
        {"User-Agent": "u\nX: 1"},
        {"Accept": "a\r\n\r\nGET /smuggled HTTP/1.1"},
    ],
    ids=lambda h: repr(h)[:30],
)
@pytest.mark.parametrize("pooled", [False, True], ids=["fresh", "pooled"])
def test_header_injection_is_refused_before_anything_is_sent(run, headers: dict, pooled: bool) -> None:
    async def main() -> None:
        async with setup(serve(echo)) as (server, client):
            if pooled:
                await fetch(client, "GET", server.url + "/warm")
            before = server.received
            with pytest.raises(httpx.LocalProtocolError):
                await client.send("POST", server.url + "/x", headers, b"body")
            await asyncio.sleep(0.02)
            assert server.accepted == (1 if pooled else 0)
            assert server.received == before
            if pooled:  # the connection was not touched: still good
                assert (await fetch(client, "GET", server.url + "/after")).body == b"GET /after"
                assert server.accepted == 1

    run(main)


def test_space_in_target_is_refused(run) -> None:
    async def main() -> None:
        async with setup(serve(echo)) as (server, client):
            with pytest.raises(httpx.LocalProtocolError):
                await client.send("GET", yarl.URL(f"{server.url}/a b HTTP/1.1", encoded=True), {}, None)
            assert server.accepted == 0

    run(main)


# --------------------------------------------------------------------------------------------------
# Uploads
# --------------------------------------------------------------------------------------------------


async def chunks_of(data: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]
        if i % (size * 8) == 0:
            await asyncio.sleep(0)


def _digest_answer(request: Request) -> bytes:
    return response(200, hashlib.sha256(request.body).hexdigest().encode())


@pytest.mark.parametrize("declared", [False, True], ids=["chunked", "content-length"])
def test_streamed_upload(run, declared: bool) -> None:
    payload = random.Random(1).randbytes(5 * 1024 * 1024)

    async def main() -> None:
        async with setup(serve(_digest_answer)) as (server, client):
            headers = {"Content-Length": str(len(payload))} if declared else {}
            got = await fetch(client, "PUT", server.url + "/upload", headers, chunks_of(payload))
            assert got.body == hashlib.sha256(payload).hexdigest().encode()
            request = server.requests[0]
            assert request.body == payload
            if declared:
                assert request.values("content-length") == [str(len(payload))]
                assert request.values("transfer-encoding") == [] and not request.chunked
            else:
                assert request.values("transfer-encoding") == ["chunked"] and request.chunked
                assert request.values("content-length") == []
            got = await fetch(client, "GET", server.url + "/after")  # the connection is fine for more
            assert got.status == 200
            assert server.accepted == 1

    run(main)


def test_streamed_upload_with_empty_chunks(run) -> None:
    async def body() -> AsyncIterator[bytes]:
        for part in (b"", b"abc", b"", b"def", b""):
            yield part

    async def main() -> None:
        async with setup(serve(_digest_answer)) as (server, client):
            await fetch(client, "POST", server.url + "/u", {}, body())
            assert server.requests[0].body == b"abcdef" and server.requests[0].chunked

    run(main)


@pytest.mark.parametrize("actual", [50, 150], ids=["shorter", "longer"])
def test_streamed_upload_not_matching_its_length_fails(run, actual: int) -> None:
    async def handler(peer: Peer) -> None:
        if peer.index == 0:  # never answers; just watches the bytes go by
            await peer.read_head()
            await peer.wait_eof()
            return
        await serve(echo)(peer)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(actual // 10):
            yield b"0123456789"

    async def main() -> None:
        async with setup(handler) as (server, client):
            with pytest.raises(httpx.WriteError):
                r = await client.send("POST", server.url + "/u", {"Content-Length": "100"}, body())
                await r.aread()
            await wait(server.peers[0].eof, "the client closes the connection")
            sent = bytes(server.peers[0].raw)
            assert len(sent) - sent.index(b"\r\n\r\n") - 4 <= 100  # never more than declared
            await eventually(lambda: not client._open, "the pool forgets the connection")
            assert (await fetch(client, "GET", server.url + "/after")).body == b"GET /after"
            assert server.accepted == 2

    run(main)


class Boom(Exception):
    pass


def test_upload_iterator_error_before_the_answer_surfaces_from_send(run) -> None:
    async def handler(peer: Peer) -> None:
        if peer.index == 0:
            await peer.read_head()
            await peer.wait_eof()
            return
        await serve(echo)(peer)

    async def body() -> AsyncIterator[bytes]:
        yield b"some"
        await asyncio.sleep(0.01)
        raise Boom("the caller went away")

    async def main() -> None:
        async with setup(handler) as (server, client):
            with pytest.raises(Boom):
                await client.send("POST", server.url + "/u", {}, body())
            await wait(server.peers[0].eof, "the connection is closed")
            assert (await fetch(client, "GET", server.url + "/after")).status == 200
            assert server.accepted == 2

    run(main)


def test_upload_iterator_error_after_the_head_surfaces_from_reading(run) -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_head()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
        await peer.wait_eof()

    async def main() -> None:
        go = asyncio.Event()

        async def body() -> AsyncIterator[bytes]:
            yield b"some"
            await go.wait()
            raise Boom("the caller went away")

        async with setup(handler) as (server, client):
            r = await client.send("POST", server.url + "/u", {}, body())
            assert r.status_code == 200
            go.set()
            with pytest.raises(Boom):
                await r.aread()
            await r.aclose()
            await wait(server.peers[0].eof, "the connection is closed")

    run(main)


@pytest.mark.parametrize("close", [False, True], ids=["keep-alive", "connection-close"])
def test_early_answer_during_a_long_upload(run, close: bool) -> None:
    async def handler(peer: Peer) -> None:
        if peer.index == 0:
            await peer.read_head()
            extra = [("Connection", "close")] if close else []
            await peer.send(response(413, b"too large", extra))
            await peer.wait_eof()  # graceful: keep reading until the client lets go
            return
        await serve(echo)(peer)

    async def endless() -> AsyncIterator[bytes]:
        block = b"u" * 65536
        for _ in range(100_000):  # 6 GB: only stopping makes this test end
            yield block
            await asyncio.sleep(0)

    async def main() -> None:
        async with setup(handler) as (server, client):
            got = await fetch(client, "POST", server.url + "/upload", {}, endless())
            assert (got.status, got.body) == (413, b"too large")
            await dropped_then_replaced(
                server, client, "/after", b"GET /after", "the client stops the upload and closes"
            )

    run(main)


# --------------------------------------------------------------------------------------------------
# Reading answers: backpressure, closing early, cancelling
# --------------------------------------------------------------------------------------------------


def test_backpressure_on_a_large_answer(run) -> None:
    size = 50 * 1024 * 1024
    block = random.Random(2).randbytes(1024 * 1024)
    expected = hashlib.sha256(block * 50).hexdigest()

    async def handler(peer: Peer) -> None:
        if await peer.read_request() is not None:
            await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
            for _ in range(50):
                for i in range(0, len(block), 256 * 1024):
                    if not await peer.send(block[i : i + 256 * 1024]):
                        return
            await peer.wait_eof()

    async def main() -> None:
        async with setup(handler) as (server, client):
            r = await client.send("GET", server.url + "/big", {}, None)
            digest = hashlib.sha256()
            received = chunks = most = 0
            paused = False
            async for chunk in r.aiter_raw():
                digest.update(chunk)
                received += len(chunk)
                chunks += 1
                await asyncio.sleep(0.002 if chunks < 60 else 0)  # slow at first: the upstream outruns us
                most = max(most, r._buffered)
                paused = paused or r._paused
                assert r._buffered <= HIGH_WATER + READ_CHUNK, f"{r._buffered} bytes buffered ahead"
            await r.aclose()
            assert received == size
            assert digest.hexdigest() == expected
            assert paused and most > HIGH_WATER // 2  # the slow phase did push against the limit
            assert server.peers[0].sent == size + len(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)

    run(main)


@pytest.mark.parametrize("read_first", [False, True], ids=["unread", "partly-read"])
def test_closing_an_answer_before_its_end_drops_the_connection(run, read_first: bool) -> None:
    async def handler(peer: Peer) -> None:
        while (request := await peer.read_request()) is not None:
            if request.target == "/big":
                await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\n\r\n", b"a" * 65536, b"b" * 65536)
                await peer.wait_eof()
                return
            await peer.send(response(200, b"small"))

    async def main() -> None:
        async with setup(handler) as (server, client):
            r = await client.send("GET", server.url + "/big", {}, None)
            if read_first:
                async for chunk in r.aiter_raw():
                    assert chunk
                    break
            await r.aclose()
            with pytest.raises(httpx.ReadError):
                await r.aread()
            await dropped_then_replaced(server, client, "/small", b"small", "the connection is closed")

    run(main)


def test_cancelled_request_closes_its_connection(run) -> None:
    async def handler(peer: Peer) -> None:
        if peer.index == 0:
            await peer.read_request()
            await peer.wait_eof()  # never answers
            return
        await serve(echo)(peer)

    async def main() -> None:
        async with setup(handler) as (server, client):
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(client.send("GET", server.url + "/slow", {}, None), 0.2)
            await wait(server.peers[0].eof, "the server sees the cancelled request's connection close")
            await eventually(lambda: not client._open, "the pool forgets the connection")
            assert idle_count(client) == 0
            assert (await fetch(client, "GET", server.url + "/next")).body == b"GET /next"
            assert server.accepted == 2 and len(server.peers[0].requests) == 1

    run(main)


def test_cancelled_requests_do_not_use_up_the_pool(run) -> None:
    """A hung upstream and callers giving up: each cancelled request must give its connection
    back, or the pool (here one connection) is exhausted for good."""

    async def handler(peer: Peer) -> None:
        while (request := await peer.read_request()) is not None:
            if request.target.startswith("/hang"):
                await peer.wait_eof()
                return
            await peer.send(echo(request))

    async def main() -> None:
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1, keepalive_expiry=30)
        async with setup(handler, limits=limits) as (server, client):
            for i in range(3):
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.1):
                        await client.send("GET", f"{server.url}/hang/{i}", {}, None)
            try:
                async with asyncio.timeout(HANG):
                    got = await fetch(client, "GET", server.url + "/ok")
            except TimeoutError:
                raise AssertionError(f"the pool is used up: {len(client._open)} connection(s) still open") from None
            assert got.body == b"GET /ok"

    run(main)


def test_cancelled_request_on_a_pooled_connection_closes_it(run) -> None:
    async def handler(peer: Peer) -> None:
        while (request := await peer.read_request()) is not None:
            if request.target == "/slow":
                await peer.wait_eof()
                return
            await peer.send(echo(request))

    async def main() -> None:
        async with setup(handler) as (server, client):
            assert (await fetch(client, "GET", server.url + "/warm")).status == 200
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):
                    await client.send("GET", server.url + "/slow", {}, None)
            await dropped_then_replaced(server, client, "/next", b"GET /next", "the connection is closed")

    run(main)


# --------------------------------------------------------------------------------------------------
# The pool
# --------------------------------------------------------------------------------------------------


def _slow_echo(delay: float) -> Handler:
    async def handler(peer: Peer) -> None:
        while (request := await peer.read_request()) is not None:
            await asyncio.sleep(delay)
            if not await peer.send(echo(request)):
                return

    return handler


def test_pool_limit_is_never_exceeded(run) -> None:
    async def main() -> None:
        limits = httpx.Limits(max_connections=2, max_keepalive_connections=2, keepalive_expiry=30)
        async with setup(_slow_echo(0.2), limits=limits) as (server, client):
            most = 0

            async def one(i: int) -> bytes:
                nonlocal most
                most = max(most, len(client._open) + client._connecting)
                got = await fetch(client, "GET", f"{server.url}/{i}")
                return got.body

            bodies = await asyncio.gather(*(one(i) for i in range(6)))
            assert bodies == [f"GET /{i}".encode() for i in range(6)]
            assert server.max_open <= 2
            assert most <= 2

    run(main)


def test_pool_limit_waiters_reuse_released_connections(run) -> None:
    """Six requests through two connections: a request waiting for room takes the connection
    that a finished request just returned, rather than closing it to open another."""

    async def main() -> None:
        limits = httpx.Limits(max_connections=2, max_keepalive_connections=2, keepalive_expiry=30)
        async with setup(_slow_echo(0.05), limits=limits) as (server, client):
            bodies = await asyncio.gather(*(fetch(client, "GET", f"{server.url}/{i}") for i in range(6)))
            assert [g.body for g in bodies] == [f"GET /{i}".encode() for i in range(6)]
            assert server.accepted == 2, f"{server.accepted} connections for 6 requests under a limit of 2"

    run(main)


def test_idle_connection_to_another_server_makes_room(run) -> None:
    async def main() -> None:
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=5, keepalive_expiry=30)
        async with RawServer(serve(echo)) as a, RawServer(serve(echo)) as b:
            client = upstream(limits=limits)
            try:
                assert (await fetch(client, "GET", a.url + "/x")).body == b"GET /x"
                assert (await fetch(client, "GET", b.url + "/y")).body == b"GET /y"
                await wait(a.peers[0].eof, "the idle connection to A is closed to make room")
                assert (b.accepted, len(client._open)) == (1, 1)
            finally:
                await client.aclose()

    run(main)


def test_making_room_closes_only_one_idle_connection(run) -> None:
    async def main() -> None:
        limits = httpx.Limits(max_connections=2, max_keepalive_connections=5, keepalive_expiry=30)
        async with RawServer(serve(echo)) as a, RawServer(serve(echo)) as b, RawServer(serve(echo)) as c:
            client = upstream(limits=limits)
            try:
                await fetch(client, "GET", a.url + "/a")
                await fetch(client, "GET", b.url + "/b")
                assert (await fetch(client, "GET", c.url + "/c")).body == b"GET /c"
                await eventually(lambda: a.peers[0].eof.is_set() or b.peers[0].eof.is_set(), "room is made")
                await asyncio.sleep(0.05)
                closed = [s.peers[0].eof.is_set() for s in (a, b)]
                assert closed.count(True) == 1, f"idle connections closed for one new connection: {closed}"
            finally:
                await client.aclose()

    run(main)


def test_cancelled_wait_for_room_leaves_the_pool_usable(run) -> None:
    async def main() -> None:
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1, keepalive_expiry=30)
        async with setup(_slow_echo(0.2), limits=limits) as (server, client):
            first = asyncio.create_task(fetch(client, "GET", server.url + "/1"))
            await eventually(lambda: len(server.requests) == 1, "the first request arrives")
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.05):
                    await client.send("GET", server.url + "/2", {}, None)  # waits for room, then gives up
            assert (await first).body == b"GET /1"
            assert (await fetch(client, "GET", server.url + "/3")).body == b"GET /3"
            assert [r.target for r in server.requests] == ["/1", "/3"]
            assert server.accepted == 1

    run(main)


def test_idle_connections_expire(run) -> None:
    async def main() -> None:
        limits = httpx.Limits(max_connections=10, max_keepalive_connections=10, keepalive_expiry=0.2)
        async with setup(serve(echo), limits=limits) as (server, client):
            assert (await fetch(client, "GET", server.url + "/1")).status == 200
            assert (await fetch(client, "GET", server.url + "/2")).status == 200  # within the expiry: reused
            assert server.accepted == 1
            await asyncio.sleep(0.5)
            assert (await fetch(client, "GET", server.url + "/3")).status == 200
            assert server.accepted == 2
            assert [r.conn for r in server.requests] == [0, 0, 1]
            await wait(server.peers[0].eof, "the expired connection is closed")

    run(main)


def test_keepalive_connections_limit_per_server(run) -> None:
    async def main() -> None:
        limits = httpx.Limits(max_connections=10, max_keepalive_connections=1, keepalive_expiry=30)
        async with setup(_slow_echo(0.05), limits=limits) as (server, client):
            await asyncio.gather(*(fetch(client, "GET", f"{server.url}/{i}") for i in range(3)))
            assert server.accepted == 3
            await eventually(lambda: sum(p.eof.is_set() for p in server.peers) == 2, "two of three are closed")
            assert idle_count(client) == 1
            assert (await fetch(client, "GET", server.url + "/again")).status == 200
            assert server.accepted == 3

    run(main)


def test_no_keepalive_connections_when_the_limit_is_zero(run) -> None:
    async def main() -> None:
        limits = httpx.Limits(max_connections=10, max_keepalive_connections=0, keepalive_expiry=30)
        async with setup(serve(echo), limits=limits) as (server, client):
            for i in range(3):
                assert (await fetch(client, "GET", f"{server.url}/{i}")).status == 200
            assert server.accepted == 3, "max_keepalive_connections=0 kept connections alive"

    run(main)


def test_client_aclose_closes_idle_connections(run) -> None:
    async def main() -> None:
        async with RawServer(_slow_echo(0.05)) as server:
            client = upstream()
            await asyncio.gather(*(fetch(client, "GET", f"{server.url}/{i}") for i in range(3)))
            assert server.accepted == 3 and idle_count(client) == 3
            await client.aclose()
            for peer in server.peers:
                await wait(peer.eof, "aclose closes every idle connection")
            assert not client._open and idle_count(client) == 0

    run(main)


def test_client_aclose_cuts_an_answer_in_flight(run) -> None:
    async def handler(peer: Peer) -> None:
        if await peer.read_request() is not None:
            await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhalf")
            await peer.wait_eof()

    async def main() -> None:
        async with RawServer(handler) as server:
            client = upstream()
            r = await client.send("GET", server.url + "/", {}, None)
            await client.aclose()
            with pytest.raises(httpx.ReadError):
                await r.aread()
            await wait(server.peers[0].eof, "the connection is closed")

    run(main)


# --------------------------------------------------------------------------------------------------
# Egress, connecting, URLs
# --------------------------------------------------------------------------------------------------


class Resolver:
    def __init__(self, *answer: str) -> None:
        self.answer = list(answer)
        self.calls: list[tuple[str, int]] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append((host, port))
        return self.answer


def test_egress_policy_refuses_loopback(run) -> None:
    async def main() -> None:
        async with setup(serve(echo), policy=EgressPolicy()) as (server, client):
            with pytest.raises(EgressDenied):
                await client.send("GET", server.url + "/", {}, None)
            for host in ("2130706433", "0x7f.1", "[::ffff:127.0.0.1]"):
                with pytest.raises(EgressDenied):
                    await client.send("GET", f"http://{host}:{server.port}/", {}, None)
            await asyncio.sleep(0.02)
            assert server.accepted == 0

    run(main)


def test_non_canonical_literal_connects_to_the_allowed_address_it_denotes(run) -> None:
    async def main() -> None:
        async with setup(serve(echo)) as (server, client):
            got = await fetch(client, "GET", f"http://2130706433:{server.port}/x")
            assert got.body == b"GET /x"
            assert server.requests[0].values("host") == [f"2130706433:{server.port}"]

    run(main)


def test_resolved_name_connects_to_the_checked_address(run) -> None:
    async def handler(peer: Peer) -> None:
        while (request := await peer.read_request()) is not None:
            await peer.send(response(200, request.target.encode(), [("Connection", "close")]))

    async def main() -> None:
        resolver = Resolver("127.0.0.1")
        async with setup(handler, resolver=resolver) as (server, client):
            for i in range(3):
                got = await fetch(client, "GET", f"http://upstream.test:{server.port}/{i}")
                assert got.body == f"/{i}".encode()
            assert server.accepted == 3  # a new connection each time (Connection: close) ...
            assert resolver.calls == [("upstream.test", server.port)]  # ... but one resolution
            assert [r.values("host") for r in server.requests] == [[f"upstream.test:{server.port}"]] * 3

    run(main)


def test_allow_listed_name_may_resolve_to_loopback(run) -> None:
    async def main() -> None:
        resolver = Resolver("127.0.0.1")
        async with setup(serve(echo), resolver=resolver, policy=EgressPolicy(["upstream.test"])) as (server, client):
            assert (await fetch(client, "GET", f"http://upstream.test:{server.port}/n")).body == b"GET /n"

    run(main)


@pytest.mark.parametrize("answer", [["10.1.2.3"], ["127.0.0.1", "169.254.169.254"], ["not-an-address"], []])
def test_resolver_answer_not_allowed_is_refused(run, answer: list[str]) -> None:
    async def main() -> None:
        async with setup(serve(echo), resolver=Resolver(*answer)) as (server, client):
            with pytest.raises(EgressDenied):
                await client.send("GET", f"http://upstream.test:{server.port}/", {}, None)
            await asyncio.sleep(0.02)
            assert server.accepted == 0

    run(main)


def test_resolver_failure_is_a_connect_error(run) -> None:
    def failing(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    async def main() -> None:
        client = upstream(resolver=failing)
        try:
            with pytest.raises(httpx.ConnectError):
                await client.send("GET", "http://nowhere.test:1/", {}, None)
        finally:
            await client.aclose()

    run(main)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_connection_refused_is_a_connect_error(run) -> None:
    async def main() -> None:
        client = upstream()
        try:
            with pytest.raises(httpx.ConnectError):
                await client.send("GET", f"http://127.0.0.1:{_closed_port()}/", {}, None)
            assert not client._open and client._connecting == 0
        finally:
            await client.aclose()

    run(main)


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/file", "/relative", "file:///etc/passwd", "http:///nohost"])
def test_unsupported_urls(run, url: str) -> None:
    async def main() -> None:
        client = upstream()
        try:
            with pytest.raises(httpx.UnsupportedProtocol):
                await client.send("GET", url, {}, None)
        finally:
            await client.aclose()

    run(main)

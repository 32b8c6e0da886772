"""The proxy under a real uvicorn (httptools, as ``integrations serve`` runs it) on 127.0.0.1, with
real sockets as callers and real local upstreams: what only shows on a real server (status lines
it can send, framing of bodiless answers, flow control, header bytes). Found in review.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import pytest
import uvicorn

from infrastructure.settings import Settings
from tests.api.conftest import Api, ForwardsPosition
from tests.proxy.test_proxy import apikey
from tests.proxy.upstream import Upstream


@pytest.fixture
def backend() -> str:
    return "sqlite"  # the defects are in the HTTP layer; one store is enough


class _Consistent(ForwardsPosition, httpx.Client):
    """An HTTP client over a real socket, forwarding event positions."""


@contextmanager
def served(settings: Settings) -> Iterator[tuple[Api, int]]:
    """The real app under uvicorn (httptools, as ``integrations serve``) on 127.0.0.1."""
    from api.app import create_app
    from cli.runtime import build_runtime

    runtime = build_runtime(settings)
    config = uvicorn.Config(
        create_app(runtime.services),
        host="127.0.0.1",
        port=0,
        http="httptools",
        lifespan="on",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="review-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        with _Consistent(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            yield Api(client, runtime), port  # type: ignore[arg-type]
    finally:
        server.should_exit = True
        thread.join(15)


@pytest.fixture
def live(proxy_settings: Settings) -> Iterator[tuple[Api, int]]:
    with served(proxy_settings) as pair:
        yield pair


class RawUpstream:
    """A keep-alive HTTP/1.1 upstream on 127.0.0.1 that answers each request with the bytes
    ``answer(target)`` returns (no framing added)."""

    def __init__(self, answer: Callable[[str], bytes]) -> None:
        self.answer = answer
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.targets: list[str] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    try:
                        data = conn.recv(65536)
                    except OSError:
                        return
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                target = head.split(b"\r\n", 1)[0].split(b" ")[1].decode()
                self.targets.append(target)
                try:
                    conn.sendall(self.answer(target))
                except OSError:
                    return

    def close(self) -> None:
        self.sock.close()


@contextmanager
def raw_upstream(answer: Callable[[str], bytes]) -> Iterator[RawUpstream]:
    server = RawUpstream(answer)
    try:
        yield server
    finally:
        server.close()


def _raw_request(port: int, head: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(head.encode("latin-1"))
    return sock


def read_head(sock: socket.socket) -> bytes:
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            break
        buf += data
    return buf


# --------------------------------------------------------------------------------------------------
# 1. An upstream status the server cannot send
# --------------------------------------------------------------------------------------------------


def test_an_upstream_status_uvicorn_cannot_send_is_a_502_and_frees_the_slot(live) -> None:
    """An upstream status of 600-999 (three digits, none defined): a 502, and the integration's and
    the caller's slots are free again (before the fix the caller got no answer, and a streamed
    answer's slots were never given back: every later call was a 503)."""
    api, _ = live
    alice = api.user("alice")

    def answer(target: str) -> bytes:
        if target.endswith("/small"):
            return b"HTTP/1.1 999 Whatever\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"
        if target.endswith("/big"):
            return b"HTTP/1.1 999 Whatever\r\nContent-Length: 100000\r\n\r\n" + b"x" * 100000
        return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    with raw_upstream(answer) as up:
        iid = apikey(api, alice, up, proxyMaxConcurrency=1)["id"]  # type: ignore[arg-type]
        problems = []
        for path in ("small", "big"):
            try:
                r = api.client.get(f"/api/integrations/{iid}/proxy/{path}", headers=alice)
            except httpx.TransportError as e:
                problems.append(f"{path}: no answer ({e})")
                continue
            if r.status_code != 502:
                problems.append(f"{path}: {r.status_code}")
        r = api.client.get(f"/api/integrations/{iid}/proxy/fine", headers=alice)
        if r.status_code != 200:
            problems.append(f"after them: {r.status_code} {r.text} (slot leaked)")
        assert not problems, problems


# --------------------------------------------------------------------------------------------------
# 2. Bodiless answers are relayed with the upstream's Content-Length
# --------------------------------------------------------------------------------------------------


def test_head_through_request_answers_a_post_with_a_complete_message(live, upstream: Upstream) -> None:
    """``POST /request`` with ``{"method": "HEAD"}``: the answer to the caller's POST carries no
    Content-Length it does not keep (before the fix it promised the GET body's length and ended at
    0 bytes, and uvicorn cut it)."""
    api, _ = live
    alice = api.user("alice")
    iid = apikey(api, alice, upstream)["id"]
    try:
        r = api.client.post(f"/api/integrations/{iid}/request", json={"url": "echo", "method": "HEAD"}, headers=alice)
    except httpx.RemoteProtocolError as e:
        raise AssertionError(f"the answer to the POST is cut: {e}") from None
    assert r.status_code == 200
    assert int(r.headers.get("content-length", "0")) == len(r.content)
    assert upstream.last().method == "HEAD"


def test_a_304_with_content_length_keeps_the_callers_connection(live) -> None:
    """A 304 may carry the representation's Content-Length (RFC 9110 §8.6); relayed without it, the
    caller's keep-alive connection stays usable (before the fix uvicorn closed it)."""
    api, port = live
    alice = api.user("alice")

    def answer(target: str) -> bytes:
        if target.endswith("/cached"):
            return b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 1234\r\n\r\n'
        return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    with raw_upstream(answer) as up:
        iid = apikey(api, alice, up)["id"]  # type: ignore[arg-type]
        token = alice["Authorization"]
        request = (
            f"GET /api/integrations/{iid}/proxy/cached HTTP/1.1\r\nHost: x\r\nAuthorization: {token}\r\n"
            'If-None-Match: "v1"\r\n\r\n'
        )
        sock = _raw_request(port, request)
        with sock:
            head = read_head(sock)
            assert head.startswith(b"HTTP/1.1 304"), head
            sock.sendall(request.encode())  # the same keep-alive connection, once more
            again = read_head(sock)
            assert again.startswith(b"HTTP/1.1 304"), f"the connection was dropped after the 304: {again!r}"


# --------------------------------------------------------------------------------------------------
# 3. The overall deadline does not bound a stream whose caller reads slowly
# --------------------------------------------------------------------------------------------------


def test_the_deadline_cuts_a_stream_that_the_caller_reads_slowly(live, upstream: Upstream) -> None:
    """The overall deadline bounds the whole relay, sending to a slow reader included: 7 s into a
    call whose deadline is 3 s, no slot is held (before the fix only reads from the upstream were
    timed, and a slow reader held its slots as long as it liked)."""
    api, port = live
    alice = api.user("alice")
    iid = apikey(api, alice, upstream)["id"]
    token = alice["Authorization"]
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    started = time.monotonic()
    services = api.runtime.services
    with sock:
        sock.sendall(
            f"GET /api/integrations/{iid}/proxy/big?size=50000000 HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: {token}\r\n\r\n".encode()
        )
        held_at_7s = None
        while time.monotonic() - started < 8:
            try:
                data = sock.recv(2048)
            except OSError:
                break
            if not data:
                break
            if held_at_7s is None and time.monotonic() - started > 7:
                held_at_7s = services.bulkhead.active("alice")
            time.sleep(0.05)  # about 40 KiB/s: 50 MB would take 20 minutes
        if held_at_7s is None:
            held_at_7s = services.bulkhead.active("alice")
    assert held_at_7s == 0, "7 s into a call whose deadline is 3 s, the relay still holds its slot"


# --------------------------------------------------------------------------------------------------
# 4. Header bytes are re-encoded on the way up
# --------------------------------------------------------------------------------------------------


def test_obs_text_in_a_header_value_reaches_the_upstream_unchanged(live, upstream: Upstream) -> None:
    """Header bytes 0x80-0xFF (RFC 9110 obs-text) reach the upstream as they came (before the fix the
    request head was encoded as UTF-8: 0xE9 went out as 0xC3 0xA9)."""
    api, port = live
    alice = api.user("alice")
    iid = apikey(api, alice, upstream)["id"]
    token = alice["Authorization"]
    sock = _raw_request(
        port,
        f"GET /api/integrations/{iid}/proxy/echo HTTP/1.1\r\nHost: x\r\nAuthorization: {token}\r\n"
        "X-Opaque: caf\xe9\r\nConnection: close\r\n\r\n",  # sent as latin-1: the single byte 0xE9
    )
    with sock:
        assert read_head(sock).startswith(b"HTTP/1.1 200")
    # http.server reads header bytes as latin-1: one character per byte
    assert upstream.last().header("x-opaque") == "caf\xe9", repr(upstream.last().header("x-opaque"))

"""Uploads through ``/proxy`` when the upstream answers before the upload has ended, under a real
uvicorn (``tests/proxy/test_served.py``), with a threaded scripted upstream on 127.0.0.1 and
callers on raw sockets that go away: the slots are freed, the upstream connection is closed, and
nothing is logged at ERROR. Found in a second review.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import pytest

from infrastructure.settings import Settings
from tests.proxy import test_served
from tests.proxy.test_proxy import apikey

backend = test_served.backend  # the fixtures: SQLite, and the app under a real uvicorn
live = test_served.live


@dataclass
class Conn:
    index: int
    target: str = ""
    head: bytes = b""
    body: int = 0  # body bytes received (framing included for chunked)
    eof: bool = False  # the proxy closed its side
    closed_by_us: bool = False


@dataclass
class Scripted:
    """Threaded upstream: ``script(conn, sock, rest)`` runs after the request head arrived."""

    script: Callable[[Conn, socket.socket, bytes], None]
    conns: list[Conn] = field(default_factory=list)
    url: str = ""


def drain(conn: Conn, sock: socket.socket, limit: int | None = None, pause: float = 0.0) -> None:
    """Read body bytes until EOF (or ``limit``)."""
    sock.settimeout(15)
    while limit is None or conn.body < limit:
        try:
            data = sock.recv(65536)
        except OSError:
            break
        if not data:
            conn.eof = True
            return
        conn.body += len(data)
        if pause:
            time.sleep(pause)


@contextmanager
def scripted(script: Callable[[Conn, socket.socket, bytes], None]) -> Iterator[Scripted]:
    state = Scripted(script)
    listener = socket.create_server(("127.0.0.1", 0))
    state.url = f"http://127.0.0.1:{listener.getsockname()[1]}"

    def serve(sock: socket.socket, conn: Conn) -> None:
        buf = b""
        with sock:
            while b"\r\n\r\n" not in buf:
                data = sock.recv(65536)
                if not data:
                    conn.eof = True
                    return
                buf += data
            head, _, rest = buf.partition(b"\r\n\r\n")
            conn.head = head
            conn.target = head.split(b" ")[1].decode()
            conn.body = len(rest)
            try:
                script(conn, sock, rest)
            except OSError:
                pass

    def accept() -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            conn = Conn(len(state.conns))
            state.conns.append(conn)
            threading.Thread(target=serve, args=(sock, conn), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield state
    finally:
        listener.close()


def until(check: Callable[[], bool], seconds: float = 5.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.02)
    return check()


def upload_head(iid: str, token: str, path: str, framing: str, size: int, extra: str = "") -> bytes:
    frame = "Transfer-Encoding: chunked" if framing == "chunked" else f"Content-Length: {size}"
    return (
        f"POST /api/integrations/{iid}/proxy/{path} HTTP/1.1\r\nHost: x\r\nAuthorization: {token}\r\n"
        f"Content-Type: application/octet-stream\r\n{frame}\r\n{extra}\r\n"
    ).encode()


def send_body(sock: socket.socket, framing: str, nbytes: int) -> None:
    block = b"u" * 65536
    sent = 0
    while sent < nbytes:
        if framing == "chunked":
            sock.sendall(b"%x\r\n%s\r\n" % (len(block), block))
        else:
            sock.sendall(block)
        sent += len(block)


read_head = test_served.read_head


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        f"{r.name}: {r.getMessage()} {r.exc_info[1]!r}" if r.exc_info else f"{r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.levelno >= logging.ERROR
    ]


@pytest.mark.parametrize("framing", ["chunked", "length"])
def test_caller_disconnects_mid_upload_after_a_streamed_early_answer(live, caplog, framing: str) -> None:
    """The answer's head comes while the upload runs; then the caller goes away mid-upload. The
    relay ends quietly (before the fix the upload's disconnect surfaced as an ``AnswerCut``,
    logged by uvicorn as an error)."""
    caplog.set_level(logging.INFO)
    api, port = live
    alice = api.user("alice")
    services = api.runtime.services

    def script(conn: Conn, sock: socket.socket, rest: bytes) -> None:
        sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n5\r\nhello\r\n")
        drain(conn, sock)

    with scripted(script) as up:
        iid = apikey(api, alice, up)["id"]  # type: ignore[arg-type]
        sock = socket.create_connection(("127.0.0.1", port))
        sock.settimeout(5)
        sock.sendall(upload_head(iid, alice["Authorization"], "sink", framing, 50 * 2**20))
        send_body(sock, framing, 2 * 2**20)
        head = read_head(sock)
        assert head.startswith(b"HTTP/1.1 200"), head
        send_body(sock, framing, 1 * 2**20)
        sock.close()
        assert until(lambda: bool(up.conns) and up.conns[0].eof), "the proxy never closed the upstream connection"
        assert until(lambda: services.bulkhead.active(UUID(iid)) == 0 and services.bulkhead.active("alice") == 0)
        assert until(lambda: not services.upstream._open), services.upstream._open
        time.sleep(0.3)
    assert not errors(caplog), errors(caplog)


@pytest.mark.parametrize("then", ["trickle", "silent"])
def test_caller_disconnects_during_download_after_an_early_answer_to_its_upload(
    proxy_settings: Settings, caplog: pytest.LogCaptureFixture, then: str
) -> None:
    """The answer's head comes while the upload runs, the upload then ends, and the caller goes away
    during the download. A watcher takes ``receive`` over as soon as the upload has ended and ends
    the relay: slots and upstream connection are freed at once (before the fix the relay pulled
    the upstream's body to its end or the deadline, since uvicorn drops messages for a gone
    caller). ``silent``: the upstream sends nothing for a while after the upload."""
    caplog.set_level(logging.INFO)
    with test_served.served(proxy_settings.with_(proxy_deadline_seconds=10.0)) as (api, port):
        _download_after_upload(api, port, caplog, then)


def _download_after_upload(api: Any, port: int, caplog: pytest.LogCaptureFixture, then: str) -> None:
    alice = api.user("alice")
    services = api.runtime.services
    size = 2 * 2**20

    def script(conn: Conn, sock: socket.socket, rest: bytes) -> None:
        sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n")
        if then == "silent":
            sock.sendall(b"5\r\nhello\r\n")
        drain(conn, sock, limit=size)
        if then == "silent":
            time.sleep(20)
        try:
            for _ in range(600):
                sock.sendall(b"400\r\n" + b"d" * 1024 + b"\r\n")
                time.sleep(0.05)
        except OSError:
            conn.eof = True

    with scripted(script) as up:
        iid = apikey(api, alice, up)["id"]  # type: ignore[arg-type]
        sock = socket.create_connection(("127.0.0.1", port))
        sock.settimeout(5)
        sock.sendall(upload_head(iid, alice["Authorization"], "dl", "length", size))
        sock.sendall(b"u" * (size // 2))
        assert read_head(sock).startswith(b"HTTP/1.1 200")
        sock.sendall(b"u" * (size - size // 2))
        assert until(lambda: bool(up.conns) and up.conns[0].body >= size)
        if then == "trickle":
            sock.recv(4096)
        time.sleep(0.2)
        sock.close()
        t0 = time.monotonic()
        assert until(lambda: services.bulkhead.active(UUID(iid)) == 0, 15)
        freed = time.monotonic() - t0
        assert until(lambda: not services.upstream._open, 15)
        closed = time.monotonic() - t0
        assert freed < 1.0 and closed < 1.0, (freed, closed)
    assert not errors(caplog), errors(caplog)

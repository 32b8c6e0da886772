"""The proxy's own client (``GuardedUpstream``) against a real TLS upstream on 127.0.0.1, with a test
CA (``tests.test_egress._tls_pair``) and a scripted resolver: a threaded TLS server that can end a
connection with a TCP FIN but no TLS close_notify (a truncation), or cleanly. Found in a second
review.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx
import pytest

from infrastructure.egress import EgressPolicy
from infrastructure.upstream_http import GuardedUpstream
from tests import test_upstream_http as base
from tests.test_egress import ScriptedResolver, _tls_pair

run = base.run  # the fixture: each test on the stock asyncio loop and on uvloop


@dataclass
class TlsServer:
    port: int = 0
    sni: list[str | None] = field(default_factory=list)
    accepted: int = 0
    requests: list[tuple[int, str, str]] = field(default_factory=list)  # (connection, target, host)
    errors: list[str] = field(default_factory=list)


@contextmanager
def tls_server(ctx: ssl.SSLContext, answer: Callable[[str], tuple[bytes, str]]) -> Iterator[TlsServer]:
    """Keep-alive TLS server; ``answer(target)`` is (bytes, how): ``keep`` (stay open),
    ``truncate`` (TCP FIN without close_notify, then read until the client closes) or ``clean``
    (close_notify, then close)."""
    state = TlsServer()
    ctx.sni_callback = lambda sock, name, c: state.sni.append(name)  # type: ignore[assignment]
    listener = socket.create_server(("127.0.0.1", 0))
    state.port = listener.getsockname()[1]

    def serve(raw: socket.socket, index: int) -> None:
        try:
            conn = ctx.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError) as e:
            state.errors.append(f"handshake: {e}")
            raw.close()
            return
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                target = lines[0].split(" ")[1]
                host = next(
                    (line.split(":", 1)[1].strip() for line in lines[1:] if line.lower().startswith("host:")), ""
                )
                state.requests.append((index, target, host))
                data, how = answer(target)
                conn.sendall(data)
                if how == "truncate":
                    # SSLSocket.shutdown: the TCP FIN, no close_notify (as a cut on the path looks);
                    # then read what the client still sends until it closes (no RST either way).
                    conn.shutdown(socket.SHUT_WR)
                    conn.settimeout(5)
                    while conn.recv(65536):
                        pass
                    return
                if how == "notify_close":  # close_notify and the FIN at once, not waiting for the client's
                    conn.setblocking(False)
                    try:
                        conn.unwrap()
                    except (OSError, ssl.SSLError):
                        pass
                    return
                if how == "clean":
                    conn.settimeout(2)
                    try:
                        conn.unwrap()  # close_notify
                    except (OSError, ssl.SSLError):
                        pass
                    return
        except (OSError, ssl.SSLError):
            return
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def accept() -> None:
        while True:
            try:
                raw, _ = listener.accept()
            except OSError:
                return
            state.accepted += 1
            threading.Thread(target=serve, args=(raw, state.accepted - 1), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield state
    finally:
        listener.close()


def client_for(client_ctx: ssl.SSLContext, *names: str) -> GuardedUpstream:
    return GuardedUpstream(
        EgressPolicy(list(names)),
        httpx.Timeout(5.0, connect=2.0),
        resolver=ScriptedResolver(["127.0.0.1"]),
        verify=client_ctx,
        limits=httpx.Limits(max_connections=10, max_keepalive_connections=10, keepalive_expiry=30),
    )


def _answer(target: str) -> tuple[bytes, str]:
    if target.endswith("/truncated"):
        return b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nthe first half of the body", "truncate"
    if target.endswith("/clean"):
        return b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nthe whole body", "clean"
    body = target.encode()
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body), "keep"


async def _get(client: GuardedUpstream, url: str) -> tuple[int, bytes]:
    r = await client.send("GET", httpx.URL(url), {}, None)
    try:
        return r.status_code, await r.aread()
    finally:
        await r.aclose()


@pytest.mark.parametrize("reader", ["aread", "aiter_raw"])
def test_a_tls_body_framed_by_the_close_is_not_complete_without_close_notify(run, reader: str) -> None:
    """An answer without Content-Length or chunked ends with the connection (RFC 9112 §6.3). Over
    TLS only a close_notify says the server ended it; a bare TCP FIN may be an attacker (or a
    middlebox) cutting the stream: a ReadError, never a short body taken for whole (RFC 8446
    §6.1). Both event loops (asyncio's TLS layer reports either end the same way; the client asks
    the TLS object which it was)."""
    server_ctx, client_ctx = _tls_pair("tls.test")

    async def main() -> None:
        client = client_for(client_ctx, "tls.test")
        try:
            with tls_server(server_ctx, _answer) as server:
                url = f"https://tls.test:{server.port}"
                # the control: a close with close_notify ends the body
                assert await _get(client, url + "/clean") == (200, b"the whole body")
                r = await client.send("GET", httpx.URL(url + "/truncated"), {}, None)
                try:
                    with pytest.raises(httpx.ReadError):
                        if reader == "aread":
                            body = await r.aread()
                        else:
                            body = b"".join([c async for c in r.aiter_raw()])
                        raise AssertionError(f"a truncated TLS body was accepted as complete: {body!r}")
                finally:
                    await r.aclose()
        finally:
            await client.aclose()

    run(main)

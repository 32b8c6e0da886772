"""Edge cases of the proxy's own HTTP/1.1 client (``infrastructure.upstream_http``) found in review:
the pool handing on room after a cancelled wait or a failed connect, and bodies framed by the close
when chunked is not the last transfer coding. Against the raw local servers of
``tests/test_upstream_http.py`` (same helpers, both event loops).
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from infrastructure.egress import EgressDenied, EgressPolicy
from tests import test_upstream_http as base
from tests.test_upstream_http import HANG, Peer, Resolver, echo, eventually, fetch, response, serve, setup

run = base.run  # the fixture: each test on the stock asyncio loop and on uvloop

ONE = httpx.Limits(max_connections=1, max_keepalive_connections=1, keepalive_expiry=30)


def test_a_wakeup_given_to_a_cancelled_waiter_is_passed_on(run) -> None:
    """A full pool, two requests waiting for room: a connection comes back and wakes the first,
    whose deadline cancels it in the same loop turn. The wakeup goes on to the second, which takes
    the idle connection (before the fix it waited to its own deadline, a 504 in the proxy)."""

    async def main() -> None:
        go = asyncio.Event()

        async def handler(peer: Peer) -> None:
            while (request := await peer.read_request()) is not None:
                if request.target == "/first":
                    await go.wait()
                if not await peer.send(response(200, request.target.encode())):
                    return

        async with setup(handler, limits=ONE) as (server, client):
            w1: asyncio.Task | None = None

            async def first_then_cancel_w1() -> bytes:
                got = await fetch(client, "GET", server.url + "/first")
                # The answer completed and the connection went back to the pool, waking w1; w1
                # has not run yet. Its deadline fires now.
                assert w1 is not None
                w1.cancel()
                return got.body

            first = asyncio.create_task(first_then_cancel_w1())
            await eventually(lambda: server.accepted == 1 and len(server.requests) == 1, "the first request is out")
            w1 = asyncio.create_task(fetch(client, "GET", server.url + "/w1"))
            w2 = asyncio.create_task(fetch(client, "GET", server.url + "/w2"))
            await eventually(lambda: len(client._waiters) == 2, "both wait for room")
            go.set()
            assert await first == b"/first"
            try:
                got = await asyncio.wait_for(w2, HANG)
            except TimeoutError:
                raise AssertionError(
                    "the second waiter was never woken: the wakeup went to a cancelled waiter"
                ) from None
            assert got.body == b"/w2"
            assert w1.cancelled()

    run(main)


@pytest.mark.parametrize(
    ("answer", "error"),
    [(None, httpx.ConnectError), (["169.254.169.254"], EgressDenied)],
    ids=["resolver-error", "egress-refusal"],
)
def test_a_failed_connect_gives_its_room_to_a_waiter(run, answer: list[str] | None, error: type[Exception]) -> None:
    """A connection attempt holds room against ``max_connections``; when it fails (here: the
    resolver fails, or the name resolves to an address the egress policy refuses) a waiting
    request is woken and uses that room (before the fix it waited to its deadline although nothing
    was open)."""

    def resolver(host: str, port: int) -> list[str]:
        if host == "failing.invalid":
            time.sleep(0.3)
            if answer is None:
                raise OSError("no such name")
            return answer
        return ["127.0.0.1"]

    async def main() -> None:
        async with setup(
            serve(lambda r: response(200, b"ok")), limits=ONE, resolver=resolver, policy=EgressPolicy(["127.0.0.1"])
        ) as (server, client):
            failing = asyncio.create_task(fetch(client, "GET", f"http://failing.invalid:{server.port}/x"))
            await eventually(lambda: client._connecting == 1, "the first connect is under way")
            waiting = asyncio.create_task(fetch(client, "GET", server.url + "/y"))
            await eventually(lambda: len(client._waiters) == 1, "the second waits for room")
            with pytest.raises(error):
                await failing
            try:
                got = await asyncio.wait_for(waiting, HANG)
            except TimeoutError:
                raise AssertionError("the waiter was never told that the failed connect freed its room") from None
            assert got.body == b"ok"

    run(main)


def test_a_body_read_until_close_is_whole_when_chunked_is_not_the_last_coding(run) -> None:
    """``Transfer-Encoding: chunked, gzip``: chunked is not the final coding, so the body ends with
    the connection (RFC 9112 §6.3) and arrives whole (before the fix the close was reported as a
    cut answer)."""

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", b"raw-bytes", pause=0.05)
        peer.close()

    async def main() -> None:
        async with setup(handler) as (server, client):
            got = await fetch(client, "GET", server.url + "/x")
            assert got.body == b"raw-bytes"

    run(main)


def test_an_internationalised_host_goes_out_in_its_ascii_form(run) -> None:
    """DNS, TLS and the Host header all use the IDNA (``xn--``) form of a non-ASCII host name; the
    raw UTF-8 bytes never reach the resolver or the wire."""

    async def main() -> None:
        resolver = Resolver("127.0.0.1")
        async with setup(serve(echo), resolver=resolver) as (server, client):
            got = await fetch(client, "GET", f"http://bücher.test:{server.port}/a")
            assert got.status == 200
            assert resolver.calls == [("xn--bcher-kva.test", server.port)]
            assert server.requests[0].values("host") == [f"xn--bcher-kva.test:{server.port}"]
            assert b"b\xc3\xbccher" not in bytes(server.peers[0].raw)

    run(main)

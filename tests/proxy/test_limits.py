"""Limits and failures (PX-9, PX-10): the overall deadline, unreachable and refused upstreams,
the per-integration bulkhead and the response size cap."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import pytest

from api.proxy_endpoint import AnswerCut
from infrastructure.settings import Settings, SettingsError
from tests.api.conftest import Api
from tests.proxy.conftest import api_with
from tests.proxy.test_proxy import apikey, create
from tests.proxy.upstream import Upstream


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_deadline_on_headers_is_504(api: Api, upstream: Upstream) -> None:
    alice = api.user("alice")
    iid = apikey(api, alice, upstream)["id"]
    started = time.monotonic()
    r = api.client.get(f"/api/integrations/{iid}/proxy/slow-headers", headers=alice)
    elapsed = time.monotonic() - started
    assert r.status_code == 504, r.text
    assert r.json() == {
        "statusCode": 504,
        "error": "Gateway Timeout",
        "message": "The upstream did not answer in time.",
        "code": "upstream_timeout",
    }
    assert 2.5 < elapsed < 6


def test_deadline_on_a_small_trickling_body_is_504(api: Api, upstream: Upstream) -> None:
    """1 byte/s after prompt headers, 30 bytes declared: a small body is read whole before our
    headers go out, so the deadline still answers a clean 504."""
    alice = api.user("alice")
    iid = apikey(api, alice, upstream)["id"]
    started = time.monotonic()
    r = api.client.get(f"/api/integrations/{iid}/proxy/trickle", headers=alice)
    assert r.status_code == 504, r.text
    assert r.json()["code"] == "upstream_timeout"
    assert time.monotonic() - started < 8


@contextmanager
def _large_trickle() -> Iterator[str]:
    """An upstream declaring 1 MB, sending 128 KiB at once (past the small-body size, so streamed)
    and then one byte per second."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    stop = threading.Event()

    def serve() -> None:
        with suppress(OSError):
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                    b"Content-Length: 1000000\r\n\r\n" + b"x" * 131072
                )
                while not stop.wait(1):
                    conn.sendall(b"x")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        listener.close()
        thread.join(5)


def test_deadline_cuts_a_trickling_streamed_body(api: Api) -> None:
    """A large body is streamed: once the status is out, the deadline can only cut the stream (the
    caller sees a broken response, never a complete-looking one)."""
    alice = api.user("alice")
    with _large_trickle() as url:
        iid = create(api, alice, apiBaseUri=url + "/v1", mode="shared")["id"]
        started = time.monotonic()
        with pytest.raises(AnswerCut):  # raised to the ASGI server, which resets the connection
            api.client.get(f"/api/integrations/{iid}/proxy/trickle", headers=alice)
        assert time.monotonic() - started < 8


def test_unreachable_upstream_is_502(api: Api) -> None:
    alice = api.user("alice")
    integration = create(api, alice, apiBaseUri=f"http://127.0.0.1:{_closed_port()}/v1", mode="shared")
    r = api.client.get(f"/api/integrations/{integration['id']}/proxy/x", headers=alice)
    assert r.status_code == 502, r.text
    assert r.json()["code"] == "upstream_unreachable" and r.json()["statusCode"] == 502
    assert "127.0.0.1" not in r.text  # never the upstream URL


def test_egress_refusal_is_502_and_nothing_is_sent(proxy_settings: Settings, upstream: Upstream) -> None:
    with api_with(proxy_settings.with_(egress_allow="")) as api:
        alice = api.user("alice")
        iid = apikey(api, alice, upstream)["id"]
        r = api.client.get(f"/api/integrations/{iid}/proxy/echo", headers=alice)
        assert r.status_code == 502, r.text
        assert r.json()["code"] == "egress_denied"
        assert upstream.count() == 0


def _hold_slow(api: Api, who: dict[str, str], iid: str, upstream: Upstream) -> tuple[threading.Thread, dict[str, int]]:
    """One call held by the upstream (slow headers) until the deadline, in a thread; returns once
    the upstream has it."""
    slow: dict[str, int] = {}

    def hold() -> None:
        slow["status"] = api.client.get(f"/api/integrations/{iid}/proxy/slow-headers", headers=who).status_code

    thread = threading.Thread(target=hold)
    thread.start()
    deadline = time.monotonic() + 2
    while upstream.count() == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    return thread, slow


def test_bulkhead_refuses_beyond_the_cap(proxy_settings: Settings, upstream: Upstream) -> None:
    with api_with(proxy_settings.with_(proxy_max_concurrency=1)) as api:
        alice = api.user("alice")
        iid = apikey(api, alice, upstream)["id"]
        other = apikey(api, alice, upstream, slug="other")["id"]
        thread, slow = _hold_slow(api, alice, iid, upstream)
        r = api.client.get(f"/api/integrations/{iid}/proxy/echo", headers=alice)
        assert r.status_code == 503, r.text
        assert r.json()["code"] == "proxy_busy" and r.headers["retry-after"] == "1"
        r = api.client.get(f"/api/integrations/{other}/proxy/echo", headers=alice)
        assert r.status_code == 200  # the cap is per integration
        thread.join()
        assert slow["status"] == 504
        r = api.client.get(f"/api/integrations/{iid}/proxy/echo", headers=alice)
        assert r.status_code == 200  # the slot came back


def test_per_user_cap_refuses_beyond_it_across_integrations(proxy_settings: Settings, upstream: Upstream) -> None:
    with api_with(proxy_settings.with_(proxy_max_concurrency_per_user=1)) as api:  # wired by cli.runtime
        _per_user_cap(api, upstream)


def _per_user_cap(api: Api, upstream: Upstream) -> None:
    alice = api.user("alice")
    bob = api.user("bob")
    iid = apikey(api, alice, upstream)["id"]
    other = apikey(api, alice, upstream, slug="other")["id"]
    for target in (iid, other):
        assert api.client.put(f"/api/integrations/{target}/shares/bob", json={}, headers=alice).status_code == 200
    thread, slow = _hold_slow(api, alice, iid, upstream)
    assert upstream.count() == 1
    for target in (iid, other):  # the cap is the caller's, whichever integration
        r = api.client.get(f"/api/integrations/{target}/proxy/echo", headers=alice)
        assert r.status_code == 503, r.text
        assert r.json() == {
            "statusCode": 503,
            "error": "Service Unavailable",
            "message": "Too many concurrent proxied requests from you; retry shortly.",
            "code": "proxy_busy",
        }
        assert r.headers["retry-after"] == "1"
        r = api.client.post(f"/api/integrations/{target}/request", json={"url": "echo"}, headers=alice)
        assert r.status_code == 503 and r.json()["code"] == "proxy_busy"
    assert upstream.count() == 1  # refused calls sent nothing
    for target in (iid, other):  # another caller is not affected, on the same integrations
        r = api.client.get(f"/api/integrations/{target}/proxy/echo", headers=bob)
        assert r.status_code == 200, r.text
    thread.join()
    assert slow["status"] == 504
    r = api.client.get(f"/api/integrations/{other}/proxy/echo", headers=alice)
    assert r.status_code == 200  # the slot came back
    services = api.runtime.services
    assert services.bulkhead.active("alice") == 0 and services.bulkhead.active("bob") == 0


def test_the_per_user_cap_is_a_setting() -> None:
    assert Settings.from_env({}).proxy_max_concurrency_per_user == 128
    env = {"INTEGRATIONS_PROXY_MAX_CONCURRENCY_PER_USER": "7"}
    assert Settings.from_env(env).proxy_max_concurrency_per_user == 7
    for bad in ("0", "-1", "x"):
        with pytest.raises(SettingsError, match="INTEGRATIONS_PROXY_MAX_CONCURRENCY_PER_USER"):
            Settings.from_env({"INTEGRATIONS_PROXY_MAX_CONCURRENCY_PER_USER": bad})


def test_response_size_cap(proxy_settings: Settings, upstream: Upstream) -> None:
    with api_with(proxy_settings.with_(proxy_max_response_bytes=1000)) as api:
        alice = api.user("alice")
        iid = apikey(api, alice, upstream)["id"]
        r = api.client.get(f"/api/integrations/{iid}/proxy/binary?n=10", headers=alice)
        assert r.status_code == 502, r.text
        assert r.json()["code"] == "upstream_too_large"
        r = api.client.get(f"/api/integrations/{iid}/proxy/binary?n=3", headers=alice)
        assert r.status_code == 200 and len(r.content) == 768


def test_per_integration_limits_lower_the_servers(api: Api, upstream: Upstream) -> None:
    alice = api.user("alice")
    integration = apikey(api, alice, upstream, proxyMaxResponseBytes=1000, proxyMaxConcurrency=2)
    assert integration["proxyMaxResponseBytes"] == 1000 and integration["proxyMaxConcurrency"] == 2
    iid = integration["id"]
    r = api.client.get(f"/api/integrations/{iid}/proxy/binary?n=10", headers=alice)
    assert r.status_code == 502 and r.json()["code"] == "upstream_too_large"
    r = api.client.get(f"/api/integrations/{iid}/proxy/big?size=900", headers=alice)
    assert r.status_code == 200 and len(r.content) == 900
    r = api.client.patch(f"/api/integrations/{iid}", json={"proxyMaxConcurrency": 0}, headers=alice)
    assert r.status_code == 400

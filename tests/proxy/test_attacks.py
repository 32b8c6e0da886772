"""The attack corpus (PX-1, PX-8): every entry is refused with a 400 and the upstream receives
nothing. Table-driven over both ways in; runs on both backends."""

from __future__ import annotations

import pytest

from tests.api.conftest import Api
from tests.proxy.test_proxy import apikey
from tests.proxy.upstream import Upstream

# Relative URLs sent in the body of POST /request: no client normalises them on the way.
REQUEST_URLS = [
    "../admin",
    "../../etc/passwd",
    "a/../../admin",
    "./admin",
    "a/./b",
    "..",
    "a/..",
    "%2e%2e/admin",
    "%2E%2E/admin",
    ".%2e/admin",
    "%2e./admin",
    "a/%2e%2e/%2e%2e/admin",
    "%252e%252e/admin",  # double encoded
    "a%2fb",
    "a%2F..%2Fadmin",
    "..%2fadmin",
    "a%5cb",
    "a%5C..%5Cadmin",
    "a\\..\\admin",
    "\\\\evil.example\\x",
    "%00",
    "a%00b",
    "a%2500",
    "//evil.example/x",
    "///evil.example/x",
    "/\\evil.example/x",
    "http://evil.example/x",
    "https://evil.example/x",
    "HTTP://evil.example/x",
    "x://y",
    "javascript:alert(1)",
    "evil.example:80@127.0.0.1/x",
    "user:pass@evil.example/x",
    "a\r\nHost: evil",
    "a\nb",
    "a\rb",
    "a\tb",
    "a b",
    "a#frag",
    "a/b#/../admin",
    "a\x00b",
    "caf\u00e9",
    "\uff0e\uff0e/admin",  # fullwidth dots
    "a//b",
    "a%",
    "a%zz",
    "a?x=%00",
]


@pytest.mark.parametrize("url", REQUEST_URLS)
def test_request_url_attacks_never_reach_the_upstream(api: Api, upstream: Upstream, url: str) -> None:
    alice = api.user("alice")
    iid = apikey(api, alice, upstream)["id"]
    r = api.client.post(f"/api/integrations/{iid}/request", json={"url": url}, headers=alice)
    assert r.status_code == 400, (url, r.status_code, r.text)
    body = r.json()
    assert body["statusCode"] == 400 and body["error"] == "Bad Request"
    assert upstream.count() == 0, upstream.received


# Raw request targets after /proxy/: what httpx would not normalise away.
PROXY_PATHS = [
    "%2e%2e/admin",
    "%2E%2E/%2E%2E/admin",
    "a/%2e%2e/%2e%2e/admin",
    ".%2e/admin",
    "%252e%252e/admin",
    "a%2fb",
    "a%2F..%2Fadmin",
    "a%5c..%5cadmin",
    "%2f%2fevil.example/x",
    "a%00b",
    "a%0d%0aHost:%20evil",
    "http:%2f%2fevil.example/x",
    "https:/evil.example",
    "evil.example:80@x/y",
    "%2e",
    "a//b",
]


@pytest.mark.parametrize("path", PROXY_PATHS)
def test_proxy_path_attacks_never_reach_the_upstream(api: Api, upstream: Upstream, path: str) -> None:
    alice = api.user("alice")
    iid = apikey(api, alice, upstream)["id"]
    r = api.client.get(f"/api/integrations/{iid}/proxy/{path}", headers=alice)
    assert r.status_code == 400, (path, r.status_code, r.text)
    assert upstream.count() == 0, upstream.received


def test_body_params_are_encoded_not_concatenated(api: Api, upstream: Upstream) -> None:
    alice = api.user("alice")
    iid = apikey(api, alice, upstream)["id"]
    r = api.client.post(
        f"/api/integrations/{iid}/request",
        json={"url": "echo", "params": {"a": "1&admin=true", "b": "../x", "c": ["1", "2"], "d": True}},
        headers=alice,
    )
    assert r.status_code == 200, r.text
    assert upstream.last().target == "/v1/echo?a=1%26admin%3Dtrue&b=..%2Fx&c=1&c=2&d=true"


def test_a_base_path_prefix_is_kept(api: Api, upstream: Upstream) -> None:
    alice = api.user("alice")
    iid = apikey(api, alice, upstream)["id"]
    for url in ("echo/x", "/echo/x", "echo/x/"):
        r = api.client.post(f"/api/integrations/{iid}/request", json={"url": url}, headers=alice)
        assert r.status_code == 200, (url, r.text)
        assert upstream.last().target.startswith("/v1/echo/x")


# Methods outside the allowlist (PX-2), OPTIONS included: a CORS preflight is never forwarded with
# the integration's credentials. The upstream recorder answers every one of these if asked.
REFUSED_METHODS = ["OPTIONS", "TRACE", "CONNECT", "PROPFIND", "MKCOL", "LINK", "FOO", "options"]


@pytest.mark.parametrize("method", REFUSED_METHODS)
def test_methods_outside_the_allowlist_are_400_and_never_reach_the_upstream(
    api: Api, upstream: Upstream, method: str
) -> None:
    alice = api.user("alice")
    iid = apikey(api, alice, upstream)["id"]
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "PUT"}
    r = api.client.request(method, f"/api/integrations/{iid}/proxy/echo", headers={**alice, **preflight}, content=b"x")
    assert r.status_code == 400, (method, r.status_code, r.text)
    body = r.json()
    assert body["statusCode"] == 400 and body["error"] == "Bad Request"
    assert body["code"] == "method_not_allowed" and "GET, HEAD, POST, PUT, PATCH, DELETE" in body["message"]
    assert body["details"] == [{"field": "method", "message": "not allowed"}]
    assert "access-control-allow-origin" not in r.headers
    r = api.client.post(f"/api/integrations/{iid}/request", json={"url": "echo", "method": method}, headers=alice)
    assert r.status_code == 400, (method, r.text)
    assert r.json()["code"] == "method_not_allowed"
    assert upstream.count() == 0, upstream.received


def test_a_refused_method_needs_no_visible_integration_and_reveals_nothing(api: Api, upstream: Upstream) -> None:
    """Refused before the integration is resolved: the same 400 for one the caller cannot see, one
    that does not exist, and without credentials (a browser's preflight carries none; Litestar's
    authentication lets OPTIONS through to the handler, which refuses it)."""
    alice = api.user("alice")
    iid = apikey(api, alice, upstream)["id"]
    bob = api.user("bob")
    origin = {"Origin": "https://app.example", "Access-Control-Request-Method": "GET"}
    answers = [
        api.client.options(f"/api/integrations/{iid}/proxy/echo", headers={**bob, **origin}),
        api.client.options("/api/integrations/nope/proxy/echo", headers={**bob, **origin}),
        api.client.options(f"/api/integrations/{iid}/proxy/echo", headers=origin),
        api.client.request("TRACE", f"/api/integrations/{iid}/proxy/echo", headers=bob),
    ]
    assert {r.status_code for r in answers} == {400}
    assert len({r.text.replace("TRACE", "OPTIONS") for r in answers}) == 1
    assert upstream.count() == 0

"""The request proxy through the HTTP API against a real local upstream: both ways in, each auth
type, header hygiene, custom headers, limits and access."""

from __future__ import annotations

import base64
import uuid
from typing import Any

from tests.api.conftest import Api
from tests.proxy.upstream import Upstream

SECRET = "sk-test-secret-value"


def create(api: Api, owner: dict[str, str], **fields: Any) -> dict[str, Any]:
    body = {"name": "Example", "authType": "apikey", "apiKey": SECRET, **fields}
    r = api.client.post("/api/integrations", json=body, headers=owner)
    assert r.status_code == 201, r.text
    return r.json()


def apikey(api: Api, owner: dict[str, str], upstream: Upstream, **fields: Any) -> dict[str, Any]:
    return create(api, owner, apiBaseUri=upstream.url + "/v1", mode="shared", **fields)


def test_request_endpoint_injects_api_key_header(api: Api, upstream: Upstream) -> None:
    alice = api.user("alice")
    integration = apikey(api, alice, upstream)
    r = api.client.post(
        f"/api/integrations/{integration['id']}/request",
        json={"url": "/echo/items", "method": "GET", "params": {"q": "a b", "n": 3}},
        headers=alice,
    )
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["target"] == "/v1/echo/items?q=a+b&n=3"
    assert doc["headers"]["x-api-key"] == SECRET
    assert "authorization" not in doc["headers"]
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["content-security-policy"] == "sandbox; default-src 'none'"


def test_api_key_in_query_replaces_a_caller_supplied_one(api: Api, upstream: Upstream) -> None:
    alice = api.user("alice")
    integration = apikey(api, alice, upstream, apiKeyLocation="query", apiKeyName="key")
    r = api.client.get(f"/api/integrations/{integration['id']}/proxy/echo?key=mine&x=1", headers=alice)
    assert r.status_code == 200, r.text
    target = upstream.last().target
    assert target.startswith("/v1/echo?") and "x=1" in target
    assert f"key={SECRET}" in target and "key=mine" not in target


def test_basic_and_bearer(api: Api, upstream: Upstream) -> None:
    alice = api.user("alice")
    basic = api.integration(
        alice,
        authType="basic",
        apiBaseUri=upstream.url + "/v1",
        apiKey=None,
        username="svc",
        password="pw:1",
        mode="shared",
        slug="basic",
    )
    r = api.client.get(f"/api/integrations/{basic['id']}/proxy/echo", headers=alice)
    assert r.status_code == 200, r.text
    assert upstream.last().header("authorization") == "Basic " + base64.b64encode(b"svc:pw:1").decode()
    bearer = api.integration(
        alice,
        authType="bearer",
        apiBaseUri=upstream.url + "/v1",
        apiKey=None,
        bearerToken="tok-123",
        mode="shared",
        slug="bearer",
    )
    r = api.client.post(f"/api/integrations/{bearer['id']}/request", json={"url": "echo"}, headers=alice)
    assert r.status_code == 200, r.text
    assert upstream.last().header("authorization") == "Bearer tok-123"


def test_per_user_not_connected_then_connected(api: Api, upstream: Upstream) -> None:
    alice = api.user("alice")
    bob = api.user("bob")
    integration = api.integration(alice, authType="bearer", apiBaseUri=upstream.url + "/v1", apiKey=None)
    iid = integration["id"]
    api.client.put(f"/api/integrations/{iid}/shares/bob", json={}, headers=alice)
    r = api.client.get(f"/api/integrations/{iid}/proxy/echo", headers=bob)
    assert r.status_code == 409, r.text
    assert r.json()["code"] == "integration_not_connected"
    assert r.json()["details"]["connectUrl"] == f"/api/integrations/{iid}/connect"
    assert upstream.count() == 0
    for who, token in ((alice, "alice-token"), (bob, "bob-token")):
        r = api.client.post(f"/api/integrations/{iid}/connect", json={"bearerToken": token}, headers=who)
        assert r.status_code == 201, r.text
    for who, token in ((alice, "alice-token"), (bob, "bob-token")):
        r = api.client.get(f"/api/integrations/{iid}/proxy/echo", headers=who)
        assert r.status_code == 200, r.text
        assert upstream.last().header("authorization") == f"Bearer {token}"


def test_proxy_streams_bodies_both_ways_and_binary(api: Api, upstream: Upstream) -> None:
    alice = api.user("alice")
    iid = apikey(api, alice, upstream)["id"]
    r = api.client.get(f"/api/integrations/{iid}/proxy/binary?n=1000", headers=alice)
    assert r.status_code == 200
    assert r.content == bytes(range(256)) * 1000
    assert r.headers["content-type"] == "application/octet-stream"
    payload = bytes(range(256)) * 20_000  # 5 MB: above the buffered-replay size, so streamed
    r = api.client.put(
        f"/api/integrations/{iid}/proxy/echo/upload",
        content=payload,
        headers={**alice, "Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 200, r.text
    got = upstream.last()
    assert got.method == "PUT" and got.body_length == len(payload)
    import hashlib

    assert got.body_sha256 == hashlib.sha256(payload).hexdigest()

    def chunks():
        for _ in range(10):
            yield b"y" * 100_000

    r = api.client.post(f"/api/integrations/{iid}/proxy/echo/chunked", content=chunks(), headers=alice)
    assert r.status_code == 200, r.text
    assert upstream.last().body_length == 1_000_000


def test_request_endpoint_bodies(api: Api, upstream: Upstream) -> None:
    alice = api.user("alice")
    iid = apikey(api, alice, upstream)["id"]
    url = f"/api/integrations/{iid}/request"
    r = api.client.post(url, json={"url": "echo", "method": "post", "data": {"a": [1, 2]}}, headers=alice)
    assert r.status_code == 200, r.text
    assert r.json()["body"] == '{"a":[1,2]}' and r.json()["headers"]["content-type"] == "application/json"
    r = api.client.post(
        url,
        json={
            "url": "echo",
            "method": "PUT",
            "data": {"a": "x y"},
            "headers": {"Content-Type": "application/x-www-form-urlencoded", "X-Extra": "1"},
        },
        headers=alice,
    )
    assert r.json()["body"] == "a=x+y" and r.json()["headers"]["x-extra"] == "1"
    r = api.client.post(url, json={"url": "echo", "method": "TRACE"}, headers=alice)
    assert r.status_code == 400
    r = api.client.post(url, json={"url": "echo", "headers": {"X-Bad": "a\r\nX-Evil: 1"}}, headers=alice)
    assert r.status_code == 400
    r = api.client.post(url, json={"url": "echo", "headers": {"Bad Name": "x"}}, headers=alice)
    assert r.status_code == 400
    assert upstream.count() == 2


def test_head_and_query_passthrough(api: Api, upstream: Upstream) -> None:
    alice = api.user("alice")
    iid = apikey(api, alice, upstream)["id"]
    r = api.client.head(f"/api/integrations/{iid}/proxy/binary", headers=alice)
    assert r.status_code == 200, r.text
    assert r.content == b""
    assert upstream.last().method == "HEAD"
    r = api.client.get(f"/api/integrations/{iid}/proxy/echo/a%20b/@me?filter[x]=1&y=%2F", headers=alice)
    assert r.status_code == 200, r.text
    assert upstream.last().target == "/v1/echo/a%20b/@me?filter[x]=1&y=%2F"


def test_answers_without_a_body_free_their_slot_at_once(api: Api, upstream: Upstream) -> None:
    """HEAD, 204 and 304 have no body to relay: the upstream's headers come back as they are (its
    Content-Length included) and the bulkhead slots are free again when the answer is out."""
    alice = api.user("alice")
    iid = apikey(api, alice, upstream)["id"]
    for _ in range(3):
        r = api.client.head(f"/api/integrations/{iid}/proxy/binary?n=4", headers=alice)
        assert r.status_code == 200 and r.content == b""
        assert r.headers["content-length"] == "1024"  # what a GET would carry
        assert r.headers["x-content-type-options"] == "nosniff"
    r = api.client.get(f"/api/integrations/{iid}/proxy/status/204", headers=alice)
    assert r.status_code == 204 and r.content == b""
    bulkhead = api.runtime.services.bulkhead
    assert bulkhead.active(uuid.UUID(iid)) == 0 and bulkhead.active("alice") == 0


def test_custom_headers_expand_per_caller_on_a_shared_connection(api: Api, upstream: Upstream) -> None:
    alice = api.user("alice", custom={"dept": "sales"})
    bob = api.user("bob", custom={"dept": "ops"}, username="bobby")
    integration = apikey(
        api,
        alice,
        upstream,
        slug="crm",
        headers={
            "X-User": "${user.email}",
            "X-Who": "$user.username/${user.displayName}/${user.id}",
            "X-Dept": "${user.custom.dept}",
            "X-Tenant": "${tenant.id}",
            "X-Integration": "${integration.id}:${integration.slug}",
        },
    )
    iid = integration["id"]
    api.client.put(f"/api/integrations/{iid}/shares/bob", json={}, headers=alice)
    seen = {}
    for name, who in (("alice", alice), ("bob", bob)):
        r = api.client.get(f"/api/integrations/{iid}/proxy/echo", headers=who)
        assert r.status_code == 200, r.text
        seen[name] = r.json()["headers"]
    assert seen["alice"]["x-user"] == "alice@example.com" and seen["bob"]["x-user"] == "bob@example.com"
    assert seen["alice"]["x-dept"] == "sales" and seen["bob"]["x-dept"] == "ops"
    assert seen["bob"]["x-who"] == "bobby/Bob/bob"
    assert seen["alice"]["x-tenant"] == "default"
    assert seen["alice"]["x-integration"] == f"{iid}:crm"
    assert seen["alice"]["x-api-key"] == seen["bob"]["x-api-key"] == SECRET


def test_header_value_with_crlf_is_refused_and_never_sent(api: Api, upstream: Upstream) -> None:
    alice = api.user("alice")
    mallory = api.user("mallory", custom={"dept": "x\r\nX-Injected: 1"})
    nul = api.user("nul", displayName="Nul\nLine")
    integration = apikey(
        api, alice, upstream, headers={"X-Dept": "${user.custom.dept}", "X-Name": "${user.displayName}"}
    )
    iid = integration["id"]
    for who in ("mallory", "nul"):
        api.client.put(f"/api/integrations/{iid}/shares/{who}", json={}, headers=alice)
    for who in (mallory, nul):
        r = api.client.get(f"/api/integrations/{iid}/proxy/echo", headers=who)
        assert r.status_code == 400, r.text
    assert upstream.count() == 0
    r = api.client.get(f"/api/integrations/{iid}/proxy/echo", headers=alice)
    assert r.status_code == 200


def test_header_hygiene_both_ways(api: Api, upstream: Upstream) -> None:
    alice = api.user("alice")
    iid = apikey(api, alice, upstream)["id"]
    r = api.client.get(
        f"/api/integrations/{iid}/proxy/headers-out",
        headers={
            **alice,
            "Cookie": "integrations_session=abc",
            "X-Forwarded-For": "10.0.0.1",
            "X-Forwarded-Host": "evil",
            "Forwarded": "for=10.0.0.1",
            "X-Real-IP": "10.0.0.1",
            "Proxy-Authorization": "Basic eA==",
            "Connection": "keep-alive, X-Drop-Me",
            "X-Drop-Me": "1",
            "X-API-Key": "caller-supplied",
            "X-Keep": "yes",
            "X-HTTP-Method-Override": "DELETE",
            "X-Method-Override": "DELETE",
            "X-Original-URL": "/admin",
            "X-Rewrite-URL": "/admin",
        },
    )
    assert r.status_code == 200, r.text
    got = upstream.last()
    for name in (
        "cookie",
        "x-forwarded-for",
        "x-forwarded-host",
        "forwarded",
        "x-real-ip",
        "proxy-authorization",
        "x-drop-me",
        "authorization",
        "x-http-method-override",
        "x-method-override",
        "x-original-url",
        "x-rewrite-url",
    ):
        assert not got.has(name), name
    assert got.header("x-api-key") == SECRET  # the integration's credential wins
    assert got.header("x-keep") == "yes"
    assert got.header("host") == upstream.url.removeprefix("http://")
    for name in (
        "set-cookie",
        "x-secret-hop",
        "keep-alive",
        "access-control-allow-origin",
        "access-control-allow-credentials",
        "alt-svc",
        "strict-transport-security",
        "service-worker-allowed",
        "cross-origin-opener-policy",
        "permissions-policy",
    ):
        assert name not in r.headers, name
    assert r.headers["x-upstream"] == "kept" and r.headers["cache-control"] == "private, max-age=60"
    assert r.headers["content-security-policy"] == "sandbox; default-src 'none'"
    assert r.headers["x-content-type-options"] == "nosniff"


def test_redirects_and_429_pass_back_unchanged(api: Api, upstream: Upstream) -> None:
    alice = api.user("alice")
    iid = apikey(api, alice, upstream)["id"]
    r = api.client.get(f"/api/integrations/{iid}/proxy/redirect", headers=alice, follow_redirects=False)
    assert r.status_code == 302 and r.headers["location"] == "http://127.0.0.2:1/elsewhere"
    assert upstream.count() == 1
    r = api.client.get(f"/api/integrations/{iid}/proxy/ratelimit", headers=alice)
    assert r.status_code == 429 and r.headers["retry-after"] == "7"
    assert r.json() == {"error": "slow down"}
    r = api.client.post(f"/api/integrations/{iid}/request", json={"url": "status/404"}, headers=alice)
    assert r.status_code == 404 and r.json() == {"status": 404}


def test_access_needs_use_level_and_invisible_is_404(api: Api, upstream: Upstream) -> None:
    alice = api.user("alice")
    bob = api.user("bob")
    integration = apikey(api, alice, upstream, slug="private")
    iid = integration["id"]
    for url in (f"/api/integrations/{iid}/proxy/echo", "/api/integrations/alice:private/proxy/echo"):
        r = api.client.get(url, headers=bob)
        assert r.status_code == 404, r.text
    r = api.client.post(f"/api/integrations/{iid}/request", json={"url": "echo"}, headers=bob)
    assert r.status_code == 404
    assert upstream.count() == 0
    api.client.put(f"/api/integrations/{iid}/shares/bob", json={}, headers=alice)
    r = api.client.get("/api/integrations/alice:private/proxy/echo", headers=bob)
    assert r.status_code == 200, r.text


def test_upstream_cookies_are_never_sent_on_a_later_call(api: Api, upstream: Upstream) -> None:
    """The outbound client is shared by every caller: a Set-Cookie from one call must not come back
    on the next one (another user's, or another integration's on the same host)."""
    alice = api.user("alice")
    bob = api.user("bob")
    first = apikey(api, alice, upstream, slug="first")["id"]
    second = apikey(api, bob, upstream, slug="second")["id"]
    r = api.client.get(f"/api/integrations/{first}/proxy/headers-out", headers=alice)
    assert r.status_code == 200 and "set-cookie" not in r.headers
    for iid, who in ((first, alice), (second, bob)):
        r = api.client.get(f"/api/integrations/{iid}/proxy/echo", headers=who)
        assert r.status_code == 200, r.text
        assert not upstream.last().has("cookie")


def test_changes_apply_to_the_next_call_despite_the_proxy_cache(api: Api, upstream: Upstream) -> None:
    """The integration and its credentials are cached for a few seconds, but a change made through
    this server invalidates them at once: a revoked share, a rotated key, a deleted integration."""
    alice = api.user("alice")
    bob = api.user("bob")
    iid = apikey(api, alice, upstream)["id"]
    api.client.put(f"/api/integrations/{iid}/shares/bob", json={}, headers=alice)
    for who in (alice, bob):
        assert api.client.get(f"/api/integrations/{iid}/proxy/echo", headers=who).status_code == 200
    assert upstream.last().header("x-api-key") == SECRET
    r = api.client.patch(f"/api/integrations/{iid}", json={"apiKey": "sk-rotated"}, headers=alice)
    assert r.status_code == 200, r.text
    assert api.client.get(f"/api/integrations/{iid}/proxy/echo", headers=bob).status_code == 200
    assert upstream.last().header("x-api-key") == "sk-rotated"
    r = api.client.delete(f"/api/integrations/{iid}/shares/bob", headers=alice)
    assert r.status_code == 204, r.text
    before = upstream.count()
    assert api.client.get(f"/api/integrations/{iid}/proxy/echo", headers=bob).status_code == 404
    assert api.client.delete(f"/api/integrations/{iid}", headers=alice).status_code == 204
    assert api.client.get(f"/api/integrations/{iid}/proxy/echo", headers=alice).status_code == 404
    assert upstream.count() == before


def _error(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["statusCode"] == status and {"error", "message"} <= set(body), body
    return body


def test_request_body_is_checked_before_anything_is_sent(api: Api, upstream: Upstream) -> None:
    """The ``/request`` body is read and decoded at the ASGI level (``api.proxy_endpoint``): every
    refusal is a 4xx in the error shape, and nothing reaches the upstream."""
    alice = api.user("alice")
    url = f"/api/integrations/{apikey(api, alice, upstream)['id']}/request"
    json_headers = {**alice, "Content-Type": "application/json"}
    assert "JSON" in _error(api.client.post(url, content=b'{"url": ', headers=json_headers), 400)["message"]
    unknown = _error(api.client.post(url, json={"url": "echo", "bogus": 1}, headers=alice), 400)
    assert "bogus" in unknown["message"]
    _error(api.client.post(url, json={"url": 7}, headers=alice), 400)  # wrong type
    _error(api.client.post(url, json=["echo"], headers=alice), 400)  # not an object
    deep: Any = "x"
    for _ in range(40):
        deep = [deep]
    assert "nested" in _error(api.client.post(url, json={"url": "echo", "data": deep}, headers=alice), 400)["message"]
    nul = b'{"url": "echo", "data": "a\\u0000b"}'
    assert "NUL" in _error(api.client.post(url, content=nul, headers=json_headers), 400)["message"]
    big = b'{"url": "echo", "data": "' + b"x" * 1_100_000 + b'"}'
    _error(api.client.post(url, content=big, headers=json_headers), 413)
    assert upstream.count() == 0
    # and a body just inside the limits goes through
    shallow: Any = "x"
    for _ in range(20):
        shallow = [shallow]
    r = api.client.post(url, json={"url": "echo", "method": "POST", "data": shallow}, headers=alice)
    assert r.status_code == 200, r.text
    assert upstream.count() == 1


def test_every_spelling_litestar_routes_to_the_proxy_is_served_by_the_front_door(api: Api, upstream: Upstream) -> None:
    """Litestar routes on the path with repeated slashes collapsed and trailing ones stripped; the
    front door must take every such spelling, or it reaches a handler that is never meant to run
    (a 500)."""
    alice = api.user("alice")
    iid = apikey(api, alice, upstream)["id"]
    for path in (
        f"/api/integrations/{iid}/request/",
        f"/api/integrations/{iid}/request///",
        f"/api/integrations/{iid}//request",
        f"/api//integrations/{iid}/request",
    ):
        r = api.client.post(path, json={"url": "echo/x"}, headers=alice)
        assert r.status_code == 200, (path, r.text)
        assert upstream.last().target == "/v1/echo/x"
    for path in (f"/api/integrations/{iid}/proxy", f"/api/integrations/{iid}/proxy/"):
        r = api.client.get(path, headers=alice)
        assert r.status_code != 500, (path, r.text)
        assert upstream.last().target == "/v1/"
    r = api.client.get(f"/api/integrations/{iid}//proxy/echo/y", headers=alice)
    assert r.status_code == 400 and r.json()["statusCode"] == 400  # the raw path is malformed: refused


def test_the_front_door_serves_under_a_root_path(api: Api, upstream: Upstream) -> None:
    """Mounted under a prefix (ASGI ``root_path``), Litestar routes on the path after it; so does
    the front door, and the raw target is read after it too."""
    from litestar.testing import TestClient

    alice = api.user("alice")
    iid = apikey(api, alice, upstream)["id"]
    app = api.client.app
    with TestClient(app=app, root_path="/svc", base_url="http://127.0.0.1:8000") as client:
        position = {"X-Wait-For-Position": str(api.client.position)}
        r = client.get(f"/svc/api/integrations/{iid}/proxy/echo/a%2Fb", headers={**alice, **position})
        assert r.status_code == 400, r.text  # the raw target was read (an encoded slash is refused)
        r = client.get(f"/svc/api/integrations/{iid}/proxy/echo/z?q=1", headers={**alice, **position})
        assert r.status_code == 200, r.text
        assert upstream.last().target == "/v1/echo/z?q=1"
        r = client.post(f"/svc/api/integrations/{iid}/request/", json={"url": "echo/w"}, headers={**alice, **position})
        assert r.status_code == 200, r.text
        assert upstream.last().target == "/v1/echo/w"

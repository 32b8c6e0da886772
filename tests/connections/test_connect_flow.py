"""The OAuth connect flow end to end: our /connect, the real provider's login and consent, our callback."""

from __future__ import annotations

import base64
import hashlib
from http.cookies import SimpleCookie

import pytest

from commands.service import token_hash
from domain.authorization import pending_authorization_id
from tests.api.conftest import Api
from tests.connections.conftest import SCOPE, oauth_integration
from tests.connections.support import (
    assert_error_shape,
    callback,
    cid_of,
    connect,
    event_names,
    events,
    head,
    query,
    start,
    token_requests,
)
from tests.oauth.harness import Browser, OAuthServer

PUBLIC_CALLBACK = "http://127.0.0.1:8000/oauth2/callback"  # INTEGRATIONS_PUBLIC_URL + /oauth2/callback


def test_connect_callback_and_status(api: Api, oauth_server: OAuthServer, browser: Browser) -> None:
    alice = api.user("alice")
    integration = oauth_integration(api, alice, oauth_server)
    r = connect(api, alice, integration["id"], browser)
    assert r.status_code == 303, r.text
    assert r.headers["location"].startswith("/oauth2/result?status=connected")
    assert query(r.headers["location"])["integration"] == integration["id"]
    assert r.headers["cache-control"] == "no-store"
    assert r.headers["referrer-policy"] == "no-referrer"
    assert "code=" not in r.headers["location"] and "state=" not in r.headers["location"]
    # the binding cookie is cleared by the callback
    cleared = SimpleCookie(r.headers["set-cookie"])
    assert all(m["max-age"] == "0" for m in cleared.values())

    r = api.client.get(f"/api/integrations/{integration['id']}/connection", headers=alice)
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    doc = r.json()
    assert doc["status"] == "connected"
    assert doc["ownerId"] == "alice"
    assert doc["isShared"] is False
    assert doc["authType"] == "oauth2"
    assert doc["account"]["sub"] == "alice@example.com"
    assert set(doc["scopes"]) >= {"openid", "offline_access", "api:read"}
    assert doc["tokenExpiresAt"] and doc["lastAuthorizedAt"] and doc["lastError"] is None
    assert not {"accessToken", "refreshToken", "credentials"} & set(doc)
    assert oauth_server.stats()["by_grant"] == {"authorization_code": 1}
    log = oauth_server.stats()["log"][0]
    assert (log["client_id"], log["auth_method"], log["status"]) == ("svc-basic", "client_secret_basic", 200)

    cid = cid_of(integration["id"], "alice")
    assert str(cid) == doc["id"]
    assert event_names(api, cid) == ["Created", "Established"]
    established = events(api, cid)[-1]
    assert set(established.credentials) == {"access_token", "refresh_token"}
    assert all(set(ref) <= {"ref", "fingerprint"} for ref in established.credentials.values())


def test_connect_with_client_secret_post(api: Api, oauth_server: OAuthServer, browser: Browser) -> None:
    alice = api.user("alice")
    client = oauth_server.post_client
    integration = oauth_integration(
        api,
        alice,
        oauth_server,
        clientId=client.client_id,
        clientSecret=client.client_secret,
        tokenAuthMethod="client_secret_post",
    )
    r = connect(api, alice, integration["id"], browser)
    assert r.status_code == 303 and "status=connected" in r.headers["location"], r.headers.get("location")
    log = oauth_server.stats()["log"]
    assert [(e["client_id"], e["auth_method"], e["status"]) for e in log] == [("svc-post", "client_secret_post", 200)]


def test_connect_redirect_cookie_and_authorization_url(api: Api, oauth_server: OAuthServer) -> None:
    alice = api.user("alice")
    integration = oauth_integration(api, alice, oauth_server)
    # Host / X-Forwarded-* of the request must not leak into the redirect URI (OA-4)
    spoofed = {
        **alice,
        "Host": "evil.example",
        "X-Forwarded-Host": "evil.example",
        "X-Forwarded-Proto": "https",
        "Forwarded": "host=evil.example;proto=https",
    }
    r = start(api, spoofed, integration["id"])
    assert r.status_code == 302, r.text
    assert r.headers["cache-control"] == "no-store"
    assert r.headers["referrer-policy"] == "no-referrer"

    # the binding cookie (OA-2): HttpOnly, SameSite=Lax, Path=/, Max-Age=600
    set_cookies = r.headers.get_list("set-cookie")
    assert len(set_cookies) == 1, set_cookies
    raw = set_cookies[0]
    attrs = [a.strip().lower() for a in raw.split(";")]
    assert "httponly" in attrs
    assert "samesite=lax" in attrs
    assert "path=/" in attrs
    assert "max-age=600" in attrs
    # http public URL in the tests: no Secure (and no __Host- prefix); see the https test below
    assert "secure" not in attrs
    name = attrs[0].partition("=")[0]
    assert name.startswith("integrations_oauth_")
    assert len(raw.split(";")[0].split("=", 1)[1]) >= 43  # 256-bit nonce, base64url

    location = r.headers["location"]
    assert location.startswith(oauth_server.authorization_endpoint + "?")
    q = query(location)
    assert q["response_type"] == "code"
    assert q["client_id"] == oauth_server.basic_client.client_id
    assert q["redirect_uri"] == PUBLIC_CALLBACK
    assert "evil" not in location
    assert q["scope"] == SCOPE
    assert q["prompt"] == "consent"  # offline_access needs it (OIDC Core §11)
    assert q["code_challenge_method"] == "S256"
    assert len(q["code_challenge"]) == 43
    base64.urlsafe_b64decode(q["code_challenge"] + "=")  # base64url
    state = q["state"]
    assert len(base64.urlsafe_b64decode(state + "=" * (-len(state) % 4))) >= 16  # >= 128 bits
    # the cookie is named after the pending authorization that the state's hash identifies
    pid = pending_authorization_id(token_hash(state))
    assert pid.hex[:16] in name

    # the stored record holds hashes and a vault reference, never the state or the verifier
    pending = api.runtime.app.repository.get(pid)
    assert pending.state_hash == hashlib.sha256(state.encode()).hexdigest()
    assert pending.redirect_uri == PUBLIC_CALLBACK
    assert pending.issuer == oauth_server.issuer
    assert pending.user_id == "alice"
    assert set(pending.verifier) <= {"ref", "fingerprint"}

    # two starts: two different states and challenges
    q2 = query(start(api, alice, integration["id"]).headers["location"])
    assert q2["state"] != state and q2["code_challenge"] != q["code_challenge"]
    assert token_requests(oauth_server) == 0


def test_binding_cookie_is_secure_and_host_prefixed_on_https(conn_settings: object, oauth_server: OAuthServer) -> None:
    from api.app import create_app
    from cli.runtime import build_runtime
    from tests.api.conftest import ConsistentClient

    settings = conn_settings.with_(public_url="https://integrations.example.com")  # type: ignore[attr-defined]
    runtime = build_runtime(settings)
    with ConsistentClient(app=create_app(runtime.services), base_url="https://integrations.example.com") as client:
        https_api = Api(client, runtime)
        alice = https_api.user("alice")
        integration = oauth_integration(https_api, alice, oauth_server)
        r = start(https_api, alice, integration["id"])
        assert r.status_code == 302, r.text
        attrs = [a.strip().lower() for a in r.headers["set-cookie"].split(";")]
        assert attrs[0].startswith("__host-integrations_oauth_")
        assert {"secure", "httponly", "samesite=lax", "path=/", "max-age=600"} <= set(attrs)
        assert not any(a.startswith("domain=") for a in attrs)
        assert query(r.headers["location"])["redirect_uri"] == "https://integrations.example.com/oauth2/callback"


def test_a_second_connect_replaces_the_first(api: Api, oauth_server: OAuthServer) -> None:
    alice = api.user("alice")
    integration = oauth_integration(api, alice, oauth_server)
    for _ in range(2):
        with oauth_server.browser() as browser:
            r = connect(api, alice, integration["id"], browser)
        assert r.status_code == 303 and "status=connected" in r.headers["location"]
    cid = cid_of(integration["id"], "alice")
    assert event_names(api, cid) == ["Created", "Established", "Established"]
    first, second = events(api, cid)[1:]
    assert first.credentials["refresh_token"]["ref"] != second.credentials["refresh_token"]["ref"]
    assert token_requests(oauth_server, "authorization_code") == 2


# -- ?redirect= (OA-4: no open redirector) ------------------------------------------------------------


@pytest.mark.parametrize("target", ["/app/integrations", "/app/done?tab=connections"])
def test_redirect_to_a_relative_path(api: Api, oauth_server: OAuthServer, browser: Browser, target: str) -> None:
    alice = api.user("alice")
    integration = oauth_integration(api, alice, oauth_server)
    r = start(api, alice, integration["id"], redirect=target)
    assert r.status_code == 302, r.text
    r = callback(api, browser.authorize(r.headers["location"]))
    assert r.status_code == 303, r.text
    location = r.headers["location"]
    path, _, _ = target.partition("?")
    assert location.startswith(path + "?")
    q = query(location)
    assert q["status"] == "connected" and q["integration"] == integration["id"]
    if "tab" in target:
        assert q["tab"] == "connections"


@pytest.mark.parametrize(
    "target",
    [
        "https://evil.example/steal",
        "http://evil.example",
        "//evil.example/x",
        "//evil.example",
        "/\\evil.example",
        "\\\\evil.example",
        "javascript:alert(1)",
        "app/relative-without-slash",
        "https://127.0.0.1:8000.evil.example/",
        "/ok\r\nSet-Cookie: x=y",
    ],
)
def test_redirect_off_site_is_rejected(api: Api, oauth_server: OAuthServer, target: str) -> None:
    alice = api.user("alice")
    integration = oauth_integration(api, alice, oauth_server)
    before = head(api)
    r = start(api, alice, integration["id"], redirect=target)
    body = assert_error_shape(r, 400)
    assert "set-cookie" not in r.headers
    assert target not in r.text and "evil" not in body["message"]
    assert head(api) == before  # no pending authorization stored


def test_redirect_to_a_configured_origin(conn_settings: object, oauth_server: OAuthServer) -> None:
    from api.app import create_app
    from cli.runtime import build_runtime
    from tests.api.conftest import ConsistentClient

    settings = conn_settings.with_(return_origins=("https://app.example.com",))  # type: ignore[attr-defined]
    runtime = build_runtime(settings)
    with ConsistentClient(app=create_app(runtime.services), base_url="http://127.0.0.1:8000") as client:
        api = Api(client, runtime)
        alice = api.user("alice")
        integration = oauth_integration(api, alice, oauth_server)
        r = start(api, alice, integration["id"], redirect="https://app.example.com/done")
        assert r.status_code == 302, r.text
        with oauth_server.browser() as browser:
            r = callback(api, browser.authorize(r.headers["location"]))
        assert r.status_code == 303
        assert r.headers["location"].startswith("https://app.example.com/done?status=connected")
        assert_error_shape(start(api, alice, integration["id"], redirect="https://app.example.com.evil.io/"), 400)
        assert_error_shape(start(api, alice, integration["id"], redirect="http://app.example.com/done"), 400)


def test_connect_needs_an_oauth2_integration_and_use_access(api: Api, oauth_server: OAuthServer) -> None:
    alice, bob = api.user("alice"), api.user("bob")
    integration = oauth_integration(api, alice, oauth_server)
    assert_error_shape(start(api, bob, integration["id"]), 404)  # invisible: 404, not 403
    keyed = api.integration(alice, name="Keyed")
    assert_error_shape(start(api, alice, keyed["id"]), 400)
    r = api.client.get(f"/api/integrations/{integration['id']}/connect", follow_redirects=False)
    assert r.status_code == 401
    assert token_requests(oauth_server) == 0

"""The OAuth test harness works, and the provider behaves the way our OAuth client will rely on.

Plain httpx is the client here (no service code). Each test documents one behaviour of oidc-provider
9.x (tests/oauth_server/op-e2e.mjs) that the connect / callback / refresh / revoke code must cope with.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.oauth.harness import (
    BASIC_CLIENT,
    POST_CLIENT,
    Browser,
    BrowserError,
    OAuthClient,
    OAuthServer,
    ServerConfig,
    client_secret_basic,
    http_client,
    pkce_pair,
)


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with http_client() as client:
        yield client


# -- small helpers (what our client will do, written out with plain httpx) -------------------------


def authorize(op: OAuthServer, client: OAuthClient = BASIC_CLIENT, **kwargs: Any) -> tuple[dict[str, str], str, str]:
    """Run login + consent; return (callback params, state, PKCE verifier)."""
    verifier, challenge = pkce_pair()
    state = secrets.token_urlsafe(16)
    with op.browser() as browser:
        params = browser.authorize(op.authorize_url(client, code_challenge=challenge, state=state, **kwargs))
    return params, state, verifier


def token_call(
    http: httpx.Client, op: OAuthServer, client: OAuthClient, form: dict[str, str], **kw: Any
) -> httpx.Response:
    headers, data = client.token_auth(form)
    return http.post(op.token_endpoint, headers=headers, data=data, **kw)


def connect(http: httpx.Client, op: OAuthServer, client: OAuthClient = BASIC_CLIENT, **kwargs: Any) -> dict[str, Any]:
    """Authorization code flow + token exchange; returns the token response."""
    params, _, verifier = authorize(op, client, **kwargs)
    form = {
        "grant_type": "authorization_code",
        "code": params["code"],
        "redirect_uri": op.redirect_uri,
        "code_verifier": verifier,
    }
    r = token_call(http, op, client, form)
    assert r.status_code == 200, r.text
    return r.json()


def refresh(
    http: httpx.Client, op: OAuthServer, refresh_token: str, client: OAuthClient = BASIC_CLIENT, **kw: Any
) -> httpx.Response:
    return token_call(http, op, client, {"grant_type": "refresh_token", "refresh_token": refresh_token}, **kw)


def whoami(http: httpx.Client, op: OAuthServer, access_token: str) -> httpx.Response:
    return http.get(op.api_url, headers={"Authorization": f"Bearer {access_token}"})


def assert_invalid_grant(r: httpx.Response) -> None:
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "invalid_grant"


# -- discovery and the authorization response ------------------------------------------------------


def test_discovery_document(oauth_server: OAuthServer) -> None:
    md = oauth_server.metadata
    assert oauth_server.issuer == oauth_server.base_url
    assert md["code_challenge_methods_supported"] == ["S256"]
    assert md["authorization_response_iss_parameter_supported"] is True
    for url in (
        oauth_server.authorization_endpoint,
        oauth_server.token_endpoint,
        oauth_server.revocation_endpoint,
        oauth_server.userinfo_endpoint,
    ):
        assert url.startswith(oauth_server.base_url + "/")
    assert {"client_secret_basic", "client_secret_post"} <= set(md["token_endpoint_auth_methods_supported"])


def test_code_flow_with_pkce_s256_returns_iss_and_tokens(oauth_server: OAuthServer, http: httpx.Client) -> None:
    params, state, verifier = authorize(oauth_server)
    assert set(params) == {"code", "state", "iss"}
    assert params["state"] == state
    assert params["iss"] == oauth_server.issuer  # RFC 9207: exact string

    form = {"grant_type": "authorization_code", "code": params["code"], "redirect_uri": oauth_server.redirect_uri}
    # A wrong verifier is rejected and does not burn the code.
    r = token_call(http, oauth_server, BASIC_CLIENT, {**form, "code_verifier": pkce_pair()[0]})
    assert_invalid_grant(r)
    r = token_call(http, oauth_server, BASIC_CLIENT, {**form, "code_verifier": verifier})
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    tokens = r.json()
    assert tokens["token_type"] == "Bearer"
    assert tokens["expires_in"] == 60
    assert tokens["scope"] == "openid offline_access api:read"
    assert tokens["refresh_token"] and tokens["access_token"]
    assert whoami(http, oauth_server, tokens["access_token"]).status_code == 200

    # Replaying the code: invalid_grant, and the tokens already issued for it are revoked.
    r = token_call(http, oauth_server, BASIC_CLIENT, {**form, "code_verifier": verifier})
    assert_invalid_grant(r)
    assert whoami(http, oauth_server, tokens["access_token"]).status_code == 401
    assert_invalid_grant(refresh(http, oauth_server, tokens["refresh_token"]))


def test_authorization_errors_come_back_with_state_and_iss(oauth_server: OAuthServer, browser: Browser) -> None:
    # No PKCE → error redirect (not an error page), with state and iss.
    url = oauth_server.authorize_url(BASIC_CLIENT, code_challenge=None, state="s-nopkce")
    params = browser.authorize(url)
    assert params["error"] == "invalid_request"
    assert params["state"] == "s-nopkce"
    assert params["iss"] == oauth_server.issuer

    # The user cancels at the login page → access_denied, with state and iss.
    _, challenge = pkce_pair()
    params = browser.authorize(
        oauth_server.authorize_url(BASIC_CLIENT, code_challenge=challenge, state="s-deny"), consent=False
    )
    assert (params["error"], params["state"], params["iss"]) == ("access_denied", "s-deny", oauth_server.issuer)

    # An unregistered redirect URI: a 400 page at the provider, never a redirect.
    url = oauth_server.authorize_url(BASIC_CLIENT, code_challenge=challenge, redirect_uri="http://127.0.0.1:9/evil")
    with pytest.raises(BrowserError) as exc:
        browser.authorize(url, redirect_uri="http://127.0.0.1:9/evil")
    assert exc.value.response is not None and exc.value.response.status_code == 400


def test_browser_stops_before_the_callback_and_keeps_its_jar(oauth_server: OAuthServer, browser: Browser) -> None:
    _, challenge = pkce_pair()
    params = browser.authorize(oauth_server.authorize_url(BASIC_CLIENT, code_challenge=challenge, state="s1"))
    assert browser.last_redirect is not None
    assert str(browser.last_redirect).startswith(oauth_server.redirect_uri + "?")
    assert dict(browser.last_redirect.params) == params
    assert not any(str(u).startswith(oauth_server.redirect_uri) for u in browser.history)  # never called
    assert any(c.name == "_session" for c in browser.client.cookies.jar)
    # Same jar, second authorization: the provider session is reused (no login form), consent again.
    params2 = browser.authorize(oauth_server.authorize_url(BASIC_CLIENT, code_challenge=challenge, state="s2"))
    assert params2["state"] == "s2" and params2["code"] != params["code"]


# -- client authentication -------------------------------------------------------------------------


def test_client_secret_basic_needs_percent_encoding(oauth_server: OAuthServer, http: httpx.Client) -> None:
    params, _, verifier = authorize(oauth_server)
    form = {
        "grant_type": "authorization_code",
        "code": params["code"],
        "redirect_uri": oauth_server.redirect_uri,
        "code_verifier": verifier,
    }
    cid, secret = BASIC_CLIENT.client_id, BASIC_CLIENT.client_secret
    assert secret == "p+q r%s:t"

    # httpx's auth=(id, secret) and a hand-made raw header both send the secret unencoded: rejected
    # before the code is looked at (so the code is still good afterwards).
    raw = "Basic " + base64.b64encode(f"{cid}:{secret}".encode()).decode()
    for attempt in (
        http.post(oauth_server.token_endpoint, data=form, auth=(cid, secret)),
        http.post(oauth_server.token_endpoint, data=form, headers={"Authorization": raw}),
    ):
        assert attempt.status_code == 400, attempt.text
        assert attempt.json()["error"] == "invalid_request"
        assert "not properly encoded" in attempt.json()["error_description"]

    # A wrong secret (properly encoded) → 401 invalid_client with a Basic challenge.
    r = http.post(oauth_server.token_endpoint, data=form, headers={"Authorization": client_secret_basic(cid, "nope")})
    assert r.status_code == 401 and r.json()["error"] == "invalid_client"
    assert r.headers["www-authenticate"].lower().startswith("basic")

    # quote(v, safe="") before base64: accepted.
    header = client_secret_basic(cid, secret)
    assert base64.b64decode(header.split()[1]).decode() == "svc-basic:p%2Bq%20r%25s%3At"
    r = http.post(oauth_server.token_endpoint, data=form, headers={"Authorization": header})
    assert r.status_code == 200, r.text


def test_client_secret_post(oauth_server: OAuthServer, http: httpx.Client) -> None:
    tokens = connect(http, oauth_server, POST_CLIENT)
    assert tokens["refresh_token"]
    me = whoami(http, oauth_server, tokens["access_token"]).json()
    assert me["client_id"] == "svc-post"
    # A wrong secret in the body → 401 invalid_client.
    r = http.post(
        oauth_server.token_endpoint,
        data={
            "grant_type": "refresh_token",
            "refresh_token": tokens["refresh_token"],
            "client_id": "svc-post",
            "client_secret": "x",
        },
    )
    assert r.status_code == 401 and r.json()["error"] == "invalid_client"
    r = refresh(http, oauth_server, tokens["refresh_token"], POST_CLIENT)
    assert r.status_code == 200, r.text
    # oidc-provider 9 does NOT pin the registered method: basic and post are interchangeable for a
    # secret-bearing client, so only the request log can show which one our client used.
    r = refresh(
        http, oauth_server, r.json()["refresh_token"], OAuthClient("svc-post", "post-secret", "client_secret_basic")
    )
    assert r.status_code == 200, r.text
    methods = [e["auth_method"] for e in oauth_server.stats()["log"]]
    assert methods == ["client_secret_post", "client_secret_post", "client_secret_post", "client_secret_basic"]


# -- refresh ----------------------------------------------------------------------------------------


def test_refresh_rotates_and_reuse_revokes_the_grant(oauth_server: OAuthServer, http: httpx.Client) -> None:
    assert oauth_server.rotating
    tokens = connect(http, oauth_server)
    r = refresh(http, oauth_server, tokens["refresh_token"])
    assert r.status_code == 200, r.text
    new = r.json()
    assert new["refresh_token"] != tokens["refresh_token"]
    assert new["access_token"] != tokens["access_token"]
    assert new["scope"] == tokens["scope"]
    assert whoami(http, oauth_server, new["access_token"]).status_code == 200
    assert whoami(http, oauth_server, tokens["access_token"]).status_code == 200  # old AT lives until reuse

    # Reusing the rotated RT: invalid_grant, and the whole grant is gone — the new RT and ATs too.
    assert_invalid_grant(refresh(http, oauth_server, tokens["refresh_token"]))
    assert_invalid_grant(refresh(http, oauth_server, new["refresh_token"]))
    assert whoami(http, oauth_server, new["access_token"]).status_code == 401


def test_non_rotating_mode_keeps_the_refresh_token(oauth_server_non_rotating: OAuthServer, http: httpx.Client) -> None:
    op = oauth_server_non_rotating
    assert not op.rotating
    tokens = connect(http, op)
    for _ in range(2):
        r = refresh(http, op, tokens["refresh_token"])
        assert r.status_code == 200, r.text
        # The response still carries a refresh_token: the same value.
        assert r.json()["refresh_token"] == tokens["refresh_token"]
        assert whoami(http, op, r.json()["access_token"]).status_code == 200


def test_refresh_works_in_both_modes(oauth_server_any: OAuthServer, http: httpx.Client) -> None:
    tokens = connect(http, oauth_server_any)
    r = refresh(http, oauth_server_any, tokens["refresh_token"])
    assert r.status_code == 200, r.text
    assert (r.json()["refresh_token"] != tokens["refresh_token"]) is oauth_server_any.rotating


def test_refresh_token_needs_offline_access_and_prompt_consent(oauth_server: OAuthServer, http: httpx.Client) -> None:
    # offline_access without prompt=consent is silently dropped → no refresh token.
    tokens = connect(http, oauth_server, prompt=None)
    assert "refresh_token" not in tokens
    assert tokens["scope"] == "openid api:read"
    # Plain OAuth (no openid): no id_token, no RT without offline_access; the API still accepts the AT.
    tokens = connect(http, oauth_server, scope="api:read")
    assert "id_token" not in tokens and "refresh_token" not in tokens
    assert whoami(http, oauth_server, tokens["access_token"]).json()["scope"] == "api:read"
    # ...but /me (userinfo) needs openid: 403 insufficient_scope.
    r = http.get(oauth_server.userinfo_endpoint, headers={"Authorization": f"Bearer {tokens['access_token']}"})
    assert r.status_code == 403 and 'error="insufficient_scope"' in r.headers["www-authenticate"]


# -- revocation and the protected API ----------------------------------------------------------------


def test_revocation(oauth_server: OAuthServer, http: httpx.Client) -> None:
    tokens = connect(http, oauth_server)
    assert whoami(http, oauth_server, tokens["access_token"]).status_code == 200
    headers, data = BASIC_CLIENT.token_auth({"token": tokens["refresh_token"], "token_type_hint": "refresh_token"})
    r = http.post(oauth_server.revocation_endpoint, headers=headers, data=data)
    assert (r.status_code, r.text) == (200, "")
    # Revoking the RT revokes the grant: the AT stops working, the RT is dead.
    r = whoami(http, oauth_server, tokens["access_token"])
    assert r.status_code == 401
    assert 'error="invalid_token"' in r.headers["www-authenticate"]
    assert_invalid_grant(refresh(http, oauth_server, tokens["refresh_token"]))
    # Unknown tokens and repeats: still 200 (RFC 7009 §2.2).
    for token in ("garbage", tokens["refresh_token"]):
        headers, data = BASIC_CLIENT.token_auth({"token": token})
        assert http.post(oauth_server.revocation_endpoint, headers=headers, data=data).status_code == 200
    stats = oauth_server.stats()
    assert stats["revocations"] == 3
    assert [e["token_type_hint"] for e in stats["log"] if e["endpoint"] == "revocation"] == [
        "refresh_token",
        None,
        None,
    ]


def test_revoking_the_access_token_also_kills_the_refresh_token(oauth_server: OAuthServer, http: httpx.Client) -> None:
    tokens = connect(http, oauth_server)
    headers, data = BASIC_CLIENT.token_auth({"token": tokens["access_token"], "token_type_hint": "access_token"})
    assert http.post(oauth_server.revocation_endpoint, headers=headers, data=data).status_code == 200
    assert whoami(http, oauth_server, tokens["access_token"]).status_code == 401
    assert_invalid_grant(refresh(http, oauth_server, tokens["refresh_token"]))


def test_protected_api_and_userinfo(oauth_server: OAuthServer, http: httpx.Client) -> None:
    tokens = connect(http, oauth_server)
    at = tokens["access_token"]
    r = whoami(http, oauth_server, at)
    assert r.status_code == 200
    body = r.json()
    assert (body["sub"], body["scope"], body["client_id"]) == ("alice@example.com", tokens["scope"], "svc-basic")
    r = http.get(oauth_server.userinfo_endpoint, headers={"Authorization": f"Bearer {at}"})
    assert r.status_code == 200 and r.json()["sub"] == "alice@example.com"

    for headers in ({}, {"Authorization": "Bearer not-a-token"}, {"Authorization": f"Basic {at}"}):
        r = http.get(oauth_server.api_url, headers=headers)
        assert r.status_code == 401
        assert r.headers["www-authenticate"].startswith("Bearer ")
        assert 'error="invalid_token"' in r.headers["www-authenticate"]
    # Bearer tokens in the query string are refused (OA-14), by the API and by the provider.
    assert http.get(oauth_server.api_url, params={"access_token": at}).status_code == 400
    assert http.get(oauth_server.userinfo_endpoint, params={"access_token": at}).status_code == 400
    assert oauth_server.stats()["api_requests"] == 7  # /api/whoami and /me, faulted or not


def test_access_token_ttl_issuer_and_always_rt_knobs(oauth_server_factory: Any, http: httpx.Client) -> None:
    op = oauth_server_factory(ServerConfig(at_ttl=1, always_rt=True, issuer="http://localhost:{port}"))
    port = op.base_url.rsplit(":", 1)[1]
    assert op.issuer == f"http://localhost:{port}"
    # Surprise: the endpoint URLs in discovery follow the Host the document was fetched with, not
    # the issuer.
    assert op.token_endpoint == f"http://127.0.0.1:{port}/token"
    # The iss parameter carries the configured issuer, whatever host the browser used.
    params, _, verifier = authorize(op, scope="openid api:read", prompt=None)
    assert params["iss"] == f"http://localhost:{port}"
    tokens_form = {
        "grant_type": "authorization_code",
        "code": params["code"],
        "redirect_uri": op.redirect_uri,
        "code_verifier": verifier,
    }
    tokens = token_call(http, op, BASIC_CLIENT, tokens_form).json()
    assert tokens["expires_in"] == 1
    assert "refresh_token" in tokens  # without offline_access, thanks to always_rt
    exp = whoami(http, op, tokens["access_token"]).json()["exp"]
    time.sleep(max(0.0, exp - time.time()) + 0.05)  # expired once now >= exp (whole seconds)
    deadline = time.time() + 3  # the provider's clock ticks in whole seconds: allow one more tick
    while (r := whoami(http, op, tokens["access_token"])).status_code == 200 and time.time() < deadline:
        time.sleep(0.1)
    assert r.status_code == 401 and 'error="invalid_token"' in r.headers["www-authenticate"]


# -- faults and stats ------------------------------------------------------------------------------


def test_fault_503_with_retry_after_then_success(oauth_server: OAuthServer, http: httpx.Client) -> None:
    tokens = connect(http, oauth_server)
    oauth_server.reset_stats()
    oauth_server.faults(status=503, count=1)
    r = refresh(http, oauth_server, tokens["refresh_token"])
    assert r.status_code == 503
    assert r.headers["retry-after"] == "1"
    assert r.json() == {"error": "temporarily_unavailable"}
    # Not processed: the same RT still works once the fault is used up.
    r = refresh(http, oauth_server, tokens["refresh_token"])
    assert r.status_code == 200, r.text
    log = oauth_server.stats()["log"]
    assert [(e["status"], e["fault"], e["grant_type"], e["client_id"]) for e in log] == [
        (503, "status", "refresh_token", "svc-basic"),
        (200, None, "refresh_token", "svc-basic"),
    ]


def test_fault_on_other_endpoints(oauth_server: OAuthServer, http: httpx.Client) -> None:
    tokens = connect(http, oauth_server)
    oauth_server.faults(endpoint="revocation", status=503, retry_after="7")
    headers, data = BASIC_CLIENT.token_auth({"token": tokens["refresh_token"], "token_type_hint": "refresh_token"})
    r = http.post(oauth_server.revocation_endpoint, headers=headers, data=data)
    assert (r.status_code, r.headers["retry-after"]) == (503, "7")
    oauth_server.faults(endpoint="api", status=429, count=2)
    assert whoami(http, oauth_server, tokens["access_token"]).status_code == 429
    bearer = {"Authorization": f"Bearer {tokens['access_token']}"}
    assert http.get(oauth_server.userinfo_endpoint, headers=bearer).status_code == 429
    assert whoami(http, oauth_server, tokens["access_token"]).status_code == 200  # not revoked
    oauth_server.faults(status=503, count=5)
    oauth_server.reset_faults()
    assert refresh(http, oauth_server, tokens["refresh_token"]).status_code == 200


def test_lost_refresh_response_then_retry_gets_invalid_grant(oauth_server: OAuthServer, http: httpx.Client) -> None:
    tokens = connect(http, oauth_server)
    oauth_server.reset_stats()
    oauth_server.faults(delay_after_ms=1000)
    with pytest.raises(httpx.ReadTimeout):
        refresh(http, oauth_server, tokens["refresh_token"], timeout=0.3)
    # The provider processed it (the RT was rotated) before the response was held back.
    [entry] = oauth_server.stats()["log"]
    assert (entry["status"], entry["fault"], entry["grant_type"]) == (200, "delayAfterMs", "refresh_token")
    # Our one retry with the old RT: invalid_grant (reuse) — the connection needs re-authorization.
    assert_invalid_grant(refresh(http, oauth_server, tokens["refresh_token"]))
    assert oauth_server.stats()["token_requests"] == 2


def test_slow_token_endpoint_then_client_timeout_is_not_processed(
    oauth_server: OAuthServer, http: httpx.Client
) -> None:
    tokens = connect(http, oauth_server)
    oauth_server.reset_stats()
    oauth_server.faults(delay_ms=500)
    with pytest.raises(httpx.ReadTimeout):
        refresh(http, oauth_server, tokens["refresh_token"], timeout=0.2)
    deadline = time.monotonic() + 5  # wait (bounded) until the provider is past the delay
    while not (log := oauth_server.stats()["log"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    # The body could no longer be read (client gone): 400, nothing rotated, the retry succeeds.
    [entry] = log
    assert (entry["status"], entry["fault"]) == (400, "delayMs")
    r = refresh(http, oauth_server, tokens["refresh_token"])
    assert r.status_code == 200, r.text


def test_stats_count_token_requests_exactly_and_hold_no_secrets(oauth_server: OAuthServer, http: httpx.Client) -> None:
    before = oauth_server.stats()
    assert before == {"token_requests": 0, "by_grant": {}, "revocations": 0, "api_requests": 0, "log": []}
    t1 = connect(http, oauth_server)
    t2 = connect(http, oauth_server, POST_CLIENT)
    r = refresh(http, oauth_server, t1["refresh_token"])
    assert r.status_code == 200
    assert_invalid_grant(refresh(http, oauth_server, t1["refresh_token"]))
    r2 = refresh(http, oauth_server, t2["refresh_token"], POST_CLIENT)
    stats = oauth_server.stats()
    assert stats["token_requests"] == 5
    assert stats["by_grant"] == {"authorization_code": 2, "refresh_token": 3}
    assert [(e["grant_type"], e["client_id"], e["status"], e["error"]) for e in stats["log"]] == [
        ("authorization_code", "svc-basic", 200, None),
        ("authorization_code", "svc-post", 200, None),
        ("refresh_token", "svc-basic", 200, None),
        ("refresh_token", "svc-basic", 400, "invalid_grant"),
        ("refresh_token", "svc-post", 200, None),
    ]
    dumped = json.dumps(stats)
    for secret in (
        BASIC_CLIENT.client_secret,
        POST_CLIENT.client_secret,
        *(t[k] for t in (t1, t2, r.json(), r2.json()) for k in ("access_token", "refresh_token")),
    ):
        assert secret not in dumped
    oauth_server.reset_stats()
    assert oauth_server.stats()["token_requests"] == 0

"""The callback refuses what it did not start (OA-1, OA-2, OA-6, OA-7, OA-9).

A refused callback answers 400 in the error shape, sends no token request and appends nothing.
Mix-up (``iss``) and provider errors end the flow with a 303 to the result page carrying a code
from a fixed set (never the provider's text).
"""

from __future__ import annotations

import html
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from tests.api.conftest import Api
from tests.connections.conftest import oauth_integration
from tests.connections.support import (
    Clock,
    assert_error_shape,
    authorize,
    callback,
    cid_of,
    event_names,
    head,
    query,
    run,
    service,
    token_requests,
)
from tests.oauth.harness import Browser, OAuthServer


@contextmanager
def other_browser(api: Api, cookies: dict[str, str] | None = None) -> Iterator[None]:
    """Make the API client a different browser for a while: its own (or no) cookies."""
    saved = httpx.Cookies(api.client.cookies)
    api.client.cookies.clear()
    for name, value in (cookies or {}).items():
        api.client.cookies.set(name, value)
    try:
        yield
    finally:
        api.client.cookies.clear()
        api.client.cookies.update(saved)


def binding_cookies(api: Api) -> dict[str, str]:
    return {c.name: c.value or "" for c in api.client.cookies.jar if c.name.startswith("integrations_oauth_")}


def assert_refused(api: Api, server: OAuthServer, params: dict[str, str], before: int) -> None:
    r = callback(api, params)
    body = assert_error_shape(r, 400)
    assert r.headers["cache-control"] == "no-store"
    assert r.headers["referrer-policy"] == "no-referrer"
    # one message for every reason: probing learns nothing, and nothing of the request is echoed
    assert body["message"] == "This authorization link is invalid, expired or already used; start the connection again."
    for value in params.values():
        if len(value) > 8:
            assert value not in r.text
    assert token_requests(server) == 0
    assert head(api) == before


@pytest.fixture
def alice_flow(api: Api, oauth_server: OAuthServer) -> tuple[dict[str, str], dict[str, str]]:
    """(alice's headers, the integration) with a provider-issued code not yet delivered to us."""
    alice = api.user("alice")
    return alice, oauth_integration(api, alice, oauth_server)


def test_unknown_and_forged_state(
    api: Api, oauth_server: OAuthServer, browser: Browser, alice_flow: tuple[dict[str, str], dict[str, str]]
) -> None:
    alice, integration = alice_flow
    params = authorize(api, alice, integration["id"], browser)
    before = head(api)
    assert_refused(api, oauth_server, {"code": params["code"], "state": secrets.token_urlsafe(32)}, before)
    assert_refused(api, oauth_server, {**params, "state": params["state"][:-1]}, before)
    assert_refused(api, oauth_server, {**params, "state": params["state"] + "A"}, before)
    assert_refused(api, oauth_server, {k: v for k, v in params.items() if k != "state"}, before)
    assert_refused(api, oauth_server, {**params, "state": ""}, before)
    assert_refused(api, oauth_server, {**params, "state": "x" * 5000}, before)
    assert_refused(api, oauth_server, {"state": secrets.token_urlsafe(32), "error": "access_denied"}, before)
    # the real state still works afterwards: forgeries burn nothing
    r = callback(api, params)
    assert r.status_code == 303 and "status=connected" in r.headers["location"]
    assert token_requests(oauth_server) == 1


def test_replayed_callback(
    api: Api, oauth_server: OAuthServer, browser: Browser, alice_flow: tuple[dict[str, str], dict[str, str]]
) -> None:
    alice, integration = alice_flow
    params = authorize(api, alice, integration["id"], browser)
    cookies = binding_cookies(api)
    assert len(cookies) == 1
    r = callback(api, params)
    assert r.status_code == 303 and "status=connected" in r.headers["location"]
    assert binding_cookies(api) == {}  # the callback cleared it
    oauth_server.reset_stats()
    before = head(api)
    # the same URL again: with the binding cookie put back (a replay from the same browser) ...
    with other_browser(api, cookies):
        assert_refused(api, oauth_server, params, before)
    # ... and without it
    with other_browser(api):
        assert_refused(api, oauth_server, params, before)
    cid = cid_of(integration["id"], "alice")
    assert event_names(api, cid) == ["Created", "Established"]


def test_concurrent_callbacks_with_one_state_make_one_token_request(
    api: Api, oauth_server: OAuthServer, browser: Browser, alice_flow: tuple[dict[str, str], dict[str, str]]
) -> None:
    """Two callbacks racing with the same state: one wins the ``Consumed`` write (OA-1, OA-9)."""
    import asyncio

    from commands.connections import CallbackOutcome
    from domain.authorization import CallbackRejected

    alice, integration = alice_flow
    params = authorize(api, alice, integration["id"], browser)
    binding = next(iter(binding_cookies(api).values()))
    connections = service(api)

    async def both() -> list[CallbackOutcome | BaseException]:
        try:
            return await asyncio.gather(
                *(connections.callback(params, binding) for _ in range(4)), return_exceptions=True
            )
        finally:
            await connections.aclose()

    results = asyncio.run(both())
    ok = [r for r in results if isinstance(r, CallbackOutcome)]
    refused = [r for r in results if isinstance(r, CallbackRejected)]
    assert len(ok) == 1 and ok[0].ok, results
    assert len(refused) == 3 and {r.reason for r in refused} <= {"replayed"}, results
    assert token_requests(oauth_server) == 1


def test_other_browser(
    api: Api, oauth_server: OAuthServer, browser: Browser, alice_flow: tuple[dict[str, str], dict[str, str]]
) -> None:
    alice, integration = alice_flow
    params = authorize(api, alice, integration["id"], browser)
    cookies = binding_cookies(api)
    (name,) = cookies
    before = head(api)
    with other_browser(api):  # no binding cookie (an attacker sends the victim the link)
        assert_refused(api, oauth_server, params, before)
    with other_browser(api, {name: secrets.token_urlsafe(32)}):  # a forged binding
        assert_refused(api, oauth_server, params, before)
    with other_browser(api, {name: ""}):
        assert_refused(api, oauth_server, params, before)
    # bob's own flow gives bob a binding cookie, but for his state, not alice's
    bob = api.user("bob")
    bob_integration = oauth_integration(api, bob, oauth_server)
    with other_browser(api):
        with oauth_server.browser() as bob_browser:
            authorize(api, bob, bob_integration["id"], bob_browser, login="bob@example.com")
        bob_cookies = binding_cookies(api)
        before = head(api)
        with other_browser(api, bob_cookies):
            assert_refused(api, oauth_server, params, before)
        # bob's cookie value under alice's cookie name
        with other_browser(api, {name: next(iter(bob_cookies.values()))}):
            assert_refused(api, oauth_server, params, before)
    # the rightful browser still completes the flow: a stranger cannot burn the state (the cookie
    # set by hand here, as above: so those cookies were sent)
    with other_browser(api, cookies):
        r = callback(api, params)
    assert r.status_code == 303 and "status=connected" in r.headers["location"]
    assert token_requests(oauth_server, "authorization_code") == 1


def test_expired_after_ten_minutes(
    api: Api,
    oauth_server: OAuthServer,
    alice_flow: tuple[dict[str, str], dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    alice, integration = alice_flow
    clock = Clock()
    monkeypatch.setattr(service(api), "clock", clock)
    with oauth_server.browser() as b1, oauth_server.browser() as b2:
        late = authorize(api, alice, integration["id"], b1)
        in_time = authorize(api, alice, integration["id"], b2)
    before = head(api)
    clock.advance(minutes=10, seconds=1)
    assert_refused(api, oauth_server, late, before)
    clock.reset()
    clock.advance(minutes=9, seconds=50)
    r = callback(api, in_time)
    assert r.status_code == 303 and "status=connected" in r.headers["location"], r.headers.get("location")
    assert token_requests(oauth_server) == 1


def test_expired_authorizations_lose_their_verifier_and_their_callback_stays_a_clean_400(
    api: Api,
    oauth_server: OAuthServer,
    alice_flow: tuple[dict[str, str], dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The background job shreds the PKCE verifier of an authorization that expired unused; a
    late callback is still refused by the expiry, before anything reads the verifier."""
    alice, integration = alice_flow
    connections = service(api)
    clock = Clock()
    monkeypatch.setattr(connections, "clock", clock)
    with oauth_server.browser() as browser:
        late = authorize(api, alice, integration["id"], browser)
    # not yet expired (by the vault's own clock): nothing goes
    assert run(connections.prune_expired_authorizations(), connections) == 0
    # the vault's clock cannot be moved: prune as the job would once expiry and grace have passed
    assert connections.app.vault.prune("pkce_verifier", -5) == 1
    before = head(api)
    clock.advance(minutes=10, seconds=1)
    assert_refused(api, oauth_server, late, before)


def test_issuer_mismatch(api: Api, oauth_server: OAuthServer, browser: Browser) -> None:
    """The integration expects another issuer: the provider's real ``iss`` is refused before any
    token request (mix-up defence; exact string comparison, no trailing-slash normalisation)."""
    alice = api.user("alice")
    integration = oauth_integration(api, alice, oauth_server, issuer=oauth_server.issuer + "/")
    params = authorize(api, alice, integration["id"], browser)
    assert params["iss"] == oauth_server.issuer
    r = callback(api, params)
    assert r.status_code == 303, r.text
    q = query(r.headers["location"])
    assert (q["status"], q["error"]) == ("error", "issuer_mismatch")
    assert token_requests(oauth_server) == 0
    assert event_names(api, cid_of(integration["id"], "alice")) == []
    # the flow is over: the same callback again is a replay
    before = head(api)
    assert_refused(api, oauth_server, params, before)


@pytest.mark.parametrize("iss", [None, "http://evil.example", "HTTP://127.0.0.1", ""])
def test_missing_or_wrong_iss_is_refused(
    api: Api, oauth_server: OAuthServer, browser: Browser, iss: str | None
) -> None:
    alice = api.user("alice")
    integration = oauth_integration(api, alice, oauth_server)
    params = authorize(api, alice, integration["id"], browser)
    params = {k: v for k, v in params.items() if k != "iss"}
    if iss is not None:
        params["iss"] = iss
    r = callback(api, params)
    assert r.status_code == 303, r.text
    assert query(r.headers["location"])["error"] == "issuer_mismatch"
    assert token_requests(oauth_server) == 0
    assert event_names(api, cid_of(integration["id"], "alice")) == []


def test_provider_access_denied(api: Api, oauth_server: OAuthServer, browser: Browser) -> None:
    alice = api.user("alice")
    integration = oauth_integration(api, alice, oauth_server)
    params = authorize(api, alice, integration["id"], browser, consent=False)
    assert params["error"] == "access_denied" and params["iss"] == oauth_server.issuer
    r = callback(api, params)
    assert r.status_code == 303, r.text
    assert r.headers["cache-control"] == "no-store" and r.headers["referrer-policy"] == "no-referrer"
    q = query(r.headers["location"])
    assert (q["status"], q["error"]) == ("error", "access_denied")
    assert "error_description" not in q
    assert token_requests(oauth_server) == 0
    page = api.client.get(r.headers["location"])
    assert page.status_code == 200
    assert "access_denied" in page.text
    assert page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["cache-control"] == "no-store"
    # the flow is over
    assert_refused(api, oauth_server, params, head(api))


SCRIPT = "<script>alert(document.cookie)</script>"


def test_provider_error_text_is_never_reflected(api: Api, oauth_server: OAuthServer, browser: Browser) -> None:
    alice = api.user("alice")
    integration = oauth_integration(api, alice, oauth_server)
    params = authorize(api, alice, integration["id"], browser, consent=False)
    # an attacker-controlled provider sends markup in error and error_description
    forged = {
        **params,
        "error": SCRIPT,
        "error_description": SCRIPT + "\r\nSet-Cookie: x=y",
        "error_uri": "javascript:x",
    }
    r = callback(api, forged)
    assert r.status_code == 303, r.text
    location = r.headers["location"]
    assert "<" not in location and "script" not in location.lower() and "\n" not in location
    assert query(location)["error"] == "invalid_error_response"
    page = api.client.get(location)
    assert SCRIPT not in page.text and "<script" not in page.text.lower()
    assert token_requests(oauth_server) == 0


@pytest.mark.parametrize("error", [SCRIPT[:60], '"><img src=x onerror=alert(1)>', "a&b<c>'d\""])
def test_result_page_escapes_its_parameters(api: Api, error: str) -> None:
    """/oauth2/result is public: anything in its query is shown escaped (or refused)."""
    page = api.client.get("/oauth2/result", params={"status": "error", "error": error})
    if page.status_code == 400:
        return
    assert page.status_code == 200
    assert error not in page.text
    assert html.escape(error) in page.text
    assert "<script" not in page.text.lower() and "<img" not in page.text.lower()
    page = api.client.get("/oauth2/result", params={"status": SCRIPT[:30]})
    assert "<script" not in page.text.lower()


def test_provider_error_for_a_later_flow_keeps_the_connection(api: Api, oauth_server: OAuthServer) -> None:
    """Cancelling a re-connect leaves the existing connection alone."""
    alice = api.user("alice")
    integration = oauth_integration(api, alice, oauth_server)
    with oauth_server.browser() as b:
        assert callback(api, authorize(api, alice, integration["id"], b)).status_code == 303
    cid = cid_of(integration["id"], "alice")
    with oauth_server.browser() as b:
        r = callback(api, authorize(api, alice, integration["id"], b, consent=False))
    assert query(r.headers["location"])["error"] == "access_denied"
    assert event_names(api, cid) == ["Created", "Established"]
    doc = api.client.get(f"/api/integrations/{integration['id']}/connection", headers=alice).json()
    assert doc["status"] == "connected"

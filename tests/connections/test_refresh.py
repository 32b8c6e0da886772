"""Token refresh on use, against the real (rotating) provider: single flight, rotation, failures.

The service is called directly (``Connections.credentials``), as the proxy will. Time moves with
a controllable clock on the service (the provider's own tokens keep their real lifetimes); the
tests that need a token to expire while a cooldown is still running use lifetimes that make
that possible without waiting.
"""

from __future__ import annotations

import time
from typing import Any
from uuid import UUID

import pytest

from api.errors import domain_error_handler
from commands.connections import (
    Connections,
    Credentials,
    ProviderUnavailable,
    ReauthorizationNeeded,
)
from domain.connection import Connection
from infrastructure.egress import EgressPolicy
from infrastructure.oauth_provider import HttpOAuthProvider
from tests.api.conftest import Api
from tests.connections.conftest import oauth_integration
from tests.connections.support import (
    Clock,
    actor,
    assert_error_shape,
    connected,
    event_names,
    events,
    gather,
    head,
    integration_of,
    run,
    service,
    token_requests,
)
from tests.oauth.conftest import ServerFactory
from tests.oauth.harness import OAuthServer, ServerConfig, http_client

TTL = 300  # the provider's access-token lifetime in most tests here; the service's margin is 60 s


@pytest.fixture
def op(oauth_server_factory: ServerFactory) -> OAuthServer:
    """Rotating refresh tokens (reuse revokes the grant), 5-minute access tokens."""
    return oauth_server_factory(ServerConfig(at_ttl=TTL))


@pytest.fixture
def op_static(oauth_server_factory: ServerFactory) -> OAuthServer:
    """Non-rotating refresh tokens, 5-minute access tokens."""
    return oauth_server_factory(ServerConfig(at_ttl=TTL, rotate_refresh=False))


@pytest.fixture
def clock(api: Api, monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(service(api), "clock", c)
    return c


class Scenario:
    """Alice connected to an integration on ``server``; helpers to use and inspect the connection."""

    def __init__(self, api: Api, server: OAuthServer, **fields: Any) -> None:
        self.api = api
        self.server = server
        self.headers = api.user("alice")
        self.integration_id = oauth_integration(api, self.headers, server, **fields)["id"]
        self.cid = connected(api, self.headers, self.integration_id, server)
        self.actor = actor(api, "alice")
        server.reset_stats()

    @property
    def integration(self) -> Any:
        return integration_of(self.api, self.actor, self.integration_id)

    def credentials(self, connections: Connections | None = None) -> Credentials:
        connections = connections or service(self.api)
        return run(connections.credentials(self.actor, self.integration), connections)

    def token(self, connections: Connections | None = None) -> str:
        return self.credentials(connections).values["access_token"]

    def connection(self) -> Connection:
        found = self.api.runtime.app._get(self.cid, Connection)
        assert found is not None
        return found

    def stored(self, kind: str) -> str:
        """A token as the vault holds it (test-only peek)."""
        ref = self.connection().credentials[kind]["ref"]
        return self.api.runtime.app.vault.open(UUID(self.integration_id), f"connection:{self.cid}:{kind}", ref)

    def events(self) -> list[str]:
        return event_names(self.api, self.cid)

    def doc(self) -> dict[str, Any]:
        r = self.api.client.get(f"/api/integrations/{self.integration_id}/connection", headers=self.headers)
        assert r.status_code == 200, r.text
        return r.json()

    def api_status(self, access_token: str) -> int:
        """The provider's protected API with this bearer token."""
        with http_client() as http:
            return http.get(self.server.api_url, headers={"Authorization": f"Bearer {access_token}"}).status_code

    def active(self, token: str) -> bool:
        """RFC 7662 introspection (does not consume anything)."""
        headers, form = self.server.basic_client.token_auth({"token": token})
        with http_client() as http:
            r = http.post(self.server.introspection_endpoint, headers=headers, data=form)
        r.raise_for_status()
        return bool(r.json()["active"])

    def revoke_at_provider(self, token: str) -> None:
        headers, form = self.server.basic_client.token_auth({"token": token, "token_type_hint": "refresh_token"})
        with http_client() as http:
            http.post(self.server.revocation_endpoint, headers=headers, data=form).raise_for_status()


def refresh_log(server: OAuthServer) -> list[tuple[int, str | None, str | None]]:
    return [(e["status"], e["error"], e["fault"]) for e in server.stats()["log"] if e["grant_type"] == "refresh_token"]


# -- refresh on use --------------------------------------------------------------------------------


def test_fresh_token_is_used_without_a_token_request(api: Api, op: OAuthServer, clock: Clock) -> None:
    s = Scenario(api, op)
    first = s.credentials()
    assert first.auth_type == "oauth2" and first.connection_id == s.cid
    assert first.values["access_token"] == s.stored("access_token")
    assert s.token() == first.values["access_token"]
    assert token_requests(op) == 0
    assert s.api_status(first.values["access_token"]) == 200


def test_expired_token_is_refreshed_once_and_rotation_is_stored(api: Api, op: OAuthServer, clock: Clock) -> None:
    s = Scenario(api, op)
    at1, rt1 = s.stored("access_token"), s.stored("refresh_token")

    clock.advance(seconds=TTL + 1)  # expired
    at2 = s.token()
    clock.reset()
    assert at2 != at1
    assert token_requests(op) == 1 and refresh_log(op) == [(200, None, None)]
    assert s.events() == ["Created", "Established", "TokenRefreshed"]
    refreshed = events(api, s.cid)[-1]
    assert refreshed.refresh_token is not None  # rotated: the new one is recorded (by reference)
    rt2 = s.stored("refresh_token")
    assert rt2 != rt1
    assert not s.active(rt1) and s.active(rt2)
    assert s.api_status(at2) == 200

    # used again while fresh: the same token, no request
    assert s.token() == at2
    assert token_requests(op) == 1

    # a second refresh later works against the rotating server (it uses the rotated token)
    clock.advance(seconds=TTL + 1)
    at3 = s.token()
    clock.reset()
    assert at3 not in (at1, at2)
    assert refresh_log(op) == [(200, None, None), (200, None, None)]
    rt3 = s.stored("refresh_token")
    assert rt3 not in (rt1, rt2) and s.active(rt3)
    assert s.api_status(at3) == 200
    doc = s.doc()
    assert doc["status"] == "connected" and doc["lastRefreshedAt"] and doc["lastError"] is None
    assert s.events() == ["Created", "Established", "TokenRefreshed", "TokenRefreshed"]


def test_status_is_refreshing_while_a_refresh_is_in_flight(api: Api, op: OAuthServer, clock: Clock) -> None:
    import threading

    s = Scenario(api, op)
    op.faults(delay_ms=2000)
    clock.advance(seconds=TTL - 30)
    got: list[str] = []
    worker = threading.Thread(target=lambda: got.append(s.token()))
    worker.start()
    try:
        deadline = time.monotonic() + 1.8
        seen = s.doc()["status"]
        while seen != "refreshing" and time.monotonic() < deadline:
            time.sleep(0.05)
            seen = s.doc()["status"]
        assert seen == "refreshing"
    finally:
        worker.join(10)
    assert got and s.doc()["status"] == "connected"
    assert token_requests(op) == 1


def test_refresh_within_the_margin_before_expiry(api: Api, op: OAuthServer, clock: Clock) -> None:
    s = Scenario(api, op)
    at1 = s.stored("access_token")
    clock.advance(seconds=TTL - 90)  # 90 s left: outside the 60 s margin
    assert s.token() == at1
    assert token_requests(op) == 0
    clock.advance(seconds=40)  # 50 s left: inside it
    assert s.token() != at1
    assert token_requests(op, "refresh_token") == 1


def test_non_rotating_provider_keeps_the_refresh_token(api: Api, op_static: OAuthServer, clock: Clock) -> None:
    s = Scenario(api, op_static)
    rt = s.stored("refresh_token")
    for _ in range(2):
        clock.advance(seconds=TTL + 1)
        s.token()
        clock.reset()
    assert refresh_log(op_static) == [(200, None, None), (200, None, None)]
    # oidc-provider echoes the same refresh token when it does not rotate: same value, same fingerprint
    assert s.stored("refresh_token") == rt
    established, *refreshed = events(api, s.cid)[1:]
    assert len(refreshed) == 2
    fingerprint = established.credentials["refresh_token"]["fingerprint"]
    assert all(e.refresh_token is None or e.refresh_token["fingerprint"] == fingerprint for e in refreshed)
    assert s.active(rt)


@pytest.mark.parametrize("when", ["expiring", "expired"])
def test_twenty_concurrent_uses_make_one_token_request(
    api: Api, oauth_server_factory: ServerFactory, clock: Clock, when: str
) -> None:
    """Single flight in one process (RL-3): 20 callers, 1 refresh, everyone gets the new token.

    ``expired``: a provider with 2-second access tokens and a real wait (the refreshed token is
    then valid in real time, as callers that arrive after the refresh must see it).
    """
    server = oauth_server_factory(ServerConfig(at_ttl=2 if when == "expired" else TTL))
    s = Scenario(api, server)
    at1 = s.stored("access_token")
    if when == "expired":
        time.sleep(2.1)
    else:
        clock.advance(seconds=TTL - 30)
    connections = service(api)
    integration = s.integration
    results = gather(connections, *[lambda: connections.credentials(s.actor, integration) for _ in range(20)])
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors
    tokens = {r.values["access_token"] for r in results}
    assert len(tokens) == 1 and at1 not in tokens
    assert {r.generation for r in results} == {s.connection().generation}
    assert token_requests(server) == 1 and refresh_log(server) == [(200, None, None)]
    assert s.events().count("TokenRefreshed") == 1
    (token,) = tokens
    assert s.api_status(token) == 200
    # the grant is still valid: the stored (rotated) refresh token works
    assert s.active(s.stored("refresh_token"))


def test_two_service_instances_on_one_store_make_one_token_request(api: Api, op: OAuthServer, clock: Clock) -> None:
    """Two ``Connections`` (as two processes would have) over the same store and lock backend:
    the lock plus the double-check after taking it keep it to one refresh (RL-3, §4.2)."""
    s = Scenario(api, op)
    main = service(api)
    other = Connections(
        api.runtime.app,
        HttpOAuthProvider(EgressPolicy.parse("127.0.0.1")),
        main.locks,
        main.policy,
        clock=clock,
    )
    clock.advance(seconds=TTL - 30)
    integration = s.integration
    calls = [lambda c=c: c.credentials(s.actor, integration) for c in (main, other) for _ in range(10)]

    async def both() -> list[Any]:
        import asyncio

        try:
            return await asyncio.gather(*(c() for c in calls), return_exceptions=True)
        finally:
            await main.aclose()
            await other.aclose()

    import asyncio

    results = asyncio.run(both())
    assert not [r for r in results if isinstance(r, BaseException)], results
    assert len({r.values["access_token"] for r in results}) == 1
    assert token_requests(op) == 1
    assert s.active(s.stored("refresh_token"))


# -- invalid_grant: reauthorization, no retry loop (OA-12, RL-7) ------------------------------------


def _assert_reauthorization(s: Scenario, reason: str = "invalid_grant") -> None:
    assert s.events()[-1] == "ReauthorizationRequired"
    assert events(s.api, s.cid)[-1].reason == reason
    assert s.connection().credentials == {}  # a dead grant's tokens are dropped
    doc = s.doc()
    assert doc["status"] == "reauthorization_required"
    assert doc["lastError"]["error"] == reason and doc["lastError"]["kind"] == "reauthorization"
    # no retry loop: further uses fail fast without asking the provider
    before = token_requests(s.server)
    position = head(s.api)
    for _ in range(3):
        with pytest.raises(ReauthorizationNeeded) as exc:
            s.credentials()
        assert exc.value.code == "reauthorization_required"
        assert exc.value.details["connectUrl"] == f"/api/integrations/{s.integration_id}/connect"
    assert token_requests(s.server) == before
    assert head(s.api) == position
    # the background refresher leaves it alone too
    assert run(service(s.api).refresh(s.cid), service(s.api)) is not None
    assert token_requests(s.server) == before


def test_invalid_grant_from_the_provider(api: Api, op: OAuthServer, clock: Clock) -> None:
    s = Scenario(api, op)
    op.faults(status=400, error="invalid_grant")
    clock.advance(seconds=TTL + 1)
    with pytest.raises(ReauthorizationNeeded):
        s.credentials()
    assert refresh_log(op) == [(400, "invalid_grant", "status")]  # exactly one attempt
    _assert_reauthorization(s)


def test_refresh_token_revoked_at_the_provider(api: Api, op: OAuthServer, clock: Clock) -> None:
    s = Scenario(api, op)
    s.revoke_at_provider(s.stored("refresh_token"))
    clock.advance(seconds=TTL - 30)  # still valid, but due: the refresh finds the grant dead
    with pytest.raises(ReauthorizationNeeded):
        s.credentials()
    assert refresh_log(op) == [(400, "invalid_grant", None)]
    _assert_reauthorization(s)


def test_reuse_of_a_rotated_refresh_token_elsewhere_kills_the_grant(api: Api, op: OAuthServer, clock: Clock) -> None:
    """Someone refreshed with our old refresh token after we rotated it: the provider revokes the
    whole grant (reuse detection), so our current one is dead too."""
    s = Scenario(api, op)
    rt1 = s.stored("refresh_token")
    clock.advance(seconds=TTL + 1)
    s.token()
    clock.reset()
    headers, form = op.basic_client.token_auth({"grant_type": "refresh_token", "refresh_token": rt1})
    with http_client() as http:
        r = http.post(op.token_endpoint, headers=headers, data=form)
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"
    op.reset_stats()
    clock.advance(seconds=TTL + 1)
    with pytest.raises(ReauthorizationNeeded):
        s.credentials()
    assert refresh_log(op) == [(400, "invalid_grant", None)]
    _assert_reauthorization(s)


def test_reconnect_clears_reauthorization(api: Api, op: OAuthServer, clock: Clock) -> None:
    s = Scenario(api, op)
    op.faults(status=400, error="invalid_grant")
    clock.advance(seconds=TTL + 1)
    with pytest.raises(ReauthorizationNeeded):
        s.credentials()
    clock.reset()
    assert connected(api, s.headers, s.integration_id, op) == s.cid
    assert s.doc()["status"] == "connected" and s.doc()["lastError"] is None
    op.reset_stats()
    assert s.api_status(s.token()) == 200
    assert token_requests(op) == 0


# -- provider unavailable (RL-5) ----------------------------------------------------------------------


def test_503_with_retry_after_while_valid_then_expired_then_recovered(
    api: Api, oauth_server: OAuthServer, clock: Clock
) -> None:
    """60-second access tokens (the service's margin is 60 s, so they are always due): a 503 with
    ``Retry-After: 120`` keeps the old token in use while it is valid, fails fast with
    ``ProviderUnavailable`` once it has expired, and the refresh succeeds after the wait."""
    s = Scenario(api, oauth_server)
    at1 = s.stored("access_token")
    oauth_server.faults(status=503, retry_after="120")

    assert s.token() == at1  # the refresh failed; the old token still works
    assert refresh_log(oauth_server) == [(503, "temporarily_unavailable", "status")]  # no immediate retry
    assert s.events()[-1] == "TokenRefreshFailed"
    failed = events(api, s.cid)[-1]
    assert (failed.error, failed.kind, failed.retry_after) == ("temporarily_unavailable", "transient", 120.0)
    doc = s.doc()
    assert doc["status"] == "connected"
    assert doc["lastError"]["error"] == "temporarily_unavailable" and doc["lastError"]["kind"] == "transient"

    # within Retry-After: no new attempt, the old token is used
    assert s.token() == at1
    assert token_requests(oauth_server) == 1

    # expired and still within Retry-After: fail fast, no request
    clock.advance(seconds=61)
    with pytest.raises(ProviderUnavailable) as exc:
        s.credentials()
    assert 0 < exc.value.retry_after <= 60
    assert token_requests(oauth_server) == 1
    response = domain_error_handler(None, exc.value)  # type: ignore[arg-type]
    assert response.status_code == 503
    headers = {k.lower(): v for k, v in response.headers.items()}
    assert 1 <= int(headers["retry-after"]) <= 60

    # after Retry-After: the refresh succeeds (the fault was for one call)
    clock.advance(seconds=60)
    at2 = s.token()
    clock.reset()
    assert at2 != at1
    assert refresh_log(oauth_server) == [(503, "temporarily_unavailable", "status"), (200, None, None)]
    assert s.events()[-2:] == ["TokenRefreshFailed", "TokenRefreshed"]
    doc = s.doc()
    assert doc["status"] == "connected" and doc["lastError"] is None
    assert s.api_status(at2) == 200


def test_500_is_retried_once(api: Api, op: OAuthServer, clock: Clock) -> None:
    """A 5xx other than 503 may have been processed: one retry with the same refresh token."""
    s = Scenario(api, op)
    op.faults(status=500, error="server_error")
    clock.advance(seconds=TTL + 1)
    s.token()
    clock.reset()
    assert refresh_log(op) == [(500, "server_error", "status"), (200, None, None)]
    assert s.events()[-1] == "TokenRefreshed"


# -- lost rotation (§4.1) ---------------------------------------------------------------------------


def _short_deadline_service(api: Api, clock: Clock) -> Connections:
    main = service(api)
    return Connections(
        api.runtime.app,
        HttpOAuthProvider(EgressPolicy.parse("127.0.0.1"), deadline=1.0),
        main.locks,
        main.policy,
        clock=clock,
    )


def test_lost_rotation_is_retried_once_then_reauthorization(api: Api, op: OAuthServer, clock: Clock) -> None:
    s = Scenario(api, op)
    connections = _short_deadline_service(api, clock)
    op.faults(delay_after_ms=2500)  # processed (RT rotated), the answer comes after our deadline
    clock.advance(seconds=TTL + 1)
    started = time.monotonic()
    with pytest.raises(ReauthorizationNeeded):
        s.credentials(connections)
    assert time.monotonic() - started < 5
    # the first was processed and rotated; the one retry with the same token found it reused
    assert refresh_log(op) == [(200, None, "delayAfterMs"), (400, "invalid_grant", None)]
    time.sleep(1.6)  # let the late answer go out; no third attempt appears
    assert token_requests(op) == 2
    _assert_reauthorization(s)


def test_lost_response_on_a_non_rotating_provider_retry_succeeds(
    api: Api, op_static: OAuthServer, clock: Clock
) -> None:
    s = Scenario(api, op_static)
    connections = _short_deadline_service(api, clock)
    at1 = s.stored("access_token")
    op_static.faults(delay_after_ms=2500)
    clock.advance(seconds=TTL + 1)
    at2 = s.token(connections)
    clock.reset()
    assert at2 != at1
    assert refresh_log(op_static) == [(200, None, "delayAfterMs"), (200, None, None)]
    assert s.events()[-1] == "TokenRefreshed"
    assert s.api_status(at2) == 200


def test_timeout_while_still_valid_keeps_the_old_token(api: Api, op_static: OAuthServer, clock: Clock) -> None:
    """Both attempts time out (slow provider): the failure is recorded, the valid token is used."""
    s = Scenario(api, op_static)
    connections = _short_deadline_service(api, clock)
    at1 = s.stored("access_token")
    op_static.faults(delay_ms=1500, count=2)
    clock.advance(seconds=TTL - 30)
    assert s.token(connections) == at1
    assert s.events()[-1] == "TokenRefreshFailed"
    failed = events(api, s.cid)[-1]
    assert failed.kind == "transient" and failed.error == "deadline_exceeded"
    time.sleep(1.0)  # the slow requests finish at the provider
    assert token_requests(op_static) == 2


def test_disconnect_while_a_refresh_is_in_flight(
    api: Api, op: OAuthServer, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The provider rotates, the user disconnects, then the refresh answer arrives: the caller
    gets "not connected" (not a crash), and the tokens nobody will use are revoked (§4.2)."""
    import asyncio

    from commands.connections import NotConnected
    from domain.oauth import TokenSet

    s = Scenario(api, op)
    connections = service(api)
    issued: list[TokenSet] = []
    real_refresh = connections.oauth.refresh

    async def refresh(*args: Any, **kwargs: Any) -> TokenSet:
        tokens = await real_refresh(*args, **kwargs)
        issued.append(tokens)
        return tokens

    monkeypatch.setattr(connections.oauth, "refresh", refresh)
    op.faults(delay_after_ms=1000)  # rotated at once, answered a second later
    clock.advance(seconds=TTL - 30)
    integration = s.integration

    async def main() -> list[Any]:
        async def disconnect_meanwhile() -> Any:
            await asyncio.sleep(0.4)
            return await connections.disconnect(s.actor, UUID(s.integration_id))

        try:
            return await asyncio.gather(
                connections.credentials(s.actor, integration), disconnect_meanwhile(), return_exceptions=True
            )
        finally:
            await connections.aclose()

    used, disconnected = asyncio.run(main())
    assert isinstance(used, NotConnected), used
    assert not isinstance(disconnected, BaseException), disconnected
    assert s.events() == ["Created", "Established", "Revoked"]
    (tokens,) = issued
    assert tokens.refresh_token
    log = [(e["endpoint"], e["status"], e["token_type_hint"]) for e in op.stats()["log"]]
    assert log == [("token", 200, None), ("revocation", 200, "refresh_token"), ("revocation", 200, "refresh_token")]
    assert not s.active(tokens.refresh_token)
    assert_error_shape(api.client.get(f"/api/integrations/{s.integration_id}/connection", headers=s.headers), 404)


def test_user_without_a_connection_gets_not_connected(api: Api, op: OAuthServer) -> None:
    """Bob has not connected alice's per-user integration: 409 integration_not_connected."""
    from commands.connections import NotConnected

    s = Scenario(api, op)
    bob_headers = api.user("bob")
    r = api.client.put(f"/api/integrations/{s.integration_id}/shares/bob", json={"accessLevel": 1}, headers=s.headers)
    assert r.status_code in (200, 201), r.text
    bob = actor(api, "bob")
    with pytest.raises(NotConnected) as exc:
        run(service(api).credentials(bob, integration_of(api, bob, s.integration_id)), service(api))
    assert exc.value.code == "integration_not_connected"
    assert api.client.get(f"/api/integrations/{s.integration_id}/connection", headers=bob_headers).status_code == 404


def test_proxy_answers_503_then_409(api: Api, op: OAuthServer, clock: Clock) -> None:
    """Through the request proxy: an expired token with the provider down → 503 with Retry-After;
    a dead grant → 409 ``reauthorization_required`` (no request goes upstream in either case)."""
    s = Scenario(api, op)
    url = f"/api/integrations/{s.integration_id}/request"
    r = api.client.post(url, json={"url": "whoami"}, headers=s.headers)
    assert r.status_code == 200, r.text
    assert r.json()["sub"] == "alice@example.com"
    upstream = op.stats()["api_requests"]

    op.faults(status=503, retry_after="120")
    clock.advance(seconds=TTL + 1)
    r = api.client.post(url, json={"url": "whoami"}, headers=s.headers)
    assert r.status_code == 503, r.text
    assert 100 <= int(r.headers["retry-after"]) <= 120
    assert refresh_log(op) == [(503, "temporarily_unavailable", "status")]

    op.faults(status=400, error="invalid_grant")
    clock.advance(seconds=121)
    r = api.client.post(url, json={"url": "whoami"}, headers=s.headers)
    assert r.status_code == 409, r.text
    assert r.json()["code"] == "reauthorization_required"
    assert refresh_log(op)[-1] == (400, "invalid_grant", "status")
    assert op.stats()["api_requests"] == upstream
    r = api.client.post(url, json={"url": "whoami"}, headers=s.headers)
    assert r.status_code == 409 and len(refresh_log(op)) == 2

"""Disconnect: RFC 7009 revocation at the provider, our copies destroyed, 503 retried later (OA-15)."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import pytest

from commands.connections import NotConnected
from domain.connection import Connection
from tests.api.conftest import Api
from tests.connections.conftest import oauth_integration
from tests.connections.support import (
    Clock,
    actor,
    assert_error_shape,
    connected,
    event_names,
    events,
    integration_of,
    run,
    service,
    token_requests,
)
from tests.oauth.harness import OAuthServer, http_client


def _open(api: Api, integration_id: str, cid: UUID, kind: str, ref: str) -> str:
    return api.runtime.app.vault.open(UUID(integration_id), f"connection:{cid}:{kind}", ref)


def _active(server: OAuthServer, token: str) -> bool:
    headers, form = server.basic_client.token_auth({"token": token})
    with http_client() as http:
        r = http.post(server.introspection_endpoint, headers=headers, data=form)
    r.raise_for_status()
    return bool(r.json()["active"])


class Connected:
    def __init__(self, api: Api, server: OAuthServer, **fields: Any) -> None:
        self.api, self.server = api, server
        self.headers = api.user("alice")
        self.integration_id = oauth_integration(api, self.headers, server, **fields)["id"]
        self.cid = connected(api, self.headers, self.integration_id, server)
        connection = api.runtime.app._get(self.cid, Connection)
        assert connection is not None
        self.refs = {k: v["ref"] for k, v in connection.credentials.items()}
        self.tokens = {k: _open(api, self.integration_id, self.cid, k, r) for k, r in self.refs.items()}
        server.reset_stats()

    @property
    def url(self) -> str:
        return f"/api/integrations/{self.integration_id}/connection"

    def revocations(self) -> list[tuple[int, str | None, str | None]]:
        return [
            (e["status"], e["token_type_hint"], e["fault"])
            for e in self.server.stats()["log"]
            if e["endpoint"] == "revocation"
        ]

    def assert_shredded(self) -> None:
        for kind, ref in self.refs.items():
            with pytest.raises(Exception):  # whatever the vault raises for a missing row
                _open(self.api, self.integration_id, self.cid, kind, ref)


def test_disconnect_revokes_at_the_provider(api: Api, oauth_server: OAuthServer) -> None:
    c = Connected(api, oauth_server)
    assert _active(oauth_server, c.tokens["refresh_token"])
    r = api.client.delete(c.url, headers=c.headers)
    assert r.status_code == 204, r.text
    assert oauth_server.stats()["revocations"] == 1
    assert c.revocations() == [(200, "refresh_token", None)]
    assert token_requests(oauth_server) == 0
    assert not _active(oauth_server, c.tokens["refresh_token"])
    assert not _active(oauth_server, c.tokens["access_token"])  # the grant is gone with it

    assert_error_shape(api.client.get(c.url, headers=c.headers), 404)
    assert event_names(api, c.cid)[-1] == "Revoked"
    revoked = events(api, c.cid)[-1]
    assert (revoked.reason, revoked.provider_revocation, revoked.pending) == ("disconnected", "done", None)
    c.assert_shredded()
    alice = actor(api, "alice")
    with pytest.raises(NotConnected):
        run(service(api).credentials(alice, integration_of(api, alice, c.integration_id)), service(api))
    # once is enough: a second DELETE finds nothing
    assert_error_shape(api.client.delete(c.url, headers=c.headers), 404)
    assert oauth_server.stats()["revocations"] == 1
    # and connecting again works
    assert connected(api, c.headers, c.integration_id, oauth_server) == c.cid


def test_disconnect_with_revocation_503_is_retried_later(
    api: Api, oauth_server: OAuthServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = Connected(api, oauth_server)
    oauth_server.faults(status=503, endpoint="revocation", retry_after="2", count=2)
    r = api.client.delete(c.url, headers=c.headers)
    assert r.status_code == 204, r.text  # our copy goes regardless
    assert c.revocations() == [(503, "refresh_token", "status")]
    assert_error_shape(api.client.get(c.url, headers=c.headers), 404)
    revoked = events(api, c.cid)[-1]
    assert type(revoked).__name__ == "Revoked"
    assert revoked.provider_revocation == "pending"
    assert revoked.pending is not None and revoked.pending["hint"] == "refresh_token"
    assert set(revoked.pending) == {"ref", "fingerprint", "hint"}  # a reference, never the token
    assert _active(oauth_server, c.tokens["refresh_token"])  # the provider has not been told yet
    # the access token is destroyed at once; only the refresh token waits, unusable
    with pytest.raises(Exception):
        _open(api, c.integration_id, c.cid, "access_token", c.refs["access_token"])
    alice = actor(api, "alice")
    with pytest.raises(NotConnected):
        run(service(api).credentials(alice, integration_of(api, alice, c.integration_id)), service(api))

    connections = service(api)
    clock = Clock()
    monkeypatch.setattr(connections, "clock", clock)
    # within the provider's Retry-After (2 s): no new attempt at all
    assert run(connections.retry_revocation(c.cid, 1), connections) == "pending"
    assert c.revocations() == [(503, "refresh_token", "status")]
    # past it, still 503: stays pending, nothing settled
    clock.advance(seconds=3)
    assert run(connections.retry_revocation(c.cid, 1), connections) == "pending"
    assert event_names(api, c.cid)[-1] == "Revoked"
    # the provider is back (once its second Retry-After has passed)
    assert run(connections.retry_revocation(c.cid, 2), connections) == "pending"
    assert len(c.revocations()) == 2
    clock.advance(seconds=3)
    assert run(connections.retry_revocation(c.cid, 2), connections) == "done"
    assert c.revocations() == [(503, "refresh_token", "status")] * 2 + [(200, "refresh_token", None)]
    assert event_names(api, c.cid)[-1] == "RevocationSettled"
    settled = events(api, c.cid)[-1]
    assert (settled.outcome, settled.attempts) == ("done", 2)
    assert not _active(oauth_server, c.tokens["refresh_token"])
    c.assert_shredded()
    # settled: nothing more to retry
    assert run(connections.retry_revocation(c.cid, 3), connections) is None
    assert oauth_server.stats()["revocations"] == 3


def test_pending_revocation_is_abandoned_after_its_deadline(
    api: Api, oauth_server: OAuthServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = Connected(api, oauth_server)
    oauth_server.faults(status=503, endpoint="revocation", count=5)
    assert api.client.delete(c.url, headers=c.headers).status_code == 204
    clock = Clock()
    connections = service(api)
    monkeypatch.setattr(connections, "clock", clock)
    clock.advance(days=1, seconds=1)
    assert run(connections.retry_revocation(c.cid, 7), connections) == "abandoned"
    settled = events(api, c.cid)[-1]
    assert (type(settled).__name__, settled.outcome) == ("RevocationSettled", "abandoned")
    c.assert_shredded()


def test_disconnect_without_a_revocation_endpoint(api: Api, oauth_server: OAuthServer) -> None:
    c = Connected(api, oauth_server, revocationUri=None)
    assert api.client.delete(c.url, headers=c.headers).status_code == 204
    assert oauth_server.stats()["revocations"] == 0
    assert events(api, c.cid)[-1].provider_revocation == "not_supported"
    c.assert_shredded()


def test_reauthorization_required_connection_can_be_disconnected(
    api: Api, oauth_server: OAuthServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from commands.connections import ReauthorizationNeeded

    c = Connected(api, oauth_server)
    clock = Clock()
    monkeypatch.setattr(service(api), "clock", clock)
    oauth_server.faults(status=400, error="invalid_grant")
    clock.advance(seconds=61)
    alice = actor(api, "alice")
    with pytest.raises(ReauthorizationNeeded):
        run(service(api).credentials(alice, integration_of(api, alice, c.integration_id)), service(api))
    assert api.client.get(c.url, headers=c.headers).json()["status"] == "reauthorization_required"
    assert api.client.delete(c.url, headers=c.headers).status_code == 204
    assert_error_shape(api.client.get(c.url, headers=c.headers), 404)
    assert event_names(api, c.cid)[-2:] == ["ReauthorizationRequired", "Revoked"]
    assert events(api, c.cid)[-1].provider_revocation == "not_supported"  # no token left to revoke
    assert oauth_server.stats()["revocations"] == 0


def test_only_the_owner_of_a_per_user_connection_disconnects_it(api: Api, oauth_server: OAuthServer) -> None:
    c = Connected(api, oauth_server)
    bob = api.user("bob")
    r = api.client.put(f"/api/integrations/{c.integration_id}/shares/bob", json={"accessLevel": 3}, headers=c.headers)
    assert r.status_code in (200, 201), r.text
    # bob (even a manager) has no connection of his own: 404, alice's stays
    assert_error_shape(api.client.delete(c.url, headers=bob), 404)
    assert api.client.get(c.url, headers=c.headers).json()["status"] == "connected"
    assert oauth_server.stats()["revocations"] == 0

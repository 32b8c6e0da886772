"""Connection: given events / when command / then events."""

from __future__ import annotations

from uuid import UUID

from domain.connection import (
    CONNECTED,
    REAUTHORIZATION_REQUIRED,
    REVOKED,
    SHARED_OWNER,
    Connection,
    connection_id,
)
from domain.errors import Conflict
from tests.domain.given_when_then import event, given, history

INTEGRATION = UUID("6f1c1c5e-1111-4222-8333-444455556666")
AT = {"ref": "a1", "fingerprint": "fa1"}
RT = {"ref": "r1", "fingerprint": "fr1"}
AT2 = {"ref": "a2", "fingerprint": "fa2"}
RT2 = {"ref": "r2", "fingerprint": "fr2"}


def new() -> Connection:
    return Connection(integration_id=INTEGRATION, owner_id="alice", shared=False)


def establish(c: Connection) -> None:
    c.establish(
        auth_type="oauth2",
        credentials={"access_token": AT, "refresh_token": RT},
        scopes=["read"],
        token_expires_at="2026-11-27T20:00:00+00:00",
        refresh_token_expires_at=None,
        account={"name": "Alice", "email": "alice@example.com", "sub": "a-1"},
    )


def refresh(generation: int, refresh_token: dict | None = RT2):
    return lambda c: c.refreshed(
        generation=generation,
        access_token=AT2,
        refresh_token=refresh_token,
        scopes=[],
        token_expires_at="2026-11-27T21:00:00+00:00",
        refresh_token_expires_at=None,
    )


def test_ids_per_user_and_shared() -> None:
    assert connection_id(INTEGRATION, "alice") == new().id
    assert connection_id(INTEGRATION, "alice") != connection_id(INTEGRATION, "bob")
    shared = Connection(integration_id=INTEGRATION, owner_id="alice", shared=True)
    assert shared.id == connection_id(INTEGRATION, None) == connection_id(INTEGRATION, SHARED_OWNER)


def test_a_new_connection_is_unusable_until_established() -> None:
    outcome = given().when(lambda _: new()).then(event(Connection.Created, owner_id="alice", shared=False))
    assert outcome.state.status == REVOKED and not outcome.state.usable


def test_establish_records_metadata_only() -> None:
    outcome = (
        given(history(new))
        .when(establish)
        .then(
            event(
                Connection.Established,
                auth_type="oauth2",
                scopes=["read"],
                credentials={"access_token": AT, "refresh_token": RT},
            )
        )
    )
    state = outcome.state
    assert (state.status, state.generation, state.account["email"]) == (CONNECTED, 1, "alice@example.com")
    assert state.last_authorized_at is not None


def test_refresh_with_rotation_replaces_both_tokens() -> None:
    outcome = (
        given(history(new, establish))
        .when(refresh(1))
        .then(event(Connection.TokenRefreshed, access_token=AT2, refresh_token=RT2))
    )
    assert outcome.state.credentials == {"access_token": AT2, "refresh_token": RT2}
    assert outcome.state.generation == 2 and outcome.state.last_refreshed_at is not None


def test_refresh_without_a_new_refresh_token_keeps_the_old_one() -> None:
    outcome = (
        given(history(new, establish))
        .when(refresh(1, refresh_token=None))
        .then(event(Connection.TokenRefreshed, refresh_token=None))
    )
    assert outcome.state.credentials["refresh_token"] == RT
    assert outcome.state.scopes == ["read"]  # an empty granted scope keeps the known one


def test_a_refresh_from_stale_credentials_is_a_conflict() -> None:
    given(history(new, establish, refresh(1))).when(refresh(1)).then_fails(Conflict)


def test_refresh_after_reauthorization_is_a_conflict() -> None:
    given(history(new, establish, lambda c: c.require_reauthorization("invalid_grant"))).when(refresh(2)).then_fails(
        Conflict
    )


def test_refresh_failure_counts_and_keeps_the_tokens() -> None:
    fail = lambda c: c.refresh_failed(generation=1, error="temporarily_unavailable", kind="transient", retry_after=1.0)  # noqa: E731
    outcome = (
        given(history(new, establish, fail))
        .when(fail)
        .then(event(Connection.TokenRefreshFailed, error="temporarily_unavailable", kind="transient", retry_after=1.0))
    )
    assert outcome.state.failures == 2 and outcome.state.usable
    assert outcome.state.credentials["refresh_token"] == RT


def test_invalid_grant_requires_reauthorization_and_drops_credentials() -> None:
    outcome = (
        given(history(new, establish))
        .when(lambda c: c.require_reauthorization("invalid_grant"))
        .then(event(Connection.ReauthorizationRequired, reason="invalid_grant"))
    )
    assert outcome.state.status == REAUTHORIZATION_REQUIRED and outcome.state.credentials == {}
    given(history(new, establish, lambda c: c.require_reauthorization("x"))).when(
        lambda c: c.require_reauthorization("again")
    ).then_nothing()


def test_reconnect_after_reauthorization_clears_the_error() -> None:
    outcome = (
        given(history(new, establish, lambda c: c.require_reauthorization("invalid_grant")))
        .when(establish)
        .then(event(Connection.Established))
    )
    assert outcome.state.status == CONNECTED and outcome.state.last_error is None and outcome.state.failures == 0


def test_revoke_once() -> None:
    revoke = lambda c: c.revoke(reason="disconnected", provider_revocation="done")  # noqa: E731
    outcome = (
        given(history(new, establish))
        .when(revoke)
        .then(event(Connection.Revoked, reason="disconnected", provider_revocation="done"))
    )
    assert outcome.state.status == REVOKED and outcome.state.credentials == {}
    given(history(new, establish, revoke)).when(revoke).then_nothing()

"""Contract of the connection status read model, the same assertions on SQLite and on PostgreSQL."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import pytest
from eventsourcing.persistence import Tracking

from domain.connection import SHARED_OWNER, Connection
from projections.runtime import READ_MODELS, rebuild
from projections.sqlview import iso
from tests.test_projection_support import Store, store_fixture  # noqa: F401 (the store fixture)

pytestmark = pytest.mark.store

T = datetime(2030, 1, 1, 10, 0, tzinfo=UTC)
I1, I2 = UUID("11111111-1111-4111-8111-111111111111"), UUID("22222222-2222-4222-8222-222222222222")
ACCOUNT = {"name": "Alice A", "email": "alice@x.test", "sub": "1234"}


def at(**delta: float) -> str:
    return (T + timedelta(**delta)).isoformat()


def ref(tag: str) -> dict[str, str]:
    """A vault reference; every one is ``vault:…`` with a ``fp-…`` fingerprint (never to be stored)."""
    return {"ref": f"vault:{tag}", "fingerprint": f"fp-{tag}"}


def connection(integration_id: UUID, owner_id: str, shared: bool = False) -> Connection:
    return Connection(integration_id=integration_id, owner_id=owner_id, shared=shared)


def establish(c: Connection, tag: str, expires: str | None, **kw: Any) -> None:
    oauth = expires is not None
    credentials = {"access_token": ref(f"{tag}-a"), "refresh_token": ref(f"{tag}-r")} if oauth else {}
    if not oauth:
        credentials["api_key"] = ref(f"{tag}-k")
    c.establish(
        auth_type=kw.pop("auth_type", "oauth2" if oauth else "api_key"),
        credentials=credentials,
        scopes=kw.pop("scopes", ["read"] if oauth else []),
        token_expires_at=expires,
        refresh_token_expires_at=kw.pop("refresh_expires", at(days=30) if oauth else None),
        account=kw.pop("account", None),
        epoch=kw.pop("epoch", 0),
    )


@pytest.fixture
def given(store: Store) -> dict[str, Any]:
    """The scenario's aggregates, and under ``"mid"`` the position and copies of them half-way."""
    alice = connection(I1, "alice")
    bob = connection(I1, "bob")
    shared = connection(I1, SHARED_OWNER, shared=True)
    carol, erin, dave = connection(I2, "carol"), connection(I2, "erin"), connection(I2, "dave")
    alice2 = connection(I2, "alice")
    store.save(alice, bob, shared, carol, erin, dave, alice2)

    establish(alice, "alice1", at(hours=1), account=ACCOUNT, scopes=["read", "write"])
    establish(bob, "bob1", at(minutes=30))
    establish(shared, "shared1", None)
    establish(carol, "carol1", at(hours=2))
    establish(erin, "erin1", at(hours=2))
    store.save(alice, bob, shared, carol, erin)

    # A refresh without a new refresh token keeps its expiry, and the scopes when none are sent.
    alice.refreshed(
        generation=1, access_token=ref("alice2-a"), refresh_token=None, scopes=[],
        token_expires_at=at(hours=2), refresh_token_expires_at=None,
    )  # fmt: skip
    alice.refresh_failed(generation=2, error="temporarily_unavailable", kind="transient", retry_after=30.0)
    bob.require_reauthorization("invalid_grant")
    carol.revoke(reason="disconnected", provider_revocation="pending", pending=ref("carol1-revoke"))
    aggregates = {"alice": alice, "bob": bob, "shared": shared, "carol": carol, "erin": erin, "dave": dave}
    aggregates["alice2"] = alice2
    mid = {"position": store.save(alice, bob, carol), **copy.deepcopy(aggregates)}

    # A rotated refresh token with its expiry; a reconnect with an expiry in another offset.
    alice.refreshed(
        generation=2, access_token=ref("alice3-a"), refresh_token=ref("alice3-r"), scopes=["read"],
        token_expires_at=at(hours=3), refresh_token_expires_at=at(days=60),
    )  # fmt: skip
    carol.settle_revocation("done", attempts=2)
    establish(carol, "carol2", "2030-01-01T12:30:00+02:00", epoch=1)  # 10:30 UTC
    store.save(alice, carol)
    return {**aggregates, "mid": mid}


@pytest.fixture
def view(store: Store, given: dict[str, Any]) -> Any:
    view = store.view("connections")
    store.feed(view, "connections")
    return view


def utc(text: str | None) -> str | None:
    return None if text is None else iso(datetime.fromisoformat(text))


def mirrored(c: Connection) -> dict[str, Any]:
    """The row the aggregate's state says, without its credentials."""
    return {
        "connection_id": str(c.id),
        "integration_id": str(c.integration_id),
        "owner_id": c.owner_id,
        "shared": c.shared,
        "status": c.status,
        "auth_type": c.auth_type,
        "account": c.account,
        "scopes": c.scopes,
        "token_expires_at": utc(c.token_expires_at),
        "refresh_token_expires_at": utc(c.refresh_token_expires_at),
        "last_authorized_at": utc(c.last_authorized_at),
        "last_refreshed_at": utc(c.last_refreshed_at),
        "last_error": None if c.last_error is None else {**c.last_error, "at": utc(c.last_error["at"])},
        "failures": c.failures,
        "generation": c.generation,
        "epoch": c.epoch,
        "revocation_pending": c.pending_revocation is not None,
        "created_at": iso(c.created_on),
        "updated_at": iso(c.modified_on),
        "version": c.version,
    }


def test_rows_mirror_the_aggregates(view: Any, given: dict[str, Any]) -> None:
    for c in (v for v in given.values() if isinstance(v, Connection)):
        assert view.get(c.id) == mirrored(c)
        assert view.get(str(c.id)) == mirrored(c)
    assert view.get(uuid4()) is None
    assert view.get("not-a-uuid") is None
    assert (view.for_integration("nope"), view.count_for_integration("nope")) == ([], 0)


def test_establish_refresh_and_failure(view: Any, given: dict[str, Any]) -> None:
    alice = given["alice"]
    row = view.get(alice.id)
    assert row["status"] == "connected" and row["shared"] is False
    assert (row["auth_type"], row["account"], row["scopes"]) == ("oauth2", ACCOUNT, ["read"])
    assert row["token_expires_at"] == "2030-01-01T13:00:00.000000+00:00"
    assert row["refresh_token_expires_at"] == "2030-03-02T10:00:00.000000+00:00"  # rotated with its expiry
    assert row["last_error"] is None and row["failures"] == 0  # the refresh after the failure cleared it
    assert row["generation"] == 3 and row["version"] == 5
    assert row["last_refreshed_at"] == iso(alice.modified_on)
    assert row["last_authorized_at"] < row["last_refreshed_at"]


def test_refresh_without_refresh_token_keeps_its_expiry_and_a_failure_is_counted(
    store: Store, given: dict[str, Any]
) -> None:
    mid = given["mid"]
    view = store.view("connections", "connections_mid")
    store.feed(view, "connections", stop=mid["position"])
    for name in ("alice", "bob", "shared", "carol", "erin", "dave", "alice2"):
        assert view.get(mid[name].id) == mirrored(mid[name])
    row = view.get(mid["alice"].id)
    assert row["scopes"] == ["read", "write"]  # the refresh sent none: kept
    assert row["refresh_token_expires_at"] == "2030-01-31T10:00:00.000000+00:00"  # no new refresh token: kept
    assert row["token_expires_at"] == "2030-01-01T12:00:00.000000+00:00"
    failed_at = row["last_error"].pop("at")
    assert row["last_error"] == {"error": "temporarily_unavailable", "kind": "transient", "retry_after": 30.0}
    assert failed_at == row["updated_at"] > row["last_refreshed_at"]
    assert (row["failures"], row["generation"], row["status"], row["version"]) == (1, 2, "connected", 4)
    carol = view.get(mid["carol"].id)
    assert (carol["status"], carol["generation"], carol["revocation_pending"], carol["token_expires_at"]) == (
        "revoked", 2, True, "2030-01-01T12:00:00.000000+00:00"
    )  # fmt: skip


def test_reauthorization_revocation_and_reconnect(view: Any, given: dict[str, Any]) -> None:
    bob = view.get(given["bob"].id)
    assert bob["status"] == "reauthorization_required"
    assert bob["last_error"]["error"] == "invalid_grant" and bob["last_error"]["kind"] == "reauthorization"
    assert bob["generation"] == 2
    carol = view.get(given["carol"].id)
    assert carol["status"] == "connected" and carol["generation"] == 3  # established, revoked, established
    assert (carol["revocation_pending"], carol["epoch"], carol["version"]) == (False, 1, 5)  # settled
    assert carol["token_expires_at"] == "2030-01-01T10:30:00.000000+00:00"  # normalised to UTC
    dave = view.get(given["dave"].id)
    assert (dave["status"], dave["generation"], dave["version"], dave["scopes"]) == ("revoked", 0, 1, [])
    assert dave["last_authorized_at"] is None and dave["account"] is None


def test_queries_by_integration_and_owner(view: Any, given: dict[str, Any]) -> None:
    assert [(r["owner_id"], r["shared"]) for r in view.for_integration(I1)] == [
        (SHARED_OWNER, True),
        ("alice", False),
        ("bob", False),
    ]
    assert view.for_integration(str(I1)) == view.for_integration(I1)
    assert [r["owner_id"] for r in view.for_integration(I2)] == ["alice", "carol", "dave", "erin"]
    assert view.for_integration(uuid4()) == []
    assert (view.count_for_integration(I1), view.count_for_integration(str(I2))) == (3, 4)
    assert view.count_for_integration(uuid4()) == 0
    assert [r["integration_id"] for r in view.for_owner("alice")] == [str(I1), str(I2)]
    assert [r["connection_id"] for r in view.for_owner(SHARED_OWNER)] == [str(given["shared"].id)]
    assert view.for_owner("nobody") == []


def test_expiring_filters_connected_tokens_and_orders_soonest_first(view: Any, given: dict[str, Any]) -> None:
    def owners(rows: list[dict[str, Any]]) -> list[str]:
        return [r["owner_id"] for r in rows]

    # carol 10:30 (given at +02:00), erin 12:00, alice 13:00; bob (10:30, reauthorization), the
    # shared api-key connection (no expiry) and dave (never established) are never listed.
    assert owners(view.expiring(at(hours=4), 100)) == ["carol", "erin", "alice"]
    assert owners(view.expiring(at(hours=4), 2)) == ["carol", "erin"]
    assert owners(view.expiring(at(hours=2), 100)) == ["carol"]  # strictly before
    assert owners(view.expiring("2030-01-01T14:00:00+02:00", 100)) == ["carol"]  # 12:00 UTC
    assert owners(view.expiring("2030-01-01T14:00:01+02:00", 100)) == ["carol", "erin"]
    assert owners(view.expiring("2030-01-01T12:00:00.000001Z", 100)) == ["carol", "erin"]
    assert view.expiring(at(minutes=30), 100) == []
    assert view.expiring(at(hours=4), 0) == []
    assert view.expiring(at(hours=4), 1) == [view.get(given["carol"].id)]


def refs_in(value: Any) -> set[str]:
    """Every vault reference and fingerprint in an event's state."""
    if isinstance(value, dict):
        found = {value[k] for k in ("ref", "fingerprint") if isinstance(value.get(k), str)}
        return found.union(*(refs_in(v) for v in value.values()))
    if isinstance(value, list | tuple):
        return set().union(*(refs_in(v) for v in value))
    return set()


def test_no_token_or_vault_reference_is_stored(store: Store, view: Any) -> None:
    events = [store.app.mapper.to_domain_event(n) for n in store.notifications("connections")]
    refs = set().union(*(refs_in(vars(e)) for e in events))
    assert len(refs) == 2 * 15  # the credentials, refreshed tokens and the pending revocation above
    cells = [str(v) for row in view.rows()["connections"] for v in row.values()]
    cells += [str(v) for c in view.for_integration(I1) + view.for_integration(I2) for v in c.values()]
    assert not [(ref, cell) for ref in refs for cell in cells if ref in cell]
    assert "vault:" not in repr(view.rows())


def tracked(store: Store) -> list[tuple[Any, Tracking]]:
    return [
        (store.app.mapper.to_domain_event(n), Tracking(store.app.name, n.id))
        for n in store.notifications("connections")
    ]


def test_batches_give_the_rows_of_event_by_event_application(store: Store, view: Any) -> None:
    expected = view.rows()
    projection = READ_MODELS["connections"].projection
    for batch_size in (1, 3, 1000):
        batched = store.view("connections", f"connections_b{batch_size}")
        report = rebuild(store.app, batched, projection, batch_size=batch_size)
        assert report.events == len(store.notifications("connections"))
        assert batched.rows() == expected
    items = tracked(store)
    one = store.view("connections", "connections_one_batch")
    assert one.apply_batch(items)
    assert one.rows() == expected


def test_redelivery_of_a_tracked_notification_is_a_no_op(store: Store, view: Any) -> None:
    before = view.rows()
    items = tracked(store)
    assert view.apply(*items[-1]) is False
    assert view.apply(*items[len(items) // 2]) is False
    assert view.apply_batch(items) is False
    assert view.rows() == before
    assert view.max_tracking_id(store.app.name) == items[-1][1].notification_id


def test_reset_forgets_rows_and_position(store: Store, view: Any) -> None:
    view.reset(store.app.name)
    assert view.max_tracking_id(store.app.name) is None
    assert view.rows() == {"connections": []}


def test_pending_revocations_lists_exactly_the_connections_owing_a_provider_revocation(
    store: Store, view: Any, given: dict[str, Any]
) -> None:
    assert view.pending_revocations(100) == []  # carol's was settled
    erin = given["erin"]
    erin.revoke(reason="disconnected", provider_revocation="pending", pending=ref("erin1-revoke"))
    store.save(erin)
    store.feed(view, "connections")
    owing = {str(c.id) for k, c in given.items() if k != "mid" and c.pending_revocation is not None}
    assert owing == {str(erin.id)}
    rows = view.pending_revocations(100)
    assert {r["connection_id"] for r in rows} == owing
    assert all(r["status"] == "revoked" and r["revocation_pending"] for r in rows)
    assert view.pending_revocations(0) == []

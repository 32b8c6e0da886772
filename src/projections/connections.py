"""The connection status read model: one row per Connection (an account linked to an integration).

The API answers ``GET /api/integrations/{id}/connection`` and the admin listings from it, and the
background refresher asks it which connected connections have a token expiring soon (the
``(status, token_expires_at)`` index). Each row mirrors the aggregate's state after its events,
except the credentials: events carry vault references in ``credentials``, ``access_token``,
``refresh_token`` and a revocation's ``pending``, and none of them is stored here (only whether a
revocation is pending), so the read model and its backups hold nothing that leads to a token.

Timestamps, the provider's expiries included, are fixed-width UTC ISO-8601 text (:func:`iso`), so
"expires before T" is a text comparison that orders alike on both backends.
"""

from __future__ import annotations

from abc import abstractmethod
from datetime import UTC, datetime
from typing import Any, ClassVar
from uuid import UUID

from eventsourcing.utils import get_topic

from domain.connection import CONNECTED, REAUTHORIZATION_REQUIRED, REVOKED, SHARED_OWNER, Connection
from projections.sqlview import (
    Batch,
    PostgresView,
    ReadModelView,
    Row,
    SQLiteView,
    SQLView,
    ViewProjection,
    iso,
    upsert,
)

_COLUMNS = (
    "connection_id", "integration_id", "owner_id", "shared", "status", "auth_type", "account", "scopes",
    "token_expires_at", "refresh_token_expires_at", "last_authorized_at", "last_refreshed_at", "last_error",
    "failures", "generation", "epoch", "revocation_pending", "created_at", "updated_at", "version",
)  # fmt: skip
_JSON_COLUMNS = frozenset({"account", "scopes", "last_error"})

_DDL = (
    "CREATE TABLE IF NOT EXISTS {connections} ("
    "connection_id {uuid} PRIMARY KEY, integration_id {uuid} NOT NULL, owner_id {key} NOT NULL, "
    "shared {bool} NOT NULL, status {key} NOT NULL, auth_type TEXT NOT NULL, account {json}, scopes {json} NOT NULL, "
    "token_expires_at {key}, refresh_token_expires_at {key}, last_authorized_at {key}, last_refreshed_at {key}, "
    "last_error {json}, failures INTEGER NOT NULL, generation INTEGER NOT NULL, epoch INTEGER NOT NULL, "
    "revocation_pending {bool} NOT NULL, created_at {key} NOT NULL, updated_at {key} NOT NULL, "
    "version INTEGER NOT NULL)",
    "CREATE INDEX IF NOT EXISTS {connections_by_integration} ON {connections} (integration_id, owner_id)",
    "CREATE INDEX IF NOT EXISTS {connections_by_owner} ON {connections} (owner_id)",
    # The refresher's question: connected, token expiring before T, oldest first.
    "CREATE INDEX IF NOT EXISTS {connections_by_expiry} ON {connections} (status, token_expires_at)",
)

_UPSERT = upsert("connections", _COLUMNS, ("connection_id",))
_LOAD = "SELECT * FROM {connections} WHERE connection_id = %s"
_COUNT = "SELECT count(*) AS n FROM {connections} WHERE integration_id = %s"


class ConnectionsView(ReadModelView):
    """Query interface of the connection status read model. Rows hold no token and no vault ref."""

    @abstractmethod
    def for_integration(self, integration_id: UUID | str) -> list[dict[str, Any]]:
        """The integration's connections (the shared one as owner ``*shared*``), by owner id."""

    @abstractmethod
    def get(self, connection_id: UUID | str) -> dict[str, Any] | None: ...

    @abstractmethod
    def expiring(self, before_iso: str, limit: int) -> list[dict[str, Any]]:
        """Connected connections whose token expires before ``before_iso``, the soonest first."""

    @abstractmethod
    def for_owner(self, owner_id: str) -> list[dict[str, Any]]:
        """The connections of ``owner_id`` (``*shared*``: every shared one), by integration id."""

    @abstractmethod
    def count_for_integration(self, integration_id: UUID | str) -> int: ...

    @abstractmethod
    def pending_revocations(self, limit: int) -> list[dict[str, Any]]:
        """Revoked connections whose provider revocation is still owed (answered 503), oldest first."""


class SQLConnectionsView(ConnectionsView, SQLView):
    TABLES: ClassVar = {"connections": "connection_id"}
    JSON_COLUMNS: ClassVar = _JSON_COLUMNS
    DDL: ClassVar = _DDL

    # --- applying events ------------------------------------------------------------------------
    # Rows are memoised per batch and written once at its end.

    def _apply_event(self, batch: Batch, event: Any) -> None:
        connection_id = str(event.originator_id)
        if isinstance(event, Connection.Created):
            row = _new_row(event)
        else:
            row = self._row(batch, connection_id)
            if row is None:
                return  # its Created was never seen: nothing to change
            _change(row, event)
        row["updated_at"] = iso(event.timestamp)
        row["version"] = event.originator_version
        batch.memo[connection_id] = row
        batch.dirty[connection_id] = None

    def _row(self, batch: Batch, connection_id: str) -> dict[str, Any] | None:
        if connection_id not in batch.memo:
            found = self.fetch_one(batch.cur, _LOAD, (connection_id,))
            batch.memo[connection_id] = None if found is None else self._out(found)
        return batch.memo[connection_id]

    def _flush(self, batch: Batch) -> None:
        for connection_id in batch.dirty:
            row = batch.memo[connection_id]
            params = [
                (None if row[c] is None else self.json_in(row[c])) if c in _JSON_COLUMNS else row[c] for c in _COLUMNS
            ]
            self.execute(batch.cur, _UPSERT, params)

    # --- queries ---------------------------------------------------------------------------------

    def _out(self, row: Row) -> dict[str, Any]:
        out = {c: row[c] for c in _COLUMNS}
        for column in ("connection_id", "integration_id"):
            out[column] = str(out[column])  # a UUID on PostgreSQL, text on SQLite
        for column in _JSON_COLUMNS:
            out[column] = self.json_out(out[column])
        out["shared"] = bool(out["shared"])
        out["revocation_pending"] = bool(out["revocation_pending"])
        return out

    def _select(self, where: str, params: list[Any], tail: str = "") -> list[dict[str, Any]]:
        return [self._out(r) for r in self.query(f"SELECT * FROM {{connections}} WHERE {where}{tail}", params)]

    def for_integration(self, integration_id: UUID | str) -> list[dict[str, Any]]:
        key = _uuid(integration_id)
        return [] if key is None else self._select("integration_id = %s", [key], " ORDER BY owner_id, connection_id")

    def get(self, connection_id: UUID | str) -> dict[str, Any] | None:
        key = _uuid(connection_id)
        found = [] if key is None else self._select("connection_id = %s", [key])
        return found[0] if found else None

    def expiring(self, before_iso: str, limit: int) -> list[dict[str, Any]]:
        return self._select(
            "status = %s AND token_expires_at IS NOT NULL AND token_expires_at < %s",
            [CONNECTED, instant(before_iso), max(limit, 0)],
            " ORDER BY token_expires_at, connection_id LIMIT %s",
        )

    def pending_revocations(self, limit: int) -> list[dict[str, Any]]:
        return self._select("revocation_pending", [max(limit, 0)], " ORDER BY updated_at, connection_id LIMIT %s")

    def for_owner(self, owner_id: str) -> list[dict[str, Any]]:
        return self._select("owner_id = %s", [owner_id], " ORDER BY integration_id, connection_id")

    def count_for_integration(self, integration_id: UUID | str) -> int:
        key = _uuid(integration_id)
        row = None if key is None else self.query_one(_COUNT, (key,))
        return int(row["n"]) if row else 0


def _uuid(value: UUID | str) -> str | None:
    """The canonical text of an id, or None when it is no UUID (PostgreSQL would refuse it)."""
    try:
        return str(value if isinstance(value, UUID) else UUID(value))
    except ValueError:
        return None


def instant(value: str | None) -> str | None:
    """An ISO-8601 instant as :func:`iso` text (naive means UTC), so it compares as text.

    A value that does not parse is kept as it is rather than stopping the projection on it.
    """
    if value is None:
        return None
    try:
        ts = datetime.fromisoformat(value)
    except ValueError:
        return value
    return iso(ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC))


def _new_row(e: Connection.Created) -> dict[str, Any]:
    # As Connection.__init__: nothing usable until Established.
    return {
        "connection_id": str(e.originator_id),
        "integration_id": str(e.integration_id),
        # The domain's convention, kept even if a caller named a user: the shared one has no owner.
        "owner_id": SHARED_OWNER if e.shared else e.owner_id,
        "shared": bool(e.shared),
        "status": REVOKED,
        "auth_type": "",
        "account": None,
        "scopes": [],
        "token_expires_at": None,
        "refresh_token_expires_at": None,
        "last_authorized_at": None,
        "last_refreshed_at": None,
        "last_error": None,
        "failures": 0,
        "generation": 0,
        "epoch": 0,
        "revocation_pending": False,
        "created_at": iso(e.timestamp),
    }


def _change(row: dict[str, Any], e: Any) -> None:
    """What each event's ``apply`` does to the aggregate, less the credentials."""
    at = iso(e.timestamp)
    if isinstance(e, Connection.Established):
        row.update(
            status=CONNECTED,
            epoch=e.epoch,
            auth_type=e.auth_type,
            scopes=list(e.scopes),
            token_expires_at=instant(e.token_expires_at),
            refresh_token_expires_at=instant(e.refresh_token_expires_at),
            account=None if e.account is None else dict(e.account),
            last_authorized_at=at,
            last_error=None,
            failures=0,
            generation=row["generation"] + 1,
        )
    elif isinstance(e, Connection.TokenRefreshed):
        if e.scopes:
            row["scopes"] = list(e.scopes)
        row["token_expires_at"] = instant(e.token_expires_at)
        if e.refresh_token_expires_at is not None or e.refresh_token is not None:
            row["refresh_token_expires_at"] = instant(e.refresh_token_expires_at)
        row.update(last_refreshed_at=at, last_error=None, failures=0, generation=row["generation"] + 1)
    elif isinstance(e, Connection.TokenRefreshFailed):
        row["last_error"] = {"error": e.error, "kind": e.kind, "at": at, "retry_after": e.retry_after}
        row["failures"] += 1
    elif isinstance(e, Connection.ReauthorizationRequired):
        row["status"] = REAUTHORIZATION_REQUIRED
        row["last_error"] = {"error": e.reason, "kind": "reauthorization", "at": at}
        row["generation"] += 1
    elif isinstance(e, Connection.Revoked):
        row["status"] = REVOKED
        row["revocation_pending"] = e.pending is not None  # whether, never the reference
        row["generation"] += 1
    elif isinstance(e, Connection.RevocationSettled):
        row["revocation_pending"] = False


class SQLiteConnectionsView(SQLConnectionsView, SQLiteView):
    """The connection status read model in its own SQLite file."""


class PostgresConnectionsView(SQLConnectionsView, PostgresView):
    """The connection status read model in the PostgreSQL table ``<projection name>_connections``."""


class Connections(ViewProjection):
    name = "connections"
    topics = tuple(
        get_topic(cls)
        for cls in (
            Connection.Created,
            Connection.Established,
            Connection.TokenRefreshed,
            Connection.TokenRefreshFailed,
            Connection.ReauthorizationRequired,
            Connection.Revoked,
            Connection.RevocationSettled,
        )
    )

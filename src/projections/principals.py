"""The identity read model: users, teams, memberships and API tokens, from User and Team events.

Authentication reads it on every request (token hash -> user and team roles), and the API uses it
to name principals (``{id, name, type}``) in share listings.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

from eventsourcing.utils import get_topic

from domain.access import is_team, normalise_principal, team_id_of
from domain.principals import Team, User
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

_USER_EVENTS = (User.ProfileChanged, User.PasswordSet, User.TokenIssued, User.TokenRevoked, User.Removed)
_USER_COLUMNS = (
    "user_id", "aggregate_id", "username", "email", "display_name", "superuser", "permissions", "custom", "password",
    "created_at", "updated_at",
)  # fmt: skip
_JSON_USER_COLUMNS = frozenset({"permissions", "custom", "password"})

_DDL = (
    "CREATE TABLE IF NOT EXISTS {users} ("
    "user_id {key} PRIMARY KEY, aggregate_id {key} NOT NULL UNIQUE, username {key} NOT NULL UNIQUE, "
    "email TEXT NOT NULL, display_name TEXT NOT NULL, superuser {bool} NOT NULL, permissions {json} NOT NULL, "
    "custom {json} NOT NULL, password {json}, created_at {key} NOT NULL, updated_at {key} NOT NULL)",
    "CREATE TABLE IF NOT EXISTS {teams} ("
    "team_id {key} PRIMARY KEY, aggregate_id {key} NOT NULL UNIQUE, name TEXT NOT NULL, created_at {key} NOT NULL)",
    "CREATE TABLE IF NOT EXISTS {memberships} ("
    "team_id {key} NOT NULL, user_id {key} NOT NULL, role TEXT NOT NULL, PRIMARY KEY (team_id, user_id))",
    "CREATE INDEX IF NOT EXISTS {memberships_by_user} ON {memberships} (user_id)",
    "CREATE TABLE IF NOT EXISTS {tokens} ("
    "token_hash {key} PRIMARY KEY, token_id {key} NOT NULL, user_id {key} NOT NULL, label TEXT NOT NULL, "
    "kind TEXT NOT NULL, expires_at TEXT, created_at {key} NOT NULL)",
    "CREATE INDEX IF NOT EXISTS {tokens_by_user} ON {tokens} (user_id, token_id)",
)

_UPSERT_USER = upsert("users", _USER_COLUMNS, ("user_id",))
_UPSERT_TEAM = upsert("teams", ("team_id", "aggregate_id", "name", "created_at"), ("team_id",))
_SET_MEMBER = upsert("memberships", ("team_id", "user_id", "role"), ("team_id", "user_id"))
_ADD_TOKEN = upsert(
    "tokens", ("token_hash", "token_id", "user_id", "label", "kind", "expires_at", "created_at"), ("token_hash",)
)
_ROLES = "SELECT team_id, role FROM {memberships} WHERE user_id = %s"


class PrincipalsView(ReadModelView):
    """Query interface of the identity read model."""

    @abstractmethod
    def user_by_token_hash(self, token_hash: str) -> dict[str, Any] | None:
        """The user owning the API token with this hash, with ``team_roles``; None if unknown."""

    @abstractmethod
    def user_by_username(self, username: str) -> dict[str, Any] | None: ...

    @abstractmethod
    def user(self, user_id: str) -> dict[str, Any] | None: ...

    @abstractmethod
    def users(self) -> list[dict[str, Any]]:
        """All users by username, each with ``team_roles``."""

    @abstractmethod
    def team(self, team_id: str) -> dict[str, Any] | None:
        """The team with ``members`` (user id -> role)."""

    @abstractmethod
    def teams(self) -> list[dict[str, Any]]:
        """All teams by id, each with ``members``."""

    @abstractmethod
    def principals(self, ids: Sequence[str]) -> dict[str, dict[str, str]]:
        """``{id: {"id", "name", "type"}}`` for the known ids among ``ids`` (teams as ``team:<id>``)."""


class SQLPrincipalsView(PrincipalsView, SQLView):
    TABLES: ClassVar = {
        "users": "user_id",
        "teams": "team_id",
        "memberships": "team_id, user_id",
        "tokens": "token_hash",
    }
    JSON_COLUMNS: ClassVar = _JSON_USER_COLUMNS
    DDL: ClassVar = _DDL

    # --- applying events ------------------------------------------------------------------------
    # Only Created events carry the natural id; later events name their aggregate by its UUID,
    # so users and teams also keep ``aggregate_id`` to resolve it.

    def _apply_event(self, batch: Batch, event: Any) -> None:
        cur, aggregate_id = batch.cur, str(event.originator_id)
        if isinstance(event, User.Created):
            self._save_user(cur, _new_user(event))
        elif isinstance(event, Team.Created):
            self.execute(cur, _UPSERT_TEAM, (event.team_id, aggregate_id, event.name, iso(event.timestamp)))
        elif isinstance(event, _USER_EVENTS):
            user = self.fetch_one(cur, "SELECT * FROM {users} WHERE aggregate_id = %s", (aggregate_id,))
            if user is not None:
                self._user_changed(cur, event, user)
        else:
            team = self.fetch_one(cur, "SELECT team_id FROM {teams} WHERE aggregate_id = %s", (aggregate_id,))
            if team is not None:
                self._team_changed(cur, event, team["team_id"])

    def _user_changed(self, cur: Any, e: Any, user: Row) -> None:
        user_id = user["user_id"]
        if isinstance(e, User.Removed):
            for table in ("tokens", "memberships", "users"):
                self.execute(cur, f"DELETE FROM {{{table}}} WHERE user_id = %s", (user_id,))
            return
        for column in _JSON_USER_COLUMNS:
            user[column] = self.json_out(user[column])
        user["updated_at"] = iso(e.timestamp)
        if isinstance(e, User.ProfileChanged):
            user.update(_profile({**user, **e.changes}))
        elif isinstance(e, User.PasswordSet):
            user["password"] = e.secret
        elif isinstance(e, User.TokenIssued):
            self.execute(
                cur,
                _ADD_TOKEN,
                (e.token_hash, e.token_id, user_id, e.label, e.kind, e.expires_at, iso(e.timestamp)),
            )
        elif isinstance(e, User.TokenRevoked):
            self.execute(cur, "DELETE FROM {tokens} WHERE user_id = %s AND token_id = %s", (user_id, e.token_id))
        self._save_user(cur, user)

    def _team_changed(self, cur: Any, e: Any, team_id: str) -> None:
        if isinstance(e, Team.Renamed):
            self.execute(cur, "UPDATE {teams} SET name = %s WHERE team_id = %s", (e.name, team_id))
        elif isinstance(e, Team.MemberSet):
            self.execute(cur, _SET_MEMBER, (team_id, e.user_id, e.role))
        elif isinstance(e, Team.MemberRemoved):
            self.execute(cur, "DELETE FROM {memberships} WHERE team_id = %s AND user_id = %s", (team_id, e.user_id))
        elif isinstance(e, Team.Removed):
            self.execute(cur, "DELETE FROM {memberships} WHERE team_id = %s", (team_id,))
            self.execute(cur, "DELETE FROM {teams} WHERE team_id = %s", (team_id,))

    def _save_user(self, cur: Any, user: dict[str, Any]) -> None:
        params = [self.json_in(user[c]) if c in _JSON_USER_COLUMNS else user[c] for c in _USER_COLUMNS]
        self.execute(cur, _UPSERT_USER, params)

    # --- queries ---------------------------------------------------------------------------------

    def _user_out(self, row: Row, roles: list[Row]) -> dict[str, Any]:
        user = {c: row[c] for c in _USER_COLUMNS if c != "aggregate_id"}
        for column in _JSON_USER_COLUMNS:
            user[column] = self.json_out(user[column])
        user["superuser"] = bool(user["superuser"])
        user["team_roles"] = {r["team_id"]: r["role"] for r in roles}
        return user

    def _user_where(self, where: str, param: str, extra: str = "") -> dict[str, Any] | None:
        with self._reading() as cur:
            row = self.fetch_one(cur, f"SELECT u.*{extra} FROM {{users}} u {where}", (param,))
            if row is None:
                return None
            cur.execute(self.sql(_ROLES), (row["user_id"],))
            user = self._user_out(row, [dict(r) for r in cur.fetchall()])
            user.update({k: row[k] for k in ("token_id", "token_kind", "token_expires_at") if k in row})
            return user

    def user_by_token_hash(self, token_hash: str) -> dict[str, Any] | None:
        """The user, plus ``token_id``, ``token_kind`` ("api" | "session") and ``token_expires_at``."""
        return self._user_where(
            "JOIN {tokens} t ON t.user_id = u.user_id WHERE t.token_hash = %s",
            token_hash,
            extra=", t.token_id AS token_id, t.kind AS token_kind, t.expires_at AS token_expires_at",
        )

    def user_by_username(self, username: str) -> dict[str, Any] | None:
        return self._user_where("WHERE u.username = %s", username)

    def user(self, user_id: str) -> dict[str, Any] | None:
        return self._user_where("WHERE u.user_id = %s", user_id)

    def users(self) -> list[dict[str, Any]]:
        with self._reading() as cur:
            cur.execute(self.sql("SELECT * FROM {users} ORDER BY username"))
            users = [dict(r) for r in cur.fetchall()]
            cur.execute(self.sql("SELECT user_id, team_id, role FROM {memberships} ORDER BY team_id"))
            memberships = [dict(r) for r in cur.fetchall()]
        roles: dict[str, list[Row]] = {}
        for m in memberships:
            roles.setdefault(m["user_id"], []).append(m)
        return [self._user_out(u, roles.get(u["user_id"], [])) for u in users]

    def _teams(self, where: str, params: Sequence[Any]) -> list[dict[str, Any]]:
        with self._reading() as cur:
            cur.execute(self.sql(f"SELECT * FROM {{teams}} t {where} ORDER BY t.team_id"), params)
            teams = [
                {"team_id": r["team_id"], "name": r["name"], "created_at": r["created_at"], "members": {}}
                for r in cur.fetchall()
            ]
            cur.execute(self.sql(f"SELECT m.* FROM {{memberships}} m JOIN {{teams}} t USING (team_id) {where}"), params)
            memberships = [dict(r) for r in cur.fetchall()]
        by_id = {t["team_id"]: t for t in teams}
        for m in memberships:
            by_id[m["team_id"]]["members"][m["user_id"]] = m["role"]
        return teams

    def team(self, team_id: str) -> dict[str, Any] | None:
        found = self._teams("WHERE t.team_id = %s", (team_id,))
        return found[0] if found else None

    def teams(self) -> list[dict[str, Any]]:
        return self._teams("", ())

    def principals(self, ids: Sequence[str]) -> dict[str, dict[str, str]]:
        team_ids = {pid: team_id_of(pid) for pid in ids if is_team(pid)}
        user_ids = {pid: normalise_principal(pid) for pid in ids if not is_team(pid)}
        found: dict[str, dict[str, str]] = {}
        if team_ids:
            names = {
                r["team_id"]: r["name"]
                for r in self.query(
                    "SELECT team_id, name FROM {teams} WHERE team_id {any}", (self.list_param(list(team_ids.values())),)
                )
            }
            for pid, tid in team_ids.items():
                if tid in names:
                    found[pid] = {"id": pid, "name": names[tid], "type": "team"}
        if user_ids:
            names = {
                r["user_id"]: r["display_name"] or r["username"]
                for r in self.query(
                    "SELECT user_id, username, display_name FROM {users} WHERE user_id {any}",
                    (self.list_param(list(user_ids.values())),),
                )
            }
            for pid, uid in user_ids.items():
                if uid in names:
                    found[pid] = {"id": pid, "name": names[uid], "type": "user"}
        return found


def _profile(profile: dict[str, Any]) -> dict[str, Any]:
    return {
        "username": profile["username"],
        "email": profile.get("email") or "",
        "display_name": profile.get("display_name") or "",
        "superuser": bool(profile.get("superuser")),
        "permissions": list(profile.get("permissions") or []),
        "custom": dict(profile.get("custom") or {}),
    }


def _new_user(e: User.Created) -> dict[str, Any]:
    return {
        "user_id": e.user_id,
        "aggregate_id": str(e.originator_id),
        **_profile(e.profile),
        "password": None,
        "created_at": iso(e.timestamp),
        "updated_at": iso(e.timestamp),
    }


class SQLitePrincipalsView(SQLPrincipalsView, SQLiteView):
    """The identity read model in its own SQLite file."""


class PostgresPrincipalsView(SQLPrincipalsView, PostgresView):
    """The identity read model in PostgreSQL tables ``<projection name>_users`` and so on."""


class Principals(ViewProjection):
    name = "principals"
    topics = tuple(
        get_topic(cls)
        for cls in (
            User.Created,
            User.ProfileChanged,
            User.PasswordSet,
            User.TokenIssued,
            User.TokenRevoked,
            User.Removed,
            Team.Created,
            Team.Renamed,
            Team.MemberSet,
            Team.MemberRemoved,
            Team.Removed,
        )
    )

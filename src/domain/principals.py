"""Principals: users and teams. Their ids are natural (``jane``, ``team:analytics``)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from domain.access import TEAM_ROLES, Actor
from domain.audit import AuditedAggregate
from domain.errors import NotFound, ValidationFailed, field_error

_NS = uuid5(NAMESPACE_URL, "https://informer-integrations/principal")
PRINCIPAL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")
PERMISSIONS = frozenset({"integrationCreation", "integrations.read"})


def user_aggregate_id(user_id: str) -> UUID:
    return uuid5(_NS, f"user:{user_id}")


def team_aggregate_id(team_id: str) -> UUID:
    return uuid5(_NS, f"team:{team_id}")


def check_principal_id(field: str, value: str) -> None:
    if not PRINCIPAL_ID.fullmatch(value) or value.startswith(("team:", "user:")):
        raise ValidationFailed(
            f"{field} is not a valid id.",
            [field_error(field, "1-128 letters, digits, '.', '_', '@' or '-', starting with a letter or digit")],
        )


class User(AuditedAggregate):
    TOPIC = "integrations/User"

    class Created(AuditedAggregate.Created):
        TOPIC = "integrations/User.Created.v1"
        user_id: str
        profile: dict[str, Any]  # username, email, display_name, superuser, permissions, custom

    class ProfileChanged(AuditedAggregate.Event):
        TOPIC = "integrations/User.ProfileChanged.v1"
        changes: dict[str, Any]

        def apply(self, aggregate: User) -> None:
            aggregate.profile.update(self.changes)

    class PasswordSet(AuditedAggregate.Event):
        TOPIC = "integrations/User.PasswordSet.v1"
        secret: dict[str, str] | None  # vault reference of the password hash; None = removed

        def apply(self, aggregate: User) -> None:
            aggregate.password = self.secret

    class TokenIssued(AuditedAggregate.Event):
        TOPIC = "integrations/User.TokenIssued.v1"
        token_id: str
        token_hash: str  # SHA-256 of a 256-bit random token: not reversible, safe to keep
        label: str
        kind: str  # "api" (until revoked) or "session" (from a login, until expires_at or logout)
        expires_at: str | None  # ISO-8601, None = no expiry

        def apply(self, aggregate: User) -> None:
            aggregate.tokens[self.token_id] = {
                "label": self.label,
                "kind": self.kind,
                "created_at": self.timestamp.isoformat(),
                "expires_at": self.expires_at,
                "hash": self.token_hash,
            }

    class TokenRevoked(AuditedAggregate.Event):
        TOPIC = "integrations/User.TokenRevoked.v1"
        token_id: str

        def apply(self, aggregate: User) -> None:
            aggregate.tokens.pop(self.token_id, None)

    class Removed(AuditedAggregate.Event):
        TOPIC = "integrations/User.Removed.v1"

        def apply(self, aggregate: User) -> None:
            aggregate.removed = True
            aggregate.tokens = {}
            aggregate.password = None

    @staticmethod
    def create_id(user_id: str, profile: Mapping[str, Any]) -> UUID:
        del profile
        return user_aggregate_id(user_id)

    def __init__(self, user_id: str, profile: dict[str, Any]) -> None:
        self.user_id = user_id
        self.profile = dict(profile)
        self.password: dict[str, str] | None = None
        self.tokens: dict[str, dict[str, str]] = {}
        self.removed = False

    @property
    def username(self) -> str:
        return self.profile["username"]

    def change_profile(self, changes: Mapping[str, Any]) -> bool:
        diff = {k: v for k, v in changes.items() if self.profile.get(k) != v}
        if diff:
            self.trigger_event(self.ProfileChanged, changes=diff)
        return bool(diff)

    def set_password(self, secret: dict[str, str] | None) -> None:
        self.trigger_event(self.PasswordSet, secret=secret)

    def issue_token(
        self, token_id: str, token_hash: str, label: str, kind: str = "api", expires_at: str | None = None
    ) -> None:
        self.trigger_event(
            self.TokenIssued,
            token_id=token_id,
            token_hash=token_hash,
            label=label,
            kind=kind,
            expires_at=expires_at,
        )

    def revoke_token(self, token_id: str) -> None:
        if token_id not in self.tokens:
            raise NotFound(f"No token '{token_id}'.")
        self.trigger_event(self.TokenRevoked, token_id=token_id)

    def remove(self) -> None:
        self.trigger_event(self.Removed)


class Team(AuditedAggregate):
    TOPIC = "integrations/Team"

    class Created(AuditedAggregate.Created):
        TOPIC = "integrations/Team.Created.v1"
        team_id: str
        name: str

    class Renamed(AuditedAggregate.Event):
        TOPIC = "integrations/Team.Renamed.v1"
        name: str

        def apply(self, aggregate: Team) -> None:
            aggregate.name = self.name

    class MemberSet(AuditedAggregate.Event):
        TOPIC = "integrations/Team.MemberSet.v1"
        user_id: str
        role: str

        def apply(self, aggregate: Team) -> None:
            aggregate.members[self.user_id] = self.role

    class MemberRemoved(AuditedAggregate.Event):
        TOPIC = "integrations/Team.MemberRemoved.v1"
        user_id: str

        def apply(self, aggregate: Team) -> None:
            aggregate.members.pop(self.user_id, None)

    class Removed(AuditedAggregate.Event):
        TOPIC = "integrations/Team.Removed.v1"

        def apply(self, aggregate: Team) -> None:
            aggregate.removed = True
            aggregate.members = {}

    @staticmethod
    def create_id(team_id: str, name: str) -> UUID:
        del name
        return team_aggregate_id(team_id)

    def __init__(self, team_id: str, name: str) -> None:
        self.team_id = team_id
        self.name = name
        self.members: dict[str, str] = {}
        self.removed = False

    def rename(self, name: str) -> None:
        if name != self.name:
            self.trigger_event(self.Renamed, name=name)

    def set_member(self, user_id: str, role: str) -> bool:
        if role not in TEAM_ROLES:
            raise ValidationFailed("Unknown role.", [field_error("role", f"must be one of {', '.join(TEAM_ROLES)}")])
        if self.members.get(user_id) == role:
            return False
        self.trigger_event(self.MemberSet, user_id=user_id, role=role)
        return True

    def remove_member(self, user_id: str) -> None:
        if user_id not in self.members:
            raise NotFound(f"'{user_id}' is not a member of team '{self.team_id}'.")
        self.trigger_event(self.MemberRemoved, user_id=user_id)

    def remove(self) -> None:
        self.trigger_event(self.Removed)


def actor_from(user: User, team_roles: Mapping[str, str]) -> Actor:
    p = user.profile
    return Actor(
        id=user.user_id,
        username=p["username"],
        email=p.get("email", ""),
        display_name=p.get("display_name", ""),
        superuser=bool(p.get("superuser")),
        permissions=frozenset(p.get("permissions", ())),
        team_roles=dict(team_roles),
        custom=dict(p.get("custom") or {}),
    )

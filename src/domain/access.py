"""Principals and access levels.

Principal ids: a user is its bare id (``jane``); a team is ``team:<id>``. ``user:<id>`` is
accepted on input and normalised to the bare id, as Informer's dataset examples use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

TEAM_PREFIX = "team:"
USER_PREFIX = "user:"


class AccessLevel(IntEnum):
    NONE = 0
    USE = 1  # read, connect, proxy
    EDIT = 2  # update
    MANAGE = 3  # share, transfer, delete


# Informer's team roles, lowest first. On a team-owned integration the role gives the level.
TEAM_ROLES: tuple[str, ...] = ("member", "memberPlus", "designer", "dataWizard", "publisher", "admin")
_ROLE_LEVEL = {
    "member": AccessLevel.USE,
    "memberPlus": AccessLevel.EDIT,
    "designer": AccessLevel.EDIT,
    "dataWizard": AccessLevel.EDIT,
    "publisher": AccessLevel.EDIT,
    "admin": AccessLevel.MANAGE,
}


def role_level(role: str) -> AccessLevel:
    return _ROLE_LEVEL.get(role, AccessLevel.NONE)


def team_principal(team_id: str) -> str:
    return f"{TEAM_PREFIX}{team_id}"


def is_team(principal_id: str) -> bool:
    return principal_id.startswith(TEAM_PREFIX)


def team_id_of(principal_id: str) -> str:
    return principal_id[len(TEAM_PREFIX) :]


def normalise_principal(principal_id: str) -> str:
    if principal_id.startswith(USER_PREFIX):
        return principal_id[len(USER_PREFIX) :]
    return principal_id


@dataclass(frozen=True)
class Actor:
    """The authenticated caller as the rules see it."""

    id: str
    username: str = ""
    email: str = ""
    display_name: str = ""
    superuser: bool = False
    permissions: frozenset[str] = frozenset()
    team_roles: Mapping[str, str] = field(default_factory=dict)  # team id -> role
    custom: Mapping[str, Any] = field(default_factory=dict)

    @property
    def principal_ids(self) -> tuple[str, ...]:
        return (self.id, *(team_principal(t) for t in self.team_roles))

    def may(self, permission: str) -> bool:
        return self.superuser or permission in self.permissions

    def administers(self, team_id: str) -> bool:
        return self.superuser or self.team_roles.get(team_id) == "admin"


def effective_level(actor: Actor, owner_id: str, shares: Mapping[str, int]) -> AccessLevel:
    """The highest level the actor holds: superuser, owner, owning team role, or a share."""
    if actor.superuser or owner_id == actor.id:
        return AccessLevel.MANAGE
    level = AccessLevel.NONE
    if is_team(owner_id):
        role = actor.team_roles.get(team_id_of(owner_id))
        if role is not None:
            level = max(level, role_level(role))
    for pid in actor.principal_ids:
        granted = shares.get(pid)
        if granted:
            level = max(level, AccessLevel(min(int(granted), AccessLevel.MANAGE)))
    return level

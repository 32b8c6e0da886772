"""Access levels: who holds what on an integration."""

from __future__ import annotations

import pytest

from domain.access import (
    AccessLevel,
    Actor,
    effective_level,
    is_team,
    normalise_principal,
    role_level,
    team_id_of,
    team_principal,
)

JANE = Actor(id="jane")


def in_team(role: str, team: str = "analytics", user: str = "bob") -> Actor:
    return Actor(id=user, team_roles={team: role})


def test_the_levels_are_use_edit_manage() -> None:
    assert [int(level) for level in AccessLevel] == [0, 1, 2, 3]
    assert [level.name for level in AccessLevel] == ["NONE", "USE", "EDIT", "MANAGE"]


@pytest.mark.parametrize(
    ("actor", "owner", "shares", "level"),
    [
        pytest.param(Actor(id="root", superuser=True), "jane", {}, 3, id="superuser"),
        pytest.param(Actor(id="root", superuser=True), "team:analytics", {}, 3, id="superuser-team-owned"),
        pytest.param(JANE, "jane", {}, 3, id="owner"),
        pytest.param(JANE, "jane", {"jane": 1}, 3, id="owner-with-a-lower-share"),
        pytest.param(in_team("member"), "team:analytics", {}, 1, id="team-member"),
        pytest.param(in_team("memberPlus"), "team:analytics", {}, 2, id="team-memberPlus"),
        pytest.param(in_team("designer"), "team:analytics", {}, 2, id="team-designer"),
        pytest.param(in_team("dataWizard"), "team:analytics", {}, 2, id="team-dataWizard"),
        pytest.param(in_team("publisher"), "team:analytics", {}, 2, id="team-publisher"),
        pytest.param(in_team("admin"), "team:analytics", {}, 3, id="team-admin"),
        pytest.param(in_team("guest"), "team:analytics", {}, 0, id="team-unknown-role"),
        pytest.param(in_team("admin", team="sales"), "team:analytics", {}, 0, id="admin-of-another-team"),
        pytest.param(Actor(id="bob"), "jane", {"bob": 1}, 1, id="share-use"),
        pytest.param(Actor(id="bob"), "jane", {"bob": 2}, 2, id="share-edit"),
        pytest.param(Actor(id="bob"), "jane", {"bob": 3}, 3, id="share-manage"),
        pytest.param(Actor(id="bob"), "jane", {"bob": 7}, 3, id="share-above-manage-is-capped"),
        pytest.param(Actor(id="bob"), "jane", {"bob": 0}, 0, id="share-zero"),
        pytest.param(in_team("member"), "jane", {"team:analytics": 2}, 2, id="share-to-the-actors-team"),
        pytest.param(in_team("member"), "jane", {"team:sales": 3}, 0, id="share-to-another-team"),
        pytest.param(in_team("member"), "jane", {"bob": 1, "team:analytics": 3}, 3, id="max-of-user-and-team-share"),
        pytest.param(in_team("member"), "jane", {"bob": 2, "team:analytics": 1}, 2, id="max-user-share-wins"),
        pytest.param(in_team("member"), "team:analytics", {"bob": 3}, 3, id="share-above-role"),
        pytest.param(in_team("admin"), "team:analytics", {"team:analytics": 1}, 3, id="role-above-share"),
        pytest.param(
            Actor(id="bob", team_roles={"analytics": "member", "sales": "member"}),
            "jane",
            {"team:analytics": 1, "team:sales": 2},
            2,
            id="max-of-two-teams",
        ),
        pytest.param(Actor(id="eve"), "jane", {"bob": 3, "team:analytics": 3}, 0, id="non-member-none"),
        pytest.param(Actor(id="eve"), "team:analytics", {}, 0, id="non-member-of-owning-team"),
        pytest.param(Actor(id="bob"), "jane", {"user:bob": 3}, 0, id="un-normalised-share-key-matches-nothing"),
    ],
)
def test_effective_level(actor: Actor, owner: str, shares: dict[str, int], level: int) -> None:
    got = effective_level(actor, owner, shares)
    assert got == level
    assert isinstance(got, AccessLevel)


@pytest.mark.parametrize(
    ("role", "level"),
    [
        ("member", 1),
        ("memberPlus", 2),
        ("designer", 2),
        ("dataWizard", 2),
        ("publisher", 2),
        ("admin", 3),
        ("Admin", 0),
        ("", 0),
    ],
)
def test_role_level(role: str, level: int) -> None:
    assert role_level(role) == level


@pytest.mark.parametrize(
    ("given_id", "normalised"),
    [("user:x", "x"), ("x", "x"), ("team:x", "team:x"), ("user:user:x", "user:x"), ("userx", "userx")],
)
def test_normalise_principal(given_id: str, normalised: str) -> None:
    assert normalise_principal(given_id) == normalised


def test_team_principal_helpers() -> None:
    assert team_principal("analytics") == "team:analytics"
    assert is_team("team:analytics") is True
    assert is_team("analytics") is False
    assert team_id_of("team:analytics") == "analytics"


def test_actor_principal_ids_are_the_user_and_its_teams() -> None:
    actor = Actor(id="bob", team_roles={"analytics": "member", "sales": "admin"})
    assert actor.principal_ids == ("bob", "team:analytics", "team:sales")


def test_actor_permissions_and_team_administration() -> None:
    bob = Actor(id="bob", permissions=frozenset({"integrationCreation"}), team_roles={"a": "admin", "b": "publisher"})
    root = Actor(id="root", superuser=True)
    assert (bob.may("integrationCreation"), bob.may("integrations.read")) == (True, False)
    assert root.may("anything") is True
    assert (bob.administers("a"), bob.administers("b"), bob.administers("c")) == (True, False, False)
    assert root.administers("c") is True

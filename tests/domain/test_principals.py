"""User and Team aggregates: given events / when command / then events."""

from __future__ import annotations

from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

import pytest

from domain.access import TEAM_ROLES, Actor
from domain.errors import NotFound, ValidationFailed
from domain.principals import (
    Team,
    User,
    actor_from,
    check_principal_id,
    team_aggregate_id,
    user_aggregate_id,
)
from tests.domain.given_when_then import by, event, given, history, replay

PRINCIPAL_NS = uuid5(NAMESPACE_URL, "https://informer-integrations/principal")
PROFILE: dict[str, Any] = {
    "username": "jane",
    "email": "jane@example.com",
    "display_name": "Jane Doe",
    "superuser": False,
    "permissions": ["integrationCreation"],
    "custom": {"team_code": "T-7"},
}
PASSWORD = {"ref": "vault:pw", "fingerprint": "fp-pw"}


def new_user() -> User:
    return User(user_id="jane", profile=dict(PROFILE))


def user_past(*commands: Any) -> list[Any]:
    return history(new_user, *commands)


def new_team() -> Team:
    return Team(team_id="analytics", name="Analytics")


def team_past(*commands: Any) -> list[Any]:
    return history(new_team, *commands)


def issue(token_id: str = "t1", **kw: Any) -> Any:
    return lambda u: u.issue_token(token_id, f"hash-{token_id}", f"label {token_id}", **kw)


# --- ids ------------------------------------------------------------------------------------


def test_principal_aggregate_ids_are_uuid5_of_the_kind_and_id() -> None:
    assert user_aggregate_id("jane") == uuid5(PRINCIPAL_NS, "user:jane")
    assert team_aggregate_id("analytics") == uuid5(PRINCIPAL_NS, "team:analytics")
    assert user_aggregate_id("jane") == UUID("3bba505e-88a7-5c3d-a127-4e421e6ebce9")
    assert user_aggregate_id("x") != team_aggregate_id("x")


@pytest.mark.parametrize("value", ["jane", "j", "Jane.Doe", "jane_doe", "jane@example.com", "a-b", "7", "a" * 128])
def test_valid_principal_ids(value: str) -> None:
    check_principal_id("id", value)


@pytest.mark.parametrize(
    "value", ["", "-jane", ".jane", "_jane", "jane doe", "team:x", "user:x", "a" * 129, "jäne", "jane\n", "a/b"]
)
def test_invalid_principal_ids_name_the_field(value: str) -> None:
    with pytest.raises(ValidationFailed) as raised:
        check_principal_id("username", value)
    assert [d["field"] for d in raised.value.details] == ["username"]
    assert raised.value.message == "username is not a valid id."


# --- user: create and profile ---------------------------------------------------------------


def test_create_user() -> None:
    outcome = (
        given()
        .when(by("root", lambda _: new_user()))
        .then(
            event(
                User.Created,
                originator_id=user_aggregate_id("jane"),
                originator_topic="integrations/User",
                user_id="jane",
                profile=PROFILE,
                actor_id="root",
            )
        )
    )
    u = outcome.state
    assert (u.user_id, u.username, u.profile) == ("jane", "jane", PROFILE)
    assert (u.password, u.tokens, u.removed) == (None, {}, False)


def test_profile_change_records_only_the_differences() -> None:
    outcome = (
        given(user_past())
        .when(lambda u: u.change_profile({"username": "jane", "email": "jd@example.com", "superuser": True}))
        .returns(True)
        .then(event(User.ProfileChanged, changes={"email": "jd@example.com", "superuser": True}))
    )
    assert outcome.state.profile == PROFILE | {"email": "jd@example.com", "superuser": True}


def test_profile_change_can_add_a_key_and_replace_a_nested_value() -> None:
    outcome = (
        given(user_past())
        .when(lambda u: u.change_profile({"custom": {"team_code": "T-8"}, "phone": "1"}))
        .then(event(User.ProfileChanged, changes={"custom": {"team_code": "T-8"}, "phone": "1"}))
    )
    assert outcome.state.profile["custom"] == {"team_code": "T-8"}


def test_profile_change_without_differences_is_a_no_op() -> None:
    given(user_past()).when(lambda u: u.change_profile({"username": "jane", "custom": {"team_code": "T-7"}})).returns(
        False
    ).then_nothing()


def test_username_change_shows_in_the_username() -> None:
    outcome = (
        given(user_past())
        .when(lambda u: u.change_profile({"username": "jdoe"}))
        .then(event(User.ProfileChanged, changes={"username": "jdoe"}))
    )
    assert outcome.state.username == "jdoe"


# --- user: password -------------------------------------------------------------------------


def test_set_password_records_the_vault_reference() -> None:
    outcome = given(user_past()).when(lambda u: u.set_password(PASSWORD)).then(event(User.PasswordSet, secret=PASSWORD))
    assert outcome.state.password == PASSWORD


def test_set_password_none_removes_it() -> None:
    outcome = (
        given(user_past(lambda u: u.set_password(PASSWORD)))
        .when(lambda u: u.set_password(None))
        .then(event(User.PasswordSet, secret=None))
    )
    assert outcome.state.password is None


# --- user: tokens ---------------------------------------------------------------------------


def test_issue_an_api_token() -> None:
    outcome = (
        given(user_past())
        .when(issue())
        .then(
            event(User.TokenIssued, token_id="t1", token_hash="hash-t1", label="label t1", kind="api", expires_at=None)
        )
    )
    assert outcome.state.tokens == {
        "t1": {
            "label": "label t1",
            "kind": "api",
            "created_at": outcome.events[0].timestamp.isoformat(),
            "expires_at": None,
            "hash": "hash-t1",
        }
    }


def test_issue_a_session_token_with_expiry() -> None:
    outcome = (
        given(user_past())
        .when(issue("s1", kind="session", expires_at="2030-01-01T00:00:00+00:00"))
        .then(event(User.TokenIssued, token_id="s1", kind="session", expires_at="2030-01-01T00:00:00+00:00"))
    )
    assert outcome.state.tokens["s1"]["kind"] == "session"
    assert outcome.state.tokens["s1"]["expires_at"] == "2030-01-01T00:00:00+00:00"


def test_revoke_a_token() -> None:
    outcome = (
        given(user_past(issue("t1"), issue("t2")))
        .when(lambda u: u.revoke_token("t1"))
        .then(event(User.TokenRevoked, token_id="t1"))
    )
    assert list(outcome.state.tokens) == ["t2"]


def test_revoke_an_unknown_token_is_not_found() -> None:
    given(user_past(issue("t1"))).when(lambda u: u.revoke_token("t9")).then_fails(NotFound, message="No token 't9'.")


def test_revoke_a_revoked_token_is_not_found() -> None:
    given(user_past(issue("t1"), lambda u: u.revoke_token("t1"))).when(lambda u: u.revoke_token("t1")).then_fails(
        NotFound
    )


# --- user: removal --------------------------------------------------------------------------


def test_removal_clears_tokens_and_password() -> None:
    outcome = (
        given(user_past(lambda u: u.set_password(PASSWORD), issue("t1"), issue("s1", kind="session")))
        .when(lambda u: u.remove())
        .then(event(User.Removed))
    )
    u = outcome.state
    assert (u.removed, u.tokens, u.password) == (True, {}, None)
    assert u.profile == PROFILE  # the history keeps who it was


def test_user_events_record_the_acting_principal() -> None:
    commands = [
        lambda u: u.change_profile({"email": "x@example.com"}),
        lambda u: u.set_password(PASSWORD),
        issue("t1"),
        lambda u: u.revoke_token("t1"),
        lambda u: u.remove(),
    ]
    outcome = given(user_past()).when(by("root", lambda u: [c(u) for c in commands]))
    outcome.then(
        event(User.ProfileChanged, actor_id="root"),
        event(User.PasswordSet, actor_id="root"),
        event(User.TokenIssued, actor_id="root"),
        event(User.TokenRevoked, actor_id="root"),
        event(User.Removed, actor_id="root"),
    )
    assert [e.actor_id for e in history(new_user, *commands)] == [None] * 6


def test_actor_from_a_user_and_team_roles() -> None:
    user = replay(user_past())
    assert actor_from(user, {"analytics": "admin"}) == Actor(
        id="jane",
        username="jane",
        email="jane@example.com",
        display_name="Jane Doe",
        superuser=False,
        permissions=frozenset({"integrationCreation"}),
        team_roles={"analytics": "admin"},
        custom={"team_code": "T-7"},
    )


def test_actor_from_a_minimal_profile_has_empty_defaults() -> None:
    user = User(user_id="bob", profile={"username": "bobby"})
    actor = actor_from(user, {})
    assert (actor.id, actor.username, actor.email, actor.display_name) == ("bob", "bobby", "", "")
    assert (actor.superuser, actor.permissions, dict(actor.team_roles), dict(actor.custom)) == (
        False,
        frozenset(),
        {},
        {},
    )


# --- team -----------------------------------------------------------------------------------


def test_create_team() -> None:
    outcome = (
        given()
        .when(by("root", lambda _: new_team()))
        .then(
            event(
                Team.Created,
                originator_id=team_aggregate_id("analytics"),
                originator_topic="integrations/Team",
                team_id="analytics",
                name="Analytics",
                actor_id="root",
            )
        )
    )
    assert (outcome.state.team_id, outcome.state.name, outcome.state.members, outcome.state.removed) == (
        "analytics",
        "Analytics",
        {},
        False,
    )


def test_rename_team() -> None:
    outcome = given(team_past()).when(lambda t: t.rename("Data")).then(event(Team.Renamed, name="Data"))
    assert outcome.state.name == "Data"


def test_rename_to_the_same_name_is_a_no_op() -> None:
    given(team_past()).when(lambda t: t.rename("Analytics")).then_nothing()


@pytest.mark.parametrize("role", TEAM_ROLES)
def test_set_a_member_with_each_role(role: str) -> None:
    outcome = (
        given(team_past())
        .when(lambda t: t.set_member("jane", role))
        .returns(True)
        .then(event(Team.MemberSet, user_id="jane", role=role))
    )
    assert outcome.state.members == {"jane": role}


def test_the_roles_are_informers_six() -> None:
    assert TEAM_ROLES == ("member", "memberPlus", "designer", "dataWizard", "publisher", "admin")


def test_change_a_members_role() -> None:
    outcome = (
        given(team_past(lambda t: t.set_member("jane", "member")))
        .when(lambda t: t.set_member("jane", "admin"))
        .then(event(Team.MemberSet, user_id="jane", role="admin"))
    )
    assert outcome.state.members == {"jane": "admin"}


def test_set_a_member_with_the_same_role_is_a_no_op() -> None:
    given(team_past(lambda t: t.set_member("jane", "designer"))).when(
        lambda t: t.set_member("jane", "designer")
    ).returns(False).then_nothing()


@pytest.mark.parametrize("role", ["owner", "Admin", "", "viewer"])
def test_an_unknown_role_is_rejected_on_role(role: str) -> None:
    given(team_past(lambda t: t.set_member("jane", "member"))).when(lambda t: t.set_member("jane", role)).then_fails(
        ValidationFailed,
        details=[
            {"field": "role", "message": "must be one of member, memberPlus, designer, dataWizard, publisher, admin"}
        ],
    )


def test_remove_a_member() -> None:
    outcome = (
        given(team_past(lambda t: t.set_member("jane", "admin"), lambda t: t.set_member("bob", "member")))
        .when(lambda t: t.remove_member("jane"))
        .then(event(Team.MemberRemoved, user_id="jane"))
    )
    assert outcome.state.members == {"bob": "member"}


def test_remove_a_non_member_is_not_found() -> None:
    given(team_past(lambda t: t.set_member("bob", "member"))).when(lambda t: t.remove_member("jane")).then_fails(
        NotFound, message="'jane' is not a member of team 'analytics'."
    )


def test_remove_team_clears_its_members() -> None:
    outcome = (
        given(team_past(lambda t: t.set_member("jane", "admin"))).when(lambda t: t.remove()).then(event(Team.Removed))
    )
    assert (outcome.state.removed, outcome.state.members) == (True, {})


def test_team_events_record_the_acting_principal() -> None:
    def commands(t: Team) -> None:
        t.rename("Data")
        t.set_member("jane", "admin")
        t.remove_member("jane")
        t.remove()

    given(team_past()).when(by("root", commands)).then(
        event(Team.Renamed, actor_id="root"),
        event(Team.MemberSet, actor_id="root"),
        event(Team.MemberRemoved, actor_id="root"),
        event(Team.Removed, actor_id="root"),
    )
    assert [e.actor_id for e in history(new_team, commands)] == [None] * 5

"""Contract of the identity read model, the same assertions on SQLite and on PostgreSQL."""

from __future__ import annotations

from typing import Any

import pytest

from domain.principals import Team, User
from tests.test_projection_support import Store, store_fixture  # noqa: F401 (the store fixture)

pytestmark = pytest.mark.store

PASSWORD = {"ref": "vault:pw", "fingerprint": "f"}


def user(user_id: str, username: str, **profile: Any) -> User:
    return User(user_id=user_id, profile={"username": username, **profile})


@pytest.fixture
def given(store: Store) -> dict[str, Any]:
    alice = user("alice", "alice", email="a@x.test", display_name="Alice A", permissions=["integrationCreation"])
    bob = user("bob", "bob", superuser=True, custom={"region": "eu"})
    carol = user("carol", "carol")
    eng, ops = Team(team_id="eng", name="Engineering"), Team(team_id="ops", name="Ops")
    store.save(alice, bob, carol, eng, ops)
    alice.change_profile({"display_name": "Alice Adams", "email": "alice@x.test"})
    alice.set_password(PASSWORD)
    alice.issue_token("t1", "hash-1", "laptop")
    alice.issue_token("t2", "hash-2", "ci")
    carol.issue_token("t3", "hash-3", "carol's")
    eng.set_member("alice", "admin")
    eng.set_member("bob", "member")
    eng.set_member("carol", "member")
    ops.set_member("alice", "member")
    store.save(alice, carol, eng, ops)
    alice.revoke_token("t2")
    eng.set_member("bob", "designer")
    eng.rename("Platform")
    carol.remove()
    ops.remove()
    store.save(alice, eng, carol, ops)
    return {"alice": alice, "bob": bob}


@pytest.fixture
def view(store: Store, given: dict[str, Any]) -> Any:
    view = store.view("principals")
    store.feed(view, "principals")
    return view


def test_user_by_token_hash_with_team_roles(view: Any, given: dict[str, Any]) -> None:
    alice = given["alice"]
    assert view.user_by_token_hash("hash-1") == {
        "user_id": "alice",
        "username": "alice",
        "email": "alice@x.test",
        "display_name": "Alice Adams",
        "superuser": False,
        "permissions": ["integrationCreation"],
        "custom": {},
        "password": PASSWORD,
        "created_at": alice.created_on.isoformat(timespec="microseconds"),
        "updated_at": alice.modified_on.isoformat(timespec="microseconds"),
        "team_roles": {"eng": "admin"},  # ops was removed
        "token_id": "t1",
        "token_kind": "api",
        "token_expires_at": None,
    }
    assert view.user_by_token_hash("hash-2") is None  # revoked
    assert view.user_by_token_hash("hash-3") is None  # its user was removed
    assert view.user_by_token_hash("nope") is None


def test_users_by_id_and_username(view: Any) -> None:
    bob = view.user("bob")
    assert (bob["superuser"], bob["custom"], bob["password"], bob["team_roles"]) == (
        True,
        {"region": "eu"},
        None,
        {"eng": "designer"},
    )
    assert view.user_by_username("bob") == bob
    assert view.user("carol") is None and view.user_by_username("carol") is None
    assert [u["user_id"] for u in view.users()] == ["alice", "bob"]
    assert view.users()[0] == view.user("alice")


def test_teams_with_members(view: Any) -> None:
    assert view.team("eng") == {
        "team_id": "eng",
        "name": "Platform",
        "created_at": view.teams()[0]["created_at"],
        "members": {"alice": "admin", "bob": "designer"},  # carol's membership went with her
    }
    assert view.team("ops") is None
    assert [t["team_id"] for t in view.teams()] == ["eng"]


def test_principals_names_users_and_teams(view: Any) -> None:
    assert view.principals(["alice", "user:bob", "team:eng", "team:ops", "carol", "ghost"]) == {
        "alice": {"id": "alice", "name": "Alice Adams", "type": "user"},
        "user:bob": {"id": "user:bob", "name": "bob", "type": "user"},  # no display name: the username
        "team:eng": {"id": "team:eng", "name": "Platform", "type": "team"},
    }
    assert view.principals([]) == {}


def test_removal_deletes_the_rows(view: Any) -> None:
    rows = view.rows()
    assert [r["token_id"] for r in rows["tokens"]] == ["t1"]
    assert {(m["team_id"], m["user_id"]) for m in rows["memberships"]} == {("eng", "alice"), ("eng", "bob")}

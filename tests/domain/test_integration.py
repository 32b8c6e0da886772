"""Integration aggregate: given events / when command / then events."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import pytest

from domain.access import AccessLevel, Actor
from domain.audit import acting_as
from domain.errors import NotFound, ValidationFailed
from domain.integration import Integration
from tests.domain.given_when_then import by, event, given, history, replay, stored

IID = UUID("6f1c2a4e-0000-4000-8000-000000000001")
SETTINGS: dict[str, Any] = {
    "name": "Google Drive",
    "auth_type": "oauth2",
    "mode": "per-user",
    "auth_uri": "https://accounts.example.com/o/oauth2/auth",
    "token_uri": "https://oauth2.example.com/token",
    "client_id": "client-1",
    "scope": "drive.readonly",
    "api_base_uri": "https://www.example.com/drive/v3",
    "headers": {"X-Team": "${user.custom.team_code}"},
}
SECRET = {"ref": "vault:1", "fingerprint": "fp-1"}
SECRETS = {"client_secret": SECRET}

JANE = Actor(id="jane")
BOB = Actor(id="bob")
ROOT = Actor(id="root", superuser=True)


def new_integration() -> Integration:
    return Integration.new(IID, owner_id="jane", slug="drive", settings=dict(SETTINGS), secrets=dict(SECRETS))


def past(*commands: Any) -> list[Any]:
    return history(new_integration, *commands)


def update(
    *,
    slug: str = "drive",
    settings: dict[str, Any] | None = None,
    secrets_set: dict[str, dict[str, str]] | None = None,
    secrets_cleared: list[str] | None = None,
) -> Any:
    return lambda i: i.update(
        slug=slug,
        settings=SETTINGS if settings is None else settings,
        secrets_set=secrets_set or {},
        secrets_cleared=secrets_cleared or [],
    )


# --- create ---------------------------------------------------------------------------------


def test_create_records_owner_slug_settings_and_secret_refs() -> None:
    outcome = (
        given()
        .when(lambda _: new_integration())
        .then(
            event(
                Integration.Created,
                originator_id=IID,
                originator_version=1,
                originator_topic="integrations/Integration",
                owner_id="jane",
                slug="drive",
                settings=SETTINGS,
                secrets=SECRETS,
            )
        )
    )
    i = outcome.state
    assert (i.id, i.version, i.natural_id) == (IID, 1, "jane:drive")
    assert i.settings == SETTINGS
    assert i.secrets == {"client_secret": SECRET}
    assert i.shares == {}
    assert i.deleted is False
    assert i.created_at == i.updated_at == outcome.events[0].timestamp


def test_created_event_has_its_stable_topic() -> None:
    [created] = past()
    assert stored([created])[0].__class__ is Integration.Created
    assert type(created).TOPIC == "integrations/Integration.Created.v1"


# --- update ---------------------------------------------------------------------------------


def test_update_with_identical_settings_is_a_no_op() -> None:
    given(past()).when(update()).returns(False).then_nothing()


def test_update_clearing_a_secret_that_is_not_held_is_a_no_op() -> None:
    given(past()).when(update(secrets_cleared=["api_key"])).returns(False).then_nothing()


def test_update_records_exactly_the_changed_added_and_removed_settings() -> None:
    new = {k: v for k, v in SETTINGS.items() if k != "headers"} | {"scope": "drive", "description": "Files"}
    outcome = (
        given(past())
        .when(update(settings=new))
        .returns(True)
        .then(
            event(
                Integration.Updated,
                originator_version=2,
                slug=None,
                changes={"scope": "drive", "description": "Files", "headers": None},
                secrets_set={},
                secrets_cleared=[],
                repointed=[],
            )
        )
    )
    assert outcome.state.settings == new
    assert "headers" not in outcome.state.settings
    assert outcome.state.updated_at == outcome.events[0].timestamp


def test_update_treats_a_none_value_as_removal() -> None:
    outcome = (
        given(past())
        .when(update(settings=SETTINGS | {"scope": None}))
        .then(event(Integration.Updated, changes={"scope": None}, repointed=[]))
    )
    assert "scope" not in outcome.state.settings


@pytest.mark.parametrize("key", ["auth_uri", "token_uri", "client_id", "api_base_uri"])
def test_changing_an_endpoint_or_client_id_is_recorded_as_repointing(key: str) -> None:
    value = "other-client" if key == "client_id" else "https://elsewhere.example.com/x"
    given(past()).when(update(settings=SETTINGS | {key: value})).then(
        event(Integration.Updated, changes={key: value}, repointed=[key])
    )


def test_removing_the_api_base_uri_is_repointing() -> None:
    settings = {k: v for k, v in SETTINGS.items() if k != "api_base_uri"}
    given(past()).when(update(settings=settings)).then(
        event(Integration.Updated, changes={"api_base_uri": None}, repointed=["api_base_uri"])
    )


def test_repointed_lists_every_repointing_field_in_a_fixed_order() -> None:
    new = SETTINGS | {
        "api_base_uri": "https://b.example.com",
        "client_id": "c2",
        "token_uri": "https://b.example.com/t",
        "auth_uri": "https://b.example.com/a",
        "name": "Drive 2",
    }
    given(past()).when(update(settings=new)).then(
        event(Integration.Updated, repointed=["auth_uri", "token_uri", "client_id", "api_base_uri"])
    )


def test_update_renaming_the_slug_sets_it() -> None:
    outcome = (
        given(past())
        .when(update(slug="google-drive"))
        .returns(True)
        .then(event(Integration.Updated, slug="google-drive", changes={}, secrets_set={}, secrets_cleared=[]))
    )
    assert outcome.state.slug == "google-drive"
    assert outcome.state.natural_id == "jane:google-drive"


def test_update_setting_a_secret_records_its_reference() -> None:
    rotated = {"ref": "vault:2", "fingerprint": "fp-2"}
    outcome = (
        given(past())
        .when(update(secrets_set={"client_secret": rotated}))
        .returns(True)
        .then(event(Integration.Updated, slug=None, changes={}, secrets_set={"client_secret": rotated}))
    )
    assert outcome.state.secrets == {"client_secret": rotated}


def test_update_clearing_a_held_secret_drops_only_the_held_ones() -> None:
    outcome = (
        given(past())
        .when(update(secrets_cleared=["client_secret", "api_key"]))
        .then(event(Integration.Updated, changes={}, secrets_set={}, secrets_cleared=["client_secret"]))
    )
    assert outcome.state.secrets == {}


def test_update_after_an_update_compares_with_the_updated_settings() -> None:
    new = SETTINGS | {"scope": "drive"}
    given(past(update(settings=new))).when(update(settings=new)).returns(False).then_nothing()


# --- share ----------------------------------------------------------------------------------


def test_share_with_a_new_principal() -> None:
    outcome = (
        given(past())
        .when(lambda i: i.share("bob", 1))
        .returns(True)
        .then(event(Integration.Shared, principal_id="bob", access_level=1))
    )
    at = outcome.events[0].timestamp.isoformat()
    assert outcome.state.shares == {"bob": {"access_level": 1, "created_at": at, "updated_at": at}}
    assert outcome.state.level_for(BOB) == AccessLevel.USE


def test_share_changing_the_level_keeps_the_creation_time() -> None:
    earlier = past(lambda i: i.share("bob", 1))
    outcome = (
        given(earlier)
        .when(lambda i: i.share("bob", 3))
        .returns(True)
        .then(event(Integration.Shared, principal_id="bob", access_level=3))
    )
    assert outcome.state.shares["bob"] == {
        "access_level": 3,
        "created_at": earlier[1].timestamp.isoformat(),
        "updated_at": outcome.events[0].timestamp.isoformat(),
    }
    assert outcome.state.level_for(BOB) == AccessLevel.MANAGE


def test_share_at_the_same_level_is_a_no_op() -> None:
    given(past(lambda i: i.share("bob", 2))).when(lambda i: i.share("bob", 2)).returns(False).then_nothing()


def test_share_with_a_team() -> None:
    outcome = (
        given(past())
        .when(lambda i: i.share("team:analytics", 2))
        .then(event(Integration.Shared, principal_id="team:analytics", access_level=2))
    )
    assert outcome.state.level_for(Actor(id="carol", team_roles={"analytics": "member"})) == AccessLevel.EDIT


@pytest.mark.parametrize("level", [0, -1])
def test_share_below_level_one_is_rejected_on_access_level(level: int) -> None:
    given(past(lambda i: i.share("bob", 2))).when(lambda i: i.share("bob", level)).then_fails(
        ValidationFailed,
        fields=["accessLevel"],
        details=[{"field": "accessLevel", "message": "must be greater than 0"}],
    )


# --- unshare --------------------------------------------------------------------------------


def test_unshare_removes_the_share() -> None:
    outcome = (
        given(past(lambda i: i.share("bob", 2), lambda i: i.share("carol", 1)))
        .when(lambda i: i.unshare("bob"))
        .then(event(Integration.Unshared, principal_id="bob"))
    )
    assert list(outcome.state.shares) == ["carol"]
    assert outcome.state.level_for(BOB) == AccessLevel.NONE


def test_unshare_of_an_unknown_principal_is_not_found() -> None:
    given(past(lambda i: i.share("bob", 2))).when(lambda i: i.unshare("carol")).then_fails(
        NotFound, message="No share for principal 'carol'."
    )


def test_unshare_twice_is_not_found_the_second_time() -> None:
    given(past(lambda i: i.share("bob", 2), lambda i: i.unshare("bob"))).when(lambda i: i.unshare("bob")).then_fails(
        NotFound
    )


# --- transfer -------------------------------------------------------------------------------


def test_transfer_to_the_current_owner_is_a_no_op() -> None:
    given(past()).when(lambda i: i.transfer_to("jane")).returns(False).then_nothing()


def test_transfer_changes_the_owner_and_drops_the_new_owners_share() -> None:
    outcome = (
        given(past(lambda i: i.share("bob", 1), lambda i: i.share("carol", 2)))
        .when(lambda i: i.transfer_to("bob"))
        .returns(True)
        .then(event(Integration.OwnershipTransferred, previous_owner_id="jane", owner_id="bob"))
    )
    i = outcome.state
    assert i.owner_id == "bob"
    assert i.natural_id == "bob:drive"
    assert list(i.shares) == ["carol"]
    assert i.level_for(BOB) == AccessLevel.MANAGE
    assert i.level_for(JANE) == AccessLevel.NONE


def test_transfer_to_a_team_gives_its_admins_manage_and_members_use() -> None:
    outcome = (
        given(past(lambda i: i.share("team:analytics", 2)))
        .when(lambda i: i.transfer_to("team:analytics"))
        .then(event(Integration.OwnershipTransferred, previous_owner_id="jane", owner_id="team:analytics"))
    )
    i = outcome.state
    assert i.shares == {}
    assert i.level_for(Actor(id="ann", team_roles={"analytics": "admin"})) == AccessLevel.MANAGE
    assert i.level_for(Actor(id="max", team_roles={"analytics": "member"})) == AccessLevel.USE


# --- delete ---------------------------------------------------------------------------------


def test_delete_empties_the_secrets_and_leaves_nobody_access() -> None:
    outcome = given(past(lambda i: i.share("bob", 3))).when(lambda i: i.delete()).then(event(Integration.Deleted))
    i = outcome.state
    assert i.deleted is True
    assert i.secrets == {}
    assert i.settings == SETTINGS  # the definition stays readable in the history
    for actor in (JANE, BOB, ROOT):
        assert i.level_for(actor) == AccessLevel.NONE


def test_level_for_before_delete() -> None:
    i = replay(past(lambda i: i.share("bob", 2)))
    assert [i.level_for(a) for a in (JANE, BOB, ROOT, Actor(id="eve"))] == [3, 2, 3, 0]


# --- audit: the acting principal --------------------------------------------------------------

COMMANDS = {
    "update": update(settings=SETTINGS | {"scope": "x"}),
    "share": lambda i: i.share("bob", 1),
    "transfer": lambda i: i.transfer_to("bob"),
    "delete": lambda i: i.delete(),
}


def test_create_records_the_acting_principal() -> None:
    given().when(by("alice", lambda _: new_integration())).then(event(Integration.Created, actor_id="alice"))


@pytest.mark.parametrize("name", COMMANDS)
def test_every_event_records_the_acting_principal(name: str) -> None:
    outcome = given(past()).when(by("alice", COMMANDS[name]))
    assert [e.actor_id for e in outcome.events] == ["alice"]
    outcome.then(event(type(outcome.events[0]), actor_id="alice"))


def test_unshare_records_the_acting_principal() -> None:
    given(past(lambda i: i.share("bob", 1))).when(by("alice", lambda i: i.unshare("bob"))).then(
        event(Integration.Unshared, actor_id="alice")
    )


@pytest.mark.parametrize("name", COMMANDS)
def test_events_outside_acting_as_record_no_principal(name: str) -> None:
    outcome = given(past()).when(COMMANDS[name])
    assert [e.actor_id for e in outcome.events] == [None]


def test_the_acting_principal_is_kept_per_event_and_survives_storage() -> None:
    with acting_as("alice"):
        i = new_integration()
        with acting_as("bob"):
            i.share("carol", 1)
        i.delete()
    i.transfer_to("dave")
    events = i.collect_events()
    assert [e.actor_id for e in events] == ["alice", "bob", "alice", None]
    assert [e.actor_id for e in stored(events)] == ["alice", "bob", "alice", None]


# --- replay ---------------------------------------------------------------------------------


def lifecycle() -> tuple[Integration, list[Any]]:
    with acting_as("jane"):
        i = new_integration()
        i.update(slug="drive", settings=SETTINGS | {"scope": "drive"}, secrets_set={}, secrets_cleared=[])
        i.share("bob", 1)
        i.share("bob", 2)
        i.share("team:analytics", 1)
        i.unshare("team:analytics")
        i.update(
            slug="gdrive",
            settings=SETTINGS,
            secrets_set={"client_secret": {"ref": "vault:2", "fingerprint": "fp-2"}},
            secrets_cleared=[],
        )
        i.transfer_to("bob")
    return i, list(i.collect_events())


def test_replaying_the_events_rebuilds_the_live_aggregate() -> None:
    live, events = lifecycle()
    rebuilt = replay(events)
    assert rebuilt == live
    assert (rebuilt.version, rebuilt.owner_id, rebuilt.slug) == (8, "bob", "gdrive")
    assert rebuilt.shares == {}
    assert rebuilt.secrets == {"client_secret": {"ref": "vault:2", "fingerprint": "fp-2"}}


def test_replaying_the_stored_events_rebuilds_the_live_aggregate() -> None:
    live, events = lifecycle()
    rebuilt = replay(stored(events))
    assert rebuilt == live
    assert rebuilt.modified_on == live.modified_on


def test_replaying_a_prefix_gives_the_state_at_that_version() -> None:
    _, events = lifecycle()
    at_four = replay(events[:4])
    assert (at_four.version, at_four.owner_id, at_four.slug) == (4, "jane", "drive")
    assert at_four.shares["bob"]["access_level"] == 2


def test_a_snapshot_rebuilds_the_live_aggregate() -> None:
    live, _ = lifecycle()
    assert Integration.Snapshot.take(live).mutate(None) == live

"""UniqueKey (the SlugIndex): claim, release, conflict, deterministic ids."""

from __future__ import annotations

from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

import pytest

from domain.errors import Conflict
from domain.unique_key import SLUG, USERNAME, UniqueKey, unique_key_id
from tests.domain.given_when_then import by, event, given, history, replay

R1 = UUID("00000000-0000-4000-8000-0000000000a1")
R2 = UUID("00000000-0000-4000-8000-0000000000a2")


def new_key(ref: UUID = R1) -> UniqueKey:
    return UniqueKey(namespace=SLUG, key="jane:drive", ref=ref)


def past(*commands: Any) -> list[Any]:
    return history(new_key, *commands)


# --- ids ------------------------------------------------------------------------------------


def test_the_id_is_uuid5_of_namespace_and_key_under_the_service_namespace() -> None:
    ns = uuid5(NAMESPACE_URL, "https://informer-integrations/unique-key")
    assert unique_key_id("slug", "jane:drive") == uuid5(ns, "slug:jane:drive")
    assert unique_key_id("slug", "jane:drive") == UUID("0af9e75f-fd32-5b8a-9158-035cf07a8dd9")


def test_ids_are_deterministic_and_independent_of_the_ref() -> None:
    assert new_key(R1).id == new_key(R2).id == unique_key_id(SLUG, "jane:drive")


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ((SLUG, "jane:drive"), (USERNAME, "jane:drive")),
        ((SLUG, "jane:drive"), (SLUG, "bob:drive")),
        ((SLUG, "jane:drive"), (SLUG, "jane:Drive")),
    ],
)
def test_different_namespaces_or_keys_give_different_ids(a: tuple[str, str], b: tuple[str, str]) -> None:
    assert unique_key_id(*a) != unique_key_id(*b)


# --- create / claim -------------------------------------------------------------------------


def test_create_claims_the_key_for_the_ref() -> None:
    outcome = (
        given()
        .when(by("jane", lambda _: new_key()))
        .then(
            event(
                UniqueKey.Created,
                originator_id=unique_key_id(SLUG, "jane:drive"),
                originator_topic="integrations/UniqueKey",
                namespace=SLUG,
                key="jane:drive",
                ref=R1,
                actor_id="jane",
            )
        )
    )
    assert (outcome.state.namespace, outcome.state.key, outcome.state.ref) == (SLUG, "jane:drive", R1)


def test_claim_by_the_holder_is_a_no_op() -> None:
    given(past()).when(lambda k: k.claim(R1)).then_nothing()


def test_claim_by_another_ref_conflicts() -> None:
    given(past()).when(lambda k: k.claim(R2)).then_fails(Conflict, message="'jane:drive' is already taken.")


def test_claim_after_release_records_the_new_holder() -> None:
    outcome = (
        given(past(lambda k: k.release(R1)))
        .when(by("bob", lambda k: k.claim(R2)))
        .then(event(UniqueKey.Claimed, ref=R2, originator_version=3, actor_id="bob"))
    )
    assert outcome.state.ref == R2


def test_the_old_holder_conflicts_once_the_key_is_reclaimed() -> None:
    given(past(lambda k: k.release(R1), lambda k: k.claim(R2))).when(lambda k: k.claim(R1)).then_fails(Conflict)


# --- release --------------------------------------------------------------------------------


def test_release_by_the_holder_frees_the_key() -> None:
    outcome = (
        given(past())
        .when(by("jane", lambda k: k.release(R1)))
        .then(event(UniqueKey.Released, originator_version=2, actor_id="jane"))
    )
    assert outcome.state.ref is None


def test_release_by_another_ref_is_ignored() -> None:
    outcome = given(past()).when(lambda k: k.release(R2)).then_nothing()
    assert outcome.state.ref == R1


def test_release_of_a_free_key_is_ignored() -> None:
    given(past(lambda k: k.release(R1))).when(lambda k: k.release(R1)).then_nothing()


def test_replay_of_claims_and_releases_rebuilds_the_holder() -> None:
    key = new_key()
    key.release(R1)
    key.claim(R2)
    key.release(R2)
    key.claim(R1)
    events = key.collect_events()
    assert [type(e) for e in events] == [
        UniqueKey.Created,
        UniqueKey.Released,
        UniqueKey.Claimed,
        UniqueKey.Released,
        UniqueKey.Claimed,
    ]
    rebuilt = replay(events)
    assert rebuilt == key
    assert (rebuilt.ref, rebuilt.version) == (R1, 5)

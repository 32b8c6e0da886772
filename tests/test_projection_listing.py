"""Contract of the listing read model, the same assertions on SQLite and on PostgreSQL."""

from __future__ import annotations

from typing import Any

import pytest

from domain.integration import Integration
from tests.test_projection_support import Store, store_fixture  # noqa: F401 (the store fixture)

pytestmark = pytest.mark.store

SECRET = {"ref": "vault:1", "fingerprint": "abc"}


def integration(owner: str, slug: str, name: str, **settings: Any) -> Integration:
    secrets = settings.pop("secrets", {})
    return Integration(owner_id=owner, slug=slug, settings={"name": name, **settings}, secrets=secrets)


@pytest.fixture
def given(store: Store) -> dict[str, Integration]:
    """The events of the scenario; each test then queries the view fed with them."""
    crm = integration(
        "alice", "crm", "Alpha CRM", description="Customer data", type="custom", secrets={"client_secret": SECRET}
    )
    drive = integration("team:eng", "drive", "beta Drive", type="google-drive")
    gamma = integration("bob", "gamma", "Gamma 100% sure_thing")
    gamma2 = integration("bob", "gamma2", "Gamma 1000 sureXthing")
    delta = integration("carol", "delta", "Delta", description="shared with ops")
    library = integration("team:eng", "crm", "Library CRM", embedded=True)
    moved = integration("dave", "moved", "Moved")
    gone = integration("alice", "gone", "Gone")
    renamed = integration("carol", "old", "Renamed")
    for agg in (crm, drive, gamma, gamma2, delta, library, moved, gone, renamed):
        store.save(agg)
    crm.update(
        slug="crm",
        settings={"name": "Alpha CRM", "description": "Customer data", "api_base_uri": "https://x.test"},
        secrets_set={"api_key": SECRET},
        secrets_cleared=["client_secret"],
    )
    gamma.share("alice", 1)
    delta.share("team:ops", 2)
    delta.share("frank", 1)
    moved.share("alice", 2)
    store.save(crm, gamma, delta, moved)
    delta.unshare("frank")
    moved.transfer_to("alice")
    gone.delete()
    renamed.update(slug="new", settings=dict(renamed.settings), secrets_set={}, secrets_cleared=[])
    store.save(delta, moved, gone, renamed)
    return {
        "crm": crm, "drive": drive, "gamma": gamma, "gamma2": gamma2, "delta": delta, "library": library,
        "moved": moved, "gone": gone, "renamed": renamed,
    }  # fmt: skip


@pytest.fixture
def view(store: Store, given: dict[str, Integration]) -> Any:
    view = store.view("listing")
    store.feed(view, "listing")
    return view


def names(docs: list[dict[str, Any]]) -> list[str]:
    return [d["settings"]["name"] for d in docs]


ALL = ["Alpha CRM", "beta Drive", "Delta", "Gamma 100% sure_thing", "Gamma 1000 sureXthing", "Moved", "Renamed"]


def test_visibility(view: Any) -> None:
    assert names(view.page(["alice"])[0]) == ["Alpha CRM", "Gamma 100% sure_thing", "Moved"]  # own, shared, moved
    assert names(view.page(["bob", "team:eng"])[0]) == ["beta Drive", "Gamma 100% sure_thing", "Gamma 1000 sureXthing"]
    assert names(view.page(["erin", "team:ops"])[0]) == ["Delta"]  # share to a team
    assert view.page(None) == (view.page(None, limit=100)[0], 7)  # superuser: all but embedded
    assert names(view.page(None)[0]) == ALL
    assert view.page(["frank"]) == ([], 0)  # unshared
    assert view.page(["dave"]) == ([], 0)  # transferred away
    assert view.page([]) == ([], 0)


def test_q_is_a_literal_case_insensitive_substring_of_name_or_description(view: Any) -> None:
    assert names(view.page(None, q="100%")[0]) == ["Gamma 100% sure_thing"]
    assert names(view.page(None, q="E_T")[0]) == ["Gamma 100% sure_thing"]
    assert names(view.page(None, q="alpha")[0]) == ["Alpha CRM"]
    assert names(view.page(None, q="CUSTOMER")[0]) == ["Alpha CRM"]  # description
    assert names(view.page(["erin", "team:ops"], q="ops")[0]) == ["Delta"]
    assert view.page(["alice"], q="ops") == ([], 0)
    assert view.page(None, q="\\") == ([], 0)
    assert names(view.page(None, q="crm")[0]) == ["Alpha CRM"]  # the embedded Library CRM never shows


def test_supports_upload_filter(view: Any) -> None:
    assert names(view.page(None, supports_upload=True)[0]) == ["beta Drive"]
    assert view.page(None, supports_upload=False)[1] == 6


def test_sort_orders_and_paging(view: Any, given: dict[str, Integration]) -> None:
    assert names(view.page(None, sort="-name")[0]) == ALL[::-1]
    created = ["Alpha CRM", "beta Drive", "Gamma 100% sure_thing", "Gamma 1000 sureXthing", "Delta", "Moved", "Renamed"]
    assert names(view.page(None, sort="createdAt")[0]) == created
    assert names(view.page(None, sort="-createdAt")[0]) == created[::-1]
    updated = ["beta Drive", "Gamma 1000 sureXthing", "Alpha CRM", "Gamma 100% sure_thing", "Delta", "Moved", "Renamed"]
    assert names(view.page(None, sort="updatedAt")[0]) == updated
    assert names(view.page(None, sort="-updatedAt")[0]) == updated[::-1]
    assert [d["slug"] for d in view.page(None, sort="slug")[0]] == sorted(
        ["crm", "drive", "gamma", "gamma2", "delta", "moved", "new"]
    )
    assert [names(view.page(None, start=s, limit=3)[0]) for s in (0, 3, 6)] == [ALL[0:3], ALL[3:6], ALL[6:]]
    assert view.page(None, start=3, limit=3)[1] == 7
    assert view.page(None, start=50, limit=3) == ([], 7)
    assert view.page(["alice"], start=2, limit=1) == ([view.page(["alice"])[0][2]], 3)
    with pytest.raises(ValueError):
        view.page(None, sort="owner")


def test_doc_is_what_the_api_renders(view: Any, given: dict[str, Integration]) -> None:
    crm = given["crm"]
    [doc] = view.by_slug("crm", ["alice"])
    assert doc == {
        "id": str(crm.id),
        "owner_id": "alice",
        "slug": "crm",
        "settings": {"name": "Alpha CRM", "description": "Customer data", "api_base_uri": "https://x.test"},
        "secret_fields": ["api_key"],
        "created_at": crm.created_on.isoformat(timespec="microseconds"),
        "updated_at": crm.modified_on.isoformat(timespec="microseconds"),
        "version": crm.version,
    }
    [moved] = view.by_slug("moved", None)
    assert (moved["owner_id"], moved["version"]) == ("alice", given["moved"].version)


def test_transfer_drops_the_new_owners_share_and_the_old_owners_access(view: Any) -> None:
    [moved] = [d for d in view.all_visible(["alice"]) if d["slug"] == "moved"]
    assert moved["shared"] is False
    moved_access = [r for r in view.rows()["access"] if r["integration_id"] == moved["id"]]
    assert [(r["principal_id"], r["level"]) for r in moved_access] == [("alice", 3)]


def test_all_visible_marks_shared(view: Any) -> None:
    flags = {d["slug"]: d["shared"] for d in view.all_visible(["alice"])}
    assert flags == {"crm": False, "gamma": True, "moved": False}
    assert [d["slug"] for d in view.all_visible(None)] == ["crm", "drive", "delta", "gamma", "gamma2", "moved", "new"]
    assert {d["slug"]: d["shared"] for d in view.all_visible(None)}["delta"] is True  # team:ops


def test_by_slug_includes_embedded_and_follows_renames(view: Any, given: dict[str, Integration]) -> None:
    assert [d["owner_id"] for d in view.by_slug("crm", None)] == ["alice", "team:eng"]
    assert [d["id"] for d in view.by_slug("crm", ["bob", "team:eng"])] == [str(given["library"].id)]
    assert view.by_slug("crm", ["zed"]) == []
    assert view.by_slug("old", None) == []
    assert [d["id"] for d in view.by_slug("new", ["carol"])] == [str(given["renamed"].id)]


def test_delete_removes_every_row(view: Any, given: dict[str, Integration]) -> None:
    gone = str(given["gone"].id)
    assert view.count() == 8  # 9 created, 1 deleted; the embedded one counts
    assert view.by_slug("gone", None) == []
    assert all(r["integration_id"] != gone for r in view.rows()["access"])


def test_reset_forgets_rows_and_position(store: Store, view: Any) -> None:
    assert view.max_tracking_id(store.app.name) == store.head()
    view.reset(store.app.name)
    assert view.max_tracking_id(store.app.name) is None
    assert view.rows() == {"items": [], "access": [], "counts": []}


def test_totals_follow_updates_and_deletes(store: Store, view: Any, given: dict[str, Integration]) -> None:
    drive = given["drive"]
    drive.update(slug="drive", settings={"name": "beta Drive", "embedded": True}, secrets_set={}, secrets_cleared=[])
    store.save(drive)
    store.feed(view, "listing")  # the events seen already are skipped
    assert names(view.page(None)[0]) == [n for n in ALL if n != "beta Drive"]
    assert view.page(None)[1] == 6
    assert view.page(None, supports_upload=True) == ([], 0)
    assert view.page(None, supports_upload=False)[1] == 6
    assert view.page(None, q="drive") == ([], 0)
    assert view.count() == 8
    assert view.page(["bob", "team:eng"])[1] == 2


# --- a caller seen through several principals (issue 2: the per-principal merge, totals, q) -------

CALLER = ["u1", "team:a", "team:b"]
LONG = "x" * 250  # past the description prefix the access rows keep (DESCRIPTION_PREFIX)


@pytest.fixture
def crowd(store: Store) -> Any:
    """Items the caller reaches once, twice or three times; ties on name; long descriptions."""
    specs = [
        ("u1", "Same", {}, ["team:a", "team:b"]),  # three rows for the caller
        ("team:a", "Same", {}, ["team:b"]),  # the same name_key: the id breaks the tie
        ("team:b", "same", {"type": "dropbox"}, ["u1"]),
        ("u1", "Alpha", {"description": LONG + " needle"}, ["team:a"]),  # q matches past the prefix
        ("team:a", "beta", {"description": "needle " + LONG}, []),  # q matches inside the prefix
        ("team:b", "Gamma", {"type": "onedrive"}, ["team:a", "u1"]),
        ("other", "Hidden", {}, ["team:z"]),  # not the caller's
        ("other", "Shared to b", {"description": "a NEEDLE"}, ["team:b", "team:z"]),
        ("u1", "Embedded", {"embedded": True}, ["team:a"]),  # never listed
        ("team:a", "Zeta", {}, ["u1", "team:b"]),
        ("other", "Delta", {}, ["u1"]),
        ("team:b", "epsilon", {}, []),
    ]
    for n, (owner, name, settings, shares) in enumerate(specs):
        agg = integration(owner, f"c{n}", name, **settings)
        store.save(agg)
        for principal in shares:
            agg.share(principal, 1)
        if shares:
            store.save(agg)  # a later updated_at than its creation
    view = store.view("listing")
    store.feed(view, "listing")
    return view


def expected(view: Any, ids: list[str], **options: Any) -> list[dict[str, Any]]:
    """The oracle: the superuser's page (items indexes) cut to what ``all_visible`` says ids see."""
    visible = {d["id"] for d in view.all_visible(ids)}
    every, _ = view.page(None, limit=1000, **options)
    return [d for d in every if d["id"] in visible]


@pytest.mark.parametrize("sort", ["name", "-name", "createdAt", "-createdAt", "updatedAt", "-updatedAt", "slug"])
def test_pages_through_several_principals_list_each_item_once(crowd: Any, sort: str) -> None:
    want = expected(crowd, CALLER, sort=sort)
    assert len(want) == 10 and len({d["id"] for d in want}) == 10
    for limit in (1, 2, 4):
        for start in range(0, len(want) + 2):
            assert crowd.page(CALLER, sort=sort, start=start, limit=limit) == (want[start : start + limit], 10)


def test_totals_and_pages_with_q_and_supports_upload_through_several_principals(crowd: Any) -> None:
    for options in (
        {"q": "needle"},
        {"q": "SAME"},
        {"q": "e"},
        {"supports_upload": True},
        {"q": "a", "supports_upload": False},
    ):
        want = expected(crowd, CALLER, **options)
        for start in range(0, len(want) + 1):
            assert crowd.page(CALLER, start=start, limit=2, **options) == (want[start : start + 2], len(want)), options
    assert names(crowd.page(CALLER, q="needle")[0]) == ["Alpha", "beta", "Shared to b"]  # past the prefix too
    assert crowd.page(CALLER, q=LONG + "  needle") == ([], 0)
    assert names(crowd.page(["team:a"], q="needle")[0]) == ["Alpha", "beta"]


def test_principal_order_and_repeats_do_not_change_the_page(crowd: Any) -> None:
    want = crowd.page(CALLER, start=1, limit=3)
    assert crowd.page(["team:b", "u1", "team:a", "u1"], start=1, limit=3) == want
    assert crowd.page(["team:b"], limit=100)[1] == len(expected(crowd, ["team:b"]))


def test_a_caller_in_more_teams_than_the_merge_takes(crowd: Any) -> None:
    from projections.listing import MAX_BRANCHES

    many = [*CALLER, *(f"team:none{i}" for i in range(MAX_BRANCHES))]
    want = expected(crowd, CALLER)
    assert crowd.page(many, start=2, limit=3) == (want[2:5], 10)
    assert crowd.page(many, q="needle") == crowd.page(CALLER, q="needle")


def test_remembered_totals_follow_every_change_of_the_view(store: Store, crowd: Any) -> None:
    assert crowd.page(CALLER)[1] == 10
    assert crowd.page(CALLER, q="needle")[1] == 3
    hidden = integration("other", "late", "Late needle")
    store.save(hidden)
    store.feed(crowd, "listing")
    assert crowd.page(CALLER)[1] == 10  # a change the caller cannot see
    hidden.share("team:a", 1)
    store.save(hidden)
    store.feed(crowd, "listing")
    assert crowd.page(CALLER)[1] == 11
    assert crowd.page(CALLER, q="needle")[1] == 4
    assert crowd.page(["team:a", "u1", "team:b"], limit=1)[1] == 11
    hidden.unshare("team:a")
    store.save(hidden)
    store.feed(crowd, "listing")
    assert (crowd.page(CALLER)[1], crowd.page(CALLER, q="needle")[1]) == (10, 3)
    assert crowd.page(None, q="needle")[1] == 4  # a superuser's q total is remembered the same way
    crowd.reset(store.app.name)  # the position moves back
    assert (crowd.page(CALLER), crowd.page(None, q="needle")) == (([], 0), ([], 0))
    store.feed(crowd, "listing")
    assert (crowd.page(CALLER)[1], crowd.page(CALLER, q="needle")[1], crowd.page(None, q="needle")[1]) == (10, 3, 4)


def test_one_batch_leaves_the_rows_event_by_event_application_leaves(store: Store, crowd: Any) -> None:
    from eventsourcing.persistence import Tracking

    # Created alone, created and shared, updated, transferred and deleted, all in one transaction.
    extra = integration("u1", "x1", "X one", description=LONG + "tail")
    store.save(extra)
    extra.share("team:a", 2)
    extra.update(
        slug="x1", settings={"name": "X renamed", "description": LONG + "tail"}, secrets_set={}, secrets_cleared=[]
    )
    extra.transfer_to("team:b")
    lone, gone = integration("u1", "x2", "X two"), integration("u1", "x3", "X three")
    store.save(extra, lone, gone)
    gone.delete()
    store.save(gone)
    store.feed(crowd, "listing")
    batched = store.view("listing", "listing_batched")
    notifications = store.notifications("listing")
    assert batched.apply_batch(
        [(store.app.mapper.to_domain_event(n), Tracking(store.app.name, n.id)) for n in notifications]
    )
    assert batched.rows() == crowd.rows()
    access = [r for r in batched.rows()["access"] if r["integration_id"] == str(extra.id)]
    assert [(r["principal_id"], r["description_key"]) for r in access] == [
        ("team:a", LONG[:200]),
        ("team:b", LONG[:200]),
    ]

"""Exactly-once tracking, batched and blue/green rebuilds, and the supervisor, on both backends."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from eventsourcing.persistence import Tracking
from eventsourcing.projection import ProjectionRunner

from domain.integration import Integration
from domain.principals import User
from infrastructure.settings import Settings
from projections.runtime import (
    READ_MODELS,
    Generations,
    LiveView,
    ProjectionSupervisor,
    ReadModel,
    backend_of,
    drop_generation,
    generation_name,
    projection_class,
    rebuild,
    rebuild_blue_green,
    view_class,
)
from tests.test_projection_support import Store, TestApp, store_fixture, workload  # noqa: F401 (the store fixture)

pytestmark = pytest.mark.store


@pytest.fixture
def generations(store: Store) -> Iterator[Generations]:
    generations = Generations.open(store.env_for(Generations.NAME))
    yield generations
    generations.close()


def reference(store: Store, read_model: str) -> Any:
    """A clean replay: every event, one transaction each."""
    view = store.view(read_model, f"{read_model}_ref")
    store.feed(view, read_model)
    return view


def eventually(condition: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("read_model", list(READ_MODELS))
def test_redelivering_tracked_events_is_a_no_op(store: Store, read_model: str) -> None:
    workload(store, 4)
    view = store.view(read_model)
    notifications = store.notifications(read_model)
    half = len(notifications) // 2
    items = [(store.app.mapper.to_domain_event(n), Tracking(store.app.name, n.id)) for n in notifications]
    assert view.apply_batch(items[:half])
    before = view.rows()
    assert view.apply(*items[half - 1]) is False
    assert view.apply(*items[0]) is False
    assert view.apply_batch(items[:half]) is False
    assert view.rows() == before
    assert view.apply_batch(items)  # overlaps: only the new half is applied
    assert view.max_tracking_id(store.app.name) == notifications[-1].id
    assert view.rows() == reference(store, read_model).rows()


def test_a_failure_after_the_view_write_leaves_nothing_and_a_restart_catches_up(store: Store) -> None:
    workload(store, 3)
    env = store.env_for("listing")
    notifications = store.notifications("listing")
    fail_at = notifications[len(notifications) // 2].id
    base = view_class("listing", env)

    class FailsAfterWriting(base):  # type: ignore[valid-type,misc]
        def _insert_tracking(self, cur: Any, tracking: Tracking) -> None:
            super()._insert_tracking(cur, tracking)  # rows and position written...
            if tracking.notification_id == fail_at:
                raise RuntimeError("injected after the view write")  # ...then the transaction fails

    runner = ProjectionRunner(
        application_class=TestApp,
        projection_class=projection_class("listing", "listing"),
        view_class=FailsAfterWriting,
        env=env,
    )
    with pytest.raises(RuntimeError, match="injected"), runner:
        runner.run_forever(timeout=10)
    runner.view.close()

    view = store.view("listing")
    before_failure = store.view("listing", "listing_partial")
    store.feed(before_failure, "listing", stop=fail_at - 1)
    assert view.max_tracking_id(store.app.name) == before_failure.max_tracking_id(store.app.name) < fail_at
    assert view.rows() == before_failure.rows()

    with ProjectionRunner(
        application_class=TestApp, projection_class=READ_MODELS["listing"].projection, view_class=base, env=env
    ) as runner:
        runner.wait(store.head(), timeout=10)
        assert runner.view.rows() == reference(store, "listing").rows()
    runner.view.close()


@pytest.mark.parametrize("read_model", list(READ_MODELS))
def test_batched_rebuild_equals_per_event_processing(store: Store, read_model: str) -> None:
    workload(store, 7)
    expected = reference(store, read_model).rows()
    for batch_size in (1, 5, 1000):
        view = store.view(read_model, f"{read_model}_b{batch_size}")
        report = rebuild(store.app, view, READ_MODELS[read_model].projection, batch_size=batch_size)
        assert report.events == len(store.notifications(read_model))
        assert report.position == view.max_tracking_id(store.app.name)
        assert view.rows() == expected
    # From the view's position: only what is new.
    before = view.max_tracking_id(store.app.name)
    workload(store, 2, tag="later")
    report = rebuild(store.app, view, READ_MODELS[read_model].projection)
    assert report.events == len(store.notifications(read_model)) - len(store.notifications(read_model, stop=before))
    assert view.rows() == reference(store, read_model).rows()


def test_batched_rebuild_of_an_integration_created_and_deleted_in_one_batch(store: Store) -> None:
    item = Integration(owner_id="alice", slug="x", settings={"name": "X", "type": "dropbox"}, secrets={})
    store.save(item)
    item.delete()
    store.save(item)
    view = store.view("listing", "listing_batched")
    rebuild(store.app, view, READ_MODELS["listing"].projection)
    assert view.rows() == reference(store, "listing").rows()
    assert view.count() == 0


def test_generations_pointer_is_compare_and_set(generations: Generations) -> None:
    assert generations.active("listing") is None
    assert generations.ensure("listing") == 1
    assert generations.ensure("listing", 7) == 1
    assert generations.activate("listing", 2, expected=5) is False
    assert generations.activate("listing", 2, expected=1) is True
    assert generations.all() == {"listing": 2}


def test_live_view_follows_a_blue_green_rebuild(store: Store, generations: Generations, settings: Settings) -> None:
    workload(store, 3)
    live = LiveView("listing", store.env_for, generations, poll_interval=0.0, grace=0.0)
    try:
        assert live.generation == 1 and live.get().count() == 0  # nothing ran generation 1
        report = rebuild_blue_green(store.app, "listing", store.env_for, generations, batch_size=4)
        assert (report["generation"], report["previous"]) == (2, 1)
        assert live.get().rows() == reference(store, "listing").rows()
        assert live.generation == 2
        with pytest.raises(ValueError, match="active"):
            drop_generation("listing", 2, store.env_for, generations)
        drop_generation("listing", 1, store.env_for, generations)
        if backend_of(store.env_for("listing"), "listing") == "sqlite":
            assert not Path(store.env_for(generation_name("listing", 1))["LISTING_G1_SQLITE_DBNAME"]).exists()
        rebuild_blue_green(store.app, "listing", store.env_for, generations, drop_old=True)
        assert live.get().rows() == reference(store, "listing").rows()
        assert live.generation == 3
    finally:
        live.close()


def test_blue_green_rebuild_while_writes_continue_ends_equal_to_the_live_model(
    store: Store, generations: Generations
) -> None:
    workload(store, 5)
    with ProjectionSupervisor(
        TestApp, store.env_for, generations=generations, poll_interval=0.05, min_backoff=0.05, grace=0.0
    ) as supervisor:
        assert supervisor.wait(store.head(), 10)
        assert supervisor.generation("listing") == 1
        stop = threading.Event()
        written = []

        def write() -> None:
            while not stop.is_set():
                written.append(workload(store, 1, tag=f"bg{len(written)}-"))

        writer = threading.Thread(target=write)
        writer.start()
        try:
            assert eventually(lambda: len(written) >= 2)
            report = rebuild_blue_green(store.app, "listing", store.env_for, generations, batch_size=10)
            assert report["generation"] == 2
            assert eventually(lambda: supervisor.generation("listing") == 2)
            count = len(written)
            assert eventually(lambda: len(written) >= count + 2)  # writes go on after the switch
        finally:
            stop.set()
            writer.join()
        assert supervisor.wait(store.head(), 10)
        assert supervisor.view("listing").rows() == reference(store, "listing").rows()
        assert supervisor.view("principals").rows() == reference(store, "principals").rows()


def test_supervisor_wait_and_positions(store: Store) -> None:
    everyone = set(READ_MODELS)
    with ProjectionSupervisor(TestApp, store.env_for, poll_interval=0.05) as supervisor:
        assert supervisor.wait(None, 0)
        assert supervisor.positions() == dict.fromkeys(everyone)
        listed = store.save(Integration(owner_id="alice", slug="a", settings={"name": "A"}, secrets={}))
        assert supervisor.wait(listed, 10)
        assert supervisor.view("listing").page(["alice"])[1] == 1  # read your write
        assert supervisor.positions()["listing"] == listed
        # The others have nothing to do for it, and pass it all the same (not only on a wait).
        assert eventually(lambda: supervisor.positions() == dict.fromkeys(everyone, listed))

        # An event of one read model only: the other has passed it without processing anything.
        began = time.monotonic()
        user = store.save(User(user_id="bob", profile={"username": "bob"}))
        assert supervisor.wait(user, 10)
        assert time.monotonic() - began < 2
        assert supervisor.positions()["principals"] == user
        assert eventually(lambda: supervisor.positions() == dict.fromkeys(everyone, user))
        assert supervisor.view("principals").user("bob")["username"] == "bob"

        assert supervisor.wait(user + 1000, 0.2) is False
        assert supervisor.lag(store.app) == dict.fromkeys(everyone, 0)
        status = supervisor.status()
        assert status["caught_up"] is True
        assert status["listing"] == {
            "generation": None,
            "position": user,
            "lag": 0,
            "running": True,
            "restarts": 0,
            "last_error": None,
        }
    assert supervisor.status()["caught_up"] is False


def test_runner_position_passes_events_of_other_read_models(store: Store) -> None:
    """A read model with rare events (principals) does not stay at its last event: in memory at
    once, stored within ``persist_every`` and when the runner stops. A restart starts there, so a
    wake-up never re-selects a stretch of integration events that grows with every write."""
    user = store.save(User(user_id="carol", profile={"username": "carol"}))
    with ProjectionSupervisor(
        TestApp, store.env_for, read_models=["principals"], poll_interval=0.05, persist_every=3600
    ) as supervisor:
        assert supervisor.wait(user, 10)
        assert supervisor.view("principals").max_tracking_id(store.app.name) == user
        last = 0
        for n in range(5):
            last = store.save(Integration(owner_id="carol", slug=f"i{n}", settings={"name": "I"}, secrets={}))
        assert eventually(lambda: supervisor.positions()["principals"] == last)
    stored = store.view("principals")  # stored when the runner stopped (the supervisor closed its view)
    assert stored.max_tracking_id(store.app.name) == last
    assert stored.user("carol")["username"] == "carol"

    with ProjectionSupervisor(
        TestApp, store.env_for, read_models=["principals"], poll_interval=0.05, persist_every=0
    ) as supervisor:
        assert eventually(lambda: supervisor.positions()["principals"] == last)  # where the last runner stopped
        later = store.save(Integration(owner_id="carol", slug="later", settings={"name": "I"}, secrets={}))
        assert eventually(lambda: stored.max_tracking_id(store.app.name) == later)  # while running


def test_rebuild_ends_at_the_head_when_the_last_events_are_not_its_own(store: Store) -> None:
    user = store.save(User(user_id="dave", profile={"username": "dave"}))
    head = store.save(Integration(owner_id="dave", slug="x", settings={"name": "X"}, secrets={}))
    view = store.view("principals", "principals_rebuilt")
    report = rebuild(store.app, view, READ_MODELS["principals"].projection)
    assert (report.events, report.position) == (1, head)
    assert view.max_tracking_id(store.app.name) == head > user
    assert view.user("dave")["username"] == "dave"
    assert rebuild(store.app, view, READ_MODELS["principals"].projection).events == 0


def test_supervisor_restarts_a_failed_runner(
    store: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    backend = backend_of(store.env_for("listing"), "listing")
    failures: list[int] = []

    class FailsOnce(READ_MODELS["listing"].views[backend]):  # type: ignore[misc]
        def _apply_event(self, cur: Any, event: Any) -> None:
            super()._apply_event(cur, event)
            if not failures:
                failures.append(event.originator_version)
                raise RuntimeError("injected failure")

    monkeypatch.setitem(READ_MODELS, "listing", ReadModel(READ_MODELS["listing"].projection, {backend: FailsOnce}))
    with (
        caplog.at_level(logging.WARNING, logger="integrations.projections"),
        ProjectionSupervisor(
            TestApp, store.env_for, read_models=["listing"], poll_interval=0.05, min_backoff=0.05
        ) as supervisor,
    ):
        position = workload(store, 3)
        assert supervisor.wait(position, 10)
        assert supervisor.status()["listing"]["restarts"] == 1
        assert "injected failure" in (supervisor.status()["listing"]["last_error"] or "")
        assert supervisor.view("listing").rows() == reference(store, "listing").rows()
    assert "projection listing failed" in caplog.text
    assert "RuntimeError: injected failure" in caplog.text


def test_a_stream_of_writes_shares_the_views_transactions(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = backend_of(store.env_for("listing"), "listing")
    transactions: list[int] = []

    class Counting(READ_MODELS["listing"].views[backend]):  # type: ignore[misc]
        def apply_batch(self, items: Any, tracking: Any = None, **kwargs: Any) -> bool:
            if items:
                transactions.append(len(items))
            return super().apply_batch(items, tracking, **kwargs)

    monkeypatch.setitem(READ_MODELS, "listing", ReadModel(READ_MODELS["listing"].projection, {backend: Counting}))
    with ProjectionSupervisor(
        TestApp, store.env_for, read_models=["listing"], poll_interval=0.05, gather=0.5
    ) as supervisor:
        assert eventually(lambda: supervisor.positions()["listing"] is not None or store.head() == 0)
        last = 0
        for n in range(10):
            last = store.save(Integration(owner_id="erin", slug=f"s{n}", settings={"name": "S"}, secrets={}))
        assert supervisor.wait(last, 10)
        assert sum(transactions) == 10
        assert len(transactions) <= 3  # the first at once, the rest gathered
        assert supervisor.view("listing").rows() == reference(store, "listing").rows()

"""The event store's write path (ADR 0014): one statement per save on PostgreSQL, a new
integration's secrets committed in the same transaction as its events, notification ids that a
follower can never skip, and write conflicts that still surface as ``IntegrityError``."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from eventsourcing.domain import Aggregate
from eventsourcing.persistence import IntegrityError

from commands.messages import IntegrationBody
from commands.service import IntegrationsApp
from domain.access import Actor
from domain.errors import Conflict
from infrastructure.keyring import load_keyring
from infrastructure.passwords import ScryptHasher
from infrastructure.persistence import application_env
from infrastructure.pg_recorder import OneStatementPostgresApplicationRecorder
from infrastructure.settings import Settings
from infrastructure.vault import open_vault

ADMIN = Actor(id="admin", superuser=True)


@pytest.fixture
def app(settings: Settings) -> Iterator[IntegrationsApp]:
    vault = open_vault(settings, load_keyring(settings))
    application = IntegrationsApp(application_env(settings), vault=vault, hasher=ScryptHasher())
    try:
        yield application
    finally:
        application.close()
        vault.close()


def _body(slug: str, key: str = "sk-write-path-secret-0001") -> IntegrationBody:
    return IntegrationBody(
        name=f"Write path {slug}",
        slug=slug,
        auth_type="apikey",
        api_base_uri="https://api.example.com/v1",
        api_key_name="X-Api-Key",
        api_key=key,
    )


def _vault_keys(settings: Settings) -> int:
    if settings.postgres is None:
        import sqlite3

        conn = sqlite3.connect(settings.data_dir / "vault.sqlite")
        try:
            return int(conn.execute("SELECT count(*) FROM vault_keys").fetchone()[0])
        finally:
            conn.close()
    with psycopg.connect(settings.postgres.conninfo()) as conn:
        row = conn.execute(f'SELECT count(*) FROM "{settings.postgres.schema}".integrations_vault_keys').fetchone()
        return int(row[0]) if row else 0


def test_the_postgres_store_saves_in_one_statement(app: IntegrationsApp, backend: str) -> None:
    assert isinstance(app.recorder, OneStatementPostgresApplicationRecorder) == (backend == "postgres")


def test_a_new_integrations_secret_is_stored_with_its_events(app: IntegrationsApp, settings: Settings) -> None:
    written = app.create_integration(ADMIN, _body("first"))
    integration = written.value
    ref = integration.secrets["api_key"]["ref"]
    assert app.vault.open(integration.id, "api_key", ref) == "sk-write-path-secret-0001"
    assert _vault_keys(settings) == 1
    # read back from the store, not from the aggregate just written
    loaded = app.repository.get(integration.id)
    assert loaded.secrets == integration.secrets


def test_a_refused_create_leaves_no_secret_behind(app: IntegrationsApp, settings: Settings) -> None:
    app.create_integration(ADMIN, _body("taken"))
    before = _vault_keys(settings)
    with pytest.raises(Conflict):
        app.create_integration(ADMIN, _body("taken", key="sk-never-stored-0002"))
    assert _vault_keys(settings) == before  # no data key, so no secret, for the refused one


class Counter(Aggregate):
    def __init__(self) -> None:
        self.n = 0

    def bump(self) -> None:
        self.trigger_event(self.Bumped)

    class Bumped(Aggregate.Event):
        def apply(self, aggregate: Any) -> None:
            aggregate.n += 1


def test_a_stale_version_is_an_integrity_error(app: IntegrationsApp) -> None:
    counter = Counter()
    app.save(counter)
    first, second = app.repository.get(counter.id), app.repository.get(counter.id)
    first.bump()
    second.bump()
    app.save(first)
    with pytest.raises(IntegrityError):
        app.save(second)
    assert app.repository.get(counter.id).n == 1


def test_a_follower_reading_during_concurrent_saves_misses_nothing(app: IntegrationsApp) -> None:
    """Notification ids are assigned under the table lock, so they commit in order: a reader that
    always continues after the highest id it has seen still sees every event."""
    writers, per_writer = 6, 40
    done = threading.Event()
    seen: list[int] = []
    errors: list[BaseException] = []

    start = app.recorder.max_notification_id() or 0

    def follow() -> None:
        position = start  # read before any writer starts (read in the thread, it could be later)
        while True:
            finished = done.is_set()
            batch = app.recorder.select_notifications(start=position, limit=500, inclusive_of_start=False)
            seen.extend(n.id for n in batch)
            if batch:
                position = batch[-1].id
            elif finished:
                return

    def write() -> None:
        try:
            for _ in range(per_writer):
                app.save(Counter())
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    follower = threading.Thread(target=follow)
    follower.start()
    threads = [threading.Thread(target=write) for _ in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    follower.join(timeout=60)
    assert not errors
    everything = [n.id for n in app.recorder.select_notifications(start=start, limit=10_000, inclusive_of_start=False)]
    assert len(everything) == writers * per_writer
    assert seen == everything  # in order, none skipped, none twice


def test_unrelated_saves_get_distinct_ids(app: IntegrationsApp) -> None:
    ids = [app.save(Counter())[-1].notification.id for _ in range(5)]
    assert ids == sorted(ids) and len(set(ids)) == 5
    assert uuid.UUID(str(app.recorder.select_notifications(start=ids[0], limit=1)[0].originator_id))

"""Running the read models: the registry, batched rebuild, blue/green generations, supervision.

Views are built the eventsourcing way, ``InfrastructureFactory.construct(Environment(name, env))
.tracking_recorder(ViewClass)``, with the view class chosen by ``<NAME>_PERSISTENCE_MODULE``.
Everything that needs a store takes ``env_for(name) -> env``, the environment for a projection
name (the composition root passes ``infrastructure.persistence.projection_env`` bound to its
settings): on SQLite each name is its own file, on PostgreSQL a table prefix.

Generations: a read model's live tables belong to a generation, projection name
``<read model>_g<N>``. The generations table (see :class:`Generations`) says which one is
active. :func:`rebuild_blue_green` builds generation N+1 beside the live one, flips the pointer
once it has caught up, and leaves N for :func:`drop_generation`. Readers (:class:`LiveView`) and
the :class:`ProjectionSupervisor` poll the pointer and move to the new generation.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from queue import Empty
from typing import Any, ClassVar, NamedTuple

from eventsourcing.application import Application
from eventsourcing.persistence import InfrastructureFactory, ShutDown, Tracking
from eventsourcing.postgres import PostgresApplicationRecorder, PostgresSubscription
from eventsourcing.projection import Projection
from eventsourcing.utils import Environment

from projections.connections import Connections, PostgresConnectionsView, SQLiteConnectionsView
from projections.listing import IntegrationListing, PostgresListingView, SQLiteListingView
from projections.principals import PostgresPrincipalsView, Principals, SQLitePrincipalsView
from projections.sqlview import PostgresView, SQLiteView, SQLView, iso

log = logging.getLogger("integrations.projections")

EnvFor = Callable[[str], Mapping[str, str]]


class ReadModel(NamedTuple):
    projection: type[Projection[Any]]
    views: Mapping[str, type[SQLView]]  # backend ("sqlite" | "postgres") -> view class


READ_MODELS: dict[str, ReadModel] = {
    IntegrationListing.name: ReadModel(
        IntegrationListing, {"sqlite": SQLiteListingView, "postgres": PostgresListingView}
    ),
    Principals.name: ReadModel(Principals, {"sqlite": SQLitePrincipalsView, "postgres": PostgresPrincipalsView}),
    Connections.name: ReadModel(Connections, {"sqlite": SQLiteConnectionsView, "postgres": PostgresConnectionsView}),
}

_BACKENDS = {"eventsourcing.sqlite": "sqlite", "eventsourcing.postgres": "postgres"}


class GenerationConflict(RuntimeError):
    """The active generation changed under a rebuild (another rebuild flipped it)."""


def backend_of(env: Mapping[str, str], name: str) -> str:
    """``sqlite`` or ``postgres``, from ``<NAME>_PERSISTENCE_MODULE`` (or ``PERSISTENCE_MODULE``)."""
    module = Environment(name, dict(env)).get("PERSISTENCE_MODULE") or ""
    if module not in _BACKENDS:
        raise ValueError(f"{name.upper()}_PERSISTENCE_MODULE must be one of {', '.join(_BACKENDS)}, not {module!r}")
    return _BACKENDS[module]


def generation_name(read_model: str, generation: int) -> str:
    return f"{read_model}_g{generation}"


def view_class(read_model: str, env: Mapping[str, str], name: str | None = None) -> type[SQLView]:
    return READ_MODELS[read_model].views[backend_of(env, name or read_model)]


def construct_view(read_model: str, env: Mapping[str, str], name: str | None = None) -> Any:
    """The view of ``read_model`` stored under projection ``name`` (default: the read model's name)."""
    name = name or read_model
    factory = InfrastructureFactory.construct(Environment(name, dict(env)))
    return factory.tracking_recorder(view_class(read_model, env, name))


@cache
def projection_class(read_model: str, name: str) -> type[Projection[Any]]:
    """The read model's Projection under another name (a generation), for ``ProjectionRunner``."""
    base = READ_MODELS[read_model].projection
    if name == base.name:
        return base
    return type(f"{base.__name__}_{name}", (base,), {"name": name, "__module__": base.__module__})


# --- batched rebuild -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RebuildReport:
    events: int
    batches: int
    position: int | None
    seconds: float


def rebuild(app: Application[Any], view: Any, projection: Any, batch_size: int = 1000) -> RebuildReport:
    """Catch ``view`` up from its position to the head, ``batch_size`` events per transaction.

    ``projection`` (class or instance) gives the topics. Reset the view first to rebuild from zero.
    """
    began = time.perf_counter()
    position = view.max_tracking_id(app.name)
    events = batches = 0
    while True:
        # Every id up to the head read now is settled: ids are drawn under the event store's table
        # lock (SQLite: its single writer), so commit order is id order and no gap fills later.
        head = app.recorder.max_notification_id() or 0
        notifications = app.recorder.select_notifications(
            start=position or 0, limit=batch_size, topics=projection.topics, inclusive_of_start=False
        )
        if not notifications:
            if head > (position or 0):
                # None of the events since the last of ours is ours: start the runner at the head,
                # not at our last event (a read model with rare events would re-read the rest).
                view.advance(Tracking(app.name, head))
                position = head
            break
        view.apply_batch([(app.mapper.to_domain_event(n), Tracking(app.name, n.id)) for n in notifications])
        position = notifications[-1].id
        events += len(notifications)
        batches += 1
    return RebuildReport(events, batches, position, time.perf_counter() - began)


# --- generations -----------------------------------------------------------------------------------


class Generations(SQLView):
    """The active generation per read model, in its own store.

    Constructed like a view, under projection name ``integrations_projection`` by default: on
    PostgreSQL the table is ``integrations_projection_generations`` in the schema; on SQLite the
    table lives in the file the env names for that projection (its own file in the data dir).
    """

    NAME: ClassVar[str] = "integrations_projection"
    TABLES: ClassVar = {"generations": "read_model"}
    DDL: ClassVar = (
        "CREATE TABLE IF NOT EXISTS {generations} ("
        "read_model {key} PRIMARY KEY, generation INTEGER NOT NULL, updated_at {key} NOT NULL)",
    )

    @classmethod
    def open(cls, env: Mapping[str, str], name: str | None = None) -> Generations:
        name = name or cls.NAME
        view_cls = _PostgresGenerations if backend_of(env, name) == "postgres" else _SQLiteGenerations
        return InfrastructureFactory.construct(Environment(name, dict(env))).tracking_recorder(view_cls)

    def _apply_event(self, batch: Any, event: Any) -> None:
        raise TypeError("the generations table is not built from events")

    def active(self, read_model: str) -> int | None:
        row = self.query_one("SELECT generation FROM {generations} WHERE read_model = %s", (read_model,))
        return None if row is None else int(row["generation"])

    def all(self) -> dict[str, int]:
        return {r["read_model"]: int(r["generation"]) for r in self.query("SELECT * FROM {generations}")}

    def ensure(self, read_model: str, generation: int = 1) -> int:
        """The active generation, set to ``generation`` if there was none."""
        with self.datastore.transaction(commit=True) as cur:
            self.execute(
                cur,
                "INSERT INTO {generations} (read_model, generation, updated_at) VALUES (%s, %s, %s) "
                "ON CONFLICT (read_model) DO NOTHING",
                (read_model, generation, iso(datetime.now(UTC))),
            )
        found = self.active(read_model)
        assert found is not None
        return found

    def activate(self, read_model: str, generation: int, *, expected: int) -> bool:
        """Compare-and-set: make ``generation`` active if ``expected`` still is."""
        with self.datastore.transaction(commit=True) as cur:
            row = self.fetch_one(
                cur,
                "UPDATE {generations} SET generation = %s, updated_at = %s "
                "WHERE read_model = %s AND generation = %s RETURNING generation",
                (generation, iso(datetime.now(UTC)), read_model, expected),
            )
        return row is not None


class _PostgresGenerations(Generations, PostgresView):
    pass


class _SQLiteGenerations(Generations, SQLiteView):
    pass


def rebuild_blue_green(
    app: Application[Any],
    read_model: str,
    env_for: EnvFor,
    generations: Generations,
    *,
    batch_size: int = 1000,
    drop_old: bool = False,
) -> dict[str, Any]:
    """Build generation N+1 of ``read_model`` beside the live N, catch up, flip, maybe drop N.

    One rebuild per read model at a time (the operator's job). N keeps serving until readers see
    the flip; the supervisor's runner then follows N+1 from where the rebuild left it.
    """
    current = generations.ensure(read_model)
    new = current + 1
    name = generation_name(read_model, new)
    view = construct_view(read_model, env_for(name), name)
    try:
        view.reset(app.name)  # a leftover of a failed attempt starts clean
        report = rebuild(app, view, READ_MODELS[read_model].projection, batch_size)
        view.optimize()
        if not generations.activate(read_model, new, expected=current):
            raise GenerationConflict(f"{read_model}: generation {current} is no longer active")
    finally:
        view.close()
    log.info("%s: generation %d active (%d events in %.2fs)", read_model, new, report.events, report.seconds)
    if drop_old:
        drop_generation(read_model, current, env_for, generations)
    return {
        "read_model": read_model,
        "generation": new,
        "previous": current,
        "events": report.events,
        "position": report.position,
        "seconds": round(report.seconds, 3),
        "dropped_previous": drop_old,
    }


def drop_generation(read_model: str, generation: int, env_for: EnvFor, generations: Generations) -> None:
    """Drop an inactive generation's tables (on SQLite, its file)."""
    if generations.active(read_model) == generation:
        raise ValueError(f"{read_model}: generation {generation} is active")
    name = generation_name(read_model, generation)
    construct_view(read_model, env_for(name), name).drop()


# --- readers ---------------------------------------------------------------------------------------


class _Retired:
    """Views replaced by a new generation, closed after a grace period (requests may hold them)."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self._views: list[tuple[float, Any]] = []
        self._lock = threading.Lock()

    def add(self, view: Any) -> None:
        with self._lock:
            self._views.append((time.monotonic() + self.grace, view))

    def close_due(self, everything: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            due = [v for t, v in self._views if everything or t <= now]
            self._views = [(t, v) for t, v in self._views if not (everything or t <= now)]
        for view in due:
            _close_quietly(view)


class LiveView:
    """The active generation's view of one read model, for readers in any process.

    ``get()`` re-reads the pointer at most every ``poll_interval`` seconds and opens the new
    generation when it changed; the old view is closed ``grace`` seconds later.
    """

    def __init__(
        self,
        read_model: str,
        env_for: EnvFor,
        generations: Generations,
        *,
        poll_interval: float = 1.0,
        grace: float = 30.0,
    ) -> None:
        self.read_model = read_model
        self._env_for = env_for
        self._generations = generations
        self._poll_interval = poll_interval
        self._retired = _Retired(grace)
        self._lock = threading.Lock()
        self.generation = generations.ensure(read_model)
        self._view = self._open(self.generation)
        self._checked = time.monotonic()

    def _open(self, generation: int) -> Any:
        name = generation_name(self.read_model, generation)
        return construct_view(self.read_model, self._env_for(name), name)

    def get(self) -> Any:
        if time.monotonic() - self._checked >= self._poll_interval:
            self.refresh()
        return self._view

    def refresh(self) -> bool:
        """Check the pointer now; True if the view moved to another generation."""
        with self._lock:
            self._checked = time.monotonic()
            self._retired.close_due()
            active = self._generations.active(self.read_model)
            if active is None or active == self.generation:
                return False
            view = self._open(active)
            self._retired.add(self._view)
            self._view, self.generation = view, active
        log.info("%s: reading generation %d", self.read_model, active)
        return True

    def close(self) -> None:
        self._retired.close_due(everything=True)
        _close_quietly(self._view)


# --- supervision -----------------------------------------------------------------------------------

_FEED_BATCH = 1000


def _batches(source: Any, limit: int, gather: float = 0.0) -> Iterator[list[Any]]:
    """Block for the next notification, then add those already fetched, up to ``limit``.

    Batches start at most every ``gather`` seconds: after a quiet spell the first notification
    goes out at once, while under a stream of writes each batch waits for the rest of its
    ``gather`` window, so that what arrives meanwhile shares its transactions (group commit).
    """
    began = 0.0
    while True:
        try:
            first = next(source)
        except StopIteration:
            return
        pause = began + gather - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        began = time.monotonic()
        yield [first, *_fetched(source, limit - 1)]


def _fetched(source: Any, room: int) -> list[Any]:
    """Notifications the subscription has already selected, without waiting for more.

    eventsourcing 9.5.6's ``ListenNotifySubscription`` (PostgreSQL, and our SQLite polling one)
    keeps the rows of its current select in ``_notifications`` (read up to ``_notifications_index``)
    and later selects in ``_notifications_queue``; its ``__next__`` reads them the same way, and
    only the thread iterating calls it. Any other subscription gives batches of one.
    """
    if not all(hasattr(source, a) for a in ("_notifications", "_notifications_index", "_notifications_queue")):
        return []
    out: list[Any] = []
    while len(out) < room:
        rows, index = source._notifications, source._notifications_index
        if index < len(rows):
            taken = rows[index : index + room - len(out)]
            source._notifications_index = index + len(taken)
            out.extend(taken)
            continue
        try:
            source._notifications = source._notifications_queue.get_nowait()
        except (Empty, ShutDown):
            break
        source._notifications_queue.task_done()
        source._notifications_index = 0
    return out


class _GatheringPostgresSubscription(PostgresSubscription):
    """eventsourcing's LISTEN/NOTIFY subscription, pulling at most every ``gather`` seconds.

    Its pull thread selects new rows on each NOTIFY: one select per write. Waiting out the rest
    of ``gather`` first lets the NOTIFYs of a stream of writes share a select (the pull thread
    itself clears the flag and selects everything new), while a write after a quiet spell is
    pulled at once. Overrides ``_pull`` of eventsourcing 9.5.6 (pinned).
    """

    def __init__(self, recorder: PostgresApplicationRecorder, gt: int | None, gather: float) -> None:
        self._gather = gather  # before the base class starts the pull thread
        self._pulled = 0.0
        super().__init__(recorder=recorder, gt=gt)

    def _pull(self) -> None:
        pause = self._pulled + self._gather - time.monotonic()
        if pause > 0 and not self._has_been_stopped:
            time.sleep(pause)
        self._pulled = time.monotonic()
        super()._pull()


@dataclass
class _Worker:
    """One read model under the supervisor: its view, where it is in the log, its health."""

    read_model: str
    topics: tuple[str, ...] = ()
    wanted: frozenset[str] = frozenset()  # the topics, for a lookup per notification
    generation: int | None = None
    view: Any = None
    position: int | None = None  # every event up to here that is for the view has been applied
    passed: int = 0  # highest id known (from a look at the log) to need nothing more from it
    stored: int | None = None  # the position in the view's tracking table (as far as we know)
    stored_at: float = 0.0
    restarts: int = 0
    last_error: str | None = None
    retry_at: float | None = None  # failed: the feed leaves it alone, its own thread retries then
    backoff: float = 0.0
    failed_at: float = 0.0
    thread: threading.Thread | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)  # one writer of the view at a time
    wake: threading.Event = field(default_factory=threading.Event)  # its thread has work


class ProjectionSupervisor:
    """Keeps each read model's view (its active generation) up to date with the event log.

    For the in-server mode and for ``integrations projections run``. With ``generations`` it
    follows the active generation of each read model; without, it runs the read models under
    their own names. ``application_class`` is the Application subclass named "integrations".

    One *feed* thread reads the log for every read model: a single subscription to the
    application's recorder, not filtered by topic (on PostgreSQL a LISTEN connection and a pull
    thread; on SQLite polling plus in-process wake-ups). Each batch it delivers (what the
    subscription had selected by then, up to 1,000 notifications) is decoded once, and each view
    gets its events in one transaction whose tracking position is the batch's last notification
    (``SQLView.apply_batch``): exactly once, and a view also passes stretches of the log that
    hold nothing for it, so no read model re-selects a stretch of the log that grows with every
    write. Positions move in memory at once (``wait`` reads them) and are stored with every
    batch that has events for the view, else at most every ``persist_every`` seconds and at stop.
    Batches start at most every ``gather`` seconds (20 ms; on PostgreSQL the subscription's pulls
    too): a write after a quiet spell is applied at once, a stream of writes shares selects and
    transactions instead of paying for each (and its GIL time beside the request threads).
    ADR 0011 says why this replaced one eventsourcing ``ProjectionRunner`` per read model.

    Each read model also has a thread of its own. It opens the view, brings it up to the feed
    when it is behind (at start, after a failure, after a generation switch: it selects what the
    view missed), retries a failed view with exponential backoff, and follows generation
    switches. The feed never waits for it: a failing or lagging view does not hold up the others.
    ``wait`` and ``status`` read the event store through ``app`` (for example the server's own
    application) or through one the supervisor constructs.
    """

    def __init__(
        self,
        application_class: type[Application[Any]],
        env_for: EnvFor,
        *,
        read_models: Iterable[str] = tuple(READ_MODELS),
        generations: Generations | None = None,
        poll_interval: float = 1.0,
        min_backoff: float = 0.5,
        max_backoff: float = 30.0,
        grace: float = 30.0,
        app: Application[Any] | None = None,
        persist_every: float = 1.0,
        gather: float = 0.02,
    ) -> None:
        self.application_class = application_class
        self.gather = gather
        self._app = app
        self._own_app: Application[Any] | None = None
        self.app_name = application_class.name
        self._env_for = env_for
        self._generations = generations
        self.poll_interval = poll_interval
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.persist_every = persist_every
        self._workers = {
            name: _Worker(name, topics=tuple(topics), wanted=frozenset(topics))
            for name, topics in ((n, READ_MODELS[n].projection.topics) for n in read_models)
        }
        self._changed = threading.Condition()
        self._version = 0
        self._stopping = threading.Event()
        self._retired = _Retired(grace)
        self._delivered: int | None = None  # the feed has handed out every notification up to here
        self._subscription: Any = None
        self._feed_thread: threading.Thread | None = None
        self.feed_restarts = 0

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> ProjectionSupervisor:
        if self._app is None:
            self._app = self._own_app = self.application_class(dict(self._env_for(next(iter(self._workers)))))
        self._feed_thread = threading.Thread(target=self._feed, name="projection-feed", daemon=True)
        self._feed_thread.start()
        for worker in self._workers.values():
            worker.thread = threading.Thread(
                target=self._supervise, args=(worker,), name=f"projection-{worker.read_model}", daemon=True
            )
            worker.thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        with self._changed:
            subscription = self._subscription
        if subscription is not None:
            subscription.stop()
        for worker in self._workers.values():
            worker.wake.set()
        threads = [self._feed_thread, *(w.thread for w in self._workers.values())]
        for thread in threads:
            if thread is not None:
                thread.join(timeout)
        for worker in self._workers.values():
            if worker.view is not None:
                with worker.lock:
                    self._store_position(worker, due=True)
                _close_quietly(worker.view)
                worker.view = None
        self._retired.close_due(everything=True)
        if self._own_app is not None:
            self._own_app.close()
            self._app = self._own_app = None
        self._notify()

    def __enter__(self) -> ProjectionSupervisor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- queries ---------------------------------------------------------------------------------

    def positions(self) -> dict[str, int | None]:
        with self._changed:
            return {name: w.position for name, w in self._workers.items()}

    def view(self, read_model: str) -> Any:
        """The view the supervisor writes for ``read_model`` (None before it is opened)."""
        return self._workers[read_model].view

    def generation(self, read_model: str) -> int | None:
        return self._workers[read_model].generation

    def wait(self, position: int | None, timeout: float) -> bool:
        """True as soon as every view has passed notification ``position``; False on timeout.

        A view has passed it when it applied it, or when none of the events up to it are of its
        topics. Woken by each batch the views take, not by polling.
        """
        if position is None:
            return True
        deadline = time.monotonic() + timeout
        while True:
            with self._changed:
                version = self._version
            if all(self._has_passed(w, position) for w in self._workers.values()):
                return True
            with self._changed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                if self._version == version:
                    self._changed.wait(remaining)

    def _has_passed(self, worker: _Worker, position: int) -> bool:
        with self._changed:
            at = worker.position or 0
            if at >= position or worker.passed >= position:
                return True
            app = self._app
        if app is None:
            return False
        try:
            recorder = app.recorder
            if (recorder.max_notification_id() or 0) < position:
                return False  # not written yet
            # Up to ``passed`` it is known that none of its events are pending: start there, or a
            # read model that rarely gets events (principals) rescans a growing stretch of the log.
            pending = recorder.select_notifications(
                start=max(at, worker.passed), limit=1, stop=position, topics=worker.topics, inclusive_of_start=False
            )
        except Exception:  # the store is unreachable: not passed yet
            log.debug("projection %s: cannot check position %d", worker.read_model, position, exc_info=True)
            return False
        if pending:
            return False
        with self._changed:
            worker.passed = max(worker.passed, position)
        return True

    def lag(self, app: Application[Any], cap: int = 1000) -> dict[str, int]:
        """Per read model, how many of its events (up to ``cap``) it has not processed yet."""
        return {name: self._lag(app, w, cap) for name, w in self._workers.items()}

    @staticmethod
    def _lag(app: Application[Any], worker: _Worker, cap: int) -> int:
        at = max(worker.position or 0, worker.passed)
        head = app.recorder.max_notification_id()
        if head is None or head <= at:
            return 0
        pending = app.recorder.select_notifications(
            start=at, limit=cap, stop=head, topics=worker.topics, inclusive_of_start=False
        )
        return len(pending)

    def status(self, max_lag: int = 1000) -> dict[str, Any]:
        """Per read model: generation, position, lag, running, restarts, last error; and ``caught_up``."""
        report: dict[str, Any] = {}
        caught_up = True
        feeding = self._subscription is not None and not self._stopping.is_set()
        for name, worker in self._workers.items():
            running = feeding and worker.view is not None and worker.retry_at is None
            try:
                lag: int | None = None if self._app is None else self._lag(self._app, worker, max_lag + 1)
            except Exception:
                lag = None
            caught_up = caught_up and running and lag is not None and lag <= max_lag
            report[name] = {
                "generation": worker.generation,
                "position": worker.position,
                "lag": lag,
                "running": running,
                "restarts": worker.restarts,
                "last_error": worker.last_error,
            }
        report["caught_up"] = caught_up
        return report

    # --- the feed ----------------------------------------------------------------------------------

    def _feed(self) -> None:
        """Subscribe to the whole log and hand each batch to every view; resubscribe on failure."""
        backoff = self.min_backoff
        while not self._stopping.is_set():
            try:
                app = self._app
                assert app is not None
                start = self._delivered
                if start is None:
                    # The views catch up to here by themselves (their own threads select it).
                    start = app.recorder.max_notification_id() or 0
                recorder = app.recorder
                if isinstance(recorder, PostgresApplicationRecorder):
                    subscription = _GatheringPostgresSubscription(recorder, start, self.gather)
                    gather = 0.0  # the subscription gathers already
                else:
                    subscription = recorder.subscribe(gt=start)
                    gather = self.gather
                with self._changed:
                    self._subscription = subscription
                    self._delivered = start
                    self._version += 1
                    self._changed.notify_all()
                for worker in self._workers.values():
                    worker.wake.set()
                with subscription:
                    if self._stopping.is_set():
                        subscription.stop()  # stop() may have run before it was published
                    for notifications in _batches(subscription, _FEED_BATCH, gather):
                        self._dispatch(app, notifications)
                        backoff = self.min_backoff
            except Exception:
                if self._stopping.is_set():
                    break
                self.feed_restarts += 1
                log.exception("projection feed failed; resubscribing in %.1fs", backoff)
            finally:
                with self._changed:
                    self._subscription = None
            if not self._stopping.is_set():
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff)

    def _dispatch(self, app: Application[Any], notifications: list[Any]) -> None:
        with self._changed:
            previous = self._delivered or 0
        decoded: dict[int, Any] = {}  # each event decoded once, whichever views want it
        left: list[_Worker] = []  # for their own threads to bring up (they select what they miss)
        for worker in self._workers.values():
            if worker.view is None or worker.retry_at is not None:
                continue
            if not worker.lock.acquire(blocking=False):
                left.append(worker)  # its thread is busy with it
                continue
            try:
                if (worker.position or 0) < previous:
                    left.append(worker)  # behind the feed
                    continue
                self._apply(app, worker, notifications, decoded)
            except Exception as e:
                self._failed(worker, e)
            finally:
                worker.lock.release()
        with self._changed:
            self._delivered = notifications[-1].id
            self._version += 1
            self._changed.notify_all()
        for worker in left:  # after ``_delivered`` moved: they catch up to this batch too
            worker.wake.set()

    def _apply(self, app: Application[Any], worker: _Worker, notifications: list[Any], decoded: dict[int, Any]) -> None:
        """Hand ``worker`` its events among ``notifications`` (it has every one before them)."""
        position = worker.position or 0
        last = notifications[-1].id
        if last <= position:
            return
        items = []
        for n in notifications:
            if n.id > position and n.topic in worker.wanted:
                event = decoded.get(n.id)
                if event is None:
                    event = decoded[n.id] = app.mapper.to_domain_event(n)
                items.append((event, Tracking(self.app_name, n.id)))
        self._record(worker, items, last)

    def _record(self, worker: _Worker, items: list[Any], last: int) -> None:
        """Apply ``items`` and move the position to ``last`` (stored now if there were events)."""
        if items:
            # Only this supervisor writes the view, so it knows the stored position: the apply
            # checks it as it moves it, instead of reading and locking it first.
            worker.view.apply_batch(items, Tracking(self.app_name, last), expected=worker.stored)
            worker.stored, worker.stored_at = last, time.monotonic()
        self._processed(worker, last)
        self._store_position(worker, due=False)

    def _store_position(self, worker: _Worker, *, due: bool) -> None:
        """Store a position that moved past events of other read models only (under the lock)."""
        position = worker.position
        if position is None or (worker.stored or 0) >= position:
            return
        if not due and time.monotonic() - worker.stored_at < self.persist_every:
            return
        try:
            worker.view.advance(Tracking(self.app_name, position), expected=worker.stored)
        except Exception:  # only saves a restart from re-reading that stretch of the log
            log.debug("projection %s: could not store position %d", worker.read_model, position, exc_info=True)
            return
        worker.stored, worker.stored_at = position, time.monotonic()

    # --- each read model's own thread --------------------------------------------------------------

    def _notify(self) -> None:
        with self._changed:
            self._version += 1
            self._changed.notify_all()

    def _processed(self, worker: _Worker, notification_id: int | None) -> None:
        """The view has passed ``notification_id``: applied it, or it holds nothing for the view."""
        with self._changed:
            worker.position = notification_id
            self._version += 1
            self._changed.notify_all()

    def _supervise(self, worker: _Worker) -> None:
        while not self._stopping.is_set():
            try:
                self._follow_generation(worker)
                if worker.retry_at is None or time.monotonic() >= worker.retry_at:
                    self._catch_up(worker)
                    if worker.retry_at is not None:
                        log.info("projection %s is running again", worker.read_model)
                        worker.retry_at = None
                with worker.lock:
                    if worker.view is not None:
                        self._store_position(worker, due=False)
            except Exception as e:
                self._failed(worker, e)
            timeout = self.poll_interval
            if worker.retry_at is not None:
                timeout = min(timeout, max(0.0, worker.retry_at - time.monotonic()))
            worker.wake.wait(timeout)
            worker.wake.clear()

    def _follow_generation(self, worker: _Worker) -> None:
        """Open the view of the active generation if it is not the one open (at start, on a flip)."""
        if self._generations is None:
            generation = None
        elif worker.view is None:
            generation = self._generations.ensure(worker.read_model)
        else:
            generation = self._generations.active(worker.read_model)
        if worker.view is not None and generation == worker.generation:
            return
        name = worker.read_model if generation is None else generation_name(worker.read_model, generation)
        view = construct_view(worker.read_model, self._env_for(name), name)
        position = view.max_tracking_id(self.app_name)
        with worker.lock:
            old = worker.view
            with self._changed:
                worker.view, worker.generation = view, generation
                worker.stored, worker.stored_at = position, time.monotonic()
                worker.position, worker.passed = position, 0
                self._version += 1
                self._changed.notify_all()
        if old is not None:
            self._retired.add(old)
            log.info("%s: following generation %s", worker.read_model, generation)
        self._retired.close_due()

    def _catch_up(self, worker: _Worker) -> None:
        """Bring the view up to what the feed has delivered, selecting its events from the log."""
        app = self._app
        while app is not None and not self._stopping.is_set():
            with self._changed:
                target = self._delivered
            with worker.lock:
                position = worker.position or 0
                if target is None or position >= target:
                    return
                # Every id up to ``target`` is settled (the feed has seen it, or it was the head).
                notifications = app.recorder.select_notifications(
                    start=position, limit=_FEED_BATCH, stop=target, topics=worker.topics, inclusive_of_start=False
                )
                end = notifications[-1].id if len(notifications) == _FEED_BATCH else target
                items = [(app.mapper.to_domain_event(n), Tracking(self.app_name, n.id)) for n in notifications]
                self._record(worker, items, end)

    def _failed(self, worker: _Worker, error: Exception) -> None:
        now = time.monotonic()
        if now - worker.failed_at > self.max_backoff:
            worker.backoff = 0.0  # it ran well for a while: start the backoff afresh
        worker.backoff = min(max(worker.backoff * 2, self.min_backoff), self.max_backoff)
        worker.failed_at, worker.retry_at = now, now + worker.backoff
        worker.restarts += 1
        worker.last_error = f"{type(error).__name__}: {error}"
        log.error("projection %s failed", worker.read_model, exc_info=error)
        log.warning("restarting projection %s in %.1fs", worker.read_model, worker.backoff)
        worker.wake.set()
        self._notify()


def _close_quietly(view: Any) -> None:
    try:
        view.close()
    except Exception:
        log.debug("closing a view failed", exc_info=True)

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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from typing import Any, ClassVar, NamedTuple

from eventsourcing.application import Application
from eventsourcing.persistence import InfrastructureFactory, Tracking
from eventsourcing.projection import BaseProjectionRunner, Projection, ProjectionRunner
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
        notifications = app.recorder.select_notifications(
            start=position or 0, limit=batch_size, topics=projection.topics, inclusive_of_start=False
        )
        if not notifications:
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


class _Runner(ProjectionRunner[Any, Any]):
    """A ``ProjectionRunner`` over a view the supervisor keeps across restarts (one pool each)."""

    def __init__(self, *, application_class: type[Any], projection: Projection[Any], env: Mapping[str, str]):
        self.view = projection.view
        self.projection = projection
        BaseProjectionRunner.__init__(
            self,
            projection=projection,
            application_class=application_class,
            tracking_recorder=projection.view,
            topics=projection.topics,
            env=dict(env),
        )


@dataclass
class _Worker:
    read_model: str
    generation: int | None = None
    view: Any = None
    runner: _Runner | None = None
    thread: threading.Thread | None = None
    position: int | None = None
    passed: int = 0  # highest id known to need nothing more from this runner
    restarts: int = 0
    last_error: str | None = None
    topics: Sequence[str] = field(default_factory=tuple)


class ProjectionSupervisor:
    """One ``ProjectionRunner`` per read model, each in a thread, restarted with backoff.

    For the in-server mode (SQLite) and for ``integrations projections run``. With ``generations``
    it follows the active generation of each read model; without, it runs the read models under
    their own names. ``application_class`` is the Application subclass named "integrations".
    ``wait`` and ``status`` read the event store through ``app`` (for example the server's own
    application), or through one the supervisor constructs; never through a runner's, which a
    restart may be closing at that moment.
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
    ) -> None:
        self.application_class = application_class
        self._app = app
        self._own_app: Application[Any] | None = None
        self.app_name = application_class.name
        self._env_for = env_for
        self._generations = generations
        self.poll_interval = poll_interval
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self._workers = {name: _Worker(name, topics=READ_MODELS[name].projection.topics) for name in read_models}
        self._changed = threading.Condition()
        self._version = 0
        self._stopping = threading.Event()
        self._retired = _Retired(grace)

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> ProjectionSupervisor:
        if self._app is None:
            self._app = self._own_app = self.application_class(dict(self._env_for(next(iter(self._workers)))))
        for worker in self._workers.values():
            worker.thread = threading.Thread(
                target=self._supervise, args=(worker,), name=f"projection-{worker.read_model}", daemon=True
            )
            worker.thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        for worker in self._workers.values():
            if worker.runner is not None:
                worker.runner.stop()
        for worker in self._workers.values():
            if worker.thread is not None:
                worker.thread.join(timeout)
        for worker in self._workers.values():
            if worker.view is not None:
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
        """The view the runner of ``read_model`` writes (None before the first start)."""
        return self._workers[read_model].view

    def generation(self, read_model: str) -> int | None:
        return self._workers[read_model].generation

    def wait(self, position: int | None, timeout: float) -> bool:
        """True as soon as every runner has passed notification ``position``; False on timeout.

        A runner has passed it when it processed it, or when none of the events up to it are of
        its topics. Woken by each processed event, not by polling.
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
        for name, worker in self._workers.items():
            runner = worker.runner
            running = runner is not None and not runner.is_interrupted.is_set()
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

    # --- the worker loop ---------------------------------------------------------------------------

    def _notify(self) -> None:
        with self._changed:
            self._version += 1
            self._changed.notify_all()

    def _processed(self, worker: _Worker, notification_id: int) -> None:
        with self._changed:
            worker.position = notification_id
            self._version += 1
            self._changed.notify_all()

    def _name(self, worker: _Worker) -> str:
        generation = worker.generation
        return worker.read_model if generation is None else generation_name(worker.read_model, generation)

    def _open(self, worker: _Worker) -> None:
        """Start a runner on the active generation (a new view only when the generation moved)."""
        generation = None if self._generations is None else self._generations.ensure(worker.read_model)
        if worker.view is None or generation != worker.generation:
            old = worker.view
            with self._changed:
                worker.generation = generation
                worker.view = construct_view(worker.read_model, self._env_for(self._name(worker)), self._name(worker))
                worker.passed = 0
            if old is not None:
                self._retired.add(old)
        projection = READ_MODELS[worker.read_model].projection(view=worker.view)
        projection.process_event = _notifying(projection.process_event, lambda n: self._processed(worker, n))
        runner = _Runner(
            application_class=self.application_class, projection=projection, env=self._env_for(self._name(worker))
        )
        runner.__enter__()
        with self._changed:
            worker.runner = runner
            worker.position = worker.view.max_tracking_id(self.app_name)
            self._version += 1
            self._changed.notify_all()

    def _supervise(self, worker: _Worker) -> None:
        backoff = self.min_backoff
        while not self._stopping.is_set():
            started = time.monotonic()
            failed = False
            try:
                self._open(worker)
                failed = self._follow(worker)
            except Exception as e:
                failed = True
                worker.last_error = f"{type(e).__name__}: {e}"
                log.exception("projection %s failed", worker.read_model)
            finally:
                self._close_runner(worker)
                self._retired.close_due()
            if failed and not self._stopping.is_set():
                worker.restarts += 1
                if time.monotonic() - started > self.max_backoff:
                    backoff = self.min_backoff  # it ran well for a while: start the backoff afresh
                log.warning("restarting projection %s in %.1fs", worker.read_model, backoff)
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff)

    def _follow(self, worker: _Worker) -> bool:
        """Run until stopped (False), the generation moved (False), or the runner failed (raises)."""
        runner = worker.runner
        assert runner is not None
        while not self._stopping.is_set():
            runner.run_forever(timeout=self.poll_interval)  # re-raises the projection's error
            if runner.is_interrupted.is_set():
                return not self._stopping.is_set()  # ended without an error nor a stop: restart
            self._retired.close_due()
            active = None if self._generations is None else self._generations.active(worker.read_model)
            if active != worker.generation:
                log.info("%s: following generation %s", worker.read_model, active)
                return False
        return False

    def _close_runner(self, worker: _Worker) -> None:
        runner = worker.runner
        if runner is None:
            return
        with self._changed:
            worker.runner = None
        try:
            runner.__exit__(None, None, None)
        except Exception:
            log.exception("projection %s: error while stopping its runner", worker.read_model)
        self._notify()


def _notifying(process_event: Callable[[Any, Tracking], None], processed: Callable[[int], None]) -> Any:
    def process(domain_event: Any, tracking: Tracking) -> None:
        process_event(domain_event, tracking)
        processed(tracking.notification_id)

    return process


def _close_quietly(view: Any) -> None:
    try:
        view.close()
    except Exception:
        log.debug("closing a view failed", exc_info=True)

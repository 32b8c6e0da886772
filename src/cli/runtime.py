"""The composition root: builds every adapter from :class:`Settings` and hands the API a
:class:`~api.services.Services`. Also the operator commands' implementations.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from typing import Any
from uuid import UUID

import httpx

from api.background import run_refresher
from api.services import ApiConfig, ProxyConfig, Services
from commands.connections import ConnectionPolicy, Connections
from commands.service import IntegrationsApp
from domain.access import Actor, is_team, team_id_of
from domain.audit import SYSTEM_ACTOR
from domain.principals import team_aggregate_id, user_aggregate_id
from domain.urls import UrlPolicy
from infrastructure.egress import EgressDenied, EgressPolicy
from infrastructure.keyring import load_keyring
from infrastructure.locks import FileRefreshLocks, PostgresRefreshLocks
from infrastructure.oauth_provider import HttpOAuthProvider
from infrastructure.passwords import ScryptHasher
from infrastructure.persistence import APP_NAME, application_env, projection_env
from infrastructure.settings import Settings, SettingsError
from infrastructure.upstream_http import GuardedUpstream
from infrastructure.vault import EnvelopeVault, open_vault
from projections.runtime import (
    READ_MODELS,
    Generations,
    LiveView,
    ProjectionSupervisor,
    rebuild_blue_green,
)

log = logging.getLogger("integrations")


class _Current:
    """Delegates to the active generation of a read model (blue/green switches are picked up)."""

    def __init__(self, live: LiveView) -> None:
        self._live = live

    def __getattr__(self, name: str) -> Any:
        return getattr(self._live.get(), name)


class _ServingApp(IntegrationsApp):
    """The server's application: calls ``on_saved`` after every save made in this process (the
    API's proxy cache is invalidated there, so a change applies to the very next request)."""

    # eventsourcing names a subclass after itself unless told: the name is the INTEGRATIONS_* env
    # prefix and the table prefix, so without this the server's store fell back to in-memory POPO.
    name = IntegrationsApp.name

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_saved: list[Callable[[], None]] = []

    def _notify(self, recordings: list[Any]) -> None:
        super()._notify(recordings)
        for callback in self.on_saved:
            callback()


class _PollingWaiter:
    """Read-your-writes when the projections run in other processes: poll the views' positions."""

    def __init__(self, app: IntegrationsApp, views: dict[str, LiveView], max_lag: int) -> None:
        self._app = app
        self._views = views
        self._max_lag = max_lag

    def _passed(self, name: str, position: int) -> bool:
        at = self._views[name].get().max_tracking_id(APP_NAME) or 0
        if at >= position:
            return True
        topics = READ_MODELS[name].projection.topics
        return not self._app.recorder.select_notifications(
            start=at, limit=1, stop=position, topics=topics, inclusive_of_start=False
        )

    def wait(self, position: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        delay = 0.005
        while True:
            if all(self._passed(name, position) for name in self._views):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def status(self) -> dict[str, Any]:
        head = self._app.recorder.max_notification_id() or 0
        report: dict[str, Any] = {}
        caught_up = True
        for name, live in self._views.items():
            at = live.get().max_tracking_id(APP_NAME) or 0
            pending = (
                self._app.recorder.select_notifications(
                    start=at,
                    limit=self._max_lag + 1,
                    stop=head,
                    topics=READ_MODELS[name].projection.topics,
                    inclusive_of_start=False,
                )
                if head > at
                else []
            )
            caught_up = caught_up and len(pending) <= self._max_lag
            report[name] = {"generation": live.generation, "position": at, "lag": len(pending), "running": None}
        report["caught_up"] = caught_up
        return report


class _SupervisorWaiter:
    def __init__(self, supervisor: ProjectionSupervisor, max_lag: int) -> None:
        self._supervisor = supervisor
        self._max_lag = max_lag

    def wait(self, position: int, timeout: float) -> bool:
        return self._supervisor.wait(position, timeout)

    def status(self) -> dict[str, Any]:
        report = self._supervisor.status(self._max_lag)
        for name, item in report.items():
            if isinstance(item, dict) and item.get("last_error"):
                # /ready is public: say that a runner failed, not what the exception said
                item["last_error"] = str(item["last_error"]).split(":", 1)[0]
            report[name] = item
        return report


@dataclass
class Runtime:
    settings: Settings
    app: IntegrationsApp
    vault: EnvelopeVault
    generations: Generations
    views: dict[str, LiveView]
    supervisor: ProjectionSupervisor | None
    services: Services = field(init=False)
    _closed: bool = False

    def start(self) -> None:
        if self.supervisor is not None:
            self.supervisor.start()
        if self.settings.admin_token:
            position = self.app.ensure_admin(self.settings.admin_token)
            if position is not None and not self.services.waiter.wait(position, 30.0):
                log.warning("the principals read model did not catch up with the admin bootstrap in 30 s")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.supervisor is not None:
            self.supervisor.stop()
        for live in self.views.values():
            live.close()
        self.generations.close()
        self.app.close()
        self.vault.close()

    def ready_check(self) -> dict[str, Any]:
        head = self.app.recorder.max_notification_id()
        return {"store": "ok", "backend": self.settings.backend, "position": head}


def _check_keys(settings: Settings) -> None:
    if settings.postgres is not None and not settings.master_keys:
        # A key file per host would split a shared database's secrets between hosts.
        raise SettingsError(
            "INTEGRATIONS_MASTER_KEY is required with PostgreSQL (generate one: integrations keys generate)"
        )


@contextmanager
def _creating_tables(settings: Settings) -> Iterator[None]:
    """One process at a time creates the tables. On a fresh PostgreSQL schema, a server and a
    projection worker started together raced on ``CREATE TABLE IF NOT EXISTS`` (a unique violation
    in ``pg_type``) and one of them died. SQLite serialises DDL itself."""
    if settings.postgres is None:
        yield
        return
    import psycopg

    with psycopg.connect(settings.postgres.conninfo(), autocommit=True, connect_timeout=10) as conn:
        conn.execute("SELECT pg_advisory_lock(hashtext(%s))", (f"integrations-ddl:{settings.postgres.schema}",))
        yield  # closing the connection releases the lock


def build_runtime(settings: Settings, *, inline_projections: bool | None = None) -> Runtime:
    """Everything the server needs. Projections run inline unless configured as external."""
    _check_keys(settings)
    keyring = load_keyring(settings)
    env_for = partial(projection_env, settings)
    with _creating_tables(settings):
        vault = open_vault(settings, keyring)
        app = _ServingApp(
            application_env(settings),
            vault=vault,
            hasher=ScryptHasher(),
            url_policy=UrlPolicy(settings.allow_http_hosts),
            session_ttl=timedelta(seconds=settings.session_ttl_seconds),
        )
        generations = Generations.open(env_for(Generations.NAME))
        views = {name: LiveView(name, env_for, generations) for name in READ_MODELS}
    inline = settings.projections == "inline" if inline_projections is None else inline_projections
    supervisor = ProjectionSupervisor(IntegrationsApp, env_for, generations=generations, app=app) if inline else None
    runtime = Runtime(settings, app, vault, generations, views, supervisor)
    waiter: Any = (
        _SupervisorWaiter(supervisor, settings.ready_max_lag)
        if supervisor is not None
        else _PollingWaiter(app, views, settings.ready_max_lag)
    )
    runtime.services = Services(
        app=app,
        listing=_Current(views["listing"]) if "listing" in views else None,
        principals=_Current(views["principals"]) if "principals" in views else None,
        waiter=waiter,
        config=ApiConfig(
            public_url=settings.public_url,
            tenant_id=settings.tenant_id,
            read_your_writes_timeout=settings.read_your_writes_timeout,
            max_body_bytes=settings.max_body_bytes,
            session_ttl_seconds=settings.session_ttl_seconds,
            ready_max_lag=settings.ready_max_lag,
            auth_cache_seconds=settings.auth_cache_seconds,
        ),
        on_start=runtime.start,
        on_stop=runtime.close,
        ready_check=runtime.ready_check,
    )
    runtime.services.auth_cache.ttl = settings.auth_cache_seconds
    runtime.services.proxy_cache.ttl = settings.auth_cache_seconds
    app.on_saved.append(runtime.services.proxy_cache.invalidate)
    _wire_connections(settings, runtime)
    _wire_proxy(settings, runtime)
    return runtime


def _wire_connections(settings: Settings, runtime: Runtime) -> None:
    """The connection service: the OAuth client behind the egress guard and the refresh locks."""
    locks: Any = (
        PostgresRefreshLocks(settings.postgres.conninfo())
        if settings.postgres is not None
        else FileRefreshLocks(settings.data_dir / "locks")
    )
    policy = ConnectionPolicy(
        redirect_uri=f"{settings.public_url}/oauth2/callback",
        return_origins=settings.return_origins,
        refresh_margin=timedelta(seconds=settings.refresh_margin_seconds),
    )
    oauth = HttpOAuthProvider(EgressPolicy.parse(settings.egress_allow))
    services = runtime.services
    services.connections = Connections(runtime.app, oauth, locks, policy)
    services.connections_view = _Current(runtime.views["connections"]) if "connections" in runtime.views else None
    if settings.refresher_interval_seconds > 0 and services.connections_view is not None:
        services.background.append(
            partial(
                run_refresher,
                services,
                interval=settings.refresher_interval_seconds,
                margin=timedelta(seconds=settings.refresher_margin_seconds),
            )
        )


def _wire_proxy(settings: Settings, runtime: Runtime) -> None:
    """The request proxy's upstream client: egress-guarded, no env proxies, no redirects, no
    cookies, a pool sized for many concurrent calls; the overall deadline is the proxy's own (PX-9).
    Our own HTTP/1.1 client on this path, not httpx's pool: see ``infrastructure.upstream_http``."""

    # httpx logs every request's full URL at INFO: an API key in the query would land in the log
    # (PX-10), and a line per proxied call costs on the hot path (performance notes).
    logging.getLogger("httpx").setLevel(logging.WARNING)
    deadline = settings.proxy_deadline_seconds
    services = runtime.services
    services.upstream = GuardedUpstream(
        EgressPolicy.parse(settings.egress_allow),
        httpx.Timeout(
            deadline, connect=settings.proxy_connect_timeout_seconds, pool=settings.proxy_connect_timeout_seconds
        ),
        limits=httpx.Limits(max_connections=1000, max_keepalive_connections=200, keepalive_expiry=30.0),
    )
    services.upstream_refusals = (EgressDenied,)
    services.proxy = ProxyConfig(
        deadline_seconds=deadline,
        max_concurrency=settings.proxy_max_concurrency,
        max_response_bytes=settings.proxy_max_response_bytes,
        max_concurrency_per_user=settings.proxy_max_concurrency_per_user,
    )


# ---------------------------------------------------------------------------------- operator commands


@contextmanager
def _offline(settings: Settings) -> Iterator[IntegrationsApp]:
    """The application with its vault, for one operator command; both closed afterwards."""
    _check_keys(settings)
    keyring = load_keyring(settings)
    with _creating_tables(settings):
        vault = open_vault(settings, keyring)
        app = IntegrationsApp(application_env(settings), vault=vault, hasher=ScryptHasher())
    try:
        yield app
    finally:
        app.close()
        vault.close()


def projection_status(settings: Settings) -> dict[str, Any]:
    with _offline(settings) as app:
        env_for = partial(projection_env, settings)
        generations = Generations.open(env_for(Generations.NAME))
        views = {name: LiveView(name, env_for, generations) for name in READ_MODELS}
        try:
            report = _PollingWaiter(app, views, settings.ready_max_lag).status()
            report["head"] = app.recorder.max_notification_id()
            return report
        finally:
            for v in views.values():
                v.close()
            generations.close()


def rebuild_projections(settings: Settings, name: str | None, *, drop_old: bool) -> list[dict[str, Any]]:
    names = [name] if name else list(READ_MODELS)
    unknown = [n for n in names if n not in READ_MODELS]
    if unknown:
        raise SettingsError(f"unknown read model {unknown[0]!r}; known: {', '.join(READ_MODELS)}")
    with _offline(settings) as app:
        env_for = partial(projection_env, settings)
        generations = Generations.open(env_for(Generations.NAME))
        try:
            return [rebuild_blue_green(app, n, env_for, generations, drop_old=drop_old) for n in names]
        finally:
            generations.close()


def run_projection_workers(settings: Settings, name: str | None, stop: threading.Event) -> None:
    env_for = partial(projection_env, settings)
    names = [name] if name else list(READ_MODELS)
    with _creating_tables(settings):
        IntegrationsApp(application_env(settings)).close()  # creates the event store's tables if missing
        generations = Generations.open(env_for(Generations.NAME))
        for read_model in names:
            LiveView(read_model, env_for, generations).close()  # and the active generations' views
    supervisor = ProjectionSupervisor(IntegrationsApp, env_for, read_models=names, generations=generations)
    supervisor.start()
    log.info("projection workers running: %s", ", ".join(names))
    try:
        while not stop.wait(5.0):
            pass
    finally:
        supervisor.stop()
        generations.close()


def _resolve_history_id(app: IntegrationsApp, ident: str) -> UUID:
    try:
        return UUID(ident)
    except ValueError:
        pass
    if ident.startswith("user:"):
        return user_aggregate_id(ident.removeprefix("user:"))
    if is_team(ident) and ":" not in team_id_of(ident):
        return team_aggregate_id(team_id_of(ident))
    owner, _, slug = ident.rpartition(":")
    found = app.find_integration_id(owner, slug) if owner else None
    if found is None:
        raise SettingsError(f"nothing found for {ident!r} (give a UUID, ownerId:slug, user:<id> or team:<id>)")
    return found


def _event_json(e: Any) -> dict[str, Any]:
    from api.render import event

    return event(e)


def history(settings: Settings, ident: str) -> Iterator[dict[str, Any]]:
    with _offline(settings) as app:
        yield from (_event_json(e) for e in app.history(_resolve_history_id(app, ident)))


def export_events(settings: Settings, *, after: int = 0, limit: int | None = None) -> Iterator[str]:
    """The whole notification log as NDJSON, in order (no secrets: events hold references only)."""
    with _offline(settings) as app:
        start, sent = after, 0
        while limit is None or sent < limit:
            batch = app.recorder.select_notifications(
                start=start, limit=min(500, (limit - sent) if limit else 500), inclusive_of_start=False
            )
            if not batch:
                break
            for n in batch:
                e = app.mapper.to_domain_event(n)
                entry = {"position": n.id, "originatorId": str(n.originator_id), **_event_json(e)}
                yield json.dumps(entry, default=str)
            sent += len(batch)
            start = batch[-1].id


def replay(settings: Settings) -> dict[str, Any]:
    """Re-fold every aggregate from its events (a consistency check of the whole history)."""
    with _offline(settings) as app:
        started = time.perf_counter()
        ids: set[Any] = set()
        events = 0
        start = 0
        while batch := app.recorder.select_notifications(start=start, limit=1000, inclusive_of_start=False):
            events += len(batch)
            ids.update(n.originator_id for n in batch)
            start = batch[-1].id
        kinds: dict[str, int] = {}
        for aggregate_id in ids:
            aggregate = app.repository.get(aggregate_id)
            kinds[type(aggregate).__name__] = kinds.get(type(aggregate).__name__, 0) + 1
        return {"events": events, "aggregates": kinds, "seconds": round(time.perf_counter() - started, 3)}


def rotate_keys(settings: Settings) -> dict[str, Any]:
    _check_keys(settings)
    with open_vault(settings, load_keyring(settings)) as vault:
        rewrapped = vault.rewrap()
        return {"rewrapped": rewrapped, "keys": vault.key_usage()}


def key_status(settings: Settings) -> dict[str, Any]:
    _check_keys(settings)
    keyring = load_keyring(settings)
    with open_vault(settings, keyring) as vault:
        return {"active": keyring.active_kid, "configured": list(keyring.kids), "data_keys": vault.key_usage()}


def bootstrap_admin(settings: Settings, token: str) -> None:
    with _offline(settings) as app:
        app.ensure_admin(token)


def issue_token(settings: Settings, user_id: str, label: str) -> str:
    with _offline(settings) as app:
        system = Actor(id=SYSTEM_ACTOR, superuser=True)
        return app.issue_token(system, user_id, label).value.token

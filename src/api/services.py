"""What the controllers use: the command application, the read models and read-your-writes."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from commands.service import IntegrationsApp

T = TypeVar("T")


class PositionWaiter(Protocol):
    def wait(self, position: int, timeout: float) -> bool:
        """True once every read model has processed notification ``position``."""
        ...

    def status(self) -> dict[str, Any]:
        """Per read model: position, lag, running; plus ``caught_up`` overall."""
        ...


@dataclass(frozen=True)
class ApiConfig:
    public_url: str = "http://127.0.0.1:8000"
    tenant_id: str = "default"
    read_your_writes_timeout: float = 5.0
    max_body_bytes: int = 1_000_000
    session_ttl_seconds: int = 8 * 3600
    ready_max_lag: int = 1000
    auth_cache_seconds: float = 2.0

    @property
    def secure_cookies(self) -> bool:
        return self.public_url.startswith("https://")


@dataclass(frozen=True)
class ProxyConfig:
    """Limits of the request proxy (security note PX-9); per-integration settings may lower them."""

    deadline_seconds: float = 30.0  # the whole call: credentials, connect, headers and body
    max_concurrency: int = 64  # in-flight proxied calls per integration (process-wide bulkhead)
    # In-flight proxied calls per caller, across integrations, in this process: one user can fill
    # one integration's bulkhead but not take every integration's at once.
    max_concurrency_per_user: int = 128
    max_response_bytes: int = 0  # 0: no cap
    replay_buffer_bytes: int = 1_000_000  # bodies up to this size are buffered so a 401 can be replayed


@dataclass
class Services:
    """Built by the composition root (``cli.runtime``); the API never constructs stores itself.

    ``listing`` and ``principals`` are read through attributes on every request, so a blue/green
    rebuild can swap in a new generation of a view while the server runs.
    """

    app: IntegrationsApp
    listing: Any  # projections.listing.IntegrationListingView
    principals: Any  # projections.principals.PrincipalsView
    waiter: PositionWaiter
    config: ApiConfig = field(default_factory=ApiConfig)
    on_start: Callable[[], None] = lambda: None
    on_stop: Callable[[], None] = lambda: None
    ready_check: Callable[[], dict[str, Any]] = lambda: {"store": "ok"}
    writes: ReadYourWrites = field(default_factory=lambda: ReadYourWrites())
    auth_cache: AuthCache = field(default_factory=lambda: AuthCache())
    connections: Any = None  # commands.connections.Connections (None: connections not wired)
    connections_view: Any = None  # projections.connections.ConnectionsView
    background: list[Callable[[], Awaitable[None]]] = field(default_factory=list)  # run while serving
    loop: asyncio.AbstractEventLoop | None = None  # the server's event loop, set by the lifespan
    # Freeze the heap after startup (``gc.freeze``): for a serving process, not for tests' apps.
    freeze_heap_after_start: bool = False

    def run_async(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the server's loop from a sync handler's worker thread, and wait."""
        if self.loop is None:
            coro.close()
            raise RuntimeError("the server's event loop is not running")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    upstream: Any = None  # httpx.AsyncClient behind the egress guard (None: the proxy is not wired)
    upstream_refusals: tuple[type[BaseException], ...] = ()  # the client's egress-refusal exceptions
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    bulkhead: Bulkhead = field(default_factory=lambda: Bulkhead())
    proxy_cache: ProxyCache = field(default_factory=lambda: ProxyCache())


class Bulkhead:
    """In-flight proxied calls per key (an integration's UUID, a caller's id), in this process
    (one event loop: no lock needed). Over the cap a call is refused at once rather than queued:
    a slow upstream must not pile up."""

    def __init__(self) -> None:
        self._active: dict[Any, int] = {}

    def enter(self, key: Any, cap: int) -> bool:
        if self._active.get(key, 0) >= cap:
            return False
        self._active[key] = self._active.get(key, 0) + 1
        return True

    def leave(self, key: Any) -> None:
        left = self._active.get(key, 1) - 1
        if left <= 0:
            self._active.pop(key, None)
        else:
            self._active[key] = left

    def active(self, key: Any) -> int:
        return self._active.get(key, 0)


class ReadYourWrites:
    """The last position each principal wrote, so its next read can wait for the projections.

    Process-local by design; across processes a client passes the ``X-Event-Position`` it got
    from a write back as ``X-Wait-For-Position`` on the read.
    """

    def __init__(self, capacity: int = 100_000) -> None:
        self._positions: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()
        self._capacity = capacity

    def record(self, principal_id: str, position: int | None) -> None:
        if position is None:
            return
        with self._lock:
            self._positions[principal_id] = max(position, self._positions.get(principal_id, 0))
            self._positions.move_to_end(principal_id)
            while len(self._positions) > self._capacity:
                self._positions.popitem(last=False)

    def last(self, principal_id: str) -> int | None:
        with self._lock:
            return self._positions.get(principal_id)


class AuthCache:
    """Token hash -> what authentication made of the principals row (``api.auth``), for a few
    seconds (``INTEGRATIONS_AUTH_CACHE_SECONDS``).

    Saves a read-model query on every request. Identity writes in this process clear it at
    once; in another process a revoked token or a changed membership takes effect within the
    TTL. A TTL of 0 turns it off.
    """

    def __init__(self, ttl: float = 2.0, capacity: int = 10_000) -> None:
        self.ttl = ttl
        self._rows: OrderedDict[str, tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self._capacity = capacity

    def get(self, token_hash: str) -> Any:
        if self.ttl <= 0:
            return None
        with self._lock:
            hit = self._rows.get(token_hash)
            if hit is None or hit[0] < time.monotonic():
                self._rows.pop(token_hash, None)
                return None
            return hit[1]

    def put(self, token_hash: str, entry: Any) -> None:
        if self.ttl <= 0:
            return
        with self._lock:
            self._rows[token_hash] = (time.monotonic() + self.ttl, entry)
            self._rows.move_to_end(token_hash)
            while len(self._rows) > self._capacity:
                self._rows.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._rows.clear()


class ProxyCache:
    """What a proxied call would otherwise read from the stores on every request, for a few
    seconds (``INTEGRATIONS_AUTH_CACHE_SECONDS``, as the auth cache): the Integration aggregate by
    id (the caller's access level is still computed on it for every request) and the credentials
    to inject per (integration, version, connection owner).

    Every save of the application in this process invalidates the whole cache at once (the
    composition root hooks the application's saves), so a share revoked, a key rotated or a
    connection changed here applies to the next request. A change made by another process (a
    second worker, ``integrations keys rotate``) applies within the TTL, as for the auth cache.
    Failures (not found, not connected) are never cached. A TTL of 0 turns it off.
    """

    def __init__(self, ttl: float = 2.0, capacity: int = 10_000) -> None:
        self.ttl = ttl
        self._rows: OrderedDict[Any, tuple[float, int, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self._capacity = capacity
        self._generation = 0
        self._pending: dict[Any, asyncio.Future[Any]] = {}

    @property
    def generation(self) -> int:
        """Take it *before* loading a value and pass it to :meth:`put`: a save that lands while
        the value loads then keeps the (possibly stale) value out of the cache."""
        return self._generation

    def get(self, key: Any) -> Any | None:
        if self.ttl <= 0:
            return None
        with self._lock:
            hit = self._rows.get(key)
            if hit is None:
                return None
            if hit[0] < time.monotonic() or hit[1] != self._generation:
                del self._rows[key]
                return None
            return hit[2]

    def put(self, key: Any, value: Any, generation: int) -> None:
        if self.ttl <= 0:
            return
        with self._lock:
            if generation != self._generation:
                return
            self._rows[key] = (time.monotonic() + self.ttl, generation, value)
            self._rows.move_to_end(key)
            while len(self._rows) > self._capacity:
                self._rows.popitem(last=False)

    def invalidate(self, *_: Any) -> None:
        with self._lock:
            self._generation += 1
            self._rows.clear()

    async def fetch(self, key: Any, load: Callable[[], Awaitable[T]]) -> T:
        """The cached value, else ``load()`` once for all concurrent callers of the same key (a
        burst of requests after an expiry or an invalidation waits for one store read, not one
        each). Called on the event loop only; a failure is shared by the waiters, never cached."""
        if self.ttl <= 0:
            return await load()
        value = self.get(key)
        if value is not None:
            return value  # type: ignore[no-any-return]
        pending = self._pending.get(key)
        if pending is None or pending.done():
            generation = self.generation
            pending = asyncio.ensure_future(self._load(key, load, generation))
            pending.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved, never logged
            self._pending[key] = pending
        return await asyncio.shield(pending)  # type: ignore[no-any-return]

    async def _load(self, key: Any, load: Callable[[], Awaitable[Any]], generation: int) -> Any:
        try:
            value = await load()
            self.put(key, value, generation)
            return value
        finally:
            self._pending.pop(key, None)

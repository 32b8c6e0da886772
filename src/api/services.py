"""What the controllers use: the command application, the read models and read-your-writes."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from commands.service import IntegrationsApp


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
    """Token hash -> principals row, for a few seconds (``INTEGRATIONS_AUTH_CACHE_SECONDS``).

    Saves a read-model query on every request. Identity writes in this process clear it at
    once; in another process a revoked token or a changed membership takes effect within the
    TTL. A TTL of 0 turns it off.
    """

    def __init__(self, ttl: float = 2.0, capacity: int = 10_000) -> None:
        self.ttl = ttl
        self._rows: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()
        self._lock = threading.Lock()
        self._capacity = capacity

    def get(self, token_hash: str) -> dict[str, Any] | None:
        if self.ttl <= 0:
            return None
        with self._lock:
            hit = self._rows.get(token_hash)
            if hit is None or hit[0] < time.monotonic():
                self._rows.pop(token_hash, None)
                return None
            return hit[1]

    def put(self, token_hash: str, row: dict[str, Any]) -> None:
        if self.ttl <= 0:
            return
        with self._lock:
            self._rows[token_hash] = (time.monotonic() + self.ttl, row)
            self._rows.move_to_end(token_hash)
            while len(self._rows) > self._capacity:
                self._rows.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._rows.clear()

"""Cross-process refresh locks (DESIGN 6, security note §4.2), the :class:`commands.ports.RefreshLocks` port.

- PostgreSQL: a session advisory lock on a dedicated connection, opened for the refresh and
  closed after it (closing releases the lock, also when the process dies). Waiting is bounded by
  ``lock_timeout``. A dedicated connection keeps the lock away from the pools and from any open
  transaction while the token request runs.
- SQLite: ``flock`` on a file per connection beside the store; the operating system releases
  it when the process dies. Polled without blocking, so waiting never holds a thread.

Both key the lock by the connection id. The caller re-reads the connection after taking the lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from uuid import UUID

import psycopg

_POLL = 0.02
log = logging.getLogger("integrations.locks")


def _advisory_key(key: UUID) -> int:
    """A signed 64-bit key from the UUID (its first 8 bytes), namespaced by a fixed XOR."""
    value = int.from_bytes(key.bytes[:8], "big") ^ 0x5EF2E5_4A11_0C
    return value - (1 << 64) if value >= (1 << 63) else value


class PostgresRefreshLocks:
    def __init__(self, conninfo: str) -> None:
        self._conninfo = conninfo

    async def _connect(self, timeout: float) -> psycopg.AsyncConnection | None:
        """A fresh connection; retried while the server refuses (e.g. too many clients) until ``timeout``."""
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            try:
                return await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True, connect_timeout=5)
            except psycopg.OperationalError as e:
                if time.monotonic() + delay >= deadline:
                    log.warning("refresh lock: cannot connect to PostgreSQL: %s", str(e).splitlines()[0][:200])
                    return None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    @contextlib.asynccontextmanager
    async def hold(self, key: UUID, timeout: float) -> AsyncIterator[bool]:
        conn = await self._connect(timeout)
        if conn is None:
            yield False  # the caller re-reads and uses a still-valid token, or answers 503
            return
        try:
            await conn.execute(f"SET lock_timeout = {max(int(timeout * 1000), 1)}")
            try:
                await conn.execute("SELECT pg_advisory_lock(%s)", (_advisory_key(key),))
                locked = True
            except psycopg.errors.LockNotAvailable:
                locked = False
            yield locked
        finally:
            await conn.close()  # releases the advisory lock with the session


class FileRefreshLocks:
    def __init__(self, directory: Path) -> None:
        self._dir = directory

    @contextlib.asynccontextmanager
    async def hold(self, key: UUID, timeout: float) -> AsyncIterator[bool]:
        self._dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._dir / f"refresh-{key}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = time.monotonic() + timeout
            locked = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    locked = True
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        break
                    await asyncio.sleep(_POLL)
            try:
                yield locked
            finally:
                if locked:
                    fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

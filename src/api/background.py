"""Jobs that run beside the HTTP server while it serves (started and cancelled by the lifespan).

The refresher renews connections whose access token expires within a margin, so a request
rarely waits for a refresh (RL-4), and retries provider revocations that were answered 503
(OA-15). It reads the candidates from the connections read model and goes through the same
single-flight path as requests, so it never races them or another process's refresher.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from uuid import UUID

import anyio.to_thread

from api.services import Services

log = logging.getLogger("integrations.refresher")

BATCH = 100


async def refresh_due(services: Services, margin: timedelta, now: datetime | None = None) -> int:
    """One pass: refresh what expires within ``margin``; retry pending revocations. Returns how many."""
    connections, view = services.connections, services.connections_view
    before = ((now or datetime.now(UTC)) + margin).isoformat()
    rows = await anyio.to_thread.run_sync(lambda: view.expiring(before, BATCH))
    done = 0
    for row in rows:
        try:
            await connections.refresh(UUID(str(row["connection_id"])), margin=margin)
            done += 1
        except Exception as e:  # one bad connection must not stop the others
            log.warning("background refresh of %s failed: %s", row["connection_id"], type(e).__name__)
    pending = getattr(view, "pending_revocations", None)
    if pending is not None:
        for row in await anyio.to_thread.run_sync(lambda: pending(BATCH)):
            try:
                await connections.retry_revocation(UUID(str(row["connection_id"])), int(row.get("failures") or 0) + 1)
            except Exception as e:
                log.warning("revocation retry of %s failed: %s", row["connection_id"], type(e).__name__)
    return done


PRUNE_EVERY = 600.0  # seconds between two prunes of expired authorizations' verifiers


async def run_refresher(services: Services, *, interval: float, margin: timedelta) -> None:
    loop = asyncio.get_running_loop()
    next_prune = loop.time()
    while True:
        await asyncio.sleep(interval)
        try:
            await refresh_due(services, margin)
            if loop.time() >= next_prune and services.connections is not None:
                next_prune = loop.time() + PRUNE_EVERY
                pruned = await services.connections.prune_expired_authorizations()
                if pruned:
                    log.info("shredded the PKCE verifiers of %d expired authorization(s)", pruned)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.warning("refresher pass failed: %s", type(e).__name__)

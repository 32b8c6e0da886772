"""Helpers for the connection end-to-end tests (no fixtures here: see ``conftest.py``)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit
from uuid import UUID

import httpx

from api.auth import actor_from_row
from commands.connections import Connections
from domain.access import Actor
from domain.connection import connection_id
from domain.integration import Integration
from tests.api.conftest import Api
from tests.oauth.harness import Browser, OAuthServer

T = TypeVar("T")


class Clock:
    """A controllable clock for the service: real time plus an offset that tests move."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, **delta: float) -> None:
        self.offset += timedelta(**delta)

    def reset(self) -> None:
        self.offset = timedelta(0)


def service(api: Api) -> Connections:
    connections = api.runtime.services.connections
    assert connections is not None
    return connections


def actor(api: Api, user_id: str) -> Actor:
    row = api.runtime.services.principals.user(user_id)
    assert row is not None, f"no principal {user_id!r}"
    return actor_from_row(row)


def integration_of(api: Api, who: Actor, integration_id: str) -> Integration:
    return api.runtime.app.integration_for(who, UUID(integration_id))


def cid_of(integration_id: str, owner: str | None) -> UUID:
    """The connection id: per user (``owner``) or the shared one (``None``)."""
    return connection_id(UUID(integration_id), owner)


def events(api: Api, aggregate_id: UUID) -> list[Any]:
    return list(api.runtime.app.history(aggregate_id))


def event_names(api: Api, aggregate_id: UUID) -> list[str]:
    return [type(e).__qualname__.split(".")[-1] for e in events(api, aggregate_id)]


def head(api: Api) -> int:
    """The event log's max notification id."""
    return api.runtime.app.recorder.max_notification_id() or 0


def run(coro: Awaitable[T], *services: Connections) -> T:
    """Run one coroutine in a fresh event loop (as a worker would); then close the HTTP clients
    ``services`` opened in that loop."""

    async def main() -> T:
        try:
            return await coro
        finally:
            for connections in services:
                await connections.aclose()

    return asyncio.run(main())


def gather(connections: Connections, *calls: Callable[[], Awaitable[Any]]) -> list[Any]:
    """Start every call in one event loop at once; results or exceptions, in order."""

    async def all_of() -> list[Any]:
        return await asyncio.gather(*(c() for c in calls), return_exceptions=True)

    return run(all_of(), connections)


# -- the flow over HTTP -------------------------------------------------------------------------------


def start(api: Api, headers: dict[str, str], integration_id: str, **params: str) -> httpx.Response:
    """``GET /connect`` (the binding cookie lands in the API client's jar)."""
    return api.client.get(
        f"/api/integrations/{integration_id}/connect", headers=headers, params=params, follow_redirects=False
    )


def query(url: str) -> dict[str, str]:
    parsed = parse_qs(urlsplit(url).query, keep_blank_values=True)
    assert all(len(v) == 1 for v in parsed.values()), f"repeated parameters in {url}"
    return {k: v[0] for k, v in parsed.items()}


def authorize(api: Api, headers: dict[str, str], integration_id: str, browser: Browser, **kw: Any) -> dict[str, str]:
    """``/connect`` then login and consent at the provider; the callback's query parameters."""
    r = start(api, headers, integration_id)
    assert r.status_code == 302, r.text
    return browser.authorize(r.headers["location"], **kw)


def callback(api: Api, params: dict[str, str], **kw: Any) -> httpx.Response:
    return api.client.get("/oauth2/callback", params=params, follow_redirects=False, **kw)


def connect(api: Api, headers: dict[str, str], integration_id: str, browser: Browser, **kw: Any) -> httpx.Response:
    """The whole browser flow; the callback's response (303 on success)."""
    return callback(api, authorize(api, headers, integration_id, browser, **kw))


def connected(api: Api, headers: dict[str, str], integration_id: str, server: OAuthServer) -> UUID:
    """Connect with a fresh browser and assert it worked; the connection id."""
    with server.browser() as browser:
        r = connect(api, headers, integration_id, browser)
    assert r.status_code == 303, r.text
    assert query(r.headers["location"])["status"] == "connected", r.headers["location"]
    doc = api.client.get(f"/api/integrations/{integration_id}/connection", headers=headers).json()
    return UUID(doc["id"])


def assert_error_shape(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["statusCode"] == status
    assert isinstance(body["error"], str) and isinstance(body["message"], str)
    return body


def token_requests(server: OAuthServer, grant: str | None = None) -> int:
    stats = server.stats()
    return stats["token_requests"] if grant is None else stats["by_grant"].get(grant, 0)

"""Single-flight refresh across processes: two ``integrations serve`` processes on one PostgreSQL,
50 concurrent proxied requests with an expired access token, against the rotating provider
(reusing a rotated refresh token revokes the whole grant there, so a second refresh would break
it). Exactly one token request, every request succeeds, and the grant still works afterwards."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx

from infrastructure.settings import PostgresConfig
from tests.conftest import TEST_MASTER_KEY
from tests.connections.conftest import SCOPE
from tests.oauth.harness import OAuthServer, ServerConfig, http_client
from tests.test_cli import ADMIN_TOKEN, Server, ok, service_env

AT_TTL = 6  # seconds: long enough for the burst to finish on the new token, short enough to wait for
REQUESTS = 50


def _processes_env(data_dir: Path, postgres: PostgresConfig) -> dict[str, str]:
    return service_env(
        data_dir,
        postgres,
        INTEGRATIONS_MASTER_KEY=TEST_MASTER_KEY,
        INTEGRATIONS_ADMIN_TOKEN=ADMIN_TOKEN,
        INTEGRATIONS_EGRESS_ALLOW="127.0.0.1",
        INTEGRATIONS_PUBLIC_URL="http://127.0.0.1:8000",  # the redirect URI the test provider knows
        INTEGRATIONS_REFRESH_MARGIN_SECONDS="0",  # refresh only once expired: the test controls when
        INTEGRATIONS_REFRESHER_INTERVAL_SECONDS="0",  # no background refresher racing the burst
        INTEGRATIONS_AUTH_CACHE_SECONDS="0",
    )


def _wait_ok(http: httpx.Client, path: str, headers: dict[str, str], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while (r := http.get(path, headers=headers)).status_code != 200:
        assert time.monotonic() < deadline, f"GET {path}: {r.status_code} {r.text[:300]}"
        time.sleep(0.1)


async def _burst(urls: list[str], headers: dict[str, str]) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=60, trust_env=False, limits=httpx.Limits(max_connections=REQUESTS)) as c:
        return list(await asyncio.gather(*(c.get(u, headers=headers) for u in urls)))


def test_fifty_requests_on_two_processes_make_one_refresh(
    pg_schema: PostgresConfig, tmp_path: Path, oauth_server_factory: Any
) -> None:
    server: OAuthServer = oauth_server_factory(ServerConfig(rotate_refresh=True, at_ttl=AT_TTL))
    env = _processes_env(tmp_path / "data", pg_schema)
    first = Server(env, tmp_path / "first.log")
    try:
        first.wait_ready()
        second = Server(env, tmp_path / "second.log")
        try:
            second.wait_ready()
            try:
                _run_scenario(server, first, second)
            except AssertionError as e:
                raise AssertionError(f"{e}\n--- first\n{first.output()}\n--- second\n{second.output()}") from None
        finally:
            second.kill()
    finally:
        first.kill()


def _run_scenario(server: OAuthServer, first: Server, second: Server) -> None:
    admin = first.http
    ok(
        admin.post(
            "/api/users", json={"id": "alice", "email": "alice@example.com", "permissions": ["integrationCreation"]}
        ),
        201,
    )
    token = ok(admin.post("/api/users/alice/tokens", json={"label": "t"}), 201)["token"]
    alice = {"Authorization": f"Bearer {token}"}
    client = server.basic_client
    integration = ok(
        admin.post(
            "/api/integrations",
            headers=alice,
            json={
                "name": "Provider",
                "authType": "oauth2",
                "authUri": server.authorization_endpoint,
                "tokenUri": server.token_endpoint,
                "issuer": server.issuer,
                "clientId": client.client_id,
                "clientSecret": client.client_secret,
                "scope": SCOPE,
                "apiBaseUri": server.base_url + "/api",
            },
        ),
        201,
    )
    iid = integration["id"]

    # Connect through the first process, as a browser would (the binding cookie stays in this jar).
    with http_client(headers=alice) as jar, server.browser(client=jar) as browser:
        params = browser.authorize(f"{first.base_url}/api/integrations/{iid}/connect")
        r = jar.get(f"{first.base_url}/oauth2/callback", params=params)
        assert r.status_code == 303 and "status=connected" in r.headers["location"], r.text
    # The second process sees alice and her connection.
    _wait_ok(second.http, "/api/me", alice)
    _wait_ok(second.http, f"/api/integrations/{iid}/connection", alice)

    for round_ in (1, 2):
        time.sleep(AT_TTL + 0.5)  # the access token has expired
        server.reset_stats()
        urls = [f"{(first if i % 2 else second).base_url}/api/integrations/{iid}/proxy/whoami" for i in range(REQUESTS)]
        responses = asyncio.run(_burst(urls, alice))
        statuses = [r.status_code for r in responses]
        assert statuses == [200] * REQUESTS, (
            round_,
            statuses,
            [r.text[:200] for r in responses if r.status_code != 200],
        )
        assert {r.json()["sub"] for r in responses} == {"alice@example.com"}
        stats = server.stats()
        # One token request for 50 requests over two processes; round 2 proves the rotated
        # refresh token stored in round 1 is the live one (a reuse would have revoked the grant).
        assert stats["by_grant"] == {"refresh_token": 1}, (round_, stats["log"])
        assert [e["status"] for e in stats["log"]] == [200]

    doc = ok(second.http.get(f"/api/integrations/{iid}/connection", headers=alice))
    assert doc["status"] == "connected" and doc["lastRefreshedAt"]

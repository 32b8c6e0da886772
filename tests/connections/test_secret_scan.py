"""After a full connection scenario no OAuth secret is written anywhere in plaintext (OA-16, CR-1).

Scenario against the real provider: connect by redirect (state, PKCE verifier, code), refresh with
rotation, a failed refresh, a direct connect from a refresh token, credential connections, a
disconnect with revocation, a revocation retried after a 503. The values are captured as the
provider issued them (the service's token calls are observed), then searched for in every table
or file of the store, in every log record the service wrote, and in every response body.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any
from urllib.parse import quote, quote_plus, urlsplit

import httpx
import pytest

from commands.service import token_hash
from domain.authorization import pending_authorization_id
from domain.oauth import TokenSet
from infrastructure.oauth_client import MAX_RETRY_AFTER
from tests.api.conftest import Api
from tests.api.test_secret_scan import _dump_store
from tests.connections.conftest import oauth_integration
from tests.connections.support import Clock, actor, callback, cid_of, integration_of, query, run, service, start
from tests.connections.test_direct_connect import provider_tokens
from tests.oauth.conftest import ServerFactory
from tests.oauth.harness import ServerConfig

CREDENTIALS = {
    "api_key": "ak-SCAN-" + secrets.token_hex(8),
    "password": "pw-SCAN-" + secrets.token_hex(8),
    "bearer_token": "bt-SCAN-" + secrets.token_hex(8),
}
HEADER_SECRET = "hs-SCAN-" + secrets.token_hex(8)  # a custom header's secret value (vault)
SECRET_HEADERS = {"X-Partner-Token": {"value": HEADER_SECRET, "secret": True}}


def _variants(value: str) -> set[str]:
    return {value, quote(value, safe=""), quote_plus(value)}


def _test_side(record: logging.LogRecord, provider: str) -> bool:
    """Lines of the test's own (synchronous) HTTP clients: the API test client and the scripted
    browser, whose requests and redirects carry state and code by design. The service talks to
    providers only through an ``AsyncClient`` (httpcore's async tracing: ``atrace``)."""
    if record.name.startswith("httpcore."):
        return record.funcName == "trace"
    if record.name != "httpx" or not isinstance(record.args, tuple) or len(record.args) < 2:
        return False
    url = str(record.args[1])
    if url.startswith("http://127.0.0.1:8000/"):
        return True
    return url.startswith(provider) and urlsplit(url).path.startswith(("/auth", "/interaction", "/__"))


def test_no_oauth_secret_in_store_logs_or_responses(
    api: Api, oauth_server_factory: ServerFactory, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.DEBUG)
    # The service keeps httpx at WARNING (full URLs at INFO); scan as if someone turned it up.
    caplog.set_level(logging.DEBUG, logger="httpx")
    op = oauth_server_factory(ServerConfig(at_ttl=300))
    connections = service(api)
    clock = Clock()
    monkeypatch.setattr(connections, "clock", clock)

    # observe every token response the service receives (the provider's values, exactly)
    issued: list[TokenSet] = []
    oauth = connections.oauth
    real_exchange, real_refresh = oauth.exchange_code, oauth.refresh

    async def exchange_code(*args: Any, **kwargs: Any) -> TokenSet:
        tokens = await real_exchange(*args, **kwargs)
        issued.append(tokens)
        return tokens

    async def refresh(*args: Any, **kwargs: Any) -> TokenSet:
        tokens = await real_refresh(*args, **kwargs)
        issued.append(tokens)
        return tokens

    monkeypatch.setattr(oauth, "exchange_code", exchange_code)
    monkeypatch.setattr(oauth, "refresh", refresh)

    secrets_seen: dict[str, str] = {"client secret": op.basic_client.client_secret, "header secret": HEADER_SECRET}
    responses: list[httpx.Response] = []

    def keep(r: httpx.Response) -> httpx.Response:
        responses.append(r)
        return r

    alice, bob = api.user("alice"), api.user("bob")
    iid = oauth_integration(api, alice, op)["id"]
    assert keep(api.client.put(f"/api/integrations/{iid}/headers", json=SECRET_HEADERS, headers=alice)).is_success

    # 1. connect by redirect; the state, the challenge's verifier and the code as they were
    r = start(api, alice, iid)
    assert r.status_code == 302
    state = query(r.headers["location"])["state"]
    pid = pending_authorization_id(token_hash(state))
    pending = api.runtime.app.repository.get(pid)
    secrets_seen["state"] = state
    secrets_seen["pkce verifier"] = api.runtime.app.vault.open(pid, "pkce_verifier", pending.verifier["ref"])
    secrets_seen["binding cookie"] = next(c.value for c in api.client.cookies.jar if "oauth" in c.name) or ""
    with op.browser() as browser:
        params = browser.authorize(r.headers["location"])
    secrets_seen["code"] = params["code"]
    r = keep(callback(api, params))
    assert r.status_code == 303 and "status=connected" in r.headers["location"]
    keep(callback(api, params))  # a replay, refused
    keep(api.client.get(r.headers["location"]))
    keep(api.client.get(f"/api/integrations/{iid}/connection", headers=alice))

    # a flow whose code exchange the provider refuses (the service logs that)
    op.faults(status=400, error="invalid_grant")
    with op.browser() as browser:
        r = start(api, alice, iid)
        failed_params = browser.authorize(r.headers["location"])
    secrets_seen["refused code"] = failed_params["code"]
    secrets_seen["refused state"] = failed_params["state"]
    r = keep(callback(api, failed_params))
    assert query(r.headers["location"])["error"] == "invalid_grant"

    # 2. refresh (rotation), a failed refresh, then another refresh
    who = actor(api, "alice")
    clock.advance(seconds=301)
    run(connections.credentials(who, integration_of(api, who, iid)), connections)
    clock.reset()
    op.faults(status=503, retry_after="1")
    clock.advance(seconds=250)
    run(connections.credentials(who, integration_of(api, who, iid)), connections)
    clock.advance(seconds=60)
    run(connections.credentials(who, integration_of(api, who, iid)), connections)
    clock.reset()
    keep(api.client.get(f"/api/integrations/{iid}/connection", headers=alice))
    keep(api.client.get(f"/api/integrations/{iid}/history", headers=alice))
    keep(api.client.get(f"/api/integrations/{iid}/connections", headers=alice))

    # 3. bob connects directly with a refresh token he got from the provider himself
    assert keep(api.client.put(f"/api/integrations/{iid}/shares/bob", json={"accessLevel": 1}, headers=alice))
    direct = provider_tokens(op)
    for key in ("access_token", "refresh_token", "id_token"):
        if direct.get(key):
            secrets_seen[f"bob's {key}"] = direct[key]
    r = keep(
        api.client.post(f"/api/integrations/{iid}/connect", json={"refreshToken": direct["refresh_token"]}, headers=bob)
    )
    assert r.status_code == 201, r.text
    keep(
        api.client.post(f"/api/integrations/{iid}/connect", json={"refreshToken": direct["refresh_token"]}, headers=bob)
    )

    # 4. credential connections
    for auth_type, body in (
        ("apikey", {"apiKey": CREDENTIALS["api_key"]}),
        ("basic", {"username": "jane", "password": CREDENTIALS["password"]}),
        ("bearer", {"bearerToken": CREDENTIALS["bearer_token"]}),
    ):
        kid = api.client.post(
            "/api/integrations",
            json={
                "name": f"scan {auth_type}",
                "authType": auth_type,
                "apiBaseUri": "https://api.example.com",
                "headers": SECRET_HEADERS,
            },
            headers=alice,
        ).json()["id"]
        assert keep(api.client.post(f"/api/integrations/{kid}/connect", json=body, headers=alice)).status_code == 201
        keep(api.client.get(f"/api/integrations/{kid}/connection", headers=alice))
    secrets_seen.update({f"credential {k}": v for k, v in CREDENTIALS.items()})

    # 5. disconnect alice (revoked at once) and bob (503, retried later)
    assert keep(api.client.delete(f"/api/integrations/{iid}/connection", headers=alice)).status_code == 204
    op.faults(status=503, endpoint="revocation")
    assert keep(api.client.delete(f"/api/integrations/{iid}/connection", headers=bob)).status_code == 204
    clock.advance(seconds=MAX_RETRY_AFTER + 1)  # past any Retry-After the provider sent
    assert run(connections.retry_revocation(cid_of(iid, "bob"), 1), connections) == "done"
    assert op.stats()["revocations"] == 3

    for n, tokens in enumerate(issued):
        secrets_seen[f"access token {n}"] = tokens.access_token
        if tokens.refresh_token:
            secrets_seen[f"refresh token {n}"] = tokens.refresh_token
        if tokens.id_token:
            secrets_seen[f"id token {n}"] = tokens.id_token
    assert len(issued) >= 4  # code exchange, two refreshes, bob's refresh
    assert sum(k.startswith("refresh token") for k in secrets_seen) >= 4

    api.runtime.services.waiter.wait(10**9, 1.0)  # let the projections settle
    stored = _dump_store(api)
    assert len(stored) > 10_000  # the scan saw real data
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    logs = "\n".join(
        f"{formatter.format(rec)} {rec.args!r}" for rec in caplog.records if not _test_side(rec, op.base_url)
    )
    assert "/token" in logs  # the service's own token calls were logged and are scanned
    assert "code exchange failed" in logs
    bodies = "\n".join(r.text for r in responses)
    headers = "\n".join(f"{k}: {v}" for r in responses for k, v in r.headers.multi_items() if k.lower() != "set-cookie")
    everywhere = {"store": stored, "logs": logs.encode(), "responses": (bodies + headers).encode()}
    for where, blob in everywhere.items():
        for name, value in secrets_seen.items():
            assert value, name
            for variant in _variants(value):
                assert variant.encode() not in blob, f"{name} found in {where}"
    # positive control: what may be stored is found by the same scan (the state's hash, in the
    # pending authorization's event), so the absence above means something
    assert token_hash(state).encode() in stored

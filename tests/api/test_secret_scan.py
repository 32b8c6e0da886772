"""No secret in plaintext anywhere but memory: tables, files, events, logs, responses."""

from __future__ import annotations

import logging
from pathlib import Path
from uuid import UUID

import pytest

from domain.access import Actor
from tests.api.conftest import Api

SECRETS = {
    "clientSecret": "cs-PLAINTEXT-7f3a9c1e",
    "apiKey": "ak-PLAINTEXT-55d0b2e4",
    "password": "pw-PLAINTEXT-8e21c7aa",
    "bearerToken": "bt-PLAINTEXT-c0ffee42",
    "rotated": "cs-PLAINTEXT-ROTATED-91ab",
    "userPassword": "user-PLAINTEXT-pass-3141",
    "headerSecret": "hs-PLAINTEXT-$user.id-d00d5e",  # a custom header's secret value
    "headerRotated": "hs-PLAINTEXT-ROTATED-77aa01",
    "headerRefused": "hs-PLAINTEXT-REFUSED-5150",
}


def _dump_store(api: Api) -> bytes:
    settings = api.runtime.settings
    if settings.postgres is None:
        return b"".join(p.read_bytes() for p in Path(settings.data_dir).rglob("*") if p.is_file())
    import psycopg

    out = []
    with psycopg.connect(settings.postgres.conninfo()) as conn:
        tables = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (settings.postgres.schema,)
        ).fetchall()
        assert len(tables) >= 5
        for (table,) in tables:
            for row in conn.execute(f'SELECT * FROM "{settings.postgres.schema}"."{table}"'):
                out.append(repr(row).encode())
                out.extend(v for v in row if isinstance(v, bytes | memoryview))
    return b"\n".join(bytes(x) for x in out)


def test_no_plaintext_secret_in_store_logs_or_responses(api: Api, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    responses: list[str] = []
    alice = api.user("alice", password=SECRETS["userPassword"])
    r = api.client.post(
        "/api/integrations",
        headers=alice,
        json={
            "name": "OAuth",
            "slug": "oauth",
            "authType": "oauth2",
            "authUri": "https://as.example.com/auth",
            "tokenUri": "https://as.example.com/token",
            "clientId": "cid",
            "clientSecret": SECRETS["clientSecret"],
            "scope": "read",
            "apiBaseUri": "https://api.example.com",
        },
    )
    responses.append(r.text)
    oauth_id = r.json()["id"]
    for slug, auth, field in (("k", "apikey", "apiKey"), ("b", "basic", "password"), ("t", "bearer", "bearerToken")):
        r = api.client.post(
            "/api/integrations",
            headers=alice,
            json={
                "name": slug,
                "slug": slug,
                "authType": auth,
                "apiBaseUri": "https://api.example.com",
                field: SECRETS[field],
                "headers": {"X-Token": {"value": SECRETS["headerSecret"], "secret": True}, "X-User": "${user.id}"},
            },
        )
        assert r.status_code == 201, r.text
        responses.append(r.text)
    key_id = api.client.get("/api/integrations/alice:k", headers=alice).json()["id"]
    r = api.client.put(
        f"/api/integrations/{key_id}/headers",
        headers=alice,
        json={"X-Token": {"value": SECRETS["headerRotated"], "secret": True}, "X-Kept": "$user.email"},
    )
    assert r.status_code == 200, r.text
    responses.append(r.text)
    r = api.client.patch(
        f"/api/integrations/{key_id}",
        headers=alice,
        json={"headers": {"X-Token": {"secret": True}, "Cookie": {"value": SECRETS["headerRefused"], "secret": True}}},
    )
    assert r.status_code == 400, r.text
    responses.append(r.text)
    r = api.client.patch(f"/api/integrations/{oauth_id}", headers=alice, json={"clientSecret": SECRETS["rotated"]})
    responses.append(r.text)
    r = api.client.post(
        "/api/integrations", headers=alice, json={"name": "bad", "apiKey": SECRETS["apiKey"], "authType": "x"}
    )
    assert r.status_code == 400
    responses.append(r.text)
    for path in (
        "/api/integrations",
        "/api/integrations-list",
        f"/api/integrations/{oauth_id}",
        f"/api/integrations/{oauth_id}/history",
        f"/api/integrations/{key_id}",
        f"/api/integrations/{key_id}/headers",
        f"/api/integrations/{key_id}/history",
        "/api/users/alice",
        "/api/me",
    ):
        responses.append(api.client.get(path, headers=alice if "users" not in path else api.admin).text)
    r = api.client.post("/api/auth/login", json={"username": "alice", "password": SECRETS["userPassword"]})
    assert r.status_code == 200
    session = r.cookies.get("integrations_session")
    api.client.cookies.clear()
    user_token = alice["Authorization"].removeprefix("Bearer ")

    api.runtime.services.waiter.wait(10**9, 0.5)  # let the projections settle
    stored = _dump_store(api)
    logs = "\n".join(rec.getMessage() + str(rec.args) for rec in caplog.records)
    everything = {"store": stored, "logs": logs.encode(), "responses": "\n".join(responses).encode()}
    for where, blob in everything.items():
        for name, secret in [*SECRETS.items(), ("api token", user_token), ("session", session or "<none>")]:
            assert secret.encode() not in blob, f"{name} found in {where}"
    assert len(stored) > 10_000  # the scan saw real data
    # positive control: the header's value is in the vault (only there), as the proxy opens it
    app = api.runtime.services.app
    vaulted = app.integration_for(Actor(id="admin", superuser=True), UUID(key_id))
    assert app.header_secrets(vaulted) == {"X-Token": SECRETS["headerRotated"]}

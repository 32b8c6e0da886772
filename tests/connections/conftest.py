"""Fixtures for the connection tests: the real API (SQLite and PostgreSQL) and a real oidc-provider.

The OAuth server fixtures come from ``tests/oauth/conftest.py``; the service may reach
127.0.0.1 (``INTEGRATIONS_EGRESS_ALLOW``) and uses http there (``ALLOW_HTTP_HOSTS``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from infrastructure.settings import Settings
from tests.api.conftest import ADMIN_TOKEN, Api, ConsistentClient
from tests.oauth.conftest import (  # noqa: F401  (fixtures)
    browser,
    oauth_server,
    oauth_server_any,
    oauth_server_factory,
    oauth_server_non_rotating,
)
from tests.oauth.harness import OAuthServer

SCOPE = "openid offline_access api:read"


@pytest.fixture
def conn_settings(settings: Settings) -> Settings:
    return settings.with_(admin_token=ADMIN_TOKEN, egress_allow="127.0.0.1", refresher_interval_seconds=0)


@pytest.fixture
def api(conn_settings: Settings) -> Iterator[Api]:
    from api.app import create_app
    from cli.runtime import build_runtime

    runtime = build_runtime(conn_settings)
    with ConsistentClient(app=create_app(runtime.services), base_url="http://127.0.0.1:8000") as client:
        yield Api(client, runtime)


def oauth_integration(api: Api, headers: dict[str, str], server: OAuthServer, **fields: Any) -> dict[str, Any]:
    client = server.basic_client
    body = {
        "name": "Provider",
        "authType": "oauth2",
        "authUri": server.authorization_endpoint,
        "tokenUri": server.token_endpoint,
        "revocationUri": server.revocation_endpoint,
        "issuer": server.issuer,
        "clientId": client.client_id,
        "clientSecret": client.client_secret,
        "scope": SCOPE,
        "apiBaseUri": server.base_url + "/api",
        **fields,
    }
    r = api.client.post("/api/integrations", json=body, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()

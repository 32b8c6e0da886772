"""Fixtures for the proxy tests: the real API (SQLite and PostgreSQL) allowed to reach 127.0.0.1,
a recording upstream on 127.0.0.1, and the oidc-provider fixtures of the OAuth tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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
from tests.proxy.upstream import Upstream, run_upstream


@pytest.fixture
def proxy_settings(settings: Settings) -> Settings:
    return settings.with_(
        admin_token=ADMIN_TOKEN,
        egress_allow="127.0.0.1",
        refresher_interval_seconds=0,
        proxy_deadline_seconds=3.0,
        refresh_margin_seconds=5,  # the provider's tokens live 60 s: no refresh on use in a test
    )


@contextmanager
def api_with(settings: Settings) -> Iterator[Api]:
    from api.app import create_app
    from cli.runtime import build_runtime

    runtime = build_runtime(settings)
    with ConsistentClient(app=create_app(runtime.services), base_url="http://127.0.0.1:8000") as client:
        yield Api(client, runtime)


@pytest.fixture
def api(proxy_settings: Settings) -> Iterator[Api]:
    with api_with(proxy_settings) as api:
        yield api


@pytest.fixture(scope="module")
def upstream_server() -> Iterator[Upstream]:
    with run_upstream() as upstream:
        yield upstream


@pytest.fixture
def upstream(upstream_server: Upstream) -> Upstream:
    upstream_server.clear()
    return upstream_server

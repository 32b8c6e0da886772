"""Fixtures for tests that need a real OAuth 2.0 authorization server (oidc-provider 9.x on 127.0.0.1).

- ``oauth_server``: rotating refresh tokens (reuse of a rotated RT revokes the grant). Faults and
  stats are reset before each test; grants/tokens from other tests stay (they are independent).
- ``oauth_server_non_rotating``: same, with ``rotateRefreshToken`` off (the RT stays valid).
- ``oauth_server_any``: parametrised over both (ids ``rotating`` / ``non_rotating``).
- ``oauth_server_factory``: ``factory(ServerConfig(...))`` for other settings (AT TTL, issuer,
  redirect URIs, always-issue-RT); one process per distinct config per test session (per xdist worker).
- ``browser``: a scripted browser (own cookie jar) for the default redirect URI (needs no server).

Where ``node`` or the installed package is missing these skip, unless
``INTEGRATIONS_REQUIRE_OAUTH_SERVER=1`` (``.ci/run``), which makes them fail.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack

import pytest

from tests.oauth.harness import (
    REQUIRE_ENV,
    REQUIRED,
    Browser,
    OAuthServer,
    ServerConfig,
    availability,
    run_oauth_server,
)

ServerFactory = Callable[..., OAuthServer]


def require_oauth_server() -> None:
    ok, reason = availability()
    if not ok:
        if REQUIRED:
            pytest.fail(f"{REQUIRE_ENV}=1 but {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="session")
def oauth_server_factory() -> Iterator[ServerFactory]:
    servers: dict[ServerConfig, OAuthServer] = {}
    with ExitStack() as stack:

        def factory(config: ServerConfig | None = None, **overrides: object) -> OAuthServer:
            require_oauth_server()
            cfg = config or ServerConfig(**overrides)  # type: ignore[arg-type]
            if cfg not in servers:
                servers[cfg] = stack.enter_context(run_oauth_server(cfg))
            server = servers[cfg]
            server.reset()
            return server

        yield factory


@pytest.fixture
def oauth_server(oauth_server_factory: ServerFactory) -> OAuthServer:
    return oauth_server_factory(ServerConfig(rotate_refresh=True))


@pytest.fixture
def oauth_server_non_rotating(oauth_server_factory: ServerFactory) -> OAuthServer:
    return oauth_server_factory(ServerConfig(rotate_refresh=False))


@pytest.fixture(params=["rotating", "non_rotating"])
def oauth_server_any(request: pytest.FixtureRequest, oauth_server_factory: ServerFactory) -> OAuthServer:
    return oauth_server_factory(ServerConfig(rotate_refresh=request.param == "rotating"))


@pytest.fixture
def browser() -> Iterator[Browser]:
    """A fresh scripted browser; its default redirect URI is ``harness.DEFAULT_REDIRECT_URI``."""
    with Browser() as b:
        yield b

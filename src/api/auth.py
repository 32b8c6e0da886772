"""Authentication: ``Authorization: Bearer <api token>`` or the session cookie from a login.

Both are random tokens stored only as SHA-256 hashes (in events and in the principals read
model). A request is authenticated by hashing what it presents and looking the hash up.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import anyio.to_thread
from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult

from api.services import Services
from commands.service import token_hash
from domain.access import Actor

SESSION_COOKIE = "integrations_session"
PUBLIC_PATHS = ("/health", "/ready", "/schema", "/api/auth/login", "/oauth2/callback", "/oauth2/result")
_UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def actor_from_row(row: dict[str, Any]) -> Actor:
    return Actor(
        id=row["user_id"],
        username=row.get("username", ""),
        email=row.get("email") or "",
        display_name=row.get("display_name") or "",
        superuser=bool(row.get("superuser")),
        permissions=frozenset(row.get("permissions") or ()),
        team_roles=dict(row.get("team_roles") or {}),
        custom=dict(row.get("custom") or {}),
    )


def presented_token(connection: ASGIConnection) -> tuple[str | None, bool]:
    """(token, from_cookie)."""
    header = None
    for name, value in connection.scope["headers"]:  # raw: no header map built for this one lookup
        if name == b"authorization" or (len(name) == 13 and name.lower() == b"authorization"):
            header = value.decode("latin-1")
            break
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip(), False
        return None, False
    cookie = connection.cookies.get(SESSION_COOKIE) or connection.cookies.get("__Host-" + SESSION_COOKIE)
    return (cookie, True) if cookie else (None, False)


def _expiry(row: dict[str, Any]) -> datetime | None:
    expires = row.get("token_expires_at")
    return datetime.fromisoformat(expires) if expires else None


async def authenticate(services: Services, connection: ASGIConnection) -> tuple[Actor, dict[str, Any]]:
    """The caller and what authenticated it (``scope["user"]``, ``scope["auth"]``); 401 when no
    valid token or session is presented, 403 for a cross-site cookie-authenticated write."""
    token, from_cookie = presented_token(connection)
    if not token or len(token) > 512:
        raise NotAuthorizedException("Authentication required: send a Bearer API token or log in.")
    hashed = token_hash(token)
    # The cache keeps the caller as the rules see it (an immutable Actor) and the token's expiry.
    entry: tuple[Actor, datetime | None] | None = services.auth_cache.get(hashed)
    if entry is None:
        row = await anyio.to_thread.run_sync(services.principals.user_by_token_hash, hashed)
        if row is not None:
            entry = (actor_from_row(row), _expiry(row))
            services.auth_cache.put(hashed, entry)
    if entry is None or (entry[1] is not None and entry[1] <= datetime.now(UTC)):
        raise NotAuthorizedException("The token is not valid (unknown, revoked or expired).")
    if from_cookie and connection.scope.get("method") in _UNSAFE:
        _check_same_origin(connection, services.config.public_url)
    return entry[0], {"token_hash": hashed, "cookie": from_cookie}


class TokenAuthentication(AbstractAuthenticationMiddleware):
    async def authenticate_request(self, connection: ASGIConnection) -> AuthenticationResult:
        user, auth = await authenticate(connection.app.state.services, connection)
        return AuthenticationResult(user=user, auth=auth)


def _check_same_origin(connection: ASGIConnection, public_url: str) -> None:
    """Cookie-authenticated writes must come from our own origin (CSRF defence beside SameSite)."""
    origin = connection.headers.get("origin")
    if origin is None:
        if connection.headers.get("sec-fetch-site") in ("cross-site", "same-site"):
            raise PermissionDeniedException("Cross-site request refused.")
        return
    ours = urlsplit(public_url)
    theirs = urlsplit(origin)
    if (theirs.scheme, theirs.netloc) != (ours.scheme, ours.netloc):
        raise PermissionDeniedException("Cross-site request refused.")

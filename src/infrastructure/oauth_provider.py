"""The :class:`commands.ports.OAuthProvider` port, implemented with the OAuth client primitives,
the provider presets and the egress-guarded HTTP client.

One ``httpx.AsyncClient`` per event loop (a client's pool belongs to the loop it was used in),
created on first use and closed by :meth:`HttpOAuthProvider.aclose`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, Literal

import httpx

from commands.ports import AuthorizationRequest
from domain.oauth import TokenSet
from infrastructure.egress import EgressPolicy, guarded_async_client
from infrastructure.oauth_client import (
    DEFAULT_DEADLINE,
    ClientCredentials,
    TokenClient,
    authorization_url,
    fetch_identity,
    new_pkce,
    new_state,
)
from infrastructure.providers import auth_params, preset_for


class HttpOAuthProvider:
    def __init__(self, egress: EgressPolicy, *, deadline: float = DEFAULT_DEADLINE) -> None:
        self._egress = egress
        self._deadline = deadline
        self._clients: dict[asyncio.AbstractEventLoop, httpx.AsyncClient] = {}

    def _http(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None or client.is_closed:
            for old in [k for k in self._clients if k.is_closed()]:
                self._clients.pop(old, None)
            client = guarded_async_client(self._egress, timeout=self._deadline)
            self._clients[loop] = client
        return client

    def _tokens(self) -> TokenClient:
        return TokenClient(self._http(), deadline=self._deadline)

    async def aclose(self) -> None:
        loop = asyncio.get_running_loop()
        client = self._clients.pop(loop, None)
        if client is not None:
            await client.aclose()

    @staticmethod
    def _client(settings: Mapping[str, Any], client_secret: str) -> ClientCredentials:
        method = settings.get("token_auth_method") or "client_secret_basic"
        return ClientCredentials(str(settings.get("client_id") or ""), client_secret, method)

    def authorization_request(self, settings: Mapping[str, Any], redirect_uri: str) -> AuthorizationRequest:
        preset = preset_for(settings.get("type"), settings.get("auth_uri"))
        extra, scope = auth_params(preset, settings.get("scope"))
        if "offline_access" in scope.split():
            extra.setdefault("prompt", "consent")  # OIDC Core §11: offline_access needs consent
        verifier, challenge = new_pkce()
        state = new_state()
        url = authorization_url(
            str(settings["auth_uri"]),
            client_id=str(settings.get("client_id") or ""),
            redirect_uri=redirect_uri,
            scope=scope or None,
            state=state,
            code_challenge=challenge,
            extra=extra,
        )
        return AuthorizationRequest(url=url, state=state, verifier=verifier, scope=scope)

    async def exchange_code(
        self, settings: Mapping[str, Any], client_secret: str, code: str, verifier: str | None, redirect_uri: str
    ) -> TokenSet:
        client = self._client(settings, client_secret)
        return await self._tokens().exchange_code(str(settings["token_uri"]), client, code, verifier, redirect_uri)

    async def refresh(self, settings: Mapping[str, Any], client_secret: str, refresh_token: str) -> TokenSet:
        return await self._tokens().refresh(
            str(settings["token_uri"]), self._client(settings, client_secret), refresh_token
        )

    async def revoke(self, settings: Mapping[str, Any], client_secret: str, token: str, hint: str) -> None:
        kind: Literal["refresh_token", "access_token"] = "access_token" if hint == "access_token" else "refresh_token"
        await self._tokens().revoke(str(settings["revocation_uri"]), self._client(settings, client_secret), token, kind)

    async def identity(self, settings: Mapping[str, Any], tokens: TokenSet) -> dict[str, str | None] | None:
        preset = preset_for(settings.get("type"), settings.get("auth_uri"))
        return await fetch_identity(self._http(), preset, tokens, deadline=self._deadline)

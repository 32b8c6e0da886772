"""Connections: the OAuth connect redirect and callback, direct connects, status and disconnect.

The callback is public (the provider sends the browser there); what ties it to a user is the
pending authorization found by the hash of ``state`` plus the browser-binding cookie set by
``GET /connect``. Responses of the flow carry ``Cache-Control: no-store`` and
``Referrer-Policy: no-referrer`` (OA-5); the callback answers 303 so ``code`` and ``state`` leave
the address bar.
"""

from __future__ import annotations

import html
from functools import partial
from typing import Annotated, Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import anyio.to_thread
from litestar import Controller, MediaType, Request, Response, delete, get, post
from litestar.datastructures import Cookie
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, QueryParameter

from api import render
from api.auth import actor_from_row
from api.controllers.common import WaitFor, consistent_read, resolve_integration, write_response
from api.errors import ApiError
from api.services import Services
from commands.connections import Connections, StartedFlow
from commands.messages import ConnectBody, given
from commands.service import token_hash
from domain.access import AccessLevel, Actor
from domain.authorization import CallbackRejected, pending_authorization_id
from domain.connection import Connection

FLOW_HEADERS = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}
RESULT_PATH = "/oauth2/result"
_COOKIE_PREFIX = "integrations_oauth_"


def _service(services: Services) -> Connections:
    if services.connections is None:
        raise ApiError(503, "Connections are not configured on this server.")
    return services.connections


def binding_cookie_name(pending_id: str, secure: bool) -> str:
    """One cookie per pending flow (two tabs connecting at once both work); ``__Host-`` when secure."""
    return f"{'__Host-' if secure else ''}{_COOKIE_PREFIX}{pending_id.replace('-', '')[:16]}"


def connection_doc(connection: Connection, *, refreshing: bool = False) -> dict[str, Any]:
    """A connection as the API shows it: metadata only, never a token or a vault reference."""
    row = {
        "connection_id": connection.id,
        "integration_id": connection.integration_id,
        "owner_id": connection.owner_id,
        "shared": connection.shared,
        "status": "refreshing" if refreshing and connection.status == "connected" else connection.status,
        "auth_type": connection.auth_type,
        "account": connection.account,
        "scopes": connection.scopes,
        "token_expires_at": connection.token_expires_at,
        "refresh_token_expires_at": connection.refresh_token_expires_at,
        "last_authorized_at": connection.last_authorized_at,
        "last_refreshed_at": connection.last_refreshed_at,
        "last_error": connection.last_error,
    }
    return {**row_doc(row), "_links": {"self": {"href": f"/api/integrations/{connection.integration_id}/connection"}}}


def row_doc(row: dict[str, Any]) -> dict[str, Any]:
    """A connection (a read-model row, or built from the aggregate) in the API's shape."""
    error = row.get("last_error")
    return {
        "id": str(row["connection_id"]),
        "integrationId": str(row["integration_id"]),
        "ownerId": None if row.get("shared") else row.get("owner_id"),
        "isShared": bool(row.get("shared")),
        "status": row.get("status"),
        "authType": row.get("auth_type"),
        "account": row.get("account"),
        "scopes": list(row.get("scopes") or []),
        "tokenExpiresAt": render.iso(row.get("token_expires_at")),
        "refreshTokenExpiresAt": render.iso(row.get("refresh_token_expires_at")),
        "lastAuthorizedAt": render.iso(row.get("last_authorized_at")),
        "lastRefreshedAt": render.iso(row.get("last_refreshed_at")),
        "lastError": None if not error else _error_doc(error),
    }


def _error_doc(error: dict[str, Any]) -> dict[str, Any]:
    return {"error": error.get("error"), "kind": error.get("kind"), "at": render.iso(error.get("at"))}


def _with_query(target: str, params: dict[str, str]) -> str:
    parts = urlsplit(target)
    query = "&".join(filter(None, (parts.query, urlencode(params))))
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))


class ConnectionController(Controller):
    path = "/api/integrations/{ident:str}"
    tags = ["connections"]

    @get("/connect", summary="Start the OAuth connect flow: 302 to the provider", status_code=302)
    async def connect(
        self,
        services: NamedDependency[Services],
        actor: NamedDependency[Actor],
        ident: FromPath[str],
        redirect: Annotated[str | None, QueryParameter(max_length=2048, required=False)] = None,
    ) -> Response[None]:
        connections = _service(services)
        iid = await _resolve(services, actor, ident)
        flow: StartedFlow = await _in_thread(connections.start, actor, iid, redirect)
        secure = services.config.secure_cookies
        cookie = Cookie(
            key=binding_cookie_name(str(flow.pending_id), secure),
            value=flow.binding,
            max_age=int(connections.policy.pending_ttl.total_seconds()),
            path="/",
            secure=secure,
            httponly=True,
            samesite="lax",  # sent on the provider's top-level redirect back; Strict would not be
        )
        return Response(
            content=None, status_code=302, headers={"Location": flow.location, **FLOW_HEADERS}, cookies=[cookie]
        )

    @post("/connect", summary="Connect without a redirect (code, refresh token, or a credential)", status_code=201)
    async def connect_direct(
        self,
        services: NamedDependency[Services],
        actor: NamedDependency[Actor],
        ident: FromPath[str],
        data: JSONBody[ConnectBody],
    ) -> Response[Any]:
        connections = _service(services)
        iid = await _resolve(services, actor, ident)
        written = await connections.connect_direct(actor, iid, given(data))
        headers = {"Location": f"/api/integrations/{iid}/connection", **FLOW_HEADERS}
        return write_response(services, actor, written, connection_doc(written.value), status=201, headers=headers)

    @get("/connection", summary="The caller's connection (shared mode: the shared one)")
    async def get_connection(
        self, services: NamedDependency[Services], actor: NamedDependency[Actor], ident: FromPath[str]
    ) -> Response[Any]:
        connections = _service(services)
        iid = await _resolve(services, actor, ident)
        _, connection = await _in_thread(connections.connection_of, actor, iid)
        doc = connection_doc(connection, refreshing=connections.refreshing(connection.id))
        return Response(content=doc, headers={"Cache-Control": "no-store"})

    @delete("/connection", summary="Disconnect: revoke at the provider and destroy the tokens", status_code=204)
    async def disconnect(
        self, services: NamedDependency[Services], actor: NamedDependency[Actor], ident: FromPath[str]
    ) -> Response[None]:
        connections = _service(services)
        iid = await _resolve(services, actor, ident)
        written = await connections.disconnect(actor, iid)
        return write_response(services, actor, written, None, status=204)

    @get("/connections", summary="Every connection of the integration (managers, level 3)")
    async def list_connections(
        self,
        services: NamedDependency[Services],
        actor: NamedDependency[Actor],
        ident: FromPath[str],
        wait_for: WaitFor = None,
    ) -> dict[str, Any]:
        iid = await _resolve(services, actor, ident)
        await _in_thread(services.app.integration_for, actor, iid, AccessLevel.MANAGE)
        # Other users' connections come from callbacks and their own requests: the caller's own
        # writes are not enough, so honour the position the client passes (RL-10).
        await _in_thread(consistent_read, services, actor, wait_for)
        rows = await _in_thread(services.connections_view.for_integration, str(iid))
        items = [row_doc(r) for r in rows if r.get("status") != "revoked"]
        return {
            "_links": {"self": {"href": f"/api/integrations/{iid}/connections"}},
            "_embedded": {"inf:connection": items},
            "count": len(items),
        }


class OAuthCallbackController(Controller):
    path = "/oauth2"
    tags = ["connections"]

    @get("/callback", summary="OAuth 2.0 redirection endpoint (public)", status_code=303, include_in_schema=True)
    async def callback(self, request: Request[Any, Any, Any], services: NamedDependency[Services]) -> Response[Any]:
        connections = _service(services)
        params = {k: v for k, v in request.query_params.items() if isinstance(v, str)}
        secure = services.config.secure_cookies
        state = params.get("state") or ""
        name = binding_cookie_name(str(pending_authorization_id(token_hash(state))), secure) if state else None
        binding = request.cookies.get(name) if name else None
        try:
            outcome = await connections.callback(params, binding, partial(_current_actor, services))
        except CallbackRejected as e:
            raise ApiError(400, e.message, headers=FLOW_HEADERS) from None
        cleared = [Cookie(key=name, value="", max_age=0, path="/", secure=secure, httponly=True, samesite="lax")]
        result = {"status": "connected" if outcome.ok else "error"}
        if outcome.error:
            result["error"] = outcome.error
        if outcome.integration_id is not None:
            result["integration"] = str(outcome.integration_id)
        target = _with_query(outcome.return_to or RESULT_PATH, result)
        headers = {"Location": target, **FLOW_HEADERS}
        if outcome.position is not None:
            headers["X-Event-Position"] = str(outcome.position)
        return Response(content=None, status_code=303, headers=headers, cookies=cleared)

    @get("/result", summary="The built-in page shown after the callback (public)", media_type=MediaType.HTML)
    async def result(
        self,
        status: Annotated[str, QueryParameter(max_length=32)] = "error",
        error: Annotated[str | None, QueryParameter(max_length=64, required=False)] = None,
    ) -> Response[str]:
        ok = status == "connected"
        title = "Connected" if ok else "Connection failed"
        text = (
            "You can close this window."
            if ok
            else f"The provider or the service refused the connection ({error or 'unknown'})."
        )
        page = (
            f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title></head>"
            f"<body><h1>{html.escape(title)}</h1><p>{html.escape(text)}</p></body></html>"
        )
        return Response(
            content=page,
            media_type=MediaType.HTML,
            headers={
                **FLOW_HEADERS,
                "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff",
            },
        )


def _current_actor(services: Services, user_id: str) -> Actor | None:
    """The user who started a flow, as they are now (the principals read model); None if removed."""
    row = services.principals.user(user_id)
    return actor_from_row(row) if row else None


async def _resolve(services: Services, actor: Actor, ident: str) -> Any:
    return await _in_thread(resolve_integration, services, actor, ident)


async def _in_thread(fn: Any, *args: Any) -> Any:
    return await anyio.to_thread.run_sync(lambda: fn(*args))

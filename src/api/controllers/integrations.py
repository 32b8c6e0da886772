"""Integrations: CRUD, the HAL listing and the flat ``-list`` route."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from litestar import Controller, Request, Response, delete, get, patch, post, put
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, QueryParameter

from api import render
from api.controllers.common import (
    IfMatch,
    WaitFor,
    consistent_read,
    parse_if_match,
    resolve_integration,
    revoke_connections,
    services_of,
    visible_to,
    write_response,
)
from api.services import Services
from commands.messages import HeaderEntry, IntegrationBody
from domain.access import AccessLevel, Actor

Sort = Literal["name", "-name", "slug", "-slug", "createdAt", "-createdAt", "updatedAt", "-updatedAt"]


def _integration_response(services: Services, actor: Actor, written: Any, status: int = 200) -> Response[Any]:
    integration = written.value
    headers = {"ETag": render.etag(integration.version)}
    if status == 201:
        headers["Location"] = f"/api/integrations/{integration.id}"
    return write_response(
        services,
        actor,
        written,
        render.integration(render.integration_doc(integration)),
        status=status,
        headers=headers,
    )


def _update(
    services: Services, actor: Actor, ident: str, data: IntegrationBody, if_match: str | None, *, partial: bool
) -> Response[Any]:
    iid = resolve_integration(services, actor, ident)
    expected = parse_if_match(if_match)
    written = services.app.update_integration(actor, iid, data, partial=partial, expected_version=expected)
    if written.position is not None and written.value.epoch_moved_by_last_write:
        revoke_connections(services, actor, iid, "integration_changed", only_stale=True)
    return _integration_response(services, actor, written)


class IntegrationController(Controller):
    path = "/api"
    tags = ["integrations"]

    @get("/integrations", sync_to_thread=True, summary="List the integrations the caller can see (HAL)")
    def list_integrations(
        self,
        services: NamedDependency[Services],
        actor: NamedDependency[Actor],
        wait_for: WaitFor,
        q: Annotated[str | None, QueryParameter(max_length=200, required=False)] = None,
        supports_upload: Annotated[bool | None, QueryParameter(name="supportsUpload", required=False)] = None,
        start: Annotated[int, QueryParameter(ge=0, le=10_000_000)] = 0,
        limit: Annotated[int, QueryParameter(ge=1, le=500)] = 50,
        sort: Annotated[Sort, QueryParameter()] = "name",
    ) -> dict[str, Any]:
        consistent_read(services, actor, wait_for)
        rows, total = services.listing.page(
            visible_to(actor), q=q or None, supports_upload=supports_upload, sort=sort, start=start, limit=limit
        )
        return {
            "_links": {"self": {"href": "/api/integrations"}},
            "_embedded": {"inf:integration": [render.integration(r) for r in rows]},
            "start": start,
            "count": len(rows),
            "total": total,
        }

    @get("/integrations-list", sync_to_thread=True, summary="Every visible integration as a flat array")
    def flat_list(
        self, services: NamedDependency[Services], actor: NamedDependency[Actor], wait_for: WaitFor
    ) -> list[dict[str, Any]]:
        consistent_read(services, actor, wait_for)
        return [
            render.integration(r, shared=bool(r.get("shared"))) for r in services.listing.all_visible(visible_to(actor))
        ]

    @post("/integrations", sync_to_thread=True, status_code=201, summary="Create an integration")
    def create(self, request: Request[Actor, Any, State], data: JSONBody[IntegrationBody]) -> Response[Any]:
        # The services and the caller straight from the request: resolving the two dependencies
        # costs about a third of this route's event-loop CPU (signature models per dependency),
        # and it is the service's hot write path (bench/listing.py).
        services, actor = services_of(request), request.user
        return _integration_response(services, actor, services.app.create_integration(actor, data), status=201)

    @get("/integrations/{ident:str}", sync_to_thread=True, summary="One integration by UUID, ownerId:slug or slug")
    def read(
        self,
        services: NamedDependency[Services],
        actor: NamedDependency[Actor],
        ident: FromPath[str],
        wait_for: WaitFor,
    ) -> Response[Any]:
        integration = services.app.integration_for(actor, resolve_integration(services, actor, ident, wait_for))
        return Response(
            render.integration(render.integration_doc(integration)), headers={"ETag": render.etag(integration.version)}
        )

    @put("/integrations/{ident:str}", sync_to_thread=True, summary="Replace an integration (omitted secrets are kept)")
    def replace(
        self,
        services: NamedDependency[Services],
        actor: NamedDependency[Actor],
        ident: FromPath[str],
        data: JSONBody[IntegrationBody],
        if_match: IfMatch,
    ) -> Response[Any]:
        return _update(services, actor, ident, data, if_match, partial=False)

    @patch("/integrations/{ident:str}", sync_to_thread=True, summary="Change some fields (null removes or clears)")
    def update(
        self,
        services: NamedDependency[Services],
        actor: NamedDependency[Actor],
        ident: FromPath[str],
        data: JSONBody[IntegrationBody],
        if_match: IfMatch,
    ) -> Response[Any]:
        return _update(services, actor, ident, data, if_match, partial=True)

    @delete("/integrations/{ident:str}", sync_to_thread=True, status_code=204, summary="Delete (and crypto-shred)")
    def remove(
        self,
        services: NamedDependency[Services],
        actor: NamedDependency[Actor],
        ident: FromPath[str],
        if_match: IfMatch,
    ) -> Response[None]:
        iid = resolve_integration(services, actor, ident)
        expected = parse_if_match(if_match)
        services.app.integration_for(actor, iid, AccessLevel.MANAGE)  # before telling any provider
        revoke_connections(services, actor, iid, "integration_deleted", only_stale=False)
        written = services.app.delete_integration(actor, iid, expected_version=expected)
        return write_response(services, actor, written, None, status=204)

    @get(
        "/integrations/{ident:str}/headers",
        sync_to_thread=True,
        summary="The integration's custom headers (secret values shown as {secret: true})",
    )
    def read_headers(
        self,
        services: NamedDependency[Services],
        actor: NamedDependency[Actor],
        ident: FromPath[str],
        wait_for: WaitFor,
    ) -> Response[Any]:
        integration = services.app.integration_for(actor, resolve_integration(services, actor, ident, wait_for))
        return Response(render.headers(integration.settings), headers={"ETag": render.etag(integration.version)})

    @put(
        "/integrations/{ident:str}/headers",
        sync_to_thread=True,
        summary="Replace the custom headers: template strings, or {value, secret: true} kept in the vault",
    )
    def replace_headers(
        self,
        services: NamedDependency[Services],
        actor: NamedDependency[Actor],
        ident: FromPath[str],
        data: JSONBody[dict[str, HeaderEntry]],
        if_match: IfMatch,
    ) -> Response[Any]:
        # The integration's update with only the headers given: one Updated event, same rules.
        iid = resolve_integration(services, actor, ident)
        expected = parse_if_match(if_match)
        written = services.app.update_integration(
            actor, iid, IntegrationBody(headers=data), partial=True, expected_version=expected
        )
        integration = written.value
        return write_response(
            services,
            actor,
            written,
            render.headers(integration.settings),
            headers={"ETag": render.etag(integration.version)},
        )

    @get("/integrations/{ident:str}/history", sync_to_thread=True, summary="The integration's audit trail")
    def history(
        self, services: NamedDependency[Services], actor: NamedDependency[Actor], ident: FromPath[str]
    ) -> list[dict[str, Any]]:
        integration = services.app.integration_for(actor, resolve_integration(services, actor, ident))
        return [render.event(e) for e in services.app.history(integration.id)]

"""Shares and ownership of an integration."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Response, delete, get, put
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, PathParameter

from api import render
from api.controllers.common import resolve_integration, write_response
from api.errors import ApiError
from api.guards import MAX_INT32
from api.services import Services
from commands.messages import OwnerBody, ShareBody
from domain.access import Actor, normalise_principal
from domain.errors import NotFound

PrincipalId = Annotated[str, PathParameter(max_length=140)]


def _owner(services: Services, owner_id: str) -> dict[str, Any]:
    known = services.principals.principals([owner_id]).get(owner_id)
    p = render.principal(owner_id, known)
    is_team = p["type"] == "team"
    return {
        "id": owner_id,
        "userId": None if is_team else owner_id,
        "teamId": owner_id.removeprefix("team:") if is_team else None,
        "name": p["name"],
        "type": p["type"],
        "_links": {"self": {"href": f"/api/principals/{owner_id}"}},
    }


class SharingController(Controller):
    path = "/api/integrations/{ident:str}"
    tags = ["sharing"]

    @get("/shares", sync_to_thread=True, summary="Every share of the integration, with its principal")
    def list_shares(
        self, services: NamedDependency[Services], actor: NamedDependency[Actor], ident: FromPath[str]
    ) -> dict[str, Any]:
        integration = services.app.integration_for(actor, resolve_integration(services, actor, ident))
        iid = str(integration.id)
        known = services.principals.principals(list(integration.shares))
        items = []
        for pid, data in sorted(integration.shares.items()):
            item = render.share(iid, pid, data)
            item["principal"] = render.principal(pid, known.get(pid))
            items.append(item)
        return {
            "_links": {"self": {"href": f"/api/integrations/{iid}/shares"}},
            "_embedded": {"inf:integration-share": items},
        }

    @get("/shares/{principal_id:str}", sync_to_thread=True, summary="One share")
    def read_share(
        self,
        services: NamedDependency[Services],
        actor: NamedDependency[Actor],
        ident: FromPath[str],
        principal_id: PrincipalId,
    ) -> dict[str, Any]:
        integration = services.app.integration_for(actor, resolve_integration(services, actor, ident))
        pid = normalise_principal(principal_id)
        if pid not in integration.shares:
            raise NotFound(f"No share for principal '{pid}'.")
        return render.share(str(integration.id), pid, integration.shares[pid])

    @put("/shares/{principal_id:str}", sync_to_thread=True, summary="Grant or change access (upsert)")
    def put_share(
        self,
        services: NamedDependency[Services],
        actor: NamedDependency[Actor],
        ident: FromPath[str],
        principal_id: PrincipalId,
        data: JSONBody[ShareBody],
    ) -> Response[Any]:
        if data.access_level > MAX_INT32:  # levels above 3 count as 3 (ADR 0005); the read model holds 32 bits
            raise ApiError(
                400,
                f"accessLevel must be at most {MAX_INT32}.",
                [{"field": "accessLevel", "message": f"must be at most {MAX_INT32}"}],
            )
        iid = resolve_integration(services, actor, ident)
        pid = normalise_principal(principal_id)
        written = services.app.share_integration(actor, iid, pid, data.access_level)
        return write_response(services, actor, written, render.share(str(iid), pid, written.value))

    @delete("/shares/{principal_id:str}", sync_to_thread=True, status_code=204, summary="Revoke a share")
    def delete_share(
        self,
        services: NamedDependency[Services],
        actor: NamedDependency[Actor],
        ident: FromPath[str],
        principal_id: PrincipalId,
    ) -> Response[None]:
        iid = resolve_integration(services, actor, ident)
        written = services.app.unshare_integration(actor, iid, principal_id)
        return write_response(services, actor, written, None, status=204)

    @get("/owner", sync_to_thread=True, summary="The owning principal")
    def read_owner(
        self, services: NamedDependency[Services], actor: NamedDependency[Actor], ident: FromPath[str]
    ) -> dict[str, Any]:
        integration = services.app.integration_for(actor, resolve_integration(services, actor, ident))
        return _owner(services, integration.owner_id)

    @put("/owner", sync_to_thread=True, summary="Transfer ownership to a user or a team")
    def transfer(
        self,
        services: NamedDependency[Services],
        actor: NamedDependency[Actor],
        ident: FromPath[str],
        data: JSONBody[OwnerBody],
    ) -> Response[Any]:
        iid = resolve_integration(services, actor, ident)
        written = services.app.transfer_integration(actor, iid, data)
        return write_response(services, actor, written, _owner(services, written.value.owner_id))

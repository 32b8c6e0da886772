"""What several controllers share: dependencies, id resolution, write responses, consistency."""

from __future__ import annotations

from typing import Annotated, Any
from uuid import UUID

from litestar import Request, Response
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.params import HeaderParameter

from api.errors import ApiError
from api.services import Services
from commands.service import Written
from domain.access import Actor
from domain.errors import Conflict, NotFound

POSITION_HEADER = "X-Event-Position"
WaitFor = Annotated[int | None, HeaderParameter(name="X-Wait-For-Position", ge=0, required=False)]
IfMatch = Annotated[str | None, HeaderParameter(name="If-Match", required=False, max_length=100)]


def provide_services(state: State) -> Services:
    return state.services


def services_of(request: Request[Any, Any, State]) -> Services:
    """The services without the dependency machinery (for hot routes; see their comments)."""
    services: Services = request.app.state.services
    return services


def provide_actor(request: Request[Actor, Any, State], services: NamedDependency[Services]) -> Actor:
    """``services`` is unused but makes this dependency follow that one: Litestar resolves
    independent dependencies of a handler concurrently, in an anyio task group of one task each,
    on every request (a measurable share of a request's CPU); dependent ones run in sequence."""
    return request.user


def visible_to(actor: Actor) -> tuple[str, ...] | None:
    """Principal ids for read-model filters; ``None`` means everything (superuser)."""
    return None if actor.superuser else actor.principal_ids


def consistent_read(services: Services, actor: Actor, wait_for: int | None = None) -> None:
    """Before a read-model query: wait (bounded) until it includes the caller's own writes."""
    if wait_for is not None and wait_for > (services.app.recorder.max_notification_id() or 0):
        # No write returned that position, so no wait could end: a client error, not a 503 in 5 s.
        raise ApiError(400, "X-Wait-For-Position is beyond the end of the event log; send a position a write returned.")
    position = max(filter(None, (services.writes.last(actor.id), wait_for)), default=None)
    if position is not None and not services.waiter.wait(position, services.config.read_your_writes_timeout):
        raise ApiError(503, "The read model is behind; retry shortly.", headers={"Retry-After": "1"})


def resolve_integration(services: Services, actor: Actor, ident: str, wait_for: int | None = None) -> UUID:
    """``{id}`` may be a UUID, ``ownerId:slug`` or a bare slug visible to the caller."""
    try:
        return UUID(ident)
    except ValueError:
        pass
    if ":" in ident:
        owner, _, slug = ident.rpartition(":")
        found = services.app.find_integration_id(owner, slug)
        if found is None:
            raise NotFound("Integration not found.")
        return found
    consistent_read(services, actor, wait_for)
    rows = services.listing.by_slug(ident, visible_to(actor))
    if not rows:
        raise NotFound("Integration not found.")
    if len(rows) > 1:
        candidates = sorted(f"{r['owner_id']}:{r['slug']}" for r in rows)
        raise Conflict(
            f"The slug '{ident}' is ambiguous; address the integration by ownerId:slug or id.",
            {"candidates": candidates},
        )
    return UUID(str(rows[0]["id"]))


def parse_if_match(value: str | None) -> int | None:
    if value is None or value.strip() == "*":
        return None
    tag = value.strip().removeprefix("W/").strip('"')
    if not tag.isdigit():
        raise ApiError(400, 'If-Match must be a version ETag such as "3".')
    return int(tag)


def write_response(
    services: Services,
    actor: Actor,
    written: Written[Any],
    content: Any,
    *,
    status: int = 200,
    headers: dict[str, str] | None = None,
    wait: bool = False,
) -> Response[Any]:
    """Answer a command; remember its position so the caller's next read includes it.

    ``wait`` makes the answer itself wait for the read models (identity changes: a new token
    or membership must work on the very next request, even on another connection).
    """
    services.writes.record(actor.id, written.position)
    out = dict(headers or {})
    if written.position is not None:
        out[POSITION_HEADER] = str(written.position)
        if wait:
            services.waiter.wait(written.position, services.config.read_your_writes_timeout)
            services.auth_cache.clear()  # an identity change: never authenticate from the old rows
    return Response(content=content, status_code=status, headers=out)


def revoke_connections(services: Services, actor: Actor, iid: UUID, reason: str, *, only_stale: bool) -> None:
    """Revoke an integration's connections at the provider and discard their tokens: all of them
    (deletion), or those made before a re-point or mode switch (OA-18), unusable already.
    Called from sync handlers (worker threads)."""
    if services.connections is None or services.connections_view is None:
        return
    _caught_up(services)
    rows = services.connections_view.for_integration(str(iid))
    ids = [UUID(str(r["connection_id"])) for r in rows if r.get("status") != "revoked"]
    if ids:
        services.run_async(services.connections.revoke_all(actor.id, iid, ids, reason, only_stale=only_stale))


def revoke_user_connections(services: Services, actor: Actor, user_id: str) -> None:
    """A removed user's connections: revoked at the providers, tokens discarded."""
    if services.connections is None or services.connections_view is None:
        return
    _caught_up(services)
    by_integration: dict[str, list[UUID]] = {}
    for row in services.connections_view.for_owner(user_id):
        if row.get("status") != "revoked":
            by_integration.setdefault(str(row["integration_id"]), []).append(UUID(str(row["connection_id"])))
    for iid, ids in by_integration.items():
        services.run_async(services.connections.revoke_all(actor.id, UUID(iid), ids, "user_removed"))


def _caught_up(services: Services) -> None:
    """Wait (bounded) until the read models include every event so far: a connection made a
    moment ago must be revoked too. Past the bound, the epoch check still makes it unusable."""
    head = services.app.recorder.max_notification_id()
    if head:
        services.waiter.wait(head, services.config.read_your_writes_timeout)

"""Users, teams, API tokens and session login. The admin routes need a superuser."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Request, Response, delete, get, patch, post, put
from litestar.datastructures import Cookie, State
from litestar.di import NamedDependency
from litestar.params import JSONBody, PathParameter

from api import render
from api.auth import SESSION_COOKIE
from api.controllers.common import consistent_read, revoke_user_connections, write_response
from api.errors import ApiError
from api.services import Services
from commands.messages import LoginBody, MemberBody, TeamBody, TokenBody, UserBody
from domain.access import Actor
from domain.errors import DomainError, Forbidden, NotFound

Id = Annotated[str, PathParameter(max_length=128)]


def _user(services: Services, user_id: str) -> dict[str, Any]:
    user = services.app.user(user_id)
    row = services.principals.user(user_id) or {}
    return render.user(
        user.profile,
        user.user_id,
        has_password=user.password is not None,
        teams=row.get("team_roles", {}),
        created_at=user.created_on,
        updated_at=user.modified_on,
    )


def _require_superuser(actor: Actor) -> None:
    if not actor.superuser:
        raise Forbidden("This needs a superuser.")


class UserController(Controller):
    path = "/api/users"
    tags = ["users"]

    @get("/", sync_to_thread=True, summary="All users (superuser)")
    def list_users(self, services: NamedDependency[Services], actor: NamedDependency[Actor]) -> list[dict[str, Any]]:
        _require_superuser(actor)
        consistent_read(services, actor)
        return [
            render.user(
                r,
                r["user_id"],
                has_password=bool(r.get("password")),
                teams=r.get("team_roles"),
                created_at=r.get("created_at"),
                updated_at=r.get("updated_at"),
            )
            for r in services.principals.users()
        ]

    @post("/", sync_to_thread=True, status_code=201, summary="Create a user (superuser)")
    def create_user(
        self, services: NamedDependency[Services], actor: NamedDependency[Actor], data: JSONBody[UserBody]
    ) -> Response[Any]:
        written = services.app.create_user(actor, data)
        uid = written.value.user_id
        return write_response(
            services,
            actor,
            written,
            _user(services, uid),
            status=201,
            headers={"Location": f"/api/users/{uid}"},
            wait=True,
        )

    @get("/{user_id:str}", sync_to_thread=True, summary="One user (superuser, or yourself)")
    def read_user(
        self, services: NamedDependency[Services], actor: NamedDependency[Actor], user_id: Id
    ) -> dict[str, Any]:
        if not (actor.superuser or actor.id == user_id):
            raise NotFound(f"User '{user_id}' not found.")
        return _user(services, user_id)

    @patch("/{user_id:str}", sync_to_thread=True, summary="Change a user (superuser)")
    def update_user(
        self, services: NamedDependency[Services], actor: NamedDependency[Actor], user_id: Id, data: JSONBody[UserBody]
    ) -> Response[Any]:
        written = services.app.update_user(actor, user_id, data)
        return write_response(services, actor, written, _user(services, user_id), wait=True)

    @delete("/{user_id:str}", sync_to_thread=True, status_code=204, summary="Remove a user (superuser)")
    def delete_user(
        self, services: NamedDependency[Services], actor: NamedDependency[Actor], user_id: Id
    ) -> Response[None]:
        written = services.app.delete_user(actor, user_id)
        revoke_user_connections(services, actor, user_id)
        return write_response(services, actor, written, None, status=204, wait=True)

    @get("/{user_id:str}/tokens", sync_to_thread=True, summary="A user's API tokens (never their values)")
    def list_tokens(
        self, services: NamedDependency[Services], actor: NamedDependency[Actor], user_id: Id
    ) -> list[dict[str, Any]]:
        if not (actor.superuser or actor.id == user_id):
            raise NotFound(f"User '{user_id}' not found.")
        user = services.app.user(user_id)
        return [
            {
                "id": tid,
                "label": t["label"],
                "kind": t.get("kind", "api"),
                "createdAt": render.iso(t["created_at"]),
                "expiresAt": render.iso(t.get("expires_at")),
            }
            for tid, t in sorted(user.tokens.items())
        ]

    @post("/{user_id:str}/tokens", sync_to_thread=True, status_code=201, summary="Issue an API token (shown once)")
    def issue_token(
        self,
        services: NamedDependency[Services],
        actor: NamedDependency[Actor],
        user_id: Id,
        data: JSONBody[TokenBody | None] = None,
    ) -> Response[Any]:
        written = services.app.issue_token(actor, user_id, data.label if data else "")
        issued = written.value
        body = {
            "token": issued.token,
            "id": issued.token_id,
            "userId": issued.user_id,
            "label": data.label if data else "",
        }
        return write_response(
            services, actor, written, body, status=201, headers={"Cache-Control": "no-store"}, wait=True
        )

    @delete("/{user_id:str}/tokens/{token_id:str}", sync_to_thread=True, status_code=204, summary="Revoke a token")
    def revoke_token(
        self, services: NamedDependency[Services], actor: NamedDependency[Actor], user_id: Id, token_id: Id
    ) -> Response[None]:
        written = services.app.revoke_token(actor, user_id, token_id)
        return write_response(services, actor, written, None, status=204, wait=True)


class TeamController(Controller):
    path = "/api/teams"
    tags = ["teams"]

    @get("/", sync_to_thread=True, summary="All teams")
    def list_teams(self, services: NamedDependency[Services], actor: NamedDependency[Actor]) -> list[dict[str, Any]]:
        consistent_read(services, actor)
        return [
            render.team(t["team_id"], t["name"], t.get("members") or {}, t.get("created_at"))
            for t in services.principals.teams()
        ]

    @post("/", sync_to_thread=True, status_code=201, summary="Create a team (superuser)")
    def create_team(
        self, services: NamedDependency[Services], actor: NamedDependency[Actor], data: JSONBody[TeamBody]
    ) -> Response[Any]:
        written = services.app.create_team(actor, data.id, data.name)
        team = written.value
        return write_response(
            services,
            actor,
            written,
            render.team(team.team_id, team.name, team.members, team.created_on),
            status=201,
            headers={"Location": f"/api/teams/{team.team_id}"},
            wait=True,
        )

    @get("/{team_id:str}", sync_to_thread=True, summary="One team with its members")
    def read_team(
        self, services: NamedDependency[Services], actor: NamedDependency[Actor], team_id: Id
    ) -> dict[str, Any]:
        del actor
        team = services.app.team(team_id)
        return render.team(team.team_id, team.name, team.members, team.created_on)

    @delete("/{team_id:str}", sync_to_thread=True, status_code=204, summary="Remove a team (superuser)")
    def delete_team(
        self, services: NamedDependency[Services], actor: NamedDependency[Actor], team_id: Id
    ) -> Response[None]:
        return write_response(services, actor, services.app.delete_team(actor, team_id), None, status=204, wait=True)

    @put("/{team_id:str}/members/{user_id:str}", sync_to_thread=True, summary="Add a member or change the role")
    def set_member(
        self,
        services: NamedDependency[Services],
        actor: NamedDependency[Actor],
        team_id: Id,
        user_id: Id,
        data: JSONBody[MemberBody | None] = None,
    ) -> Response[Any]:
        written = services.app.set_member(actor, team_id, user_id, data.role if data else "member")
        team = written.value
        return write_response(
            services, actor, written, render.team(team.team_id, team.name, team.members, team.created_on), wait=True
        )

    @delete("/{team_id:str}/members/{user_id:str}", sync_to_thread=True, status_code=204, summary="Remove a member")
    def remove_member(
        self, services: NamedDependency[Services], actor: NamedDependency[Actor], team_id: Id, user_id: Id
    ) -> Response[None]:
        written = services.app.remove_member(actor, team_id, user_id)
        return write_response(services, actor, written, None, status=204, wait=True)


class AuthController(Controller):
    path = "/api"
    tags = ["auth"]

    @post("/auth/login", sync_to_thread=True, status_code=200, summary="Log in with username and password")
    def login(self, state: State, data: JSONBody[LoginBody]) -> Response[Any]:
        services: Services = state.services
        try:
            written = services.app.login(data.username, data.password)
        except DomainError as e:
            raise ApiError(401, e.message) from None
        issued = written.value
        services.writes.record(issued.user_id, written.position)
        if written.position is not None:
            services.waiter.wait(written.position, services.config.read_your_writes_timeout)
        secure = services.config.secure_cookies
        cookie = Cookie(
            key=("__Host-" if secure else "") + SESSION_COOKIE,
            value=issued.token,
            path="/",
            httponly=True,
            secure=secure,
            samesite="lax",
            max_age=services.config.session_ttl_seconds,
        )
        return Response(
            {"userId": issued.user_id, "expiresAt": render.iso(issued.expires_at)},
            cookies=[cookie],
            headers={"Cache-Control": "no-store"},
        )

    @post("/auth/logout", sync_to_thread=True, status_code=204, summary="End the session")
    def logout(self, services: NamedDependency[Services], request: Request[Actor, Any, State]) -> Response[None]:
        actor: Actor = request.user
        row = services.principals.user_by_token_hash(request.auth["token_hash"]) or {}
        if row.get("token_id") and row.get("token_kind") == "session":  # API tokens are revoked explicitly
            written = services.app.logout(actor.id, row["token_id"])
            if written.position is not None:
                services.waiter.wait(written.position, services.config.read_your_writes_timeout)
            services.auth_cache.clear()
        response: Response[None] = Response(None, status_code=204)
        secure = services.config.secure_cookies
        response.set_cookie(
            ("__Host-" if secure else "") + SESSION_COOKIE,
            "",
            path="/",
            max_age=0,
            expires=0,
            httponly=True,
            secure=secure,
            samesite="lax",
        )
        return response

    @get("/me", sync_to_thread=True, summary="The authenticated caller")
    def me(self, services: NamedDependency[Services], actor: NamedDependency[Actor]) -> dict[str, Any]:
        return _user(services, actor.id)


__all__ = ["AuthController", "TeamController", "UserController"]

"""Users, teams, tokens and session login."""

from __future__ import annotations

from tests.api.conftest import ADMIN_TOKEN, Api


def test_admin_bootstrap_token_works(api: Api) -> None:
    r = api.client.get("/api/me", headers=api.admin)
    assert r.status_code == 200 and r.json()["id"] == "admin" and r.json()["superuser"] is True


def test_user_crud_is_superuser_only(api: Api) -> None:
    bob = api.user("bob")
    r = api.client.post("/api/users", json={"id": "x"}, headers=bob)
    assert r.status_code == 403
    r = api.client.post(
        "/api/users",
        json={
            "id": "jane",
            "username": "jane.doe",
            "email": "j@example.com",
            "displayName": "Jane",
            "custom": {"region": "eu"},
        },
        headers=api.admin,
    )
    assert r.status_code == 201 and r.headers["location"] == "/api/users/jane"
    body = r.json()
    assert body["username"] == "jane.doe" and body["custom"] == {"region": "eu"} and body["hasPassword"] is False
    assert api.client.post("/api/users", json={"id": "jane"}, headers=api.admin).status_code == 409
    assert (
        api.client.post("/api/users", json={"id": "jim", "username": "jane.doe"}, headers=api.admin).status_code == 409
    )
    r = api.client.patch("/api/users/jane", json={"displayName": "Jane D."}, headers=api.admin)
    assert r.status_code == 200 and r.json()["displayName"] == "Jane D."
    assert api.client.get("/api/users/jane", headers=api.admin).json()["email"] == "j@example.com"
    assert api.client.get("/api/users/jane", headers=bob).status_code == 404
    assert api.client.delete("/api/users/jane", headers=api.admin).status_code == 204
    assert api.client.get("/api/users/jane", headers=api.admin).status_code == 404
    assert api.client.post("/api/users", json={"id": "bad id"}, headers=api.admin).status_code == 400


def test_tokens_are_shown_once_stored_hashed_and_revocable(api: Api) -> None:
    api.user("bob")
    r = api.client.post("/api/users/bob/tokens", json={"label": "ci"}, headers=api.admin)
    assert r.status_code == 201
    token, token_id = r.json()["token"], r.json()["id"]
    assert api.client.get("/api/me", headers=api.as_(token)).json()["id"] == "bob"
    listed = api.client.get("/api/users/bob/tokens", headers=api.admin).json()
    assert token_id in {t["id"] for t in listed} and token not in str(listed)
    assert api.client.delete(f"/api/users/bob/tokens/{token_id}", headers=api.admin).status_code == 204
    assert api.client.get("/api/me", headers=api.as_(token)).status_code == 401


def test_removed_user_cannot_authenticate(api: Api) -> None:
    bob = api.user("bob")
    assert api.client.delete("/api/users/bob", headers=api.admin).status_code == 204
    assert api.client.get("/api/me", headers=bob).status_code == 401


def test_teams_and_membership_roles(api: Api) -> None:
    api.user("bob")
    r = api.client.post("/api/teams", json={"id": "analytics", "name": "Analytics"}, headers=api.admin)
    assert r.status_code == 201 and r.json()["id"] == "team:analytics"
    r = api.client.put("/api/teams/analytics/members/bob", json={"role": "admin"}, headers=api.admin)
    assert r.status_code == 200 and r.json()["members"] == [{"userId": "bob", "role": "admin"}]
    assert (
        api.client.put("/api/teams/analytics/members/bob", json={"role": "king"}, headers=api.admin).status_code == 400
    )
    assert api.client.put("/api/teams/analytics/members/ghost", json={}, headers=api.admin).status_code == 404
    assert api.client.get("/api/me", headers=api.admin).status_code == 200
    assert api.client.delete("/api/teams/analytics/members/bob", headers=api.admin).status_code == 204
    assert api.client.get("/api/teams/analytics", headers=api.admin).json()["members"] == []
    assert api.client.post("/api/teams", json={"id": "analytics", "name": "x"}, headers=api.admin).status_code == 409


def test_login_cookie_session_and_logout(api: Api) -> None:
    r = api.client.post("/api/users", json={"id": "sam", "password": "correct horse battery"}, headers=api.admin)
    assert r.status_code == 201 and r.json()["hasPassword"] is True
    assert api.client.post("/api/auth/login", json={"username": "sam", "password": "wrong password"}).status_code == 401
    assert api.client.post("/api/auth/login", json={"username": "nobody", "password": "whatever1"}).status_code == 401
    r = api.client.post("/api/auth/login", json={"username": "sam", "password": "correct horse battery"})
    assert r.status_code == 200, r.text
    set_cookie = r.headers["set-cookie"]
    assert "HttpOnly" in set_cookie and "SameSite=lax" in set_cookie.replace("Lax", "lax")
    assert api.client.get("/api/me").json()["id"] == "sam"  # the client keeps the cookie
    r = api.client.post("/api/integrations", json={"name": "X"}, headers={"Origin": "https://evil.example"})
    assert r.status_code == 403
    session = api.client.cookies.get("integrations_session")
    assert api.client.post("/api/auth/logout").status_code == 204
    assert api.client.get("/api/me").status_code == 401  # the cookie was cleared
    api.client.cookies.set("integrations_session", session)  # a stolen copy of it is dead too
    assert api.client.get("/api/me").status_code == 401
    api.client.cookies.clear()


def test_expired_session_is_rejected(api: Api) -> None:
    from datetime import timedelta

    api.client.post("/api/users", json={"id": "sue", "password": "correct horse battery"}, headers=api.admin)
    api.runtime.services.app.session_ttl = timedelta(seconds=-1)  # sessions issued from now on are already expired
    r = api.client.post("/api/auth/login", json={"username": "sue", "password": "correct horse battery"})
    assert r.status_code == 200
    assert api.client.get("/api/me").status_code == 401
    api.client.cookies.clear()


def test_logout_with_an_api_token_does_not_revoke_it(api: Api) -> None:
    bob = api.user("bob")
    assert api.client.post("/api/auth/logout", headers=bob).status_code == 204
    assert api.client.get("/api/me", headers=bob).status_code == 200


def test_admin_bootstrap_is_idempotent(api: Api) -> None:
    app = api.runtime.services.app
    assert app.ensure_admin(ADMIN_TOKEN) is None
    admin = app.user("admin")
    assert [t for t in admin.tokens] == ["bootstrap"]


def test_auth_cache_ttl_bounds_how_long_another_process_revocation_takes(api: Api) -> None:
    """A revocation made by another server process applies here once the short cache expires."""
    import time

    from cli.runtime import build_runtime
    from domain.access import Actor

    api.runtime.services.auth_cache.ttl = 0.5
    bob = api.user("bob")
    token_id = api.client.get("/api/users/bob/tokens", headers=api.admin).json()[0]["id"]
    assert api.client.get("/api/me", headers=bob).status_code == 200  # cached now
    other = build_runtime(api.runtime.settings)
    try:
        written = other.services.app.revoke_token(Actor(id="admin", superuser=True), "bob", token_id)
    finally:
        other.close()
    assert api.runtime.services.waiter.wait(written.position, 5)
    time.sleep(0.6)
    assert api.client.get("/api/me", headers=bob).status_code == 401

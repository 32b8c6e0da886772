"""Integrations CRUD through the HTTP API, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest

from tests.api.conftest import Api

OAUTH = {
    "name": "Google Drive",
    "slug": "gdrive",
    "type": "google-drive",
    "category": "storage",
    "description": "Team drive",
    "authType": "oauth2",
    "authUri": "https://accounts.google.com/o/oauth2/v2/auth",
    "tokenUri": "https://oauth2.googleapis.com/token",
    "clientId": "client-123",
    "clientSecret": "very-secret-client-secret",
    "scope": "https://www.googleapis.com/auth/drive.readonly",
    "apiBaseUri": "https://www.googleapis.com/drive/v3",
}


def test_create_returns_201_location_and_hides_secrets(api: Api) -> None:
    alice = api.user("alice")
    r = api.client.post("/api/integrations", json=OAUTH, headers=alice)
    assert r.status_code == 201, r.text
    body = r.json()
    assert r.headers["location"] == f"/api/integrations/{body['id']}"
    assert r.headers["etag"] == '"1"'
    assert body["slug"] == "gdrive" and body["ownerId"] == "alice" and body["mode"] == "per-user"
    assert body["hasClientSecret"] is True and "clientSecret" not in body
    assert "very-secret-client-secret" not in r.text
    assert body["supportsUpload"] is True
    assert body["createdAt"].endswith("Z") and len(body["createdAt"]) == 24
    assert body["_links"]["self"]["href"] == f"/api/integrations/{body['id']}"


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"slug": "Bad Slug"}, "slug"),
        ({"authType": "oauth2", "clientSecret": None}, "clientSecret"),
        ({"tokenUri": "http://evil.example.com/token"}, "tokenUri"),
        ({"apiBaseUri": "ftp://example.com"}, "apiBaseUri"),
        ({"authUri": "https://user:pw@example.com/auth"}, "authUri"),
        ({"headers": {"X-User": "${user.password}"}}, "headers.X-User"),
        ({"headers": {"Host": "x"}}, "headers.Host"),
    ],
)
def test_invalid_create_is_400_with_details_and_changes_nothing(api: Api, patch: dict, field: str) -> None:
    alice = api.user("alice")
    body = {**OAUTH, **patch}
    body = {k: v for k, v in body.items() if v is not None}
    r = api.client.post("/api/integrations", json=body, headers=alice)
    assert r.status_code == 400, r.text
    err = r.json()
    assert err["statusCode"] == 400 and err["error"] == "Bad Request"
    assert field in {d["field"] for d in err["details"]}
    assert api.client.get("/api/integrations", headers=alice).json()["total"] == 0


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b'{"name": 5}', b'{"name": "x", "unknownField": 1}', b"[]", b'{"name": "' + b"x" * 300 + b'"}'],
)
def test_malformed_bodies_are_400(api: Api, raw: bytes) -> None:
    alice = api.user("alice")
    r = api.client.post("/api/integrations", content=raw, headers={**alice, "Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert set(r.json()) >= {"statusCode", "error", "message"}
    assert api.client.get("/api/integrations", headers=alice).json()["total"] == 0


def test_oversized_body_is_413(api: Api) -> None:
    alice = api.user("alice")
    r = api.client.post(
        "/api/integrations",
        content=b"{" + b" " * 2_000_000 + b"}",
        headers={**alice, "Content-Type": "application/json"},
    )
    assert r.status_code == 413
    assert r.json()["statusCode"] == 413


def test_duplicate_slug_per_owner_is_409_but_other_owner_may_reuse(api: Api) -> None:
    alice, bob = api.user("alice"), api.user("bob")
    api.integration(alice, slug="crm")
    r = api.client.post("/api/integrations", json={"name": "Other", "slug": "crm"}, headers=alice)
    assert r.status_code == 409
    assert api.integration(bob, slug="crm")["ownerId"] == "bob"


def test_create_needs_integration_creation_permission(api: Api) -> None:
    carol = api.user("carol", permissions=[])
    r = api.client.post("/api/integrations", json={"name": "X"}, headers=carol)
    assert r.status_code == 403


def test_unauthenticated_is_401(api: Api) -> None:
    assert api.client.get("/api/integrations").status_code == 401
    r = api.client.get("/api/integrations", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json()["error"] == "Unauthorized"


def test_get_by_uuid_owner_slug_and_bare_slug(api: Api) -> None:
    alice = api.user("alice")
    created = api.integration(alice, slug="crm", name="CRM")
    for ident in (created["id"], "alice:crm", "crm"):
        r = api.client.get(f"/api/integrations/{ident}", headers=alice)
        assert r.status_code == 200, (ident, r.text)
        assert r.json()["id"] == created["id"]


def test_ambiguous_bare_slug_is_409_with_candidates(api: Api) -> None:
    alice, bob = api.user("alice"), api.user("bob")
    mine = api.integration(alice, slug="crm")
    theirs = api.integration(bob, slug="crm")
    r = api.client.put(f"/api/integrations/{theirs['id']}/shares/alice", json={"accessLevel": 1}, headers=bob)
    assert r.status_code == 200
    # Bob's write is not Alice's own: she reads it consistently by passing its position along.
    position = r.headers["X-Event-Position"]
    r = api.client.get("/api/integrations/crm", headers={**alice, "X-Wait-For-Position": position})
    assert r.status_code == 409
    assert r.json()["details"]["candidates"] == ["alice:crm", "bob:crm"]
    assert mine["id"] != theirs["id"]


def test_invisible_integration_is_404_on_every_route(api: Api) -> None:
    alice, bob = api.user("alice"), api.user("bob")
    iid = api.integration(alice)["id"]
    for method, path, body in [
        ("GET", f"/api/integrations/{iid}", None),
        ("PUT", f"/api/integrations/{iid}", {"name": "x"}),
        ("PATCH", f"/api/integrations/{iid}", {"name": "x"}),
        ("DELETE", f"/api/integrations/{iid}", None),
        ("GET", f"/api/integrations/{iid}/shares", None),
        ("PUT", f"/api/integrations/{iid}/shares/bob", {"accessLevel": 3}),
        ("GET", f"/api/integrations/{iid}/owner", None),
        ("PUT", f"/api/integrations/{iid}/owner", {"userId": "bob"}),
        ("GET", "/api/integrations/alice:example", None),
    ]:
        r = api.client.request(method, path, json=body, headers=bob)
        assert r.status_code == 404, (method, path, r.text)


def test_patch_is_partial_and_keeps_omitted_secrets(api: Api) -> None:
    alice = api.user("alice")
    created = api.client.post("/api/integrations", json=OAUTH, headers=alice).json()
    r = api.client.patch(f"/api/integrations/{created['id']}", json={"description": "New"}, headers=alice)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["description"] == "New" and body["name"] == "Google Drive" and body["hasClientSecret"] is True
    assert body["version"] == 2 and r.headers["etag"] == '"2"'
    r = api.client.patch(f"/api/integrations/{created['id']}", json={"description": None}, headers=alice)
    assert "description" not in r.json() or r.json()["description"] == ""


def test_put_replaces_settings_but_keeps_secrets(api: Api) -> None:
    alice = api.user("alice")
    created = api.client.post("/api/integrations", json=OAUTH, headers=alice).json()
    replacement = {k: v for k, v in OAUTH.items() if k not in ("clientSecret", "description", "category")}
    r = api.client.put(f"/api/integrations/{created['id']}", json=replacement, headers=alice)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["hasClientSecret"] is True
    assert body["description"] == "" and body["category"] == ""


def test_rename_slug_moves_the_natural_key(api: Api) -> None:
    alice = api.user("alice")
    iid = api.integration(alice, slug="old")["id"]
    r = api.client.patch(f"/api/integrations/{iid}", json={"slug": "new"}, headers=alice)
    assert r.status_code == 200 and r.json()["slug"] == "new"
    assert api.client.get("/api/integrations/alice:new", headers=alice).json()["id"] == iid
    assert api.client.get("/api/integrations/alice:old", headers=alice).status_code == 404
    assert api.integration(alice, slug="old")["id"] != iid  # the old slug is free again


def test_if_match_is_honoured(api: Api) -> None:
    alice = api.user("alice")
    iid = api.integration(alice)["id"]
    r = api.client.patch(f"/api/integrations/{iid}", json={"description": "a"}, headers={**alice, "If-Match": '"1"'})
    assert r.status_code == 200
    r = api.client.patch(f"/api/integrations/{iid}", json={"description": "b"}, headers={**alice, "If-Match": '"1"'})
    assert r.status_code == 412
    assert r.json()["details"]["currentVersion"] == 2
    r = api.client.delete(f"/api/integrations/{iid}", headers={**alice, "If-Match": '"1"'})
    assert r.status_code == 412
    r = api.client.patch(f"/api/integrations/{iid}", json={"description": "b"}, headers={**alice, "If-Match": "junk"})
    assert r.status_code == 400


def test_delete_is_204_then_404_and_slug_reusable(api: Api) -> None:
    alice = api.user("alice")
    iid = api.integration(alice, slug="gone")["id"]
    assert api.client.delete(f"/api/integrations/{iid}", headers=alice).status_code == 204
    assert api.client.get(f"/api/integrations/{iid}", headers=alice).status_code == 404
    assert api.client.get("/api/integrations", headers=alice).json()["total"] == 0
    assert api.integration(alice, slug="gone")["id"] != iid


def test_history_records_actor_for_every_change(api: Api) -> None:
    alice = api.user("alice")
    api.user("bob")
    iid = api.integration(alice)["id"]
    api.client.put(f"/api/integrations/{iid}/shares/bob", json={"accessLevel": 2}, headers=alice)
    api.client.patch(f"/api/integrations/{iid}", json={"description": "x"}, headers=alice)
    history = api.client.get(f"/api/integrations/{iid}/history", headers=alice).json()
    assert [h["type"] for h in history] == [
        "integrations/Integration.Created.v1",
        "integrations/Integration.Shared.v1",
        "integrations/Integration.Updated.v1",
    ]
    assert {h["actorId"] for h in history} == {"alice"}
    assert all(h["at"].endswith("Z") for h in history)
    assert "sk-test-secret-value" not in str(history)


def test_a_taken_slug_is_409_without_a_read_first_and_leaves_no_sealed_secret(api: Api) -> None:
    """The create claims its slug optimistically (a new UniqueKey at version 1): a taken key
    collides on the store's primary key, the retry reads it, and answers 409; the secret sealed
    for the refused integration is shredded. A released key is claimed again the same way."""
    alice = api.user("alice")
    first = api.integration(alice, slug="dup")
    keys = sum(api.runtime.vault.key_usage().values())
    r = api.client.post("/api/integrations", json={"name": "Again", "slug": "dup", "apiKey": "sk-other"}, headers=alice)
    assert r.status_code == 409
    assert sum(api.runtime.vault.key_usage().values()) == keys  # nothing references it: shredded
    assert (
        api.client.patch(f"/api/integrations/{first['id']}", json={"slug": "moved"}, headers=alice).status_code == 200
    )
    again = api.integration(alice, slug="dup")  # the released key, claimed again
    assert again["id"] != first["id"]
    assert api.client.get("/api/integrations/alice:dup", headers=alice).json()["id"] == again["id"]

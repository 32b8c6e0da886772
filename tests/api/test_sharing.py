"""Shares, access levels and ownership transfer."""

from __future__ import annotations

from tests.api.conftest import Api


def test_share_upsert_read_list_and_delete(api: Api) -> None:
    alice = api.user("alice")
    api.user("bob")
    api.team("ops", {})
    iid = api.integration(alice)["id"]
    r = api.client.put(f"/api/integrations/{iid}/shares/bob", json={}, headers=alice)
    assert r.status_code == 200 and r.json()["accessLevel"] == 1
    r = api.client.put(f"/api/integrations/{iid}/shares/team:ops", json={"accessLevel": 2}, headers=alice)
    assert r.json() | {} and r.json()["principalId"] == "team:ops"
    one = api.client.get(f"/api/integrations/{iid}/shares/team:ops", headers=alice).json()
    assert one["accessLevel"] == 2 and one["integrationId"] == iid and one["createdAt"].endswith("Z")
    listing = api.client.get(f"/api/integrations/{iid}/shares", headers=alice).json()
    shares = {s["principalId"]: s for s in listing["_embedded"]["inf:integration-share"]}
    assert shares["bob"]["principal"] == {"id": "bob", "name": "Bob", "type": "user"}
    assert shares["team:ops"]["principal"] == {"id": "team:ops", "name": "Ops", "type": "team"}
    assert api.client.delete(f"/api/integrations/{iid}/shares/bob", headers=alice).status_code == 204
    assert api.client.get(f"/api/integrations/{iid}/shares/bob", headers=alice).status_code == 404
    assert api.client.delete(f"/api/integrations/{iid}/shares/bob", headers=alice).status_code == 404


def test_share_validation(api: Api) -> None:
    alice = api.user("alice")
    iid = api.integration(alice)["id"]
    for level in (0, -1):
        r = api.client.put(f"/api/integrations/{iid}/shares/alice", json={"accessLevel": level}, headers=alice)
        assert r.status_code == 400
    assert api.client.put(f"/api/integrations/{iid}/shares/nobody", json={}, headers=alice).status_code == 404
    assert api.client.put(f"/api/integrations/{iid}/shares/team:none", json={}, headers=alice).status_code == 404
    r = api.client.put(f"/api/integrations/{iid}/shares/bob", json={"accessLevel": "2"}, headers=alice)
    assert r.status_code in (400, 404)


def test_access_levels_use_edit_manage(api: Api) -> None:
    alice, bob = api.user("alice"), api.user("bob")
    api.user("carol")
    iid = api.integration(alice)["id"]
    api.client.put(f"/api/integrations/{iid}/shares/bob", json={"accessLevel": 1}, headers=alice)
    assert api.client.get(f"/api/integrations/{iid}", headers=bob).status_code == 200
    assert api.client.patch(f"/api/integrations/{iid}", json={"description": "x"}, headers=bob).status_code == 403
    api.client.put(f"/api/integrations/{iid}/shares/bob", json={"accessLevel": 2}, headers=alice)
    assert api.client.patch(f"/api/integrations/{iid}", json={"description": "x"}, headers=bob).status_code == 200
    assert api.client.put(f"/api/integrations/{iid}/shares/carol", json={}, headers=bob).status_code == 403
    assert api.client.delete(f"/api/integrations/{iid}", headers=bob).status_code == 403
    api.client.put(f"/api/integrations/{iid}/shares/bob", json={"accessLevel": 3}, headers=alice)
    assert api.client.put(f"/api/integrations/{iid}/shares/carol", json={}, headers=bob).status_code == 200
    assert api.client.delete(f"/api/integrations/{iid}", headers=bob).status_code == 204


def test_team_owner_admins_manage_members_use(api: Api) -> None:
    admin_user, member = api.user("tina"), api.user("mike")
    api.team("data", {"tina": "admin", "mike": "member"})
    iid = api.integration(admin_user, ownerId="team:data")["id"]
    assert api.client.get(f"/api/integrations/{iid}", headers=member).status_code == 200
    assert api.client.patch(f"/api/integrations/{iid}", json={"name": "Y"}, headers=member).status_code == 403
    assert api.client.patch(f"/api/integrations/{iid}", json={"name": "Y"}, headers=admin_user).status_code == 200
    outsider = api.user("olga")
    r = api.client.post("/api/integrations", json={"name": "Z", "ownerId": "team:data"}, headers=outsider)
    assert r.status_code == 403


def test_owner_read_and_transfer_moves_natural_key(api: Api) -> None:
    alice, bob = api.user("alice"), api.user("bob")
    api.team("ops", {"alice": "admin"})
    iid = api.integration(alice, slug="crm")["id"]
    owner = api.client.get(f"/api/integrations/{iid}/owner", headers=alice).json()
    assert owner["id"] == "alice" and owner["userId"] == "alice" and owner["type"] == "user"
    r = api.client.put(f"/api/integrations/{iid}/owner", json={"teamId": "ops"}, headers=alice)
    assert r.status_code == 200, r.text
    assert r.json()["id"] == "team:ops" and r.json()["teamId"] == "ops"
    assert api.client.get("/api/integrations/team:ops:crm", headers=alice).json()["id"] == iid
    assert api.client.get("/api/integrations/alice:crm", headers=alice).status_code == 404
    r = api.client.put(f"/api/integrations/{iid}/owner", json={"userId": "bob"}, headers=alice)
    assert r.status_code == 200
    assert api.client.get(f"/api/integrations/{iid}", headers=bob).json()["ownerId"] == "bob"
    assert api.client.get(f"/api/integrations/{iid}", headers=alice).status_code == 404


def test_transfer_clash_at_new_owner_is_409_and_changes_nothing(api: Api) -> None:
    alice, bob = api.user("alice"), api.user("bob")
    iid = api.integration(alice, slug="crm")["id"]
    api.integration(bob, slug="crm")
    r = api.client.put(f"/api/integrations/{iid}/owner", json={"userId": "bob"}, headers=alice)
    assert r.status_code == 409
    assert api.client.get(f"/api/integrations/{iid}", headers=alice).json()["ownerId"] == "alice"


def test_transfer_validation(api: Api) -> None:
    alice = api.user("alice")
    api.team("ops", {})
    iid = api.integration(alice)["id"]
    assert api.client.put(f"/api/integrations/{iid}/owner", json={}, headers=alice).status_code == 400
    assert (
        api.client.put(f"/api/integrations/{iid}/owner", json={"userId": "a", "teamId": "b"}, headers=alice).status_code
        == 400
    )
    assert api.client.put(f"/api/integrations/{iid}/owner", json={"userId": "ghost"}, headers=alice).status_code == 404
    assert api.client.put(f"/api/integrations/{iid}/owner", json={"teamId": "ops"}, headers=alice).status_code == 403


def test_sharing_with_the_owner_is_refused(api: Api) -> None:
    alice = api.user("alice")
    iid = api.integration(alice)["id"]
    r = api.client.put(f"/api/integrations/{iid}/shares/alice", json={"accessLevel": 1}, headers=alice)
    assert r.status_code == 400 and r.json()["details"][0]["field"] == "principalId"

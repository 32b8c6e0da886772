"""The permission-filtered HAL listing and the flat -list route."""

from __future__ import annotations

from tests.api.conftest import Api


def _names(api: Api, headers: dict[str, str], query: str = "") -> list[str]:
    r = api.client.get(f"/api/integrations{query}", headers=headers)
    assert r.status_code == 200, r.text
    return [i["name"] for i in r.json()["_embedded"]["inf:integration"]]


def test_listing_shows_owned_shared_team_and_superuser_views(api: Api) -> None:
    alice, bob, carol = api.user("alice"), api.user("bob"), api.user("carol")
    api.team("analytics", {"bob": "member", "carol": "admin"})
    api.integration(alice, name="Alpha", slug="alpha")
    shared = api.integration(alice, name="Beta", slug="beta")
    to_team = api.integration(alice, name="Gamma", slug="gamma")
    api.integration(carol, name="Team Owned", slug="team-owned", ownerId="team:analytics")
    api.integration(alice, name="Embedded", slug="embedded", embedded=True)
    assert api.client.put(f"/api/integrations/{shared['id']}/shares/bob", json={}, headers=alice).status_code == 200
    r = api.client.put(
        f"/api/integrations/{to_team['id']}/shares/team:analytics", json={"accessLevel": 1}, headers=alice
    )
    assert r.status_code == 200
    assert _names(api, alice) == ["Alpha", "Beta", "Gamma"]
    assert _names(api, bob) == ["Beta", "Gamma", "Team Owned"]
    assert _names(api, carol) == ["Gamma", "Team Owned"]
    assert _names(api, api.admin) == ["Alpha", "Beta", "Gamma", "Team Owned"]
    page = api.client.get("/api/integrations", headers=bob).json()
    assert page["total"] == 3 and page["start"] == 0 and page["count"] == 3
    assert page["_links"]["self"]["href"] == "/api/integrations"
    item = page["_embedded"]["inf:integration"][0]
    assert (
        "hasApiKey" in item and "apiKey" not in item and item["_links"]["self"]["href"].startswith("/api/integrations/")
    )


def test_query_sort_and_paging(api: Api) -> None:
    alice = api.user("alice")
    for i, name in enumerate(["Salesforce", "Slack", "Dropbox", "Drive 100%", "Zendesk"]):
        api.integration(alice, name=name, slug=f"s{i}", description="crm tool" if name == "Zendesk" else "")
    assert _names(api, alice, "?q=sla") == ["Slack"]
    assert _names(api, alice, "?q=CRM") == ["Zendesk"]
    assert _names(api, alice, "?q=100%25") == ["Drive 100%"]
    assert _names(api, alice, "?q=_") == []
    assert _names(api, alice, "?sort=-name&limit=2") == ["Zendesk", "Slack"]
    page = api.client.get("/api/integrations?start=2&limit=2", headers=alice).json()
    assert [i["name"] for i in page["_embedded"]["inf:integration"]] == ["Salesforce", "Slack"]
    assert page["total"] == 5 and page["start"] == 2 and page["count"] == 2
    assert _names(api, alice, "?sort=createdAt")[0] == "Salesforce"
    assert api.client.get("/api/integrations?limit=0", headers=alice).status_code == 400
    assert api.client.get("/api/integrations?sort=bogus", headers=alice).status_code == 400


def test_supports_upload_filter(api: Api) -> None:
    alice = api.user("alice")
    api.integration(alice, name="Drive", slug="drive", type="google-drive")
    api.integration(alice, name="CRM", slug="crm", type="salesforce")
    assert _names(api, alice, "?supportsUpload=true") == ["Drive"]
    assert _names(api, alice, "?supportsUpload=false") == ["CRM"]


def test_flat_list_has_owner_shared_and_tags(api: Api) -> None:
    alice = api.user("alice")
    api.user("bob")
    one = api.integration(alice, name="One", slug="one", tags=["t1"])
    api.integration(alice, name="Two", slug="two")
    api.client.put(f"/api/integrations/{one['id']}/shares/bob", json={}, headers=alice)
    r = api.client.get("/api/integrations-list", headers=alice)
    assert r.status_code == 200
    items = {i["slug"]: i for i in r.json()}
    assert set(items) == {"one", "two"}
    assert items["one"]["shared"] is True and items["two"]["shared"] is False
    assert items["one"]["ownerId"] == "alice" and items["one"]["tags"] == ["t1"]


def test_listing_reads_own_writes_immediately(api: Api) -> None:
    alice = api.user("alice")
    for i in range(5):
        api.integration(alice, name=f"N{i}", slug=f"n{i}")
        assert api.client.get("/api/integrations", headers=alice).json()["total"] == i + 1

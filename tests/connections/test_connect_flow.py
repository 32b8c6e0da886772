"""The OAuth connect flow end to end: our /connect, the real provider's login and consent, our callback."""

from __future__ import annotations

from tests.api.conftest import Api
from tests.connections.conftest import oauth_integration
from tests.oauth.harness import Browser, OAuthServer


def connect(api: Api, headers: dict[str, str], integration_id: str, browser: Browser) -> dict:
    r = api.client.get(f"/api/integrations/{integration_id}/connect", headers=headers, follow_redirects=False)
    assert r.status_code == 302, r.text
    params = browser.authorize(r.headers["location"])
    r = api.client.get("/oauth2/callback", params=params, follow_redirects=False)
    return r


def test_connect_callback_and_status(api: Api, oauth_server: OAuthServer, browser: Browser) -> None:
    alice = api.user("alice")
    integration = oauth_integration(api, alice, oauth_server)
    r = connect(api, alice, integration["id"], browser)
    assert r.status_code == 303, r.text
    assert r.headers["location"].startswith("/oauth2/result?status=connected")
    assert r.headers["cache-control"] == "no-store"
    assert r.headers["referrer-policy"] == "no-referrer"
    r = api.client.get(f"/api/integrations/{integration['id']}/connection", headers=alice)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["status"] == "connected"
    assert doc["ownerId"] == "alice"
    assert doc["account"]["sub"] == "alice@example.com" or doc["account"]
    assert oauth_server.stats()["by_grant"] == {"authorization_code": 1}

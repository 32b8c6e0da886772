"""oauth2 through the proxy against the real oidc-provider: the caller's access token goes up,
an upstream 401 costs one forced refresh and one replay (when the body can be sent again)."""

from __future__ import annotations

from tests.api.conftest import Api
from tests.connections.conftest import oauth_integration
from tests.connections.test_connect_flow import connect
from tests.oauth.harness import Browser, OAuthServer


def _connected(
    api: Api, oauth_server: OAuthServer, browser: Browser, templates: dict[str, str] | None = None, **fields: object
) -> tuple[dict[str, str], str]:
    alice = api.user("alice")
    integration = oauth_integration(api, alice, oauth_server, **fields)
    if templates:
        r = api.client.patch(f"/api/integrations/{integration['id']}", json={"headers": templates}, headers=alice)
        assert r.status_code == 200, r.text
    r = connect(api, alice, integration["id"], browser)
    assert r.status_code == 303 and "status=connected" in r.headers["location"], r.headers.get("location")
    oauth_server.reset()
    return alice, integration["id"]


def test_bearer_token_goes_up_and_401_refreshes_once(api: Api, oauth_server: OAuthServer, browser: Browser) -> None:
    alice, iid = _connected(api, oauth_server, browser)
    r = api.client.get(f"/api/integrations/{iid}/proxy/whoami", headers=alice)
    assert r.status_code == 200, r.text
    assert r.json()["sub"]
    assert oauth_server.stats()["by_grant"] == {}

    oauth_server.faults(status=401, endpoint="api", count=1)
    r = api.client.post(f"/api/integrations/{iid}/request", json={"url": "whoami"}, headers=alice)
    assert r.status_code == 200, r.text
    assert oauth_server.stats()["by_grant"] == {"refresh_token": 1}

    # still 401 after the replay: passed back as it is, and no second refresh
    oauth_server.faults(status=401, endpoint="api", count=2)
    r = api.client.get(f"/api/integrations/{iid}/proxy/whoami", headers=alice)
    assert r.status_code == 401
    assert oauth_server.stats()["by_grant"] == {"refresh_token": 2}


def test_a_streamed_body_is_not_replayed(api: Api, oauth_server: OAuthServer, browser: Browser) -> None:
    alice, iid = _connected(api, oauth_server, browser)

    def body():
        yield b"x" * 1000

    oauth_server.faults(status=401, endpoint="api", count=1)
    r = api.client.post(f"/api/integrations/{iid}/proxy/whoami", content=body(), headers=alice)
    assert r.status_code == 401
    assert oauth_server.stats()["by_grant"] == {}


def test_shared_connection_serves_every_user_with_access(api: Api, oauth_server: OAuthServer, browser: Browser) -> None:
    alice, iid = _connected(api, oauth_server, browser, {"X-Caller": "${user.id}"}, mode="shared")
    bob = api.user("bob")
    api.client.put(f"/api/integrations/{iid}/shares/bob", json={}, headers=alice)
    for who in (alice, bob):
        r = api.client.get(f"/api/integrations/{iid}/proxy/whoami", headers=who)
        assert r.status_code == 200, r.text

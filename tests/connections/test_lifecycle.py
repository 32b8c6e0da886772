"""What happens to connections when their integration or user goes, and the background refresher."""

from __future__ import annotations

from datetime import timedelta

from api.background import refresh_due
from tests.api.conftest import Api
from tests.connections.conftest import oauth_integration
from tests.connections.support import connected, event_names, run, service, token_requests
from tests.oauth.harness import OAuthServer, ServerConfig


def test_deleting_an_integration_revokes_its_connections_at_the_provider(api: Api, oauth_server: OAuthServer) -> None:
    alice, bob = api.user("alice"), api.user("bob")
    integration = oauth_integration(api, alice, oauth_server)
    r = api.client.put(f"/api/integrations/{integration['id']}/shares/bob", json={"accessLevel": 1}, headers=alice)
    assert r.status_code == 200, r.text
    cids = [connected(api, who, integration["id"], oauth_server) for who in (alice, bob)]
    oauth_server.reset_stats()

    r = api.client.delete(f"/api/integrations/{integration['id']}", headers=bob)
    assert r.status_code == 403  # bob may use it, not delete it: nothing revoked
    assert oauth_server.stats()["revocations"] == 0

    r = api.client.delete(f"/api/integrations/{integration['id']}", headers=alice)
    assert r.status_code == 204, r.text
    assert oauth_server.stats()["revocations"] == 2
    for cid in cids:
        assert event_names(api, cid)[-1] == "Revoked"
        assert api.runtime.app.history(cid)  # the audit trail stays
        revoked = list(api.runtime.app.history(cid))[-1]
        assert revoked.reason == "integration_deleted" and revoked.provider_revocation == "done"


def test_removing_a_user_revokes_their_connections(api: Api, oauth_server: OAuthServer) -> None:
    alice, bob = api.user("alice"), api.user("bob")
    integration = oauth_integration(api, alice, oauth_server)
    api.client.put(f"/api/integrations/{integration['id']}/shares/bob", json={"accessLevel": 1}, headers=alice)
    alice_cid = connected(api, alice, integration["id"], oauth_server)
    bob_cid = connected(api, bob, integration["id"], oauth_server)
    oauth_server.reset_stats()

    r = api.client.delete("/api/users/bob", headers=api.admin)
    assert r.status_code == 204, r.text
    assert oauth_server.stats()["revocations"] == 1
    assert event_names(api, bob_cid)[-1] == "Revoked"
    assert list(api.runtime.app.history(bob_cid))[-1].reason == "user_removed"
    assert event_names(api, alice_cid)[-1] == "Established"  # alice keeps hers
    r = api.client.get(f"/api/integrations/{integration['id']}/connection", headers=alice)
    assert r.json()["status"] == "connected"


def test_background_refresher_renews_tokens_nearing_expiry_once(api: Api, oauth_server_factory) -> None:
    server = oauth_server_factory(ServerConfig(rotate_refresh=True, at_ttl=120))
    alice = api.user("alice")
    integration = oauth_integration(api, alice, server)
    cid = connected(api, alice, integration["id"], server)
    api.runtime.services.waiter.wait(api.client.position, 5)  # the connections view has it
    server.reset_stats()

    # Nothing expires within a minute: the pass leaves it alone.
    assert run(refresh_due(api.runtime.services, timedelta(seconds=60)), service(api)) == 0
    assert token_requests(server) == 0

    # Within 5 minutes: refreshed, once, and the view moves on (a second pass does nothing).
    assert run(refresh_due(api.runtime.services, timedelta(minutes=5)), service(api)) == 1
    assert token_requests(server, "refresh_token") == 1
    assert event_names(api, cid)[-1] == "TokenRefreshed"
    head = api.runtime.app.recorder.max_notification_id()
    assert api.runtime.services.waiter.wait(head, 5)
    before = token_requests(server, "refresh_token")
    run(refresh_due(api.runtime.services, timedelta(seconds=60)), service(api))
    assert token_requests(server, "refresh_token") == before
    r = api.client.get(f"/api/integrations/{integration['id']}/connection", headers=alice)
    assert r.json()["status"] == "connected" and r.json()["lastRefreshedAt"]


def test_callback_rechecks_access_taken_away_during_the_flow(api: Api, oauth_server: OAuthServer) -> None:
    """A manager starts connecting the shared connection, is demoted before coming back: refused,
    no token request, nothing connected. A user removed meanwhile is refused the same way."""
    from tests.connections.support import authorize, callback, query, token_requests

    alice, bob, carol = api.user("alice"), api.user("bob"), api.user("carol")
    iid = oauth_integration(api, alice, oauth_server, mode="shared")["id"]
    r = api.client.put(f"/api/integrations/{iid}/shares/bob", json={"accessLevel": 3}, headers=alice)
    assert r.status_code == 200, r.text
    with oauth_server.browser() as browser:
        params = authorize(api, bob, iid, browser)
    r = api.client.put(f"/api/integrations/{iid}/shares/bob", json={"accessLevel": 1}, headers=alice)
    assert r.status_code == 200, r.text
    api.runtime.services.waiter.wait(api.client.position, 5)
    oauth_server.reset_stats()
    r = callback(api, params)
    assert r.status_code == 303, r.text
    assert query(r.headers["location"]) == {"status": "error", "error": "access_denied", "integration": iid}
    assert token_requests(oauth_server) == 0
    assert api.client.get(f"/api/integrations/{iid}/connection", headers=bob).status_code == 404

    # carol (level 3) starts, then is removed before the callback.
    api.client.put(f"/api/integrations/{iid}/shares/carol", json={"accessLevel": 3}, headers=alice)
    with oauth_server.browser() as browser:
        params = authorize(api, carol, iid, browser)
    assert api.client.delete("/api/users/carol", headers=api.admin).status_code == 204
    r = callback(api, params)
    assert r.status_code == 303 and query(r.headers["location"])["error"] == "access_denied"
    assert token_requests(oauth_server) == 0

    # And alice, the owner, still connects it.
    assert connected(api, alice, iid, oauth_server)

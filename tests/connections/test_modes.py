"""Shared mode, re-pointing (OA-18), the mode switch, and the managers' list of connections."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import pytest

from commands.connections import NotConnected, ReauthorizationNeeded
from tests.api.conftest import Api
from tests.connections.conftest import oauth_integration
from tests.connections.support import (
    actor,
    assert_error_shape,
    authorize,
    callback,
    cid_of,
    connected,
    event_names,
    integration_of,
    query,
    run,
    service,
    start,
    token_requests,
)
from tests.oauth.harness import OAuthServer, ServerConfig, http_client


def share(api: Api, owner: dict[str, str], integration_id: str, user_id: str, level: int) -> None:
    r = api.client.put(
        f"/api/integrations/{integration_id}/shares/{user_id}", json={"accessLevel": level}, headers=owner
    )
    assert r.status_code in (200, 201), r.text


def connection(api: Api, headers: dict[str, str], integration_id: str) -> Any:
    return api.client.get(f"/api/integrations/{integration_id}/connection", headers=headers)


def patch(api: Api, headers: dict[str, str], integration_id: str, body: dict[str, Any]) -> None:
    r = api.client.patch(f"/api/integrations/{integration_id}", json=body, headers=headers)
    assert r.status_code == 200, r.text


def credentials_of(api: Api, user_id: str, integration_id: str) -> Any:
    who = actor(api, user_id)
    connections = service(api)
    return run(connections.credentials(who, integration_of(api, who, integration_id)), connections)


# -- shared mode ------------------------------------------------------------------------------------


def test_shared_connection_is_made_by_a_manager_and_used_by_everyone(api: Api, oauth_server_factory: Any) -> None:
    # 5-minute access tokens: longer than the refresh margin, so using the token does not refresh it
    oauth_server = oauth_server_factory(ServerConfig(at_ttl=300))
    alice, bob, carol = api.user("alice"), api.user("bob"), api.user("carol")
    integration = oauth_integration(api, alice, oauth_server, mode="shared")
    iid = integration["id"]
    share(api, alice, iid, "bob", 1)
    share(api, alice, iid, "carol", 3)

    # a level-1 user may not make (or replace) the shared connection: 403, nothing started
    assert_error_shape(start(api, bob, iid), 403)
    assert "set-cookie" not in start(api, bob, iid).headers
    assert_error_shape(
        api.client.post(f"/api/integrations/{iid}/connect", json={"refreshToken": "x"}, headers=bob), 403
    )
    assert token_requests(oauth_server) == 0
    assert_error_shape(connection(api, bob, iid), 404)  # nothing connected yet

    # a level-3 manager (not the owner) connects it
    shared_cid = connected(api, carol, iid, oauth_server)
    assert shared_cid == cid_of(iid, None)
    assert event_names(api, shared_cid) == ["Created", "Established"]

    # everyone with access sees and uses the one shared connection
    for headers in (alice, bob, carol):
        r = connection(api, headers, iid)
        assert r.status_code == 200, r.text
        doc = r.json()
        assert (doc["id"], doc["isShared"], doc["ownerId"], doc["status"]) == (str(shared_cid), True, None, "connected")
    tokens = {credentials_of(api, user, iid).values["access_token"] for user in ("alice", "bob", "carol")}
    assert len(tokens) == 1 and token_requests(oauth_server, "refresh_token") == 0
    with http_client() as http:
        r = http.get(oauth_server.api_url, headers={"Authorization": f"Bearer {tokens.pop()}"})
    assert r.status_code == 200

    # a level-1 user may not disconnect it either; a manager may
    assert_error_shape(api.client.delete(f"/api/integrations/{iid}/connection", headers=bob), 403)
    assert connection(api, bob, iid).json()["status"] == "connected"
    assert api.client.delete(f"/api/integrations/{iid}/connection", headers=carol).status_code == 204
    assert_error_shape(connection(api, bob, iid), 404)
    assert oauth_server.stats()["revocations"] == 1
    with pytest.raises(NotConnected):
        credentials_of(api, "bob", iid)


def test_shared_mode_user_without_access_sees_nothing(api: Api, oauth_server: OAuthServer) -> None:
    alice, mallory = api.user("alice"), api.user("mallory")
    iid = oauth_integration(api, alice, oauth_server, mode="shared")["id"]
    connected(api, alice, iid, oauth_server)
    assert_error_shape(connection(api, mallory, iid), 404)
    assert_error_shape(start(api, mallory, iid), 404)
    assert_error_shape(api.client.delete(f"/api/integrations/{iid}/connection", headers=mallory), 404)


# -- re-pointing (OA-18) ----------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["tokenUri", "apiBaseUri", "authUri", "clientId", "issuer"])
def test_repointing_requires_reauthorization(api: Api, oauth_server: OAuthServer, field: str) -> None:
    alice = api.user("alice")
    iid = oauth_integration(api, alice, oauth_server)["id"]
    cid = connected(api, alice, iid, oauth_server)
    before = credentials_of(api, "alice", iid)
    assert before.connection_id == cid
    oauth_server.reset_stats()
    new_value = {
        "tokenUri": oauth_server.token_endpoint + "?v=2",
        "apiBaseUri": oauth_server.base_url + "/api/v2",
        "authUri": oauth_server.authorization_endpoint + "?v=2",
        "clientId": oauth_server.post_client.client_id,
        "issuer": oauth_server.issuer + "/",
    }[field]
    patch(api, alice, iid, {field: new_value})

    r = connection(api, alice, iid)
    if r.status_code == 200:  # the epoch moved: shown as needing reauthorization
        doc = r.json()
        assert doc["status"] == "reauthorization_required"
        assert doc["lastError"]["kind"] == "reauthorization"
        with pytest.raises(ReauthorizationNeeded) as exc:
            credentials_of(api, "alice", iid)
        assert exc.value.code == "reauthorization_required"
    else:  # invalidated by the PATCH: revoked at the provider, gone here
        assert_error_shape(r, 404)
        with pytest.raises(NotConnected):
            credentials_of(api, "alice", iid)
        assert event_names(api, cid)[-1] == "Revoked"
        assert oauth_server.stats()["revocations"] <= 1
    assert token_requests(oauth_server) == 0  # the old tokens never go to the new token endpoint
    # a new connect under the new configuration works (when the provider still accepts it)
    if field in ("apiBaseUri", "authUri"):
        assert connected(api, alice, iid, oauth_server) == cid
        assert connection(api, alice, iid).json()["status"] == "connected"


def test_repointing_during_a_flow_fails_the_callback(api: Api, oauth_server: OAuthServer) -> None:
    """A code obtained for the old configuration is never redeemed at the new token endpoint."""
    alice = api.user("alice")
    iid = oauth_integration(api, alice, oauth_server)["id"]
    with oauth_server.browser() as browser:
        params = authorize(api, alice, iid, browser)
    patch(api, alice, iid, {"apiBaseUri": oauth_server.base_url + "/v9"})
    r = callback(api, params)
    assert r.status_code == 303
    assert query(r.headers["location"])["error"] == "integration_changed"
    assert token_requests(oauth_server) == 0
    assert event_names(api, cid_of(iid, "alice")) == []


def test_repointing_needs_manage_rights(api: Api, oauth_server: OAuthServer) -> None:
    alice, bob = api.user("alice"), api.user("bob")
    iid = oauth_integration(api, alice, oauth_server)["id"]
    share(api, alice, iid, "bob", 2)
    connected(api, alice, iid, oauth_server)
    r = api.client.patch(f"/api/integrations/{iid}", json={"tokenUri": "http://127.0.0.1:9/token"}, headers=bob)
    assert_error_shape(r, 403)
    assert connection(api, alice, iid).json()["status"] == "connected"


def _introspect(server: OAuthServer, token: str) -> bool:
    headers, form = server.basic_client.token_auth({"token": token})
    with http_client() as http:
        return bool(http.post(server.introspection_endpoint, headers=headers, data=form).json()["active"])


@pytest.mark.parametrize("change", ["clientId", "tokenUri+revocationUri"])
def test_repointed_tokens_are_revoked_where_they_came_from(
    api: Api, oauth_server: OAuthServer, oauth_server_factory: Any, change: str
) -> None:
    """After a re-point the old tokens are revoked at the server that issued them, by the client
    they were issued to, never sent to the new endpoints (OA-18, RFC 7009)."""
    from domain.connection import Connection

    alice = api.user("alice")
    iid = oauth_integration(api, alice, oauth_server)["id"]
    cid = connected(api, alice, iid, oauth_server)
    stored = api.runtime.app._get(cid, Connection)
    assert stored is not None
    rt = api.runtime.app.vault.open(
        UUID(iid), f"connection:{cid}:refresh_token", stored.credentials["refresh_token"]["ref"]
    )
    oauth_server.reset_stats()
    other = oauth_server_factory(ServerConfig(at_ttl=59))  # the new, different authorization server
    if change == "clientId":
        body = {"clientId": oauth_server.post_client.client_id, "clientSecret": oauth_server.post_client.client_secret}
    else:
        body = {"tokenUri": other.token_endpoint, "revocationUri": other.revocation_endpoint}
    patch(api, alice, iid, body)
    if connection(api, alice, iid).status_code == 200:  # not invalidated by the PATCH: disconnect it
        assert api.client.delete(f"/api/integrations/{iid}/connection", headers=alice).status_code == 204
    revocations = [(e["client_id"], e["status"]) for e in oauth_server.stats()["log"] if e["endpoint"] == "revocation"]
    assert revocations == [("svc-basic", 200)]
    assert other.stats()["revocations"] == 0 and other.stats()["token_requests"] == 0
    assert not _introspect(oauth_server, rt)
    revoked = list(api.runtime.app.history(cid))[-1]
    assert (type(revoked).__name__, revoked.provider_revocation) == ("Revoked", "done")


def test_an_editor_cannot_redirect_revocation(api: Api, oauth_server: OAuthServer, oauth_server_factory: Any) -> None:
    alice, bob = api.user("alice"), api.user("bob")
    iid = oauth_integration(api, alice, oauth_server)["id"]
    share(api, alice, iid, "bob", 2)
    connected(api, alice, iid, oauth_server)
    bobs_server = oauth_server_factory(ServerConfig(at_ttl=61))  # stands in for a server bob controls
    r = api.client.patch(
        f"/api/integrations/{iid}", json={"revocationUri": bobs_server.revocation_endpoint}, headers=bob
    )
    assert r.status_code == 403, r.text  # revocationUri is a re-pointing field: managers only (OA-18)
    assert api.client.delete(f"/api/integrations/{iid}/connection", headers=alice).status_code == 204
    assert bobs_server.stats()["revocations"] == 0, "alice's refresh token was sent to bob's server"


# -- mode switch ------------------------------------------------------------------------------------


def test_mode_switch_is_audited_and_retires_connections(api: Api, oauth_server: OAuthServer) -> None:
    alice, bob = api.user("alice"), api.user("bob")
    iid = oauth_integration(api, alice, oauth_server)["id"]
    share(api, alice, iid, "bob", 1)
    connected(api, alice, iid, oauth_server)
    connected(api, bob, iid, oauth_server)

    patch(api, alice, iid, {"mode": "shared"})
    history = list(api.runtime.app.history(UUID(iid)))
    assert [type(e).__qualname__ for e in history[-2:]] == ["Integration.Updated", "Integration.ModeChanged"]
    changed = history[-1]
    assert (changed.previous_mode, changed.mode) == ("per-user", "shared")
    # shared now: nobody has the shared connection yet; the per-user ones are not used
    for headers, user in ((alice, "alice"), (bob, "bob")):
        assert_error_shape(connection(api, headers, iid), 404)
        with pytest.raises(NotConnected):
            credentials_of(api, user, iid)
    shared = connected(api, alice, iid, oauth_server)
    assert shared == cid_of(iid, None)

    # back to per-user: the old per-user connections are from an older epoch
    patch(api, alice, iid, {"mode": "per-user"})
    for headers, user in ((alice, "alice"), (bob, "bob")):
        r = connection(api, headers, iid)
        if r.status_code == 200:
            assert r.json()["status"] == "reauthorization_required"
        else:  # invalidated (revoked) by the switch
            assert_error_shape(r, 404)
        with pytest.raises((ReauthorizationNeeded, NotConnected)):
            credentials_of(api, user, iid)


# -- the managers' list -----------------------------------------------------------------------------


def test_list_connections_for_managers(api: Api, oauth_server: OAuthServer) -> None:
    alice, bob, carol = api.user("alice"), api.user("bob"), api.user("carol")
    iid = oauth_integration(api, alice, oauth_server)["id"]
    share(api, alice, iid, "bob", 1)
    share(api, alice, iid, "carol", 3)
    connected(api, alice, iid, oauth_server)
    connected(api, bob, iid, oauth_server)
    url = f"/api/integrations/{iid}/connections"
    for headers in (alice, carol):
        r = api.client.get(url, headers=headers)
        assert r.status_code == 200, r.text
        doc = r.json()
        items = doc["_embedded"]["inf:connection"]
        assert doc["count"] == 2
        assert sorted(i["ownerId"] for i in items) == ["alice", "bob"]
        assert {i["status"] for i in items} == {"connected"}
        assert all(not {"accessToken", "refreshToken", "credentials"} & set(i) for i in items)
    assert_error_shape(api.client.get(url, headers=bob), 403)
    mallory = api.user("mallory")
    assert_error_shape(api.client.get(url, headers=mallory), 404)
    # a disconnected one drops out of the list
    assert api.client.delete(f"/api/integrations/{iid}/connection", headers=bob).status_code == 204
    r = api.client.get(url, headers=alice)
    assert [i["ownerId"] for i in r.json()["_embedded"]["inf:connection"]] == ["alice"]

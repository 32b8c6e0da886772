"""``POST /api/integrations/{id}/connect``: a connection without a redirect (oauth2 from a refresh
token or a code; apikey/basic/bearer from the credential itself)."""

from __future__ import annotations

import secrets
from typing import Any

import pytest

from commands.connections import Connections
from tests.api.conftest import Api
from tests.connections.conftest import oauth_integration
from tests.connections.support import (
    actor,
    assert_error_shape,
    cid_of,
    event_names,
    events,
    integration_of,
    run,
    service,
    token_requests,
)
from tests.oauth.harness import OAuthServer, http_client, pkce_pair

NO_VALUES = ("accessToken", "refreshToken", "apiKey", "password", "bearerToken", "credentials")


def provider_code(server: OAuthServer) -> tuple[str, str]:
    """Login and consent at the provider with our own PKCE pair; (code, verifier)."""
    verifier, challenge = pkce_pair()
    with server.browser() as browser:
        params = browser.authorize(
            server.authorize_url(server.basic_client, code_challenge=challenge, state=secrets.token_urlsafe(16))
        )
    return params["code"], verifier


def provider_tokens(server: OAuthServer) -> dict[str, Any]:
    """A token response obtained from the provider directly (not through the service)."""
    code, verifier = provider_code(server)
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": server.redirect_uri,
        "code_verifier": verifier,
    }
    headers, data = server.basic_client.token_auth(form)
    with http_client() as http:
        r = http.post(server.token_endpoint, headers=headers, data=data)
    assert r.status_code == 200, r.text
    tokens = r.json()
    assert tokens.get("refresh_token")
    return tokens


def post_connect(api: Api, headers: dict[str, str], integration_id: str, body: dict[str, Any]) -> Any:
    return api.client.post(f"/api/integrations/{integration_id}/connect", json=body, headers=headers)


def assert_metadata_only(doc: dict[str, Any], *values: str) -> None:
    assert not set(NO_VALUES) & set(doc)
    text = str(doc)
    for value in values:
        assert value not in text


def test_oauth2_from_a_refresh_token(api: Api, oauth_server: OAuthServer) -> None:
    alice = api.user("alice")
    integration = oauth_integration(api, alice, oauth_server)
    tokens = provider_tokens(oauth_server)
    oauth_server.reset_stats()
    r = post_connect(api, alice, integration["id"], {"refreshToken": tokens["refresh_token"]})
    assert r.status_code == 201, r.text
    assert r.headers["location"] == f"/api/integrations/{integration['id']}/connection"
    assert r.headers["cache-control"] == "no-store"
    doc = r.json()
    assert doc["status"] == "connected" and doc["authType"] == "oauth2" and doc["ownerId"] == "alice"
    assert_metadata_only(doc, tokens["refresh_token"], tokens["access_token"])
    assert oauth_server.stats()["by_grant"] == {"refresh_token": 1}
    cid = cid_of(integration["id"], "alice")
    assert event_names(api, cid) == ["Created", "Established"]
    # the rotating provider consumed the given token; the service holds (and uses) the new grant
    alice_actor = actor(api, "alice")
    connections = service(api)
    creds = run(connections.credentials(alice_actor, integration_of(api, alice_actor, integration["id"])), connections)
    assert creds.values["access_token"] not in (tokens["access_token"],)
    with http_client() as http:
        who = http.get(oauth_server.api_url, headers={"Authorization": f"Bearer {creds.values['access_token']}"})
    assert who.status_code == 200 and who.json()["sub"] == "alice@example.com"
    r = api.client.get(f"/api/integrations/{integration['id']}/connection", headers=alice)
    assert r.status_code == 200 and r.json()["status"] == "connected"


def test_oauth2_from_a_code(api: Api, oauth_server: OAuthServer) -> None:
    alice = api.user("alice")
    integration = oauth_integration(api, alice, oauth_server)
    code, verifier = provider_code(oauth_server)
    body = {"code": code, "redirectUri": oauth_server.redirect_uri, "codeVerifier": verifier}
    r = post_connect(api, alice, integration["id"], body)
    assert r.status_code == 201, r.text
    assert_metadata_only(r.json(), code, verifier)
    assert oauth_server.stats()["by_grant"] == {"authorization_code": 1}
    # the code is spent: the same body again is refused by the provider, reported as 400
    r = post_connect(api, alice, integration["id"], body)
    assert_error_shape(r, 400)
    assert code not in r.text


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"code": "abc"},  # without redirectUri
        {"code": "abc", "refreshToken": "def", "redirectUri": "http://127.0.0.1:8000/oauth2/callback"},
        {"apiKey": "k"},  # not an oauth2 field... accepted by the schema, but no code/refreshToken
    ],
)
def test_oauth2_bad_bodies(api: Api, oauth_server: OAuthServer, body: dict[str, Any]) -> None:
    alice = api.user("alice")
    integration = oauth_integration(api, alice, oauth_server)
    assert_error_shape(post_connect(api, alice, integration["id"], body), 400)
    assert token_requests(oauth_server) == 0
    assert event_names(api, cid_of(integration["id"], "alice")) == []


def test_oauth2_dead_refresh_token_and_provider_down(api: Api, oauth_server: OAuthServer) -> None:
    alice = api.user("alice")
    integration = oauth_integration(api, alice, oauth_server)
    r = post_connect(api, alice, integration["id"], {"refreshToken": "not-a-token-" + secrets.token_urlsafe(8)})
    body = assert_error_shape(r, 400)
    assert body["details"][0]["field"] == "refreshToken"
    oauth_server.faults(status=503, retry_after="7")
    r = post_connect(api, alice, integration["id"], {"refreshToken": "whatever"})
    assert_error_shape(r, 503)
    assert r.headers["retry-after"] == "7"
    assert event_names(api, cid_of(integration["id"], "alice")) == []


CREDENTIALS = [
    ("apikey", {"apiKey": "ak-direct-" + "x" * 12}, {"api_key": "ak-direct-" + "x" * 12}),
    (
        "basic",
        {"username": "jane", "password": "pw-direct-secret"},
        {"username": "jane", "password": "pw-direct-secret"},
    ),
    ("bearer", {"bearerToken": "bt-direct-secret"}, {"bearer_token": "bt-direct-secret"}),
]


@pytest.mark.parametrize(("auth_type", "body", "values"), CREDENTIALS, ids=[c[0] for c in CREDENTIALS])
def test_credential_connections(api: Api, auth_type: str, body: dict[str, str], values: dict[str, str]) -> None:
    alice = api.user("alice")
    r = api.client.post(
        "/api/integrations",
        json={"name": f"{auth_type} svc", "authType": auth_type, "apiBaseUri": "https://api.example.com/v1"},
        headers=alice,
    )
    assert r.status_code == 201, r.text
    iid = r.json()["id"]
    r = post_connect(api, alice, iid, body)
    assert r.status_code == 201, r.text
    secret_values = [v for k, v in values.items() if k != "username"]
    assert_metadata_only(r.json(), *secret_values)
    r = api.client.get(f"/api/integrations/{iid}/connection", headers=alice)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert (doc["status"], doc["authType"], doc["ownerId"], doc["isShared"]) == ("connected", auth_type, "alice", False)
    assert doc["tokenExpiresAt"] is None and doc["scopes"] == []
    assert_metadata_only(doc, *secret_values)
    cid = cid_of(iid, "alice")
    established = events(api, cid)[-1]
    assert set(established.credentials) == set(values)
    assert_metadata_only({"x": str(established.__dict__)}, *secret_values)
    # the proxy's view: the values, from the vault
    alice_actor = actor(api, "alice")
    connections: Connections = service(api)
    creds = run(connections.credentials(alice_actor, integration_of(api, alice_actor, iid)), connections)
    assert dict(creds.values) == values and creds.auth_type == auth_type and creds.connection_id == cid
    # disconnect: 204, nothing at any provider (no revocation for these)
    assert api.client.delete(f"/api/integrations/{iid}/connection", headers=alice).status_code == 204
    assert events(api, cid)[-1].provider_revocation == "not_supported"
    assert_error_shape(api.client.get(f"/api/integrations/{iid}/connection", headers=alice), 404)


@pytest.mark.parametrize(
    ("auth_type", "body"),
    [
        ("apikey", {}),
        ("apikey", {"bearerToken": "wrong-field"}),
        ("basic", {"password": "no-user"}),
        ("basic", {"username": "no-password"}),
        ("bearer", {"apiKey": "wrong-field"}),
        ("bearer", {"bearerToken": ""}),
        ("none", {"apiKey": "k"}),
    ],
)
def test_missing_credential_is_400(api: Api, auth_type: str, body: dict[str, str]) -> None:
    alice = api.user("alice")
    iid = api.client.post(
        "/api/integrations",
        json={"name": "svc", "authType": auth_type, "apiBaseUri": "https://api.example.com/v1"},
        headers=alice,
    ).json()["id"]
    r = post_connect(api, alice, iid, body)
    assert_error_shape(r, 400)
    for value in body.values():
        if value:
            assert value not in r.text
    assert event_names(api, cid_of(iid, "alice")) == []


def test_unknown_fields_are_refused(api: Api) -> None:
    alice = api.user("alice")
    iid = api.integration(alice)["id"]
    assert_error_shape(post_connect(api, alice, iid, {"apiKey": "k", "accessToken": "x"}), 400)

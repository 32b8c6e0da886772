"""``apiBaseUri: "$connection.<field>"`` (PX-3): an oauth2 integration whose API lives where the
token response says (Salesforce's ``instance_url``), against the real oidc-provider.

The value is kept with the connection (a non-secret field of its events), checked on every
request like a saved base URL and against ``apiBaseUriHosts``, and replaced when a refresh answer
names another instance. Nothing is sent, and no credential opened, for a path attack.
"""

from __future__ import annotations

import json
from uuid import UUID

import pytest
from eventsourcing.persistence import StoredEvent

from domain.connection import Connection
from tests.api.conftest import Api
from tests.connections.conftest import oauth_integration
from tests.connections.support import connected
from tests.oauth.harness import OAuthServer

REF = "$connection.instance_url"


def _setup(api: Api, op: OAuthServer, instance: str | None, **fields: object) -> tuple[dict[str, str], str, UUID]:
    alice = api.user("alice")
    if instance is not None:
        op.token_extra(instance_url=instance)
    integration = oauth_integration(api, alice, op, apiBaseUri=REF, **fields)
    cid = connected(api, alice, integration["id"], op)
    op.reset()  # faults, extra fields and counts cleared: only what follows is counted
    return alice, integration["id"], cid


def _connection(api: Api, cid: UUID) -> Connection:
    connection = api.runtime.services.app.repository.get(cid)
    assert isinstance(connection, Connection)
    return connection


def test_the_base_url_comes_from_the_token_response(api: Api, oauth_server: OAuthServer) -> None:
    alice, iid, cid = _setup(api, oauth_server, oauth_server.base_url + "/api", apiBaseUriHosts=["127.0.0.1"])
    assert _connection(api, cid).metadata == {"instance_url": oauth_server.base_url + "/api"}
    r = api.client.get(f"/api/integrations/{iid}/proxy/whoami", headers=alice)
    assert r.status_code == 200, r.text
    assert r.json()["sub"]
    r = api.client.post(f"/api/integrations/{iid}/request", json={"url": "whoami"}, headers=alice)
    assert r.status_code == 200, r.text
    assert oauth_server.stats()["api_requests"] == 2
    shown = api.client.get(f"/api/integrations/{iid}", headers=alice).json()
    assert shown["apiBaseUri"] == REF and shown["apiBaseUriHosts"] == ["127.0.0.1"]


def test_a_refresh_that_names_another_instance_moves_the_base(api: Api, oauth_server: OAuthServer) -> None:
    alice, iid, cid = _setup(api, oauth_server, oauth_server.base_url + "/api")
    # under .../api, "api/whoami" is /api/api/whoami: not served
    assert api.client.get(f"/api/integrations/{iid}/proxy/api/whoami", headers=alice).status_code == 404
    oauth_server.token_extra(instance_url=oauth_server.base_url + "/")
    oauth_server.faults(status=401, endpoint="api", count=1)
    # /api/whoami answers 401: one refresh, whose answer names the new instance; the replay goes
    # there (/whoami at the root: not served)
    r = api.client.get(f"/api/integrations/{iid}/proxy/whoami", headers=alice)
    assert r.status_code == 404, r.text
    assert oauth_server.stats()["by_grant"] == {"refresh_token": 1}
    assert _connection(api, cid).metadata == {"instance_url": oauth_server.base_url + "/"}
    r = api.client.get(f"/api/integrations/{iid}/proxy/api/whoami", headers=alice)
    assert r.status_code == 200, r.text
    # a refresh answer without the field keeps the value
    oauth_server.token_extra()
    oauth_server.faults(status=401, endpoint="api", count=1)
    assert api.client.get(f"/api/integrations/{iid}/proxy/api/whoami", headers=alice).status_code == 200
    assert oauth_server.stats()["by_grant"] == {"refresh_token": 2}
    assert _connection(api, cid).metadata == {"instance_url": oauth_server.base_url + "/"}


@pytest.mark.parametrize(
    ("hosts", "instance"),
    [
        (["api.example.com"], "{base}/api"),  # not an allowed host
        (["*.example.com"], "{base}/api"),
        (None, "https://user:pw@127.0.0.1/api"),  # userinfo
        (None, "ftp://127.0.0.1/api"),  # not http(s)
        (None, "http://evil.example/api"),  # http for a host not allow-listed for http
        (None, "{base}/api#frag"),
        (None, "/relative/api"),
    ],
    ids=["host", "wildcard-host", "userinfo", "scheme", "plain-http", "fragment", "relative"],
)
def test_a_base_the_rules_refuse_sends_nothing(
    api: Api, oauth_server: OAuthServer, hosts: list[str] | None, instance: str
) -> None:
    fields = {"apiBaseUriHosts": hosts} if hosts else {}
    alice, iid, _ = _setup(api, oauth_server, instance.format(base=oauth_server.base_url), **fields)
    for r in (
        api.client.get(f"/api/integrations/{iid}/proxy/whoami", headers=alice),
        api.client.post(f"/api/integrations/{iid}/request", json={"url": "whoami"}, headers=alice),
    ):
        assert r.status_code == 502, r.text
        assert r.json()["code"] == "api_base_uri_rejected"
        assert "127.0.0.1" not in r.text and "evil" not in r.text  # never the URL itself
    assert oauth_server.stats()["api_requests"] == 0


def test_a_connection_without_the_field_sends_nothing(api: Api, oauth_server: OAuthServer) -> None:
    alice, iid, cid = _setup(api, oauth_server, None)
    assert _connection(api, cid).metadata == {}
    r = api.client.get(f"/api/integrations/{iid}/proxy/whoami", headers=alice)
    assert r.status_code == 502, r.text
    assert r.json()["code"] == "api_base_uri_unresolved" and "instance_url" in r.json()["message"]
    assert oauth_server.stats()["api_requests"] == 0


@pytest.mark.parametrize("path", ["../admin", "%2e%2e/admin", "//evil.example/x", "a\\b", "http://evil.example/"])
def test_path_attacks_are_refused_before_any_credential(api: Api, oauth_server: OAuthServer, path: str) -> None:
    alice, iid, _ = _setup(api, oauth_server, oauth_server.base_url + "/api")
    oauth_server.faults(status=500, endpoint="token", count=5)  # a refresh attempt would show here
    r = api.client.post(f"/api/integrations/{iid}/request", json={"url": path}, headers=alice)
    assert r.status_code == 400, r.text
    stats = oauth_server.stats()
    assert stats["api_requests"] == 0 and stats["token_requests"] == 0


@pytest.mark.parametrize(
    ("fields", "where"),
    [
        ({"authType": "apikey", "apiKey": "k", "apiBaseUri": REF}, "apiBaseUri"),
        ({"apiBaseUri": "$connection."}, "apiBaseUri"),
        ({"apiBaseUri": "$connection.instance-url"}, "apiBaseUri"),
        ({"apiBaseUri": "$connection.a.b"}, "apiBaseUri"),
        ({"apiBaseUri": REF, "apiBaseUriHosts": ["*.com"]}, "apiBaseUriHosts.0"),
        ({"apiBaseUri": REF, "apiBaseUriHosts": ["ok.example", "Bad.Example"]}, "apiBaseUriHosts.1"),
        ({"apiBaseUri": REF, "apiBaseUriHosts": ["a b.example"]}, "apiBaseUriHosts.0"),
        ({"apiBaseUri": REF, "apiBaseUriHosts": ["*.0.0.1"]}, "apiBaseUriHosts.0"),  # would match 127.0.0.1
    ],
    ids=["not-oauth2", "no-field", "bad-field", "dotted-field", "tld-wildcard", "upper-case", "space", "numeric"],
)
def test_references_and_host_lists_are_checked_when_saved(
    api: Api, oauth_server: OAuthServer, fields: dict[str, object], where: str
) -> None:
    alice = api.user("alice")
    integration = oauth_integration(api, alice, oauth_server)
    r = api.client.patch(f"/api/integrations/{integration['id']}", json=fields, headers=alice)
    assert r.status_code == 400, r.text
    assert where in {d["field"] for d in r.json()["details"]}, r.json()
    after = api.client.get(f"/api/integrations/{integration['id']}", headers=alice).json()
    assert after["version"] == integration["version"]  # nothing changed


def test_connection_events_written_before_the_field_existed_still_load(api: Api) -> None:
    """``Established`` and ``TokenRefreshed`` gained ``metadata`` in class version 2; a version 1
    event (as stored before) is upcast when read."""
    mapper = api.runtime.services.app.mapper
    connection = Connection(integration_id=UUID(int=1), owner_id="alice", shared=False)
    ref = {"ref": "r1"}
    connection.establish(
        auth_type="oauth2",
        credentials={"access_token": ref},
        scopes=["s"],
        token_expires_at=None,
        refresh_token_expires_at=None,
        account=None,
        metadata={"instance_url": "https://x.example/"},
    )
    connection.refreshed(
        generation=1,
        access_token=ref,
        refresh_token=None,
        scopes=[],
        token_expires_at=None,
        refresh_token_expires_at=None,
    )
    old = []
    for event in connection.collect_events():
        stored = mapper.to_stored_event(event)
        state = json.loads(stored.state)
        if state.pop("class_version", 1) == 2:
            state.pop("metadata")
        old.append(
            StoredEvent(stored.originator_id, stored.originator_version, stored.topic, json.dumps(state).encode())
        )
    events = [mapper.to_domain_event(s) for s in old]
    established, refreshed = events[1], events[2]
    assert established.metadata == {} and refreshed.metadata is None
    rebuilt = None
    for event in events:
        rebuilt = event.mutate(rebuilt)
    assert rebuilt is not None and rebuilt.metadata == {}


def test_credentials_never_show_their_values() -> None:
    from commands.connections import Credentials

    creds = Credentials("oauth2", {"access_token": "at-very-secret"}, UUID(int=1), 3, None, {"instance_url": "x"})
    assert "at-very-secret" not in repr(creds) and "at-very-secret" not in str(creds)

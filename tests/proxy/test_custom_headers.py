"""Custom headers (issue 4, PX-8): secret values kept in the vault, ``PUT/GET .../headers``, and
what the real upstream receives. Through the HTTP API, on both backends."""

from __future__ import annotations

from typing import Any

import pytest

from tests.api.conftest import Api
from tests.proxy.test_proxy import SECRET, apikey
from tests.proxy.upstream import Upstream

TOKEN = "tok-$user.id-${user.email}-VAULTED"  # a literal: never expanded, `$` and all
MASKED = {"secret": True}


def _get(api: Api, who: dict[str, str], iid: str) -> dict[str, Any]:
    r = api.client.get(f"/api/integrations/{iid}", headers=who)
    assert r.status_code == 200, r.text
    return r.json()


def _history(api: Api, who: dict[str, str], iid: str) -> list[dict[str, Any]]:
    r = api.client.get(f"/api/integrations/{iid}/history", headers=who)
    assert r.status_code == 200, r.text
    return r.json()


def _sent(api: Api, who: dict[str, str], iid: str, upstream: Upstream) -> dict[str, str]:
    """The headers the upstream received for one ``/proxy`` and one ``/request`` call (equal)."""
    r = api.client.get(f"/api/integrations/{iid}/proxy/echo", headers=who)
    assert r.status_code == 200, r.text
    via_proxy = {k.lower(): v for k, v in upstream.last().headers}
    r = api.client.post(f"/api/integrations/{iid}/request", json={"url": "echo"}, headers=who)
    assert r.status_code == 200, r.text
    via_request = {k.lower(): v for k, v in upstream.last().headers}
    for name in ("x-token", "x-user", "x-other"):
        assert via_proxy.get(name) == via_request.get(name), name
    return via_proxy


def test_a_secret_header_is_masked_everywhere_and_injected_literally(api: Api, upstream: Upstream) -> None:
    alice = api.user("alice")
    bob = api.user("bob")
    r = api.client.post(
        "/api/integrations",
        json={
            "name": "Vaulted",
            "authType": "apikey",
            "apiKey": SECRET,
            "apiBaseUri": upstream.url + "/v1",
            "mode": "shared",
            "headers": {"X-Token": {"value": TOKEN, "secret": True}, "X-User": "${user.email}"},
        },
        headers=alice,
    )
    assert r.status_code == 201, r.text
    created = r.json()
    iid = created["id"]
    assert created["headers"] == {"X-Token": MASKED, "X-User": "${user.email}"}
    assert TOKEN not in r.text
    assert _get(api, alice, iid)["headers"] == {"X-Token": MASKED, "X-User": "${user.email}"}
    r = api.client.get(f"/api/integrations/{iid}/headers", headers=alice)
    assert r.status_code == 200 and r.json() == {"X-Token": MASKED, "X-User": "${user.email}"}
    assert r.headers["etag"] == '"1"'
    listed = api.client.get("/api/integrations", headers=alice).json()["_embedded"]["inf:integration"]
    assert listed[0]["headers"] == {"X-Token": MASKED, "X-User": "${user.email}"}
    assert api.client.get("/api/integrations-list", headers=alice).json()[0]["headers"]["X-Token"] == MASKED
    created_event = _history(api, alice, iid)[0]
    assert created_event["data"]["settings"]["headers"]["X-Token"] == MASKED
    assert set(created_event["data"]["secrets"]) == {"api_key", "header:x-token"}

    api.client.put(f"/api/integrations/{iid}/shares/bob", json={}, headers=alice)
    for who, email in ((alice, "alice@example.com"), (bob, "bob@example.com")):
        sent = _sent(api, who, iid, upstream)
        assert sent["x-token"] == TOKEN  # exactly as given: no expansion of `$user.id` or `${...}`
        assert sent["x-user"] == email
        assert sent["x-api-key"] == SECRET


def test_a_secret_header_wins_over_a_caller_header_of_the_same_name(api: Api, upstream: Upstream) -> None:
    alice = api.user("alice")
    iid = apikey(api, alice, upstream, headers={"X-Token": {"value": TOKEN, "secret": True}})["id"]
    r = api.client.get(f"/api/integrations/{iid}/proxy/echo", headers={**alice, "x-token": "caller"})
    assert r.status_code == 200, r.text
    assert upstream.last().header("x-token") == TOKEN


def test_patch_keeps_replaces_and_removes_secret_values(api: Api, upstream: Upstream) -> None:
    alice = api.user("alice")
    iid = apikey(api, alice, upstream, headers={"X-Token": {"value": TOKEN, "secret": True}})["id"]
    url = f"/api/integrations/{iid}"

    # keep: the masked form as responses show it, beside a new template header
    r = api.client.patch(url, json={"headers": {"X-Token": MASKED, "X-Other": "${tenant.id}"}}, headers=alice)
    assert r.status_code == 200, r.text
    assert r.json()["headers"] == {"X-Token": MASKED, "X-Other": "${tenant.id}"}
    event = _history(api, alice, iid)[-1]
    assert event["data"]["secrets_set"] == {} and event["data"]["secrets_cleared"] == []
    sent = _sent(api, alice, iid, upstream)
    assert sent["x-token"] == TOKEN and sent["x-other"] == "default"

    # keep across a change of the name's case (header names are case-insensitive)
    r = api.client.patch(url, json={"headers": {"x-token": MASKED}}, headers=alice)
    assert r.status_code == 200, r.text
    assert _sent(api, alice, iid, upstream)["x-token"] == TOKEN
    assert "x-other" not in _sent(api, alice, iid, upstream)

    # replace: a new value applies to the very next call (the proxy cache is invalidated on save)
    r = api.client.patch(
        url, json={"headers": {"X-Token": {"value": "rotated-VAULTED", "secret": True}}}, headers=alice
    )
    assert r.status_code == 200, r.text
    assert r.json()["headers"] == {"X-Token": MASKED} and "rotated" not in r.text
    history = _history(api, alice, iid)
    assert list(history[-1]["data"]["secrets_set"]) == ["header:x-token"]
    assert _sent(api, alice, iid, upstream)["x-token"] == "rotated-VAULTED"

    # a secret header turned into a template: its stored value is cleared
    r = api.client.patch(url, json={"headers": {"X-Token": "${user.id}"}}, headers=alice)
    assert r.status_code == 200, r.text
    assert _history(api, alice, iid)[-1]["data"]["secrets_cleared"] == ["header:x-token"]
    assert _sent(api, alice, iid, upstream)["x-token"] == "alice"

    # and back, then removed from the map: cleared again, nothing sent
    r = api.client.patch(url, json={"headers": {"X-Token": {"value": TOKEN, "secret": True}}}, headers=alice)
    assert r.status_code == 200, r.text
    r = api.client.patch(url, json={"headers": {}}, headers=alice)
    assert r.status_code == 200, r.text
    assert r.json()["headers"] == {}
    assert _history(api, alice, iid)[-1]["data"]["secrets_cleared"] == ["header:x-token"]
    assert "x-token" not in _sent(api, alice, iid, upstream)

    # once cleared, the masked form has nothing to keep: 400, nothing changes
    version = _get(api, alice, iid)["version"]
    r = api.client.patch(url, json={"headers": {"X-Token": MASKED}}, headers=alice)
    assert r.status_code == 400, r.text
    assert r.json()["details"] == [
        {"field": "headers.X-Token", "message": 'has no stored secret value: send {"value": ..., "secret": true}'}
    ]
    assert _get(api, alice, iid)["version"] == version


def test_put_without_headers_clears_secret_values_and_null_does_too(api: Api, upstream: Upstream) -> None:
    alice = api.user("alice")
    body = {
        "name": "Vaulted",
        "authType": "apikey",
        "apiBaseUri": upstream.url + "/v1",
        "mode": "shared",
        "headers": {"X-Token": {"value": TOKEN, "secret": True}},
    }
    iid = apikey(api, alice, upstream, headers=body["headers"])["id"]
    r = api.client.put(f"/api/integrations/{iid}", json={**body, "headers": {"X-Token": MASKED}}, headers=alice)
    assert r.status_code == 200, r.text
    assert _sent(api, alice, iid, upstream)["x-token"] == TOKEN  # PUT with the masked form keeps it
    r = api.client.put(
        f"/api/integrations/{iid}", json={k: v for k, v in body.items() if k != "headers"}, headers=alice
    )
    assert r.status_code == 200, r.text
    assert r.json()["headers"] == {}
    assert "header:x-token" in _history(api, alice, iid)[-1]["data"]["secrets_cleared"]
    assert "x-token" not in _sent(api, alice, iid, upstream)
    r = api.client.patch(
        f"/api/integrations/{iid}", json={"headers": {"X-Token": {"value": "v2", "secret": True}}}, headers=alice
    )
    assert r.status_code == 200, r.text
    r = api.client.patch(f"/api/integrations/{iid}", json={"headers": None}, headers=alice)
    assert r.status_code == 200, r.text
    assert _history(api, alice, iid)[-1]["data"]["secrets_cleared"] == ["header:x-token"]
    assert "x-token" not in _sent(api, alice, iid, upstream)


def test_put_headers_replaces_the_map_in_one_event(api: Api, upstream: Upstream) -> None:
    alice = api.user("alice")
    bob = api.user("bob")
    iid = apikey(api, alice, upstream, headers={"X-Old": "old"})["id"]
    api.client.put(f"/api/integrations/{iid}/shares/bob", json={"accessLevel": 2}, headers=alice)
    before = len(_history(api, alice, iid))
    headers = {"X-Token": {"value": TOKEN, "secret": True}, "X-User": "$user.username"}
    r = api.client.put(f"/api/integrations/{iid}/headers", json=headers, headers=bob)
    assert r.status_code == 200, r.text
    assert r.json() == {"X-Token": MASKED, "X-User": "$user.username"}
    assert TOKEN not in r.text
    version = _get(api, alice, iid)["version"]
    assert r.headers["etag"] == f'"{version}"' and r.headers["x-event-position"]
    history = _history(api, alice, iid)
    assert len(history) == before + 1
    event = history[-1]
    assert event["type"] == "integrations/Integration.Updated.v1" and event["actorId"] == "bob"
    assert event["data"]["changes"] == {"headers": {"X-Token": MASKED, "X-User": "$user.username"}}
    assert list(event["data"]["secrets_set"]) == ["header:x-token"]
    assert TOKEN not in str(history)
    r = api.client.get(f"/api/integrations/{iid}/headers", headers=bob)
    assert r.status_code == 200 and r.json() == {"X-Token": MASKED, "X-User": "$user.username"}
    assert r.headers["etag"] == f'"{version}"'
    sent = _sent(api, bob, iid, upstream)
    assert sent["x-token"] == TOKEN and sent["x-user"] == "bob" and "x-old" not in sent

    # the same map again: nothing changed, no event
    r = api.client.put(f"/api/integrations/{iid}/headers", json={**headers, "X-Token": MASKED}, headers=alice)
    assert r.status_code == 200, r.text
    assert "x-event-position" not in r.headers
    assert len(_history(api, alice, iid)) == before + 1

    # an empty map removes every header and clears the secret value
    r = api.client.put(f"/api/integrations/{iid}/headers", json={}, headers=alice)
    assert r.status_code == 200 and r.json() == {}
    assert _history(api, alice, iid)[-1]["data"]["secrets_cleared"] == ["header:x-token"]


def test_put_headers_if_match(api: Api, upstream: Upstream) -> None:
    alice = api.user("alice")
    iid = apikey(api, alice, upstream)["id"]
    url = f"/api/integrations/{iid}/headers"
    r = api.client.put(url, json={"X-A": "1"}, headers={**alice, "If-Match": '"1"'})
    assert r.status_code == 200, r.text
    assert r.headers["etag"] == '"2"'
    r = api.client.put(url, json={"X-B": {"value": "v", "secret": True}}, headers={**alice, "If-Match": '"1"'})
    assert r.status_code == 412, r.text
    assert r.json()["statusCode"] == 412 and r.json()["details"] == {"currentVersion": 2}
    r = api.client.put(url, json={"X-A": "2"}, headers={**alice, "If-Match": "junk"})
    assert r.status_code == 400
    assert api.client.get(url, headers=alice).json() == {"X-A": "1"}
    assert _get(api, alice, iid)["version"] == 2


INVALID = [
    ({"X-User": "${user.password}"}, "headers.X-User", "unknown variable 'user.password'"),
    ({"X-User": "${user.email"}, "headers.X-User", "unterminated '${'"),
    ({"X-User": "$$"}, "headers.X-User", "a lone '$' must not be followed by '$'"),
    ({"Host": "evil.example"}, "headers.Host", "is set by the service and cannot be templated"),
    ({"x-api-key": "mine"}, "headers.x-api-key", "is set by the service and cannot be templated"),
    ({"Bad Name": "x"}, "headers.Bad Name", "is not a valid header name"),
    ({"X-A": "1", "x-a": "2"}, "headers.x-a", "is given twice (header names are case-insensitive)"),
    ({"Cookie": {"value": "c", "secret": True}}, "headers.Cookie", "is set by the service and cannot be templated"),
    (
        {"X-Token": {"value": "a\r\nX-Evil: 1", "secret": True}},
        "headers.X-Token",
        "a secret value must be printable ASCII (no CR, LF, NUL or other control characters)",
    ),
    (
        {"X-Token": {"value": "caf\u00e9", "secret": True}},
        "headers.X-Token",
        "a secret value must be printable ASCII (no CR, LF, NUL or other control characters)",
    ),
    (
        {"X-Token": {"value": "v", "secret": False}},
        "headers.X-Token",
        "a value that is not secret is given as a template string",
    ),
    ({"X-Token": MASKED}, "headers.X-Token", 'has no stored secret value: send {"value": ..., "secret": true}'),
]


@pytest.mark.parametrize(("headers", "field", "message"), INVALID)
def test_invalid_headers_are_400_with_details_and_change_nothing(
    api: Api, upstream: Upstream, headers: dict[str, Any], field: str, message: str
) -> None:
    alice = api.user("alice")
    iid = apikey(api, alice, upstream, headers={"X-Keep": {"value": TOKEN, "secret": True}})["id"]
    for method, url, body in (
        ("PUT", f"/api/integrations/{iid}/headers", headers),
        ("PATCH", f"/api/integrations/{iid}", {"headers": headers}),
    ):
        r = api.client.request(method, url, json=body, headers=alice)
        assert r.status_code == 400, (method, r.text)
        doc = r.json()
        assert doc["statusCode"] == 400 and doc["error"] == "Bad Request" and doc["message"]
        assert {"field": field, "message": message} in doc["details"], doc
        assert "a\r\n" not in r.text and TOKEN not in r.text
    r = api.client.post(
        "/api/integrations",
        json={"name": "New", "authType": "apikey", "apiKey": "k", "apiBaseUri": upstream.url, "headers": headers},
        headers=alice,
    )
    assert r.status_code == 400, r.text
    assert {"field": field, "message": message} in r.json()["details"]
    assert _get(api, alice, iid)["version"] == 1
    assert len(_history(api, alice, iid)) == 1
    assert api.client.get(f"/api/integrations/{iid}/headers", headers=alice).json() == {"X-Keep": MASKED}
    assert _sent(api, alice, iid, upstream)["x-keep"] == TOKEN  # the stored value is untouched


def test_malformed_headers_bodies_are_400(api: Api, upstream: Upstream) -> None:
    alice = api.user("alice")
    iid = apikey(api, alice, upstream)["id"]
    url = f"/api/integrations/{iid}/headers"
    for body in (
        ["X-A"],
        {"X-A": 1},
        {"X-A": {"value": "v"}},
        {"X-A": {"value": "v", "secret": True, "extra": 1}},
        {"X-A": {"value": "", "secret": True}},
        {"X-A": {"value": "x" * 4097, "secret": True}},
        {"X-A": "x" * 4097},
        {f"X-{n}": "v" for n in range(51)},
    ):
        r = api.client.put(url, json=body, headers=alice)
        assert r.status_code == 400, (body if len(str(body)) < 200 else "long", r.text)
        assert r.json()["statusCode"] == 400
    assert _get(api, alice, iid)["version"] == 1


def test_headers_need_edit_access_and_invisible_is_404(api: Api, upstream: Upstream) -> None:
    alice = api.user("alice")
    bob = api.user("bob")
    carol = api.user("carol")
    iid = apikey(api, alice, upstream, headers={"X-Token": {"value": TOKEN, "secret": True}})["id"]
    api.client.put(f"/api/integrations/{iid}/shares/bob", json={"accessLevel": 1}, headers=alice)
    r = api.client.get(f"/api/integrations/{iid}/headers", headers=bob)
    assert r.status_code == 200 and r.json() == {"X-Token": MASKED}
    r = api.client.put(f"/api/integrations/{iid}/headers", json={"X-A": "1"}, headers=bob)
    assert r.status_code == 403, r.text
    for method in ("GET", "PUT"):
        r = api.client.request(method, f"/api/integrations/{iid}/headers", json={"X-A": "1"}, headers=carol)
        assert r.status_code == 404, r.text
    r = api.client.get("/api/integrations/alice:example/headers", headers=alice)
    assert r.status_code == 200 and r.json() == {"X-Token": MASKED}
    assert _get(api, alice, iid)["version"] == 2  # the share only

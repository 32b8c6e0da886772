"""Base URLs that pass the URL rules (``domain.urls.UrlPolicy``) but that the parsers the proxy
sends with (yarl, httpx, the resolver) refuse: a refusal in the error shape, never a 500. For
``$connection.<field>`` the value comes from the authorization server, which is not trusted
(PX-3): a 502 ``api_base_uri_rejected``. Found in review.
"""

from __future__ import annotations

import pytest

from tests.api.conftest import Api
from tests.connections.conftest import oauth_integration
from tests.connections.support import connected
from tests.oauth.harness import OAuthServer
from tests.proxy.upstream import Upstream


@pytest.mark.parametrize(
    "instance",
    [
        "https://[::1]x/api",  # urlsplit: host ::1, no port; yarl: ValueError "Invalid IPv6 URL"
        "https://a[::1]b/api",
    ],
)
def test_a_connection_base_the_sender_cannot_parse_is_rejected_not_a_500(
    api: Api, oauth_server: OAuthServer, instance: str
) -> None:
    """``urlsplit`` reads a host in these, yarl refuses them: a 502 ``api_base_uri_rejected`` on every
    call, nothing sent."""
    alice = api.user("alice")
    oauth_server.token_extra(instance_url=instance)
    integration = oauth_integration(api, alice, oauth_server, apiBaseUri="$connection.instance_url")
    connected(api, alice, integration["id"], oauth_server)
    oauth_server.reset()
    r = api.client.get(f"/api/integrations/{integration['id']}/proxy/whoami", headers=alice)
    assert r.status_code == 502, r.text
    assert r.json()["code"] == "api_base_uri_rejected"
    assert oauth_server.stats()["api_requests"] == 0


@pytest.mark.parametrize("base", ["https://256.1.1.1/v1", "https://[v1.x]/v1"])
def test_params_on_a_base_httpx_cannot_parse_are_not_a_500(api: Api, upstream: Upstream, base: str) -> None:
    """Hosts ``urlsplit`` and yarl accept but httpx refuses when ``params`` are merged
    (``256.1.1.1``, ``[v1.x]``): a clean 4xx/5xx with or without ``params``."""
    alice = api.user("alice")
    r = api.client.post(
        "/api/integrations",
        json={"name": "Odd", "authType": "apikey", "apiKey": "k", "apiBaseUri": base, "mode": "shared"},
        headers=alice,
    )
    assert r.status_code == 201, r.text  # the URL rules accept it
    iid = r.json()["id"]
    plain = api.client.post(f"/api/integrations/{iid}/request", json={"url": "x"}, headers=alice)
    assert plain.status_code in (400, 502), plain.text
    r = api.client.post(f"/api/integrations/{iid}/request", json={"url": "x", "params": {"a": 1}}, headers=alice)
    assert r.status_code in (400, 502), r.text


@pytest.mark.parametrize("host", ["a..b.example", "a" * 64 + ".example", ".example"])
def test_a_host_the_resolver_cannot_encode_is_a_502_not_a_500(api: Api, oauth_server: OAuthServer, host: str) -> None:
    """A name with an empty or over-long label: ``getaddrinfo`` raises ``UnicodeError``, which is a
    connect error (502), from a saved base URL or one from the token response."""
    alice = api.user("alice")
    oauth_server.token_extra(instance_url=f"https://{host}/api")
    integration = oauth_integration(api, alice, oauth_server, apiBaseUri="$connection.instance_url")
    connected(api, alice, integration["id"], oauth_server)
    r = api.client.get(f"/api/integrations/{integration['id']}/proxy/whoami", headers=alice)
    assert r.status_code == 502, r.text
    r = api.client.post(
        "/api/integrations",
        json={"name": "Odd", "authType": "apikey", "apiKey": "k", "apiBaseUri": f"https://{host}/v1", "slug": "odd"},
        headers=alice,
    )
    assert r.status_code == 201, r.text
    r = api.client.get(f"/api/integrations/{r.json()['id']}/proxy/x", headers=alice)
    assert r.status_code == 502, r.text

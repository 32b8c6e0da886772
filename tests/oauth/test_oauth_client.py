"""The OAuth client primitives against a real oidc-provider (tests/oauth/harness.py) and, for
responses no honest provider sends, a tiny local HTTP server. Every call goes through the egress
guard with ``INTEGRATIONS_EGRESS_ALLOW=127.0.0.1``.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import gzip
import hashlib
import json
import threading
import time
import urllib.parse as up
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

import pytest

from infrastructure.egress import EgressPolicy, guarded_async_client
from infrastructure.oauth_client import (
    ClientConfigError,
    ClientCredentials,
    InvalidGrant,
    OAuthError,
    ProtocolError,
    TokenClient,
    TokenSet,
    TransientError,
    authorization_url,
    fetch_identity,
    hash_state,
    may_retry,
    new_pkce,
    new_state,
    parse_retry_after,
    pkce_challenge,
    unverified_id_token_claims,
)
from infrastructure.providers import DROPBOX, GOOGLE, MICROSOFT, OIDC, auth_params, preset_for
from tests.oauth.harness import BASIC_CLIENT, POST_CLIENT, OAuthClient, OAuthServer, http_client

ALLOW_LOOPBACK = EgressPolicy.parse("127.0.0.1")  # INTEGRATIONS_EGRESS_ALLOW=127.0.0.1
SCOPE = "openid offline_access api:read"
T = TypeVar("T")


def creds(client: OAuthClient, secret: str | None = None) -> ClientCredentials:
    return ClientCredentials(client.client_id, secret or client.client_secret, client.auth_method)  # type: ignore[arg-type]


def with_tokens(fn: Callable[[TokenClient], Awaitable[T]], *, policy: EgressPolicy = ALLOW_LOOPBACK, **kw: Any) -> T:
    """Run ``fn(TokenClient)`` on a fresh guarded client in a fresh event loop."""

    async def main() -> T:
        async with guarded_async_client(policy) as http:
            return await fn(TokenClient(http, **kw))

    return asyncio.run(main())


def expect(exc_type: type[OAuthError], fn: Callable[[TokenClient], Awaitable[Any]], **kw: Any) -> Any:
    with pytest.raises(exc_type) as info:
        with_tokens(fn, **kw)
    return info.value


def authorize(
    op: OAuthServer,
    client: OAuthClient = BASIC_CLIENT,
    *,
    auth_uri: str | None = None,
    scope: str = SCOPE,
    login: str = "alice@example.com",
) -> tuple[str, str, str]:
    """Our authorization URL + PKCE through login and consent: ``(code, verifier, url)``."""
    verifier, challenge = new_pkce()
    state = new_state()
    url = authorization_url(
        auth_uri or op.authorization_endpoint,
        client_id=client.client_id,
        redirect_uri=op.redirect_uri,
        scope=scope,
        state=state,
        code_challenge=challenge,
        extra={"prompt": "consent"},
    )
    with op.browser() as browser:
        params = browser.authorize(url, login=login)
    assert params["state"] == state
    assert params["iss"] == op.issuer
    return params["code"], verifier, url


def connect(op: OAuthServer, client: OAuthClient = BASIC_CLIENT, **kw: Any) -> TokenSet:
    code, verifier, _ = authorize(op, client, **kw)
    return with_tokens(lambda tc: tc.exchange_code(op.token_endpoint, creds(client), code, verifier, op.redirect_uri))


def whoami(op: OAuthServer, access_token: str) -> int:
    with http_client() as http:
        return http.get(op.api_url, headers={"Authorization": f"Bearer {access_token}"}).status_code


# --------------------------------------------------------------------------------------------------
# PKCE, state, authorization URL
# --------------------------------------------------------------------------------------------------


def test_pkce_and_state_shapes() -> None:
    verifier, challenge = new_pkce()
    assert len(verifier) == 43 and len(challenge) == 43
    digest = hashlib.sha256(verifier.encode()).digest()
    assert challenge == base64.urlsafe_b64encode(digest).rstrip(b"=").decode() == pkce_challenge(verifier)
    assert new_pkce()[0] != verifier
    state = new_state()
    assert len(state) >= 22 and len(base64.urlsafe_b64decode(state + "=")) * 8 >= 128
    assert hash_state(state) == hashlib.sha256(state.encode()).hexdigest() != state


def test_code_flow_with_our_authorization_url(oauth_server: OAuthServer) -> None:
    code, verifier, url = authorize(oauth_server)
    pairs = up.parse_qsl(up.urlsplit(url).query, keep_blank_values=True)
    names = [k for k, _ in pairs]
    assert len(names) == len(set(names))
    params = dict(pairs)
    assert params["response_type"] == "code" and params["client_id"] == "svc-basic"
    assert params["redirect_uri"] == oauth_server.redirect_uri and params["scope"] == SCOPE
    assert params["code_challenge_method"] == "S256"
    assert len(params["code_challenge"]) == 43
    assert len(params["state"]) >= 22
    assert "%20" in url and "+" not in up.urlsplit(url).query  # space encoded as %20
    tokens = with_tokens(
        lambda tc: tc.exchange_code(
            oauth_server.token_endpoint, creds(BASIC_CLIENT), code, verifier, oauth_server.redirect_uri
        )
    )
    assert whoami(oauth_server, tokens.access_token) == 200


def test_auth_uri_keeps_its_own_params_without_duplicates(oauth_server: OAuthServer) -> None:
    """oidc-provider rejects a repeated parameter, so the flow succeeding proves there is none."""
    auth_uri = (
        oauth_server.authorization_endpoint
        + "?ui_locales=en&client_id=svc-post&scope=api%3Awrite&state=theirs&response_type=token"
        + "&code_challenge_method=plain&prompt=consent&ui_locales=de#frag"
    )
    code, verifier, url = authorize(oauth_server, auth_uri=auth_uri)
    pairs = up.parse_qsl(up.urlsplit(url).query)
    names = [k for k, _ in pairs]
    assert len(names) == len(set(names)) and "#" not in url
    params = dict(pairs)
    assert params["ui_locales"] == "en"  # theirs, kept (first occurrence)
    assert params["client_id"] == "svc-basic" and params["scope"] == SCOPE and params["response_type"] == "code"
    assert params["code_challenge_method"] == "S256" and params["state"] != "theirs"
    tokens = with_tokens(
        lambda tc: tc.exchange_code(
            oauth_server.token_endpoint, creds(BASIC_CLIENT), code, verifier, oauth_server.redirect_uri
        )
    )
    assert tokens.refresh_token


def test_authorization_url_extra_params() -> None:
    url = authorization_url(
        "https://accounts.google.com/o/oauth2/v2/auth?prompt=select_account",
        client_id="cid",
        redirect_uri="https://app.example/oauth2/callback",
        scope="a b",
        state="s" * 43,
        code_challenge="c" * 43,
        extra={"access_type": "offline", "prompt": "consent"},
    )
    params = dict(up.parse_qsl(up.urlsplit(url).query))
    assert params["access_type"] == "offline"
    assert params["prompt"] == "select_account"  # the operator's explicit parameter wins over the preset
    with pytest.raises(ValueError):
        authorization_url(
            "https://as.example/auth",
            client_id="c",
            redirect_uri="r",
            scope=None,
            state="s",
            code_challenge="c",
            extra={"state": "x"},
        )
    with pytest.raises(ValueError):
        authorization_url("/relative", client_id="c", redirect_uri="r", scope=None, state="s", code_challenge="c")


# --------------------------------------------------------------------------------------------------
# Code exchange, client authentication
# --------------------------------------------------------------------------------------------------


def test_exchange_with_client_secret_basic(oauth_server: OAuthServer) -> None:
    """The secret ``p+q r%s:t`` only works when percent-encoded before base64 (OA-10)."""
    code, verifier, _ = authorize(oauth_server)
    before = datetime.now(UTC)
    tokens = with_tokens(
        lambda tc: tc.exchange_code(
            oauth_server.token_endpoint, creds(BASIC_CLIENT), code, verifier, oauth_server.redirect_uri
        )
    )
    after = datetime.now(UTC)
    assert tokens.token_type == "Bearer"
    assert tokens.refresh_token and tokens.id_token
    assert set((tokens.scope or "").split()) == set(SCOPE.split())
    assert before + timedelta(seconds=60) <= tokens.expires_at <= after + timedelta(seconds=60)
    assert tokens.access_token not in repr(tokens) and tokens.refresh_token not in repr(tokens)
    [entry] = oauth_server.stats()["log"]
    assert (entry["auth_method"], entry["client_id"], entry["status"]) == ("client_secret_basic", "svc-basic", 200)
    assert whoami(oauth_server, tokens.access_token) == 200


def test_exchange_with_client_secret_post(oauth_server: OAuthServer) -> None:
    tokens = connect(oauth_server, POST_CLIENT)
    assert tokens.refresh_token
    [entry] = oauth_server.stats()["log"]
    assert (entry["auth_method"], entry["client_id"]) == ("client_secret_post", "svc-post")


def test_expires_at_counts_from_when_the_request_was_sent(oauth_server: OAuthServer) -> None:
    code, verifier, _ = authorize(oauth_server)
    sent = datetime(2030, 1, 1, tzinfo=UTC)
    tokens = with_tokens(
        lambda tc: tc.exchange_code(
            oauth_server.token_endpoint, creds(BASIC_CLIENT), code, verifier, oauth_server.redirect_uri
        ),
        clock=lambda: sent,
    )
    assert tokens.expires_at == sent + timedelta(seconds=60)


def test_replayed_code_is_invalid_grant(oauth_server: OAuthServer) -> None:
    code, verifier, _ = authorize(oauth_server)

    async def twice(tc: TokenClient) -> None:
        await tc.exchange_code(
            oauth_server.token_endpoint, creds(BASIC_CLIENT), code, verifier, oauth_server.redirect_uri
        )
        await tc.exchange_code(
            oauth_server.token_endpoint, creds(BASIC_CLIENT), code, verifier, oauth_server.redirect_uri
        )

    error = expect(InvalidGrant, twice)
    assert error.error == "invalid_grant" and error.status == 400


def test_wrong_verifier_is_invalid_grant(oauth_server: OAuthServer) -> None:
    code, _, _ = authorize(oauth_server)
    wrong, _ = new_pkce()
    expect(
        InvalidGrant,
        lambda tc: tc.exchange_code(
            oauth_server.token_endpoint, creds(BASIC_CLIENT), code, wrong, oauth_server.redirect_uri
        ),
    )


def test_wrong_secret_is_client_config_error(oauth_server: OAuthServer) -> None:
    code, verifier, _ = authorize(oauth_server)
    bad = creds(BASIC_CLIENT, secret="not-the-secret")
    error = expect(
        ClientConfigError,
        lambda tc: tc.exchange_code(oauth_server.token_endpoint, bad, code, verifier, oauth_server.redirect_uri),
    )
    assert (error.error, error.status) == ("invalid_client", 401)
    for secret in ("not-the-secret", code, verifier):
        assert secret not in str(error) and secret not in repr(error) and secret not in (error.description or "")
    assert error.__cause__ is None  # no chained httpx exception (it would reference the request)


def test_invalid_request_is_client_config_error(oauth_server: OAuthServer) -> None:
    """Also what oidc-provider answers for a badly encoded Basic header (OA-10)."""
    tokens = connect(oauth_server)
    oauth_server.faults(status=400, error="invalid_request")
    error = expect(
        ClientConfigError,
        lambda tc: tc.refresh(oauth_server.token_endpoint, creds(BASIC_CLIENT), tokens.refresh_token or ""),
    )
    assert error.error == "invalid_request"
    assert not may_retry(error, grant="refresh_token")


def test_egress_guard_applies_to_the_token_endpoint(oauth_server: OAuthServer) -> None:
    tokens = connect(oauth_server)
    oauth_server.reset_stats()
    error = expect(
        ClientConfigError,
        lambda tc: tc.refresh(oauth_server.token_endpoint, creds(BASIC_CLIENT), tokens.refresh_token or ""),
        policy=EgressPolicy(),
    )
    assert error.error == "egress_denied" and "loopback" in (error.description or "")
    assert oauth_server.stats()["token_requests"] == 0


# --------------------------------------------------------------------------------------------------
# Refresh: rotation, reuse, no rotation
# --------------------------------------------------------------------------------------------------


def test_refresh_with_rotation_and_reuse_detection(oauth_server: OAuthServer) -> None:
    first = connect(oauth_server)
    assert first.refresh_token
    second = with_tokens(
        lambda tc: tc.refresh(oauth_server.token_endpoint, creds(BASIC_CLIENT), first.refresh_token or "")
    )
    assert second.refresh_token and second.refresh_token != first.refresh_token
    assert whoami(oauth_server, second.access_token) == 200
    # reuse of the rotated RT: invalid_grant → reauthorization; the provider revokes the whole grant
    error = expect(
        InvalidGrant, lambda tc: tc.refresh(oauth_server.token_endpoint, creds(BASIC_CLIENT), first.refresh_token or "")
    )
    assert not may_retry(error, grant="refresh_token")
    expect(
        InvalidGrant,
        lambda tc: tc.refresh(oauth_server.token_endpoint, creds(BASIC_CLIENT), second.refresh_token or ""),
    )


def test_refresh_without_rotation_keeps_the_old_token_usable(oauth_server_non_rotating: OAuthServer) -> None:
    op = oauth_server_non_rotating
    first = connect(op, POST_CLIENT)
    rt = first.refresh_token or ""
    for _ in range(2):
        again = with_tokens(lambda tc: tc.refresh(op.token_endpoint, creds(POST_CLIENT), rt))
        assert again.refresh_token in (None, rt)  # None or the same: the caller keeps what it has
        assert whoami(op, again.access_token) == 200
    assert op.stats()["by_grant"]["refresh_token"] == 2


def test_refresh_may_narrow_the_scope(oauth_server_non_rotating: OAuthServer) -> None:
    op = oauth_server_non_rotating
    first = connect(op)
    narrower = with_tokens(
        lambda tc: tc.refresh(
            op.token_endpoint, creds(BASIC_CLIENT), first.refresh_token or "", scope="openid api:read"
        )
    )
    assert narrower.scope is not None and "offline_access" not in narrower.scope.split()


# --------------------------------------------------------------------------------------------------
# Transient failures: 503/429 + Retry-After, deadlines, lost responses, connect errors
# --------------------------------------------------------------------------------------------------


def test_503_with_retry_after_is_transient(oauth_server: OAuthServer) -> None:
    tokens = connect(oauth_server)
    oauth_server.faults(status=503)
    error = expect(
        TransientError,
        lambda tc: tc.refresh(oauth_server.token_endpoint, creds(BASIC_CLIENT), tokens.refresh_token or ""),
    )
    assert (error.retry_after, error.status, error.phase, error.cause) == (1.0, 503, "connect", "status")
    assert error.error == "temporarily_unavailable"
    assert may_retry(error, grant="refresh_token") and may_retry(error, grant="authorization_code")
    # not processed: the same refresh token still works
    again = with_tokens(
        lambda tc: tc.refresh(oauth_server.token_endpoint, creds(BASIC_CLIENT), tokens.refresh_token or "")
    )
    assert again.refresh_token


def test_429_retry_after_http_date_and_cap(oauth_server: OAuthServer) -> None:
    tokens = connect(oauth_server)
    later = email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    oauth_server.faults(status=429, retry_after=later)
    error = expect(
        TransientError,
        lambda tc: tc.refresh(oauth_server.token_endpoint, creds(BASIC_CLIENT), tokens.refresh_token or ""),
    )
    assert error.status == 429 and error.retry_after is not None and 25 <= error.retry_after <= 30
    oauth_server.faults(status=503, retry_after="86400")
    error = expect(
        TransientError,
        lambda tc: tc.refresh(oauth_server.token_endpoint, creds(BASIC_CLIENT), tokens.refresh_token or ""),
        max_retry_after=120,
    )
    assert error.retry_after == 120


def test_slow_provider_hits_the_overall_deadline(oauth_server_non_rotating: OAuthServer) -> None:
    op = oauth_server_non_rotating
    tokens = connect(op)
    op.faults(delay_ms=1500)
    started = time.monotonic()
    error = expect(
        TransientError,
        lambda tc: tc.refresh(op.token_endpoint, creds(BASIC_CLIENT), tokens.refresh_token or ""),
        deadline=0.5,
    )
    assert time.monotonic() - started < 2.0
    assert (error.cause, error.phase, error.error) == ("deadline", "read", "deadline_exceeded")
    assert error.maybe_processed
    assert may_retry(error, grant="refresh_token", read_retries_done=0)
    assert not may_retry(error, grant="refresh_token", read_retries_done=1)
    assert not may_retry(error, grant="authorization_code")  # a code is never redeemed twice
    # the provider still processes the abandoned request: let it land here, not in another test's stats
    until = time.monotonic() + 5
    while op.stats()["by_grant"].get("refresh_token", 0) < 1 and time.monotonic() < until:
        time.sleep(0.05)


def test_lost_rotation_response_then_one_retry_gets_invalid_grant(oauth_server: OAuthServer) -> None:
    """§4.1: the provider rotated, the answer was lost; the one permitted retry says invalid_grant."""
    tokens = connect(oauth_server)
    rt = tokens.refresh_token or ""
    oauth_server.faults(delay_after_ms=2000)
    error = expect(
        TransientError, lambda tc: tc.refresh(oauth_server.token_endpoint, creds(BASIC_CLIENT), rt), deadline=0.5
    )
    assert error.phase == "read" and may_retry(error, grant="refresh_token")
    time.sleep(0.2)  # the provider has processed the refresh by now (it only delays the answer)
    expect(InvalidGrant, lambda tc: tc.refresh(oauth_server.token_endpoint, creds(BASIC_CLIENT), rt))


def test_connection_refused_is_transient_connect_phase() -> None:
    import socket

    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    error = expect(
        TransientError,
        lambda tc: tc.refresh(f"http://127.0.0.1:{port}/token", ClientCredentials("c", "s"), "rt"),
    )
    assert (error.phase, error.cause) == ("connect", "network")
    assert may_retry(error, grant="authorization_code")


def test_parse_retry_after() -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("100000") == 300.0
    assert parse_retry_after(email.utils.format_datetime(now + timedelta(seconds=42), usegmt=True), now=now) == 42.0
    assert parse_retry_after(email.utils.format_datetime(now - timedelta(seconds=42), usegmt=True), now=now) == 0.0
    assert parse_retry_after("-1") is None and parse_retry_after("soon") is None and parse_retry_after(None) is None


# --------------------------------------------------------------------------------------------------
# Revocation
# --------------------------------------------------------------------------------------------------


def test_revocation(oauth_server: OAuthServer) -> None:
    tokens = connect(oauth_server)
    rt = tokens.refresh_token or ""

    async def revoke_twice(tc: TokenClient) -> None:
        await tc.revoke(oauth_server.revocation_endpoint, creds(BASIC_CLIENT), rt, "refresh_token")
        await tc.revoke(oauth_server.revocation_endpoint, creds(BASIC_CLIENT), "garbage-token", "refresh_token")

    assert with_tokens(revoke_twice) is None  # 200 also for a token it does not know
    log = [e for e in oauth_server.stats()["log"] if e["endpoint"] == "revocation"]
    assert [(e["status"], e["token_type_hint"], e["auth_method"]) for e in log] == [
        (200, "refresh_token", "client_secret_basic")
    ] * 2
    expect(InvalidGrant, lambda tc: tc.refresh(oauth_server.token_endpoint, creds(BASIC_CLIENT), rt))


def test_revocation_503_is_transient(oauth_server: OAuthServer) -> None:
    tokens = connect(oauth_server, POST_CLIENT)
    oauth_server.faults(endpoint="revocation", status=503)
    error = expect(
        TransientError,
        lambda tc: tc.revoke(
            oauth_server.revocation_endpoint, creds(POST_CLIENT), tokens.refresh_token or "", "refresh_token"
        ),
    )
    assert (error.retry_after, error.status) == (1.0, 503)
    assert may_retry(error, grant="revocation")
    # still valid until a revocation succeeds
    assert with_tokens(
        lambda tc: tc.refresh(oauth_server.token_endpoint, creds(POST_CLIENT), tokens.refresh_token or "")
    ).access_token


# --------------------------------------------------------------------------------------------------
# Identity
# --------------------------------------------------------------------------------------------------


def _identity(op: OAuthServer, tokens: TokenSet, userinfo: str | None) -> dict[str, str | None] | None:
    async def main() -> dict[str, str | None] | None:
        async with guarded_async_client(ALLOW_LOOPBACK) as http:
            return await fetch_identity(http, OIDC, tokens, userinfo)

    return asyncio.run(main())


def test_fetch_identity_via_userinfo(oauth_server: OAuthServer) -> None:
    tokens = connect(oauth_server, login="bob@example.com")
    before = oauth_server.stats()["api_requests"]
    identity = _identity(oauth_server, tokens, oauth_server.userinfo_endpoint)
    assert identity == {"name": None, "email": None, "sub": "bob@example.com"}
    assert oauth_server.stats()["api_requests"] == before + 1


def test_fetch_identity_falls_back_to_id_token_claims(oauth_server: OAuthServer) -> None:
    tokens = connect(oauth_server, login="carol@example.com")
    oauth_server.faults(endpoint="api", status=503)
    assert _identity(oauth_server, tokens, oauth_server.userinfo_endpoint) == {
        "name": None,
        "email": None,
        "sub": "carol@example.com",
    }
    claims = unverified_id_token_claims(tokens.id_token or "")
    assert claims is not None and claims["sub"] == "carol@example.com"
    bare = TokenSet(access_token="x", token_type="Bearer", expires_at=datetime.now(UTC))
    oauth_server.faults(endpoint="api", status=503)
    assert _identity(oauth_server, bare, oauth_server.userinfo_endpoint) is None


# --------------------------------------------------------------------------------------------------
# Responses no honest provider sends: a tiny local server
# --------------------------------------------------------------------------------------------------

BIG = 1024 * 1024
RELEASE = threading.Event()  # lets stalled handlers finish at teardown


def _json(obj: Any) -> bytes:
    return json.dumps(obj).encode()


STATIC: dict[str, tuple[int, dict[str, str], bytes]] = {
    "/non-json": (200, {"Content-Type": "text/html"}, b"<html>hello</html>"),
    "/form-encoded": (
        200,
        {"Content-Type": "application/x-www-form-urlencoded"},
        b"access_token=abc&token_type=bearer",
    ),
    "/dpop": (200, {}, _json({"access_token": "abc", "token_type": "DPoP", "expires_in": 60})),
    "/missing-access-token": (200, {}, _json({"token_type": "Bearer", "expires_in": 60})),
    "/bad-access-token": (200, {}, _json({"access_token": "a b\r\nX: y", "token_type": "Bearer"})),
    "/no-token-type": (200, {}, _json({"access_token": "abc"})),
    "/array": (200, {}, _json([{"access_token": "abc", "token_type": "Bearer"}])),
    "/bad-expires": (200, {}, _json({"access_token": "abc", "token_type": "Bearer", "expires_in": "soon"})),
    "/error-in-200": (200, {}, _json({"error": "invalid_grant", "error_description": "bad code"})),
    "/html-500": (500, {"Content-Type": "text/html"}, b"<h1>oops</h1>"),
    "/html-404": (404, {"Content-Type": "text/html"}, b"<h1>not here</h1>"),
    "/redirect": (302, {"Location": "https://elsewhere.example/token"}, b""),
    "/weird-error": (400, {}, _json({"error": "bad_verification_code"})),
    "/interaction-required": (400, {}, _json({"error": "interaction_required"})),
    "/salesforce": (
        200,
        {},
        _json(
            {
                "access_token": "00Dxx!AQ0AQ.abc",
                "token_type": "bearer",
                "expires_in": "7200",
                "refresh_token": "5Aep861.xyz",
                "scope": ["api", "refresh_token"],
                "instance_url": "https://example.my.salesforce.com",
                "id": "https://login.salesforce.com/id/00Dxx/005xx",
                "issued_at": "1700000000000",
                "signature": "SIGNATURE-SECRET",
                "authed_user": {"access_token": "NESTED-SECRET"},
                "session_key": "SESSION-SECRET",
            }
        ),
    ),
    "/no-expires": (200, {}, _json({"access_token": "abc", "token_type": "Bearer", "refresh_token": ""})),
}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        try:
            self._answer()
        except OSError:  # the client hung up, as it should for the oversized bodies
            pass

    def _answer(self) -> None:
        if self.path in STATIC:
            status, headers, body = STATIC[self.path]
            self.send_response(status)
            for k, v in {"Content-Type": "application/json", **headers}.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/big-declared":  # says 1 MiB, sends 1 KiB, then stalls
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(BIG))
            self.end_headers()
            self.wfile.write(b'{"access_token": "' + b"a" * 1024)
            self.wfile.flush()
            RELEASE.wait(5)
        elif self.path == "/big-chunked":  # no length: 80 KiB quickly, then stalls before the rest
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = b"a" * 16384
            self.wfile.write(b'%x\r\n{"access_token": "\r\n' % len(b'{"access_token": "'))
            for i in range(BIG // len(chunk)):
                if i == 5:
                    self.wfile.flush()
                    RELEASE.wait(5)
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.write(b"0\r\n\r\n")
        elif self.path == "/gzip-bomb":  # 10 MiB of JSON whitespace in ~10 KiB of gzip
            body = gzip.compress(b"{" + b" " * (10 * BIG) + b"}")
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/gzip-ok":
            body = gzip.compress(_json({"access_token": "abc", "token_type": "Bearer", "expires_in": 5}))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()


@contextmanager
def _bad_provider() -> Iterator[str]:
    RELEASE.clear()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        RELEASE.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture(scope="module")
def bad_provider() -> Iterator[str]:
    with _bad_provider() as url:
        yield url


CLIENT = ClientCredentials("cid", "csecret", "client_secret_post")


def _refresh(base: str, path: str, **kw: Any) -> TokenSet:
    return with_tokens(lambda tc: tc.refresh(base + path, CLIENT, "rt"), **kw)


@pytest.mark.parametrize(
    ("path", "error"),
    [
        ("/non-json", "malformed_token_response"),
        ("/form-encoded", "malformed_token_response"),
        ("/dpop", "unsupported_token_type"),
        ("/missing-access-token", "missing_access_token"),
        ("/bad-access-token", "malformed_access_token"),
        ("/no-token-type", "unsupported_token_type"),
        ("/array", "malformed_token_response"),
        ("/bad-expires", "invalid_expires_in"),
    ],
)
def test_malformed_token_responses_are_protocol_errors(bad_provider: str, path: str, error: str) -> None:
    with pytest.raises(ProtocolError) as info:
        _refresh(bad_provider, path)
    assert info.value.error == error


@pytest.mark.parametrize("path", ["/big-declared", "/big-chunked", "/gzip-bomb"])
def test_oversized_bodies_are_cut_without_reading_them(bad_provider: str, path: str) -> None:
    """The server stalls after the first 1-80 KiB of a 1 MiB body; the client gives up at once
    (long before the stall ends or the 10 s deadline) instead of reading on."""
    started = time.monotonic()
    with pytest.raises(ProtocolError) as info:
        _refresh(bad_provider, path, deadline=10)
    assert info.value.error == "response_too_large"
    assert time.monotonic() - started < 2.0


def test_error_classification_of_odd_answers(bad_provider: str) -> None:
    with pytest.raises(InvalidGrant):
        _refresh(bad_provider, "/error-in-200")  # GitHub-style: an error object with status 200
    with pytest.raises(InvalidGrant):
        _refresh(bad_provider, "/interaction-required")  # Entra ID: the user must sign in again
    with pytest.raises(TransientError) as transient:
        _refresh(bad_provider, "/html-500")
    assert (transient.value.phase, transient.value.status, transient.value.retry_after) == ("read", 500, None)
    with pytest.raises(ClientConfigError) as config:
        _refresh(bad_provider, "/html-404")
    assert config.value.error == "http_404"
    with pytest.raises(ClientConfigError) as config:
        _refresh(bad_provider, "/redirect")
    assert config.value.error == "unexpected_redirect"
    with pytest.raises(ClientConfigError) as config:
        _refresh(bad_provider, "/weird-error")
    assert config.value.error == "bad_verification_code"


def test_lenient_where_providers_differ(bad_provider: str) -> None:
    tokens = _refresh(bad_provider, "/salesforce")
    assert tokens.token_type == "Bearer" and tokens.refresh_token == "5Aep861.xyz"
    assert tokens.scope == "api refresh_token"
    assert dict(tokens.raw_extra) == {
        "instance_url": "https://example.my.salesforce.com",
        "id": "https://login.salesforce.com/id/00Dxx/005xx",
        "issued_at": "1700000000000",
    }
    assert "SECRET" not in repr(tokens)
    sent = datetime(2030, 1, 1, tzinfo=UTC)
    plain = _refresh(bad_provider, "/no-expires", clock=lambda: sent, default_expires_in=900)
    assert plain.expires_at == sent + timedelta(seconds=900) and plain.refresh_token is None
    assert _refresh(bad_provider, "/gzip-ok").access_token == "abc"


# --------------------------------------------------------------------------------------------------
# Provider presets
# --------------------------------------------------------------------------------------------------


def test_provider_presets() -> None:
    assert preset_for("google-drive") is GOOGLE and preset_for("googledrive") is GOOGLE
    assert preset_for("onedrive") is MICROSOFT and preset_for("SharePoint") is MICROSOFT
    assert preset_for("dropbox") is DROPBOX
    assert preset_for("custom", "https://accounts.google.com/o/oauth2/v2/auth") is GOOGLE
    assert preset_for(None, "https://login.microsoftonline.com/common/oauth2/v2.0/authorize") is MICROSOFT
    assert preset_for("custom", "https://www.dropbox.com/oauth2/authorize") is DROPBOX
    assert preset_for("custom", "https://as.example/auth") is OIDC and preset_for(None, "::bad") is OIDC

    assert auth_params(GOOGLE, "drive.readonly") == ({"access_type": "offline", "prompt": "consent"}, "drive.readonly")
    assert auth_params(MICROSOFT, "Files.Read User.Read") == ({}, "Files.Read User.Read offline_access")
    assert auth_params(MICROSOFT, "offline_access Files.Read Files.Read") == ({}, "offline_access Files.Read")
    assert auth_params(DROPBOX, None) == ({"token_access_type": "offline"}, "")
    assert auth_params(OIDC, " openid  email ") == ({}, "openid email")
    extra, _ = auth_params(GOOGLE, "x")
    extra["prompt"] = "none"
    assert GOOGLE.auth_params["prompt"] == "consent"  # presets are immutable data

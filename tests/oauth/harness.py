"""A real OAuth 2.0 / OIDC authorization server for the end-to-end tests, and a scripted browser.

The server is oidc-provider 9.x (npm, pinned in ``tests/oauth_server/package-lock.json``) running
``tests/oauth_server/op-e2e.mjs`` on 127.0.0.1 with a free port. See that file for the knobs and the
test control routes, and ``shared/notes/security.md`` §6.1/§6.2 for the background.

Install the Node side with ``npm ci --prefix tests/oauth_server --no-audit --no-fund`` (``.ci/run``
and ``scripts/test`` do it). Without ``node`` or the installed package the tests skip, unless
``INTEGRATIONS_REQUIRE_OAUTH_SERVER=1`` (set by ``.ci/run``), which turns the skip into a failure.

Nothing here imports service code: these are test utilities usable with plain httpx.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import html
import json
import os
import re
import secrets
import shutil
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.parse as up
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

SERVER_DIR = Path(__file__).resolve().parent.parent / "oauth_server"
SERVER_SCRIPT = SERVER_DIR / "op-e2e.mjs"
REQUIRE_ENV = "INTEGRATIONS_REQUIRE_OAUTH_SERVER"
REQUIRED = os.environ.get(REQUIRE_ENV) == "1"
DEFAULT_REDIRECT_URI = "http://127.0.0.1:8000/oauth2/callback"
READY_TIMEOUT_S = 20.0


class OAuthServerUnavailable(RuntimeError):
    """``node`` or the installed oidc-provider package is missing."""


@functools.cache
def ssl_context() -> ssl.SSLContext:
    """One default SSL context for all test clients (building one per httpx.Client costs ~40 ms)."""
    return ssl.create_default_context()


def http_client(**kwargs: Any) -> httpx.Client:
    """A plain httpx client for tests: no redirects, no proxies from the environment, shared SSL context."""
    kwargs.setdefault("timeout", 10)
    return httpx.Client(verify=ssl_context(), trust_env=False, **kwargs)


def availability() -> tuple[bool, str]:
    """Whether the Node side can run here, and why not."""
    node = shutil.which("node")
    if node is None:
        return False, "node is not on PATH (needed for the oidc-provider test server)"
    pkg = SERVER_DIR / "node_modules" / "oidc-provider" / "package.json"
    if not pkg.is_file():
        return False, (
            f"oidc-provider is not installed in {SERVER_DIR}; run "
            "`npm ci --prefix tests/oauth_server --no-audit --no-fund`"
        )
    version = json.loads(pkg.read_text()).get("version", "")
    if not version.startswith("9."):
        return False, f"oidc-provider {version!r} installed in {SERVER_DIR}, expected 9.x (run npm ci)"
    return True, ""


# --------------------------------------------------------------------------------------------------
# Client credentials and protocol helpers (plain functions, no service code)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OAuthClient:
    """A client registered at the test server."""

    client_id: str
    client_secret: str
    auth_method: str  # "client_secret_basic" | "client_secret_post"

    def token_auth(self, form: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
        """(headers, form) for a token/revocation request authenticated the registered way."""
        data = dict(form)
        headers = {"Accept": "application/json"}
        if self.auth_method == "client_secret_basic":
            headers["Authorization"] = client_secret_basic(self.client_id, self.client_secret)
        else:
            data.update(client_id=self.client_id, client_secret=self.client_secret)
        return headers, data


BASIC_CLIENT = OAuthClient("svc-basic", "p+q r%s:t", "client_secret_basic")
POST_CLIENT = OAuthClient("svc-post", "post-secret", "client_secret_post")


def pkce_pair() -> tuple[str, str]:
    """(verifier, S256 challenge): 32 random bytes, base64url without padding (RFC 7636 §4.1)."""
    verifier = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def client_secret_basic(client_id: str, client_secret: str) -> str:
    """RFC 6749 §2.3.1: percent-encode id and secret (``quote(v, safe="")``) *before* base64."""
    raw = f"{up.quote(client_id, safe='')}:{up.quote(client_secret, safe='')}"
    return "Basic " + base64.b64encode(raw.encode()).decode()


# --------------------------------------------------------------------------------------------------
# The server handle
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerConfig:
    rotate_refresh: bool = True
    always_rt: bool = False
    at_ttl: int = 60
    rt_ttl: int = 24 * 3600
    redirect_uris: tuple[str, ...] = (DEFAULT_REDIRECT_URI,)
    issuer: str | None = None  # None = http://127.0.0.1:<port>; "{port}" is substituted

    def env(self) -> dict[str, str]:
        env = {
            "OP_PORT": "0",
            "OP_ROTATE_REFRESH": "1" if self.rotate_refresh else "0",
            "OP_ALWAYS_RT": "1" if self.always_rt else "0",
            "OP_AT_TTL": str(self.at_ttl),
            "OP_RT_TTL": str(self.rt_ttl),
            "OP_REDIRECT_URIS": ",".join(self.redirect_uris),
            "OP_EXIT_ON_STDIN_EOF": "1",
        }
        if self.issuer is not None:
            env["OP_ISSUER"] = self.issuer
        return env


@dataclass
class OAuthServer:
    """A running op-e2e.mjs. URLs come from its discovery document."""

    config: ServerConfig
    base_url: str  # http://127.0.0.1:<port>, where it listens
    metadata: dict[str, Any]
    stderr_path: Path
    _http: httpx.Client = field(repr=False)

    basic_client: OAuthClient = BASIC_CLIENT
    post_client: OAuthClient = POST_CLIENT

    # -- discovery ---------------------------------------------------------------------------
    @property
    def issuer(self) -> str:
        return self.metadata["issuer"]

    @property
    def authorization_endpoint(self) -> str:
        return self.metadata["authorization_endpoint"]

    @property
    def token_endpoint(self) -> str:
        return self.metadata["token_endpoint"]

    @property
    def revocation_endpoint(self) -> str:
        return self.metadata["revocation_endpoint"]

    @property
    def introspection_endpoint(self) -> str:
        return self.metadata["introspection_endpoint"]

    @property
    def userinfo_endpoint(self) -> str:
        return self.metadata["userinfo_endpoint"]

    @property
    def api_url(self) -> str:
        """The protected test API: GET → {sub, scope, client_id, exp} for a valid bearer token."""
        return f"{self.base_url}/api/whoami"

    @property
    def redirect_uri(self) -> str:
        return self.config.redirect_uris[0]

    @property
    def rotating(self) -> bool:
        return self.config.rotate_refresh

    @property
    def clients(self) -> dict[str, OAuthClient]:
        return {c.client_id: c for c in (self.basic_client, self.post_client)}

    # -- building requests -------------------------------------------------------------------
    def authorize_url(
        self,
        client: OAuthClient | str = BASIC_CLIENT,
        *,
        code_challenge: str | None,
        state: str | None = None,
        scope: str = "openid offline_access api:read",
        redirect_uri: str | None = None,
        prompt: str | None = "consent",
        **extra: str,
    ) -> str:
        """An authorization-code request URL. ``prompt=consent`` keeps ``offline_access`` (→ RT)."""
        client_id = client if isinstance(client, str) else client.client_id
        params: dict[str, str] = {
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": redirect_uri or self.redirect_uri,
            "scope": scope,
        }
        if state is not None:
            params["state"] = state
        if code_challenge is not None:
            params.update(code_challenge=code_challenge, code_challenge_method="S256")
        if prompt is not None:
            params["prompt"] = prompt
        params.update(extra)
        return f"{self.authorization_endpoint}?{up.urlencode(params, quote_via=up.quote)}"

    # -- test control ------------------------------------------------------------------------
    def faults(
        self,
        *,
        status: int | None = None,
        delay_ms: int | None = None,
        delay_after_ms: int | None = None,
        count: int = 1,
        endpoint: str = "token",
        retry_after: str | None = None,
        error: str | None = None,
    ) -> None:
        """Inject a fault into the next ``count`` calls of ``endpoint`` ("token", "revocation", "api").

        ``status``: answer with it before processing (503/429 carry ``Retry-After: 1`` unless
        ``retry_after`` is given; body ``{"error": error or "temporarily_unavailable"}``).
        ``delay_ms``: wait before processing. ``delay_after_ms``: process (e.g. rotate the RT), then
        wait before answering — a client timeout then loses the response.
        """
        spec: dict[str, Any] = {"endpoint": endpoint, "count": count}
        for key, value in (
            ("status", status),
            ("delayMs", delay_ms),
            ("delayAfterMs", delay_after_ms),
            ("retryAfter", retry_after),
            ("error", error),
        ):
            if value is not None:
                spec[key] = value
        self._http.post("/__faults", json=spec).raise_for_status()

    def reset_faults(self) -> None:
        self._http.post("/__faults", json={"reset": True}).raise_for_status()

    def stats(self) -> dict[str, Any]:
        """``{token_requests, by_grant: {grant_type: n}, revocations, api_requests, log}``.

        ``log`` has one entry per token or revocation call, in order: ``{endpoint, grant_type,
        client_id, auth_method, at, status, error, token_type_hint, fault}`` — never secrets or tokens.
        """
        r = self._http.get("/__stats")
        r.raise_for_status()
        return r.json()

    def reset_stats(self) -> None:
        self._http.post("/__stats/reset").raise_for_status()

    def token_extra(self, **fields: str) -> None:
        """Add these fields to every successful token response (``instance_url=...``, as
        Salesforce does); none: add nothing."""
        self._http.post("/__token-extra", json=fields).raise_for_status()

    def reset(self) -> None:
        """Clear faults, extra token-response fields and the stats (provider state — grants,
        tokens — is kept)."""
        self.reset_faults()
        self.token_extra()
        self.reset_stats()

    def browser(self, **kwargs: Any) -> Browser:
        """A fresh browser (own cookie jar) whose default redirect URI is this server's first."""
        kwargs.setdefault("redirect_uri", self.redirect_uri)
        return Browser(**kwargs)

    def stderr_tail(self, n: int = 4000) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


@contextmanager
def run_oauth_server(
    config: ServerConfig = ServerConfig(), *, timeout: float = READY_TIMEOUT_S
) -> Iterator[OAuthServer]:
    """Start ``node op-e2e.mjs`` on a free port, wait for its ready line, stop it afterwards."""
    ok, reason = availability()
    if not ok:
        raise OAuthServerUnavailable(reason)
    env = {**os.environ, **config.env()}
    env.pop("NODE_OPTIONS", None)
    fd, stderr_name = tempfile.mkstemp(prefix="op-e2e-", suffix=".stderr")
    stderr_path = Path(stderr_name)
    stderr_file = os.fdopen(fd, "wb")
    proc = subprocess.Popen(
        [shutil.which("node") or "node", str(SERVER_SCRIPT)],
        cwd=SERVER_DIR,
        env=env,
        stdin=subprocess.PIPE,  # held open: if this process dies, node sees EOF and exits
        stdout=subprocess.PIPE,
        stderr=stderr_file,
    )
    ready: list[str] = []
    got_line = threading.Event()

    def pump() -> None:  # read stdout to the end so the pipe never fills
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace").strip()
            if line.startswith("op ready ") and not ready:
                ready.append(line)
                got_line.set()
        got_line.set()  # EOF: the process ended

    threading.Thread(target=pump, name="op-e2e-stdout", daemon=True).start()
    http: httpx.Client | None = None
    try:
        deadline = time.monotonic() + timeout
        while not got_line.wait(0.05):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"op-e2e.mjs printed no ready line within {timeout:.0f}s; stderr:\n{_tail(stderr_path)}"
                )
        if not ready:
            raise RuntimeError(
                f"op-e2e.mjs exited with {proc.wait()} before it was ready; stderr:\n{_tail(stderr_path)}"
            )
        base_url = ready[0].split()[2]
        http = http_client(base_url=base_url)
        metadata = http.get("/.well-known/openid-configuration").raise_for_status().json()
        yield OAuthServer(config=config, base_url=base_url, metadata=metadata, stderr_path=stderr_path, _http=http)
    finally:
        if http is not None:
            http.close()
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if proc.stdin is not None:
            proc.stdin.close()
        stderr_file.close()
        stderr_path.unlink(missing_ok=True)


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


# --------------------------------------------------------------------------------------------------
# A scripted browser (security.md §6.2)
# --------------------------------------------------------------------------------------------------


class BrowserError(AssertionError):
    """The flow stopped somewhere other than the redirect URI (e.g. an error page)."""

    def __init__(self, message: str, response: httpx.Response | None = None) -> None:
        super().__init__(message)
        self.response = response


_FORM_RE = re.compile(r"<form\b[^>]*\baction=\"([^\"]*)\"[^>]*>(.*?)</form>", re.S | re.I)
_INPUT_RE = re.compile(r"<input\b[^>]*>", re.I)
_ATTR_RE = re.compile(r"(\w+)=\"([^\"]*)\"")
_ABORT_RE = re.compile(r"href=\"([^\"]*/abort)\"")


class Browser:
    """One cookie jar, redirects followed by hand, devInteractions login and consent scripted.

    ``authorize(url, redirect_uri=...)`` walks from ``url`` (the provider's authorization URL, or
    our own ``/connect`` that redirects to it) until a redirect points at ``redirect_uri`` (a prefix
    match) and returns that redirect's query parameters **without requesting it**. The full URL is
    kept in ``last_redirect``, so a test can then call our callback with the same cookie jar:
    ``browser.client.get(browser.last_redirect)``.
    """

    def __init__(
        self,
        client: httpx.Client | None = None,
        *,
        redirect_uri: str = DEFAULT_REDIRECT_URI,
        max_hops: int = 20,
        timeout: float = 10,
    ) -> None:
        self._own = client is None
        self.redirect_uri = redirect_uri
        self.client = client or http_client(timeout=timeout)
        self.max_hops = max_hops
        self.last_redirect: httpx.URL | None = None
        self.history: list[httpx.URL] = []  # every URL requested, for failure messages

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._own:
            self.client.close()

    def authorize(
        self,
        url: str | httpx.URL,
        *,
        redirect_uri: str | None = None,
        login: str = "alice@example.com",
        password: str = "any",
        consent: bool = True,
    ) -> dict[str, str]:
        """Log in as ``login`` and consent (or cancel when ``consent=False`` → ``error=access_denied``).

        Returns the query parameters of the redirect to ``redirect_uri`` (not requested).
        """
        redirect_uri = redirect_uri or self.redirect_uri
        self.last_redirect = None
        response = self._get(httpx.URL(str(url)))
        for _ in range(self.max_hops):
            if response.is_redirect:
                target = response.url.join(response.headers["location"])
                if str(target).startswith(redirect_uri):
                    self.last_redirect = target
                    return dict(up.parse_qsl(target.query.decode(), keep_blank_values=True))
                response = self._get(target)
                continue
            if response.status_code == 200 and "<form" in response.text:
                response = self._submit(response, login=login, password=password, consent=consent)
                continue
            raise BrowserError(
                f"stopped at {response.request.method} {response.url} with {response.status_code}: "
                f"{_text_of(response)[:500]}",
                response,
            )
        raise BrowserError(f"more than {self.max_hops} hops without reaching {redirect_uri}: {self.history}")

    def _get(self, url: httpx.URL) -> httpx.Response:
        self.history.append(url)
        return self.client.get(url)

    def _submit(self, page: httpx.Response, *, login: str, password: str, consent: bool) -> httpx.Response:
        match = _FORM_RE.search(page.text)
        if match is None:
            raise BrowserError(f"no form with an action at {page.url}", page)
        action = page.url.join(html.unescape(match.group(1)))
        fields: dict[str, str] = {}
        for tag in _INPUT_RE.findall(match.group(2)):
            attrs = {k.lower(): html.unescape(v) for k, v in _ATTR_RE.findall(tag)}
            if "name" in attrs:
                fields[attrs["name"]] = attrs.get("value", "")
        prompt = fields.get("prompt")
        if not consent:
            abort = _ABORT_RE.search(page.text)
            if abort is None:
                raise BrowserError(f"no cancel link at {page.url}", page)
            return self._get(page.url.join(html.unescape(abort.group(1))))
        if prompt == "login":
            fields.update(login=login, password=password)
        elif prompt != "consent":
            raise BrowserError(f"unknown interaction prompt {prompt!r} at {page.url}", page)
        self.history.append(action)
        return self.client.post(action, data=fields)


def _text_of(response: httpx.Response) -> str:
    text = re.sub(r"<style.*?</style>", "", response.text, flags=re.S | re.I)
    return " ".join(re.sub(r"<[^>]+>", " ", text).split())

"""OAuth 2.0 client primitives: PKCE and state, the authorization URL, the token and revocation
endpoints, and the connected account's identity. No event store and no domain state here: the
callers (connect, callback, refresher, disconnect) own persistence, locking and retry scheduling.

Requirement IDs refer to ``shared/notes/security.md``: OA-3 (PKCE), OA-10 (client authentication),
OA-11 (token response validation), OA-12 and RL-5 (error classification), OA-15 (revocation),
OA-16 (no secrets in exceptions), OA-17 (authorization URL parameters), §4.1 (ambiguous refreshes).

Every exception raised by :class:`TokenClient` is an :class:`OAuthError` subclass whose message and
attributes hold no secret (no client secret, code, verifier, token, or request body), and which does
not chain the underlying ``httpx`` exception (that one references the request, body included).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import hashlib
import json
import re
import secrets
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import httpx

from domain.oauth import (  # re-exported: callers and tests import them from here
    REAUTH_CODES,
    TRANSIENT_CODES,
    ClientConfigError,
    InvalidGrant,
    OAuthError,
    Phase,
    ProtocolError,
    TokenSet,
    TransientError,
)
from domain.oauth import (
    may_retry as may_retry,
)
from infrastructure.egress import EgressDenied
from infrastructure.providers import IdentitySpec, ProviderPreset

AuthMethod = Literal["client_secret_basic", "client_secret_post"]
Clock = Callable[[], datetime]

DEFAULT_DEADLINE = 10.0
DEFAULT_MAX_BODY = 64 * 1024
DEFAULT_EXPIRES_IN = 3600  # when a token response has no expires_in (RFC 6749 §5.1: RECOMMENDED)
MAX_EXPIRES_IN = 10 * 365 * 24 * 3600
MAX_RETRY_AFTER = 300.0
BEARER = "Bearer"  # the only token type we accept (RFC 6750)

# ------------------------------------------------------------------------------------------------
# PKCE, state, authorization URL
# ------------------------------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def pkce_challenge(verifier: str) -> str:
    """S256 code challenge: ``BASE64URL(SHA256(ascii(verifier)))`` (RFC 7636 §4.2)."""
    return _b64url(hashlib.sha256(verifier.encode("ascii")).digest())


def new_pkce() -> tuple[str, str]:
    """``(verifier, challenge)``: 32 random bytes → a 43-character verifier, S256 challenge (OA-3)."""
    verifier = _b64url(secrets.token_bytes(32))
    return verifier, pkce_challenge(verifier)


def new_state() -> str:
    """An unguessable ``state``: 256 random bits, 43 URL-safe characters (OA-1 asks for ≥128)."""
    return secrets.token_urlsafe(32)


def hash_state(state: str) -> str:
    """What is stored and looked up server-side instead of the state itself (hex SHA-256).

    A plain hash suffices: the state has 256 bits of entropy, so the digest cannot be reversed.
    """
    return hashlib.sha256(state.encode("utf-8")).hexdigest()


OWNED_PARAMS = frozenset(
    {"response_type", "client_id", "redirect_uri", "scope", "state", "code_challenge", "code_challenge_method"}
)


def authorization_url(
    auth_uri: str,
    *,
    client_id: str,
    redirect_uri: str,
    scope: str | None,
    state: str,
    code_challenge: str,
    extra: Mapping[str, str] | None = None,
) -> str:
    """The authorization request URL (RFC 6749 §4.1.1 + PKCE), with every parameter exactly once.

    ``auth_uri`` keeps its own query parameters (e.g. a tenant hint), except the ones we own
    (:data:`OWNED_PARAMS`), which are dropped and set by us (OA-17). ``extra`` (provider preset
    parameters such as ``access_type``) is added only where ``auth_uri`` has no parameter of that
    name, so an operator's explicit choice wins over a preset default. A fragment is dropped.
    """
    parts = urlsplit(auth_uri)
    if parts.scheme not in ("https", "http") or not parts.netloc:
        raise ValueError("auth_uri must be an absolute http(s) URL")
    params: list[tuple[str, str]] = []
    names: set[str] = set()
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in OWNED_PARAMS or key in names:
            continue
        names.add(key)
        params.append((key, value))
    params += [("response_type", "code"), ("client_id", client_id), ("redirect_uri", redirect_uri)]
    if scope:
        params.append(("scope", scope))
    params += [("state", state), ("code_challenge", code_challenge), ("code_challenge_method", "S256")]
    for key, value in (extra or {}).items():
        if key in OWNED_PARAMS:
            raise ValueError(f"extra parameter {key!r} is set by the client itself")
        if key not in names:
            names.add(key)
            params.append((key, value))
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(params, quote_via=quote), ""))


# ------------------------------------------------------------------------------------------------
# Client authentication
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientCredentials:
    """A confidential client and its one authentication method (OA-10)."""

    client_id: str
    client_secret: str = field(repr=False)
    method: AuthMethod = "client_secret_basic"

    def __post_init__(self) -> None:
        if self.method not in ("client_secret_basic", "client_secret_post"):
            raise ValueError(f"unsupported client authentication method {self.method!r}")

    def apply(self, form: dict[str, str]) -> dict[str, str]:
        """Authenticate a token/revocation request: returns the extra headers; fills ``form``."""
        if self.method == "client_secret_basic":
            # RFC 6749 §2.3.1: form-encode id and secret *before* base64; quote(safe="") is accepted
            # by form-decoding (oidc-provider) and percent-decoding (authlib) servers alike.
            raw = f"{quote(self.client_id, safe='')}:{quote(self.client_secret, safe='')}"
            return {"Authorization": "Basic " + base64.b64encode(raw.encode("utf-8")).decode("ascii")}
        form["client_id"] = self.client_id
        form["client_secret"] = self.client_secret
        return {}


def parse_retry_after(value: str | None, *, now: datetime | None = None, cap: float = MAX_RETRY_AFTER) -> float | None:
    """``Retry-After`` as seconds from now (delay-seconds or HTTP-date), clamped to ``[0, cap]``."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return min(float(int(text)), cap)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    delta = (when - (now or datetime.now(UTC))).total_seconds()
    return min(max(delta, 0.0), cap)


_PRINTABLE = re.compile(r"[^\x20-\x7e]")


def _clean(value: Any, limit: int) -> str | None:
    if not isinstance(value, str):
        return None
    text = _PRINTABLE.sub("?", value)[:limit]
    return text or None


# ------------------------------------------------------------------------------------------------
# The bounded HTTP exchange shared by every call
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Reply:
    status: int
    headers: httpx.Headers
    body: bytes
    sent_at: datetime


class _Inflater:
    """Bounded decoding of a ``Content-Encoding`` (we ask for identity; some servers compress anyway)."""

    def __init__(self, encoding: str) -> None:
        encoding = encoding.strip().lower()
        if encoding in ("", "identity"):
            self._z = None
        elif encoding in ("gzip", "x-gzip"):
            self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            self._z = zlib.decompressobj()
        else:
            raise ProtocolError("unsupported_content_encoding")

    def feed(self, chunk: bytes, room: int) -> bytes:
        if self._z is None:
            return chunk
        try:
            return self._z.decompress(chunk, max(room, 1))
        except zlib.error:
            raise ProtocolError("malformed_content_encoding") from None


async def _read_capped(response: httpx.Response, max_body: int) -> bytes:
    length = response.headers.get("content-length")
    if length is not None:
        if not length.strip().isdigit():
            raise ProtocolError("malformed_content_length", status=response.status_code)
        if int(length) > max_body:
            raise ProtocolError("response_too_large", status=response.status_code)
    inflater = _Inflater(response.headers.get("content-encoding", ""))
    body = bytearray()
    raw = 0
    async for chunk in response.aiter_raw():
        raw += len(chunk)
        body += inflater.feed(chunk, max_body + 1 - len(body))
        if raw > max_body or len(body) > max_body:
            raise ProtocolError("response_too_large", status=response.status_code)
    return bytes(body)


def _transport_error(exc: httpx.HTTPError, sent: bool) -> OAuthError:
    """Map an httpx failure without keeping it (it references the request, secrets included)."""
    if isinstance(exc, httpx.ConnectError) and "CERTIFICATE_VERIFY_FAILED" in str(exc):
        return ClientConfigError("tls_verification_failed")
    if isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout):
        return TransientError("connect_timeout", phase="connect", cause="timeout")
    if isinstance(exc, httpx.ConnectError):
        return TransientError("connect_error", phase="connect", cause="network")
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        return ClientConfigError("invalid_endpoint")
    if isinstance(exc, httpx.TimeoutException):
        return TransientError("timeout", phase="read" if sent else "connect", cause="timeout")
    if isinstance(exc, httpx.LocalProtocolError):
        return ProtocolError("local_protocol_error")
    if isinstance(exc, httpx.TransportError):
        return TransientError("network_error", phase="read" if sent else "connect", cause="network")
    return ProtocolError("http_error")


async def _exchange(
    http: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    headers: Mapping[str, str],
    form: Mapping[str, str] | None,
    deadline: float,
    max_body: int,
    clock: Clock,
) -> _Reply:
    """One request under an overall deadline, body read with a cap, failures mapped (RL-5, OA-11)."""
    sent = False

    async def trace(event: str, info: Mapping[str, Any]) -> None:
        nonlocal sent
        if event.endswith("send_request_headers.started"):
            sent = True  # from here on the provider may have processed it

    request_headers = {"Accept": "application/json", "Accept-Encoding": "identity", **headers}
    sent_at = clock()
    try:
        async with asyncio.timeout(deadline):
            async with http.stream(
                method, url, headers=request_headers, data=form, extensions={"trace": trace}
            ) as response:
                body = await _read_capped(response, max_body)
                return _Reply(response.status_code, response.headers, body, sent_at)
    except EgressDenied as exc:
        raise ClientConfigError("egress_denied", description=exc.reason) from None
    except httpx.HTTPError as exc:
        raise _transport_error(exc, sent) from None
    except TimeoutError:
        raise TransientError("deadline_exceeded", phase="read" if sent else "connect", cause="deadline") from None


def _json_object(body: bytes) -> dict[str, Any] | None:
    def reject(_: str) -> None:
        raise ValueError("non-standard JSON constant")

    try:
        value = json.loads(body, parse_constant=reject)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _error_for(reply: _Reply, obj: dict[str, Any] | None, retry_cap: float) -> OAuthError:
    """Classify a failed token or revocation response (OA-12, RL-5)."""
    status = reply.status
    code = _clean(obj.get("error"), 64) if obj else None
    description = _clean(obj.get("error_description"), 200) if obj else None
    retry_after = parse_retry_after(reply.headers.get("retry-after"), cap=retry_cap)
    if status == 429 or status >= 500 or code in TRANSIENT_CODES:
        # 429, 503 and temporarily_unavailable are explicit "not now" answers: nothing was processed.
        not_processed = status in (429, 503) or code in ("temporarily_unavailable", "slow_down")
        phase: Phase = "connect" if not_processed else "read"
        return TransientError(
            code or f"http_{status}",
            phase=phase,
            retry_after=retry_after,
            cause="status",
            status=status,
            description=description,
        )
    if 300 <= status < 400:
        return ClientConfigError("unexpected_redirect", status=status)
    if code in REAUTH_CODES:
        return InvalidGrant(code, status=status, description=description)
    if code is not None:
        # Registered configuration codes and anything unknown: a human has to look.
        return ClientConfigError(code, status=status, description=description)
    if status == 401:
        return ClientConfigError("invalid_client", status=status)
    if 400 <= status < 500:
        return ClientConfigError(f"http_{status}", status=status)
    return ProtocolError("unexpected_status", status=status)


# ------------------------------------------------------------------------------------------------
# Token response validation (OA-11)
# ------------------------------------------------------------------------------------------------

# RFC 6750 §2.1 b64token, plus "!": Salesforce access tokens ("00Dxx!AQ0AQ...") contain it. Either
# way only header-safe characters, so the token can go into "Authorization: Bearer" verbatim (OA-14).
_ACCESS_TOKEN = re.compile(r"^[A-Za-z0-9\-._~+/!]+=*$")
_VSCHAR = re.compile(r"^[\x20-\x7e]+$")  # RFC 6749 Appendix A.17
_SECRETISH = re.compile(
    r"token|secret|password|passwd|signature|code|key|assertion|credential|cookie|session|nonce", re.IGNORECASE
)
_STANDARD = frozenset({"access_token", "token_type", "expires_in", "refresh_token", "scope", "id_token"})


def _expires_in(value: Any, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool):
        raise ProtocolError("invalid_expires_in")
    if isinstance(value, str) and value.strip().isdigit():  # some providers send a string
        value = int(value.strip())
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or value < 0:
        raise ProtocolError("invalid_expires_in")
    return min(value, MAX_EXPIRES_IN)


def _scope(value: Any) -> str | None:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        value = " ".join(value)
    if not isinstance(value, str):
        return None
    return " ".join(value.split()) or None


def parse_token_response(obj: Mapping[str, Any], *, sent_at: datetime, default_expires_in: int) -> TokenSet:
    access_token = obj.get("access_token")
    if not isinstance(access_token, str) or not access_token:
        raise ProtocolError("missing_access_token")
    if not _ACCESS_TOKEN.match(access_token):
        raise ProtocolError("malformed_access_token")
    token_type = obj.get("token_type")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise ProtocolError("unsupported_token_type")
    refresh_token = obj.get("refresh_token")
    if refresh_token in (None, ""):
        refresh_token = None
    elif not isinstance(refresh_token, str) or not _VSCHAR.match(refresh_token):
        raise ProtocolError("malformed_refresh_token")
    id_token = obj.get("id_token")
    extra = {
        k: (v[:2048] if isinstance(v, str) else v)
        for k, v in obj.items()
        if k not in _STANDARD
        and isinstance(k, str)
        and not _SECRETISH.search(k)
        and isinstance(v, str | int | float | bool)
    }
    return TokenSet(
        access_token=access_token,
        token_type=BEARER,
        expires_at=sent_at + timedelta(seconds=_expires_in(obj.get("expires_in"), default_expires_in)),
        refresh_token=refresh_token,
        scope=_scope(obj.get("scope")),
        id_token=id_token if isinstance(id_token, str) and id_token else None,
        raw_extra=extra,
    )


# ------------------------------------------------------------------------------------------------
# The token endpoint client
# ------------------------------------------------------------------------------------------------


def _utcnow() -> datetime:
    return datetime.now(UTC)


class TokenClient:
    """Token endpoint (code exchange, refresh) and revocation endpoint calls.

    ``http`` should come from :func:`infrastructure.egress.guarded_async_client`. Each call is one
    HTTP request (no internal retries: see :func:`may_retry`) bounded by ``deadline`` seconds in
    total, with the response body capped at ``max_body`` bytes while it streams in.
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        deadline: float = DEFAULT_DEADLINE,
        max_body: int = DEFAULT_MAX_BODY,
        default_expires_in: int = DEFAULT_EXPIRES_IN,
        max_retry_after: float = MAX_RETRY_AFTER,
        clock: Clock = _utcnow,
    ) -> None:
        self._http = http
        self._deadline = deadline
        self._max_body = max_body
        self._default_expires_in = default_expires_in
        self._max_retry_after = max_retry_after
        self._clock = clock

    async def _post(self, url: str, client: ClientCredentials, form: dict[str, str]) -> _Reply:
        headers = client.apply(form)
        return await _exchange(
            self._http,
            "POST",
            url,
            headers=headers,
            form=form,
            deadline=self._deadline,
            max_body=self._max_body,
            clock=self._clock,
        )

    async def _token(self, url: str, client: ClientCredentials, form: dict[str, str]) -> TokenSet:
        reply = await self._post(url, client, form)
        obj = _json_object(reply.body)
        if reply.status == 200 and obj is not None and not obj.get("error"):
            return parse_token_response(obj, sent_at=reply.sent_at, default_expires_in=self._default_expires_in)
        if reply.status == 200 and obj is None:
            raise ProtocolError("malformed_token_response", status=200)
        if 200 < reply.status < 300:
            raise ProtocolError("unexpected_status", status=reply.status)
        raise _error_for(reply, obj, self._max_retry_after)

    async def exchange_code(
        self, token_uri: str, client: ClientCredentials, code: str, verifier: str | None, redirect_uri: str
    ) -> TokenSet:
        """Redeem an authorization code (RFC 6749 §4.1.3 + RFC 7636 §4.5). Never repeat it after a
        maybe-processed failure (OA-9). ``verifier`` is None only for a code obtained elsewhere
        without PKCE (``POST /connect``); our own flow always has one."""
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri}
        if verifier is not None:
            form["code_verifier"] = verifier
        return await self._token(token_uri, client, form)

    async def refresh(
        self, token_uri: str, client: ClientCredentials, refresh_token: str, scope: str | None = None
    ) -> TokenSet:
        """Refresh (RFC 6749 §6). ``scope`` may only narrow the grant; omit it to keep it."""
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        if scope:
            form["scope"] = scope
        return await self._token(token_uri, client, form)

    async def revoke(
        self,
        revocation_uri: str,
        client: ClientCredentials,
        token: str,
        hint: Literal["refresh_token", "access_token"] | None = "refresh_token",
    ) -> None:
        """RFC 7009: any 2xx means done, also for tokens the server does not know (OA-15);
        503 → :class:`TransientError` with ``retry_after``; the token may still be valid."""
        form = {"token": token}
        if hint:
            form["token_type_hint"] = hint
        reply = await self._post(revocation_uri, client, form)
        if 200 <= reply.status < 300:
            return
        raise _error_for(reply, _json_object(reply.body), self._max_retry_after)


# ------------------------------------------------------------------------------------------------
# Identity (display only)
# ------------------------------------------------------------------------------------------------

Identity = dict[str, str | None]


def unverified_id_token_claims(id_token: str) -> dict[str, Any] | None:
    """The payload of a JWS compact ID token, **not verified**: for display only, never for
    authentication or authorisation decisions."""
    parts = id_token.split(".")
    if len(parts) != 3 or len(parts[1]) > 16384:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload.encode("ascii")))
    except (ValueError, binascii.Error, UnicodeError, RecursionError):
        return None
    return claims if isinstance(claims, dict) else None


def _lookup(obj: Mapping[str, Any], path: str) -> Any:
    value: Any = obj
    for part in path.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _first(obj: Mapping[str, Any], paths: tuple[str, ...]) -> str | None:
    for path in paths:
        value = _lookup(obj, path)
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        text = _clean(value, 256)
        if text:
            return text
    return None


def _pick(obj: Mapping[str, Any], spec: IdentitySpec) -> Identity:
    return {"name": _first(obj, spec.name), "email": _first(obj, spec.email), "sub": _first(obj, spec.sub)}


_ID_TOKEN_SPEC = IdentitySpec(email=("email", "preferred_username"))


async def fetch_identity(
    http: httpx.AsyncClient,
    preset: ProviderPreset,
    token_set: TokenSet,
    userinfo_uri: str | None = None,
    *,
    deadline: float = DEFAULT_DEADLINE,
    max_body: int = DEFAULT_MAX_BODY,
) -> Identity | None:
    """``{"name", "email", "sub"}`` of the connected account, or ``None`` when nothing is known.

    Asks the preset's identity endpoint (Graph ``/me``, Dropbox ``get_current_account``, Google
    userinfo) or, for generic OIDC, ``userinfo_uri`` from discovery; the access token goes in the
    ``Authorization`` header only (OA-14). Missing fields are filled from the ID token's claims,
    decoded without verification, only when both name the same subject. Best effort: failures
    give ``None`` (identity is for display).
    """
    spec = preset.identity
    url = spec.url or userinfo_uri
    found: Identity = {"name": None, "email": None, "sub": None}
    if url:
        try:
            reply = await _exchange(
                http,
                spec.method,
                url,
                headers={"Authorization": f"Bearer {token_set.access_token}"},
                form=None,
                deadline=deadline,
                max_body=max_body,
                clock=_utcnow,
            )
        except OAuthError:
            reply = None
        obj = _json_object(reply.body) if reply is not None and reply.status == 200 else None
        if obj is not None:
            found = _pick(obj, spec)
    claims = unverified_id_token_claims(token_set.id_token) if token_set.id_token else None
    if claims is not None:
        from_token = _pick(claims, _ID_TOKEN_SPEC)
        if from_token["email"] and "@" not in from_token["email"]:
            from_token["email"] = None
        if found["sub"] is None or from_token["sub"] in (None, found["sub"]):
            found = {k: found[k] or from_token[k] for k in found}
    return found if any(found.values()) else None

"""The authenticated request proxy: one upstream call with the integration's credentials.

Both ways in (``POST /request`` and ``/proxy/{path}``) end here. The order matters: access
(404), the target URL (PX-1, 400), the custom headers (PX-8, 400) are all checked before any
credential is opened or any byte leaves, so a rejected request never reaches the upstream and
never refreshes a token. Then a slot of the integration's bulkhead, the credentials, the call
under one overall deadline (PX-9), one forced refresh and replay after a 401 when the body can be
sent again, and the response streamed back raw (encoded bytes as the upstream sent them), with
its headers filtered (PX-7).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import anyio.to_thread
import httpx
import yarl

from api.controllers.common import resolve_integration
from api.errors import ApiError
from api.services import Services
from domain.access import AccessLevel, Actor
from domain.audit import SYSTEM_ACTOR
from domain.errors import NotFound, ValidationFailed, field_error
from domain.integration import Integration
from domain.paths import Base, PathRejected, confine, within
from domain.settings import HEADER_NAME, connection_field, host_allowed
from domain.templates import TemplateError, parse_template, template_values
from domain.urls import UrlPolicy

log = logging.getLogger("integrations.proxy")

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")  # PX-2; anything else is a 400
SMALL_BODY_BYTES = 64 * 1024  # a response body up to this size (declared by Content-Length) is sent in one piece
MAX_HEADER_VALUE = 4096

# Never forwarded from the caller (PX-6). ``Connection`` also removes what it names.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
_REQUEST_DROP = _HOP_BY_HOP | {
    "host",
    "content-length",  # recomputed (or taken from the body we actually send)
    "cookie",
    "authorization",  # the caller's token for *this* service
    "forwarded",
    "x-real-ip",
    "true-client-ip",
    "x-client-ip",
    "via",
    "expect",
    "x-wait-for-position",
    # Overrides some frameworks honour: they would move the call off the checked path or method.
    "x-original-url",
    "x-rewrite-url",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
}
# Never returned to the caller (PX-7): hop-by-hop, cookies for our origin, anything that would
# widen what other origins or the browser may do with this origin.
_RESPONSE_DROP = _HOP_BY_HOP | {
    "set-cookie",
    "set-cookie2",
    "alt-svc",
    "clear-site-data",
    "refresh",
    "content-security-policy",
    "content-security-policy-report-only",
    "x-content-type-options",
    "date",
    "server",
    # Policies of our origin, not the upstream's to set for it.
    "strict-transport-security",
    "service-worker-allowed",
    "cross-origin-opener-policy",
    "cross-origin-embedder-policy",
    "permissions-policy",
    "origin-agent-cluster",
    "public-key-pins",
    "expect-ct",
    "nel",
    "report-to",
}
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "sandbox; default-src 'none'",
}


class Body:
    """The outbound body: bytes (replayable), a one-shot stream, or nothing."""

    def __init__(self, content: bytes | AsyncIterator[bytes] | None, length: int | None = None) -> None:
        self.content = content
        self.length = length

    @property
    def replayable(self) -> bool:
        return not isinstance(self.content, AsyncIterator)


@dataclass
class Call:
    """One proxied call as the controller hands it over."""

    ident: str
    method: str
    relative: str  # path (+ optional ?query) relative to apiBaseUri
    params: Mapping[str, Any] | None
    headers: Iterable[tuple[str, str]]  # the caller's headers (filtered here)
    body: Body


@dataclass
class Answer:
    """What goes back to the caller: the upstream's status and filtered headers (lower-case names,
    ``content-type`` included when the upstream sent one), and either the whole body (``content``),
    a one-shot relay of it (``stream``), or neither: no body at all (HEAD, 204, 304), the headers
    as the upstream sent them."""

    status: int
    headers: dict[str, str]
    content: bytes | None
    stream: AsyncIterator[bytes] | None = None
    # With a stream: when the relay must end (the call's overall deadline, loop time), and what
    # frees its slots and upstream connection even if the relay never starts (idempotent).
    deadline: float = 0.0
    close: Callable[[], None] | None = None


# ------------------------------------------------------------------------------------------------
# Pure pieces
# ------------------------------------------------------------------------------------------------


def request_headers(raw: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The caller's headers that may go upstream (PX-6)."""
    items = list(raw)
    named = {
        token.strip().lower()
        for name, value in items
        if name.lower() == "connection"
        for token in value.split(",")
        if token.strip()
    }
    out = []
    for name, value in items:
        lower = name.lower()
        if lower in _REQUEST_DROP or lower in named or lower.startswith(("x-forwarded-", "proxy-")):
            continue
        out.append((name, value))
    return out


def response_headers(headers: Any) -> dict[str, str]:
    """The upstream's headers that may come back (PX-7), repeated ones joined, plus ours.
    ``headers``: a case-insensitive multi-map (``get``; ``items()`` yields every pair)."""
    named = {t.strip().lower() for t in (headers.get("connection") or "").split(",") if t.strip()}
    out: dict[str, str] = {}
    items = headers.multi_items() if isinstance(headers, httpx.Headers) else headers.items()
    for name, value in items:
        lower = name.lower()
        if lower in _RESPONSE_DROP or lower in named or lower.startswith("access-control-"):
            continue
        out[lower] = f"{out[lower]}, {value}" if lower in out else value
    out.update(SECURITY_HEADERS)
    return out


def method_refused(method: str) -> ApiError:
    """400 for a method outside the allowlist (PX-2), before anything is read or sent. OPTIONS
    included: a CORS preflight is answered here, never forwarded with the integration's
    credentials, and says no."""
    shown = method[:16] if method.isascii() and method.isprintable() else "this method"
    return ApiError(
        400,
        f"The request proxy does not forward {shown}: only {', '.join(METHODS)} are sent upstream.",
        [field_error("method", "not allowed")],
        code="method_not_allowed",
    )


def check_caller_header(name: str, value: str) -> None:
    if not HEADER_NAME.fullmatch(name):
        raise ValidationFailed("A request header name is not valid.", [field_error(f"headers.{name[:64]}", "invalid")])
    if len(value) > MAX_HEADER_VALUE or any(
        (ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F or ord(c) > 0xFF for c in value
    ):
        raise ValidationFailed(
            "A request header value holds control characters or is too long.",
            [field_error(f"headers.{name}", "invalid value")],
        )


def expand_headers(actor: Actor, integration: Integration, tenant_id: str) -> dict[str, str]:
    """The integration's custom headers for this caller (PX-8); 400 when a value is unsafe.
    Secret headers are not here: they are literals from the vault (:func:`_header_secrets`)."""
    templates: Mapping[str, Any] = integration.settings.get("headers") or {}
    if not templates:
        return {}
    values = template_values(
        user={
            "id": actor.id,
            "username": actor.username,
            "email": actor.email,
            "displayName": actor.display_name,
            "custom": actor.custom,
        },
        tenant_id=tenant_id,
        integration_id=str(integration.id),
        integration_slug=integration.slug,
    )
    out = {}
    for name, text in templates.items():
        if type(text) is not str:  # a secret header's marker
            continue
        try:
            value = parse_template(text).expand(values)
        except TemplateError as e:
            raise ValidationFailed(
                f"The custom header '{name}' cannot be sent for this caller: {e}.",
                [field_error(f"headers.{name}", "unsafe value")],
            ) from None
        if len(value) > MAX_HEADER_VALUE or not value.isascii():
            raise ValidationFailed(
                f"The custom header '{name}' cannot be sent for this caller: the value is too long or not ASCII.",
                [field_error(f"headers.{name}", "unsafe value")],
            )
        out[name] = value
    return out


def target_url(base_uri: str, relative: str, params: Mapping[str, Any] | None) -> yarl.URL:
    """The upstream URL, confined under ``base_uri`` and re-checked as the object the sending
    client (``infrastructure.upstream_http``) sends (PX-1): built once as a ``yarl.URL`` with
    ``encoded=True``, sent exactly as built."""
    base = _base(base_uri)
    path, query = confine(base, relative)
    text = f"{base.scheme}://{base.netloc}{path}" + ("?" + query if query else "")
    try:
        if params:  # httpx's encoding of axios-style params, merged into the query
            text = str(httpx.URL(text).copy_merge_params(_params(params)))
        url = yarl.URL(text, encoded=True)
    except (ValueError, httpx.InvalidURL):  # e.g. a host 256.1.1.1: a reg-name to one, an IP to another
        raise BaseUnusable from None
    if url.raw_user is not None or url.raw_fragment or not within(base, url.scheme, url.raw_authority, url.raw_path):
        raise PathRejected("the URL leaves the integration's base URL")
    return url


class Target:
    """Where the call goes: a URL built and checked up front, or (``apiBaseUri`` is
    ``$connection.<field>``, PX-3) one built per call from the connection's value of ``field``,
    checked then against the URL rules and the integration's ``apiBaseUriHosts``."""

    __slots__ = ("field", "hosts", "params", "policy", "relative", "url")

    def __init__(
        self,
        url: yarl.URL | None,
        relative: str = "",
        params: Mapping[str, Any] | None = None,
        field: str = "",
        hosts: tuple[str, ...] = (),
        policy: UrlPolicy | None = None,
    ) -> None:
        self.url = url
        self.relative = relative
        self.params = params
        self.field = field
        self.hosts = hosts
        self.policy = policy or _NO_HTTP

    def resolve(self, creds: Any) -> yarl.URL:
        if self.url is not None:
            return self.url
        value = creds.metadata.get(self.field) if creds is not None else None
        if not value:
            raise ApiError(
                502,
                f"The connection holds no {self.field} to send requests to: connect again.",
                code="api_base_uri_unresolved",
            )
        try:
            if _connection_base_allowed(value, self.hosts, self.policy):
                return target_url(value, self.relative, self.params)
        except (BaseUnusable, PathRejected):
            pass
        raise ApiError(
            502,
            f"The {self.field} the provider gave is not a base URL this integration allows.",
            code="api_base_uri_rejected",
        )


# Path rules are checked against this before any credential is opened when the real base is the
# connection's; the real base is checked again when it is known.
_NEUTRAL_BASE = "https://connection.invalid/"
_NO_HTTP = UrlPolicy()


class BaseUnusable(ValidationFailed):
    """A base URL the URL rules accept but the client cannot send to."""

    def __init__(self) -> None:
        super().__init__(
            "The integration's apiBaseUri is not a URL requests can be sent to.",
            [field_error("apiBaseUri", "invalid")],
        )


@functools.lru_cache(maxsize=1024)
def _connection_base_allowed(value: str, hosts: tuple[str, ...], policy: UrlPolicy) -> bool:
    """A base URL from token-response data (the authorization server is not trusted, PX-3): the
    same rules as a saved ``apiBaseUri`` (absolute, https unless allow-listed, no userinfo or
    fragment) and, when the integration lists hosts, one of those."""
    if policy.problem(value) is not None:
        return False
    try:
        host = yarl.URL(value, encoded=True).raw_host or ""
    except ValueError:
        return False
    return not hosts or host_allowed(host, hosts)


@functools.lru_cache(maxsize=1024)
def _base(base_uri: str) -> Base:
    """``Base.parse`` once per distinct ``apiBaseUri`` (a pure function of the text)."""
    return Base.parse(base_uri)


def _params(params: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        if isinstance(value, list):
            value = [("true" if v else "false") if isinstance(v, bool) else v for v in value if v is not None]
        out[key] = value
    return out


def inject(
    auth_type: str, values: Mapping[str, str], settings: Mapping[str, Any], headers: dict[str, str], url: yarl.URL
) -> yarl.URL:
    """Put the credentials where the auth type says; they win over anything of the same name."""
    if auth_type == "oauth2":
        _set(headers, "Authorization", f"Bearer {values['access_token']}")
    elif auth_type == "bearer":
        _set(headers, "Authorization", f"Bearer {values['bearer_token']}")
    elif auth_type == "basic":
        pair = f"{values.get('username', '')}:{values.get('password', '')}".encode()
        _set(headers, "Authorization", "Basic " + base64.b64encode(pair).decode("ascii"))
    elif auth_type == "apikey":
        name = str(settings.get("api_key_name") or "X-API-Key")
        if settings.get("api_key_location", "header") == "query":
            url = url.update_query({name: values["api_key"]})
        else:
            _set(headers, name, values["api_key"])
    return url


def _set(headers: dict[str, str], name: str, value: str) -> None:
    for key in [k for k in headers if k.lower() == name.lower()]:
        del headers[key]
    headers[name] = value


def _int_setting(settings: Mapping[str, Any], key: str, default: int) -> int:
    value = settings.get(key)
    if isinstance(value, int) and value > 0:
        return min(value, default) if default > 0 else value
    return default


# ------------------------------------------------------------------------------------------------
# The call
# ------------------------------------------------------------------------------------------------


async def forward(services: Services, actor: Actor, call: Call) -> Answer:
    if services.upstream is None:
        raise ApiError(503, "The request proxy is not configured on this server.")
    method = call.method.upper()
    if method not in METHODS:
        raise method_refused(call.method)
    integration = await _integration(services, actor, call.ident)
    settings = integration.settings
    base_uri = settings.get("api_base_uri")
    if not base_uri:
        raise ValidationFailed("This integration has no apiBaseUri to send requests to.")
    field = connection_field(settings)
    if field is None:
        target = Target(target_url(str(base_uri), call.relative, call.params))
    else:
        target_url(_NEUTRAL_BASE, call.relative, call.params)  # a path attack: 400 before any credential
        hosts = tuple(settings.get("api_base_uri_hosts") or ())
        target = Target(None, call.relative, call.params, field, hosts, services.app.url_policy)
    headers = dict(request_headers(call.headers))
    templates = settings.get("headers")
    secret_headers = False
    if templates:
        for name, value in expand_headers(actor, integration, services.config.tenant_id).items():
            _set(headers, name, value)
        secret_headers = any(type(v) is not str for v in templates.values())
    if not any(k.lower() == "accept-encoding" for k in headers):
        headers["Accept-Encoding"] = "identity"  # the body goes back raw: never an encoding the caller did not ask for
    auth_type = str(settings.get("auth_type") or "none")
    config = services.proxy
    cap = _int_setting(settings, "proxy_max_concurrency", config.max_concurrency)
    user_cap = config.max_concurrency_per_user
    size_cap = _int_setting(settings, "proxy_max_response_bytes", config.max_response_bytes)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + config.deadline_seconds
    bulkhead = services.bulkhead
    if not bulkhead.enter(integration.id, cap):
        raise ApiError(
            503,
            "Too many concurrent requests to this integration; retry shortly.",
            headers={"Retry-After": "1"},
            code="proxy_busy",
        )
    # Per caller across integrations (PX-9): the actor id (a str) never equals an integration id
    # (a UUID), so one dict keeps both counts.
    if user_cap and not bulkhead.enter(actor.id, user_cap):
        bulkhead.leave(integration.id)
        raise ApiError(
            503,
            "Too many concurrent proxied requests from you; retry shortly.",
            headers={"Retry-After": "1"},
            code="proxy_busy",
        )
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            released = True
            bulkhead.leave(integration.id)
            if user_cap:
                bulkhead.leave(actor.id)

    def close() -> None:
        """Frees the slots and the upstream connection (an answer not read to its end takes its
        connection along); idempotent."""
        release()
        response.abandon()

    try:
        try:
            # One timer for the whole exchange up to the answer's body (or its first byte, when it
            # is streamed): the overall deadline (PX-9).
            async with asyncio.timeout_at(deadline):
                response = await _send_with_credentials(
                    services, actor, integration, auth_type, method, target, headers, call.body, secret_headers
                )
                out_headers = response_headers(response.headers)
                length = response.headers.get("content-length")
                if size_cap and length and length.isdigit() and int(length) > size_cap:
                    await response.aclose()
                    raise ApiError(
                        502, "The upstream response is larger than this integration allows.", code="upstream_too_large"
                    )
                if method == "HEAD" or response.status_code < 200 or response.status_code in (204, 304):
                    # No body follows (RFC 9110 §6.4.1): the headers go back as they are, the
                    # upstream's Content-Length included, and the slot and connection are freed now.
                    close()
                    return Answer(response.status_code, out_headers, None)
                if length is not None and length.isdigit() and int(length) <= SMALL_BODY_BYTES:
                    # A small body with a declared length (most API answers) is read here and sent
                    # in one piece: no streaming task per response, and a failure while reading is
                    # still a clean 502/504 rather than a cut stream. Memory stays bounded by
                    # SMALL_BODY_BYTES.
                    try:
                        content = await _read_small(response)
                    finally:
                        close()
                    out_headers.pop("content-length", None)  # set from the body
                    return Answer(response.status_code, out_headers, content)
        except TimeoutError:
            raise ApiError(504, "The upstream did not answer in time.", code="upstream_timeout") from None
    except BaseException:
        release()
        raise

    return Answer(response.status_code, out_headers, None, _relay(response, size_cap, close), deadline, close)


# The loader reads an integration whatever its shares say; the caller's own access is checked on
# the (possibly cached) aggregate for every request, as ``IntegrationsApp.integration_for`` does.
_LOADER = Actor(id=SYSTEM_ACTOR, superuser=True)


async def _integration(services: Services, actor: Actor, ident: str) -> Integration:
    """The integration the caller may use (level 1), else 404 (PX-11). A UUID needs no store read
    to resolve; the aggregate comes from the proxy cache when it is fresh."""
    try:
        iid = UUID(ident)
    except ValueError:
        iid = await anyio.to_thread.run_sync(resolve_integration, services, actor, ident)
    integration: Integration = await services.proxy_cache.fetch(
        ("integration", iid), lambda: anyio.to_thread.run_sync(services.app.integration_for, _LOADER, iid)
    )
    if integration.level_for(actor) < AccessLevel.USE:
        raise NotFound("Integration not found.")
    return integration


async def _header_secrets(services: Services, integration: Integration) -> dict[str, str]:
    """The secret header values, opened from the vault once per integration version and kept in
    the proxy cache like the credentials (plaintext: memory only)."""
    return await services.proxy_cache.fetch(
        ("header-secrets", integration.id, integration.version),
        lambda: anyio.to_thread.run_sync(services.app.header_secrets, integration),
    )


async def _credentials(services: Services, actor: Actor, integration: Integration, refresh_from: int | None) -> Any:
    """The credentials to inject, from the proxy cache when fresh. A forced refresh (after an
    upstream 401) always goes to the connection service and replaces the cached entry."""
    cache = services.proxy_cache
    owner = services.connections.connection_owner(actor, integration)
    key = ("credentials", integration.id, integration.version, owner)
    if refresh_from is None:
        creds = await cache.fetch(key, lambda: services.connections.credentials(actor, integration))
        if services.connections.fresh_for(creds, 0):
            return creds
        # Due for a refresh (or will be within the cache's lifetime): ask the service, which
        # refreshes single-flight, and keep its answer only if it outlives the cache entry.
        generation = cache.generation
        creds = await services.connections.credentials(actor, integration)
        if services.connections.fresh_for(creds, cache.ttl):
            cache.put(key, creds, generation)
        return creds
    generation = cache.generation
    creds = await services.connections.credentials(actor, integration, force_refresh_from=refresh_from)
    cache.put(key, creds, generation)
    return creds


async def _send_with_credentials(
    services: Services,
    actor: Actor,
    integration: Integration,
    auth_type: str,
    method: str,
    target: Target,
    headers: dict[str, str],
    body: Body,
    secret_headers: bool = False,
) -> Any:
    """The upstream's answer, with one forced refresh and replay after a 401 (OAuth 2.0, when the
    body can be sent again). Runs under the caller's deadline."""
    creds = None
    if secret_headers:
        for name, value in (await _header_secrets(services, integration)).items():
            _set(headers, name, value)
    if auth_type != "none":
        creds = await _credentials(services, actor, integration, None)
    response = await _send(services, method, target, headers, body, creds, integration)
    if (
        response.status_code == 401
        and creds is not None
        and creds.auth_type == "oauth2"
        and creds.connection_id is not None
        and body.replayable
    ):
        await response.aclose()
        creds = await _credentials(services, actor, integration, creds.generation)
        response = await _send(services, method, target, headers, body, creds, integration)
    return response


async def _send(
    services: Services,
    method: str,
    target: Target,
    headers: dict[str, str],
    body: Body,
    creds: Any,
    integration: Integration,
) -> Any:
    """One upstream call through ``services.upstream`` (``send(method, url, headers, content)``:
    the proxy's own guarded client, whose errors are httpx exceptions)."""
    out = dict(headers)
    url = target.resolve(creds)
    if creds is not None:
        url = inject(creds.auth_type, creds.values, integration.settings, out, url)
    if body.content is not None and body.length is not None:
        out["Content-Length"] = str(body.length)
    try:
        return await services.upstream.send(method, url, out, body.content)
    except httpx.TimeoutException as e:
        if isinstance(e, httpx.ConnectTimeout | httpx.PoolTimeout):
            raise ApiError(502, "The upstream could not be reached.", code="upstream_unreachable") from None
        raise TimeoutError from None
    except httpx.TransportError as e:
        log.info("upstream %s failed for integration %s: %s", method, integration.id, type(e).__name__)
        raise ApiError(502, "The upstream could not be reached.", code="upstream_unreachable") from None
    except services.upstream_refusals:
        raise ApiError(502, "The upstream address is not allowed by the egress policy.", code="egress_denied") from None


async def _read_small(response: Any) -> bytes:
    """A small body (its length declared and under ``SMALL_BODY_BYTES``) read whole, under the
    caller's deadline; 502 when the upstream fails while sending it."""
    try:
        return bytes(await response.aread())
    except httpx.TransportError as e:
        log.info("upstream body failed: %s", type(e).__name__)
        raise ApiError(502, "The upstream could not be reached.", code="upstream_unreachable") from None


async def _relay(response: Any, size_cap: int, close: Callable[[], None]) -> AsyncIterator[bytes]:
    """The body as the upstream sent it, under the size cap; the overall deadline bounds the whole
    relay where it is sent (``api.proxy_endpoint``, with ``Answer.deadline``). Past the headers an
    error can only cut the stream: it raises, so the caller sees a broken response, never a
    silently truncated one."""
    sent = 0
    chunks = response.aiter_raw()
    try:
        while True:
            try:
                chunk = await anext(chunks)
            except StopAsyncIteration:
                break
            except httpx.TransportError as e:
                raise UpstreamAborted(f"upstream failed while streaming: {type(e).__name__}") from None
            sent += len(chunk)
            if size_cap and sent > size_cap:
                raise UpstreamAborted("the upstream body exceeded the size cap")
            yield chunk
    finally:
        close()


class UpstreamAborted(Exception):
    """The upstream body could not be relayed to the end (deadline, size cap, network)."""

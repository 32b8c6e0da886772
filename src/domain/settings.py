"""Integration settings: the non-secret configuration and the rules over it.

Keys are snake_case; the API maps them to the contract's camelCase names. Secrets are never
settings: they are sealed in the vault and only a reference reaches the events.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from domain.errors import ValidationFailed, field_error
from domain.templates import TemplateError, parse_template
from domain.urls import UrlPolicy

AUTH_TYPES = ("oauth2", "apikey", "basic", "bearer", "none")
AUTH_TYPE_ALIASES = {"apiKey": "apikey", "api_key": "apikey", "oauth": "oauth2"}
MODES = ("per-user", "shared")
TOKEN_AUTH_METHODS = ("client_secret_basic", "client_secret_post")
API_KEY_LOCATIONS = ("header", "query")
SECRET_FIELDS = ("client_secret", "api_key", "password", "bearer_token")
URL_FIELDS = ("auth_uri", "token_uri", "api_base_uri", "revocation_uri", "issuer")
# Changing where tokens come from or go to re-points live credentials (security note OA-18).
REPOINTING_FIELDS = ("auth_uri", "token_uri", "client_id", "api_base_uri", "issuer", "revocation_uri")
UPLOAD_TYPES = frozenset({"google-drive", "googledrive", "onedrive", "sharepoint", "dropbox"})

REQUIRED: Mapping[str, tuple[str, ...]] = {
    "oauth2": ("auth_uri", "token_uri", "client_id", "client_secret", "scope", "api_base_uri"),
    "apikey": ("api_base_uri", "api_key_name", "api_key_location"),
    "basic": ("api_base_uri",),
    "bearer": ("api_base_uri",),
    "none": (),
}
DEFAULTS: Mapping[str, Any] = {
    "mode": "per-user",
    "auth_type": "none",
    "embedded": False,
    "type": "custom",
    "category": "",
    "description": "",
    "headers": {},
    "tags": [],
}
AUTH_DEFAULTS: Mapping[str, Mapping[str, Any]] = {
    "apikey": {"api_key_name": "X-API-Key", "api_key_location": "header"},
    "oauth2": {"token_auth_method": "client_secret_basic"},
}
HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}$")
# An oauth2 integration's apiBaseUri may name a field of the token response instead of a URL
# (``$connection.instance_url``: Salesforce, and others that answer with a per-tenant host). The
# value is kept with the connection and checked on every request (security note PX-3).
CONNECTION_REF = re.compile(r"\$connection\.([A-Za-z_][A-Za-z0-9_]{0,63})")
CONNECTION_REF_PREFIX = "$connection."
# ``apiBaseUriHosts``: the hosts such a URL may name, exact (``api.example.com``) or one wildcard
# label deep and more (``*.my.salesforce.com``).
# The last label of a name starts with a letter, so no pattern (``*.0.0.1``) can match an IP literal.
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_LAST = r"[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?"
HOST_PATTERN = re.compile(rf"(?:\*\.)?(?:{_LABEL}\.)+{_LAST}|{_LAST}|\d{{1,3}}(?:\.\d{{1,3}}){{3}}")
MAX_HOST_PATTERNS = 20
# Headers the service owns on the outbound request; a template may not set them.
RESERVED_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "upgrade",
        "te",
        "trailer",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "cookie",
    }
)
MAX_HEADERS = 50
MAX_HEADER_VALUE = 4096  # an expanded or secret header value (security note PX-8)
# A header whose value is a secret keeps only this marker in the settings (and so in the events);
# the value is sealed in the vault under the integration, field ``header:<lower-case name>``.
SECRET_HEADER = {"secret": True}
SECRET_HEADER_PREFIX = "header:"  # noqa: S105  (a vault field prefix, not a secret)
_HEADER_VALUE_CTL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def is_secret_header(value: Any) -> bool:
    return isinstance(value, Mapping) and value.get("secret") is True


def secret_header_field(name: str) -> str:
    """The vault field of a secret header's value (names are case-insensitive)."""
    return SECRET_HEADER_PREFIX + name.lower()


def secret_header_fields(settings: Mapping[str, Any]) -> frozenset[str]:
    """The vault fields the settings' secret headers refer to."""
    headers = settings.get("headers") or {}
    return frozenset(secret_header_field(n) for n, v in headers.items() if is_secret_header(v))


def secret_header_problem(value: str) -> str | None:
    """Why a secret header value cannot be sent as it is (it is a literal: never expanded)."""
    if len(value) > MAX_HEADER_VALUE:
        return f"a secret value may hold at most {MAX_HEADER_VALUE} characters"
    if not value.isascii() or _HEADER_VALUE_CTL.search(value):
        return "a secret value must be printable ASCII (no CR, LF, NUL or other control characters)"
    return None


def connection_field(settings: Mapping[str, Any]) -> str | None:
    """The token-response field an integration's ``apiBaseUri`` names (``$connection.<field>``),
    or ``None`` when it is a URL."""
    value = settings.get("api_base_uri")
    if isinstance(value, str) and value.startswith(CONNECTION_REF_PREFIX):
        match = CONNECTION_REF.fullmatch(value)
        return match.group(1) if match else None
    return None


def host_allowed(host: str, patterns: Iterable[str]) -> bool:
    """Whether ``host`` (a URL's host name, any case) matches one of ``patterns``; a
    ``*.example.com`` pattern matches any name under ``example.com``, not ``example.com`` itself."""
    host = host.lower().rstrip(".")
    for pattern in patterns:
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]) and len(host) > len(pattern) - 1:
                return True
        elif host == pattern:
            return True
    return False


def normalise(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Canonical spellings and defaults; unknown auth types are left for :func:`check`."""
    out = dict(settings)
    auth = out.get("auth_type")
    if isinstance(auth, str):
        out["auth_type"] = AUTH_TYPE_ALIASES.get(auth, auth)
    for key, value in DEFAULTS.items():
        if out.get(key) is None:
            out[key] = value if not isinstance(value, dict | list) else type(value)()
    for key, value in AUTH_DEFAULTS.get(out["auth_type"], {}).items():
        if out.get(key) is None:
            out[key] = value
    if "basic_token_auth" in out:  # the vendor manifest's spelling of the token auth method
        flag = out.pop("basic_token_auth")
        if flag is not None:
            out["token_auth_method"] = "client_secret_basic" if flag else "client_secret_post"
    return {k: v for k, v in out.items() if v is not None}


def check(settings: Mapping[str, Any], secrets_present: Iterable[str], policy: UrlPolicy) -> None:
    """Raise :class:`ValidationFailed` listing every problem, or return."""
    errors: list[dict[str, str]] = []
    present = set(secrets_present)
    auth = settings.get("auth_type")
    if auth not in AUTH_TYPES:
        errors.append(field_error("authType", f"must be one of {', '.join(AUTH_TYPES)}"))
    if settings.get("mode") not in MODES:
        errors.append(field_error("mode", f"must be one of {', '.join(MODES)}"))
    if not str(settings.get("name") or "").strip():
        errors.append(field_error("name", "is required"))
    for key in REQUIRED.get(str(auth), ()):
        if key in SECRET_FIELDS:
            if key not in present:
                errors.append(field_error(camel(key), f"is required for authType {auth}"))
        elif settings.get(key) is None or (key != "scope" and settings.get(key) == ""):
            errors.append(field_error(camel(key), f"is required for authType {auth}"))
    for key in URL_FIELDS:
        value = settings.get(key)
        if key == "api_base_uri" and isinstance(value, str) and value.startswith(CONNECTION_REF_PREFIX):
            errors.extend(_check_connection_ref(value, auth))
        elif value:
            problem = policy.problem(value)
            if problem:
                errors.append(field_error(camel(key), problem))
    errors.extend(_check_host_patterns(settings.get("api_base_uri_hosts")))
    if settings.get("api_key_location", "header") not in API_KEY_LOCATIONS:
        errors.append(field_error("apiKeyLocation", "must be header or query"))
    if settings.get("token_auth_method", "client_secret_basic") not in TOKEN_AUTH_METHODS:
        errors.append(field_error("tokenAuthMethod", f"must be one of {', '.join(TOKEN_AUTH_METHODS)}"))
    key_name = settings.get("api_key_name")
    if key_name is not None and not HEADER_NAME.fullmatch(key_name):
        errors.append(field_error("apiKeyName", "must be a valid header or parameter name"))
    errors.extend(_check_headers(settings.get("headers") or {}, _service_headers(settings), present))
    if errors:
        raise ValidationFailed("The integration is not valid.", errors)


def _check_connection_ref(value: str, auth: Any) -> list[dict[str, str]]:
    if auth != "oauth2":
        return [field_error("apiBaseUri", "a $connection.<field> reference needs authType oauth2")]
    if not CONNECTION_REF.fullmatch(value):
        return [field_error("apiBaseUri", "must be a URL or $connection.<field> (a token-response field name)")]
    return []


def _check_host_patterns(patterns: Any) -> list[dict[str, str]]:
    if patterns is None:
        return []
    if not isinstance(patterns, list) or len(patterns) > MAX_HOST_PATTERNS:
        return [field_error("apiBaseUriHosts", f"must be a list of at most {MAX_HOST_PATTERNS} host names")]
    return [
        field_error(f"apiBaseUriHosts.{i}", "must be a lower-case host name, optionally starting with *.")
        for i, pattern in enumerate(patterns)
        if not isinstance(pattern, str) or not HOST_PATTERN.fullmatch(pattern)
    ]


def _service_headers(settings: Mapping[str, Any]) -> frozenset[str]:
    """Headers the service sets for this integration; a template must not override them."""
    reserved = set(RESERVED_HEADERS)
    if settings.get("auth_type") in ("oauth2", "bearer", "basic"):
        reserved.add("authorization")
    if settings.get("auth_type") == "apikey" and settings.get("api_key_location", "header") == "header":
        reserved.add(str(settings.get("api_key_name") or "").lower())
    return frozenset(reserved)


def _check_headers(
    headers: Mapping[str, Any], reserved: frozenset[str] = RESERVED_HEADERS, secrets_present: Iterable[str] = ()
) -> list[dict[str, str]]:
    """Names, templates, and a stored value behind every secret header's marker."""
    errors = []
    if not isinstance(headers, Mapping):
        return [field_error("headers", "must be an object of header name to value")]
    if len(headers) > MAX_HEADERS:
        errors.append(field_error("headers", f"at most {MAX_HEADERS} headers"))
    present = set(secrets_present)
    seen: set[str] = set()
    for name, value in headers.items():
        lower = name.lower()
        where = f"headers.{name}"
        if not HEADER_NAME.fullmatch(name):
            errors.append(field_error(where, "is not a valid header name"))
        elif lower in reserved:
            errors.append(field_error(where, "is set by the service and cannot be templated"))
        elif lower in seen:
            errors.append(field_error(where, "is given twice (header names are case-insensitive)"))
        seen.add(lower)
        if is_secret_header(value):
            if secret_header_field(name) not in present:
                errors.append(field_error(where, 'has no stored secret value: send {"value": ..., "secret": true}'))
            continue
        if not isinstance(value, str):
            errors.append(field_error(where, 'must be a template string or {"value": ..., "secret": true}'))
            continue
        try:
            parse_template(value)
        except TemplateError as e:
            errors.append(field_error(where, str(e)))
    return errors


def camel(key: str) -> str:
    head, *rest = key.split("_")
    return head + "".join(p.title() for p in rest)

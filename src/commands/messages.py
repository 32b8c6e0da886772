"""Command messages: msgspec Structs, used as the HTTP request bodies too (camelCase on the wire).

Types, lengths and unknown fields are checked here when the body is decoded; the domain checks
the rules that need context (required-per-authType, URL policy, templates, permissions).
``UNSET`` means "not given": on create and replace it takes the default, on a partial update it
keeps the current value; ``null`` on a partial update removes a setting or clears a secret.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from domain import settings as rules
from domain.errors import ValidationFailed, field_error

Text = Annotated[str, Meta(max_length=2000)]
Short = Annotated[str, Meta(max_length=200)]
Url = Annotated[str, Meta(max_length=2048)]
Secret = Annotated[str, Meta(min_length=1, max_length=8192)]
Name = Annotated[str, Meta(min_length=1, max_length=200)]
Ident = Annotated[str, Meta(min_length=1, max_length=128)]
HeaderValue = Annotated[str, Meta(max_length=4096)]
Tag = Annotated[str, Meta(min_length=1, max_length=64)]
Permission = Literal["integrationCreation", "integrations.read"]

_STRUCT = {"kw_only": True, "forbid_unknown_fields": True, "rename": "camel"}


class SecretHeader(msgspec.Struct, **_STRUCT):
    """A custom header value kept in the vault: ``{"value": "<literal>", "secret": true}``.

    The value is sent as given, never template-expanded (a ``$`` in a token is just a character).
    Without ``value`` (as responses show it) an update keeps the stored value.
    """

    secret: bool
    value: Annotated[str, Meta(min_length=1, max_length=4096)] | UnsetType = UNSET


HeaderEntry = HeaderValue | SecretHeader


class IntegrationBody(msgspec.Struct, **_STRUCT):
    """Create (POST), replace (PUT) and partial update (PATCH) of an integration."""

    name: Name | UnsetType | None = UNSET
    slug: Annotated[str, Meta(max_length=64)] | UnsetType | None = UNSET
    owner_id: Ident | UnsetType | None = UNSET  # create only; transfers go through /owner
    type: Annotated[str, Meta(max_length=64, pattern=r"^[a-z0-9][a-z0-9._-]*$")] | UnsetType | None = UNSET
    category: Short | UnsetType | None = UNSET
    description: Text | UnsetType | None = UNSET
    mode: Literal["per-user", "shared"] | UnsetType | None = UNSET
    auth_type: Literal["oauth2", "apikey", "apiKey", "basic", "bearer", "none"] | UnsetType | None = UNSET
    embedded: bool | UnsetType | None = UNSET
    library_id: Ident | UnsetType | None = UNSET
    scope: Text | UnsetType | None = UNSET
    auth_uri: Url | UnsetType | None = UNSET
    token_uri: Url | UnsetType | None = UNSET
    # A URL, or for oauth2 ``$connection.<field>``: the URL the token response names (PX-3).
    api_base_uri: Url | UnsetType | None = UNSET
    # The hosts a ``$connection.<field>`` URL may name (``*.my.salesforce.com``); checked on each request.
    api_base_uri_hosts: (
        Annotated[list[Annotated[str, Meta(max_length=253)]], Meta(max_length=20)] | UnsetType | None
    ) = UNSET
    revocation_uri: Url | UnsetType | None = UNSET
    # The authorization server's issuer identifier (RFC 8414/9207): when set, the callback's
    # ``iss`` must equal it exactly (mix-up defence, OA-7).
    issuer: Url | UnsetType | None = UNSET
    client_id: Annotated[str, Meta(max_length=512)] | UnsetType | None = UNSET
    client_secret: Secret | UnsetType | None = UNSET
    basic_token_auth: bool | UnsetType | None = UNSET
    token_auth_method: Literal["client_secret_basic", "client_secret_post"] | UnsetType | None = UNSET
    api_key: Secret | UnsetType | None = UNSET
    api_key_name: Annotated[str, Meta(max_length=128)] | UnsetType | None = UNSET
    api_key_location: Literal["header", "query"] | UnsetType | None = UNSET
    username: Short | UnsetType | None = UNSET
    password: Secret | UnsetType | None = UNSET
    bearer_token: Secret | UnsetType | None = UNSET
    image_url: Url | UnsetType | None = UNSET
    headers: Annotated[dict[str, HeaderEntry], Meta(max_length=50)] | UnsetType | None = UNSET
    tags: Annotated[list[Tag], Meta(max_length=50)] | UnsetType | None = UNSET
    # Request proxy limits for this integration; they can only lower the server's (PX-9).
    proxy_max_concurrency: Annotated[int, Meta(ge=1, le=100_000)] | UnsetType | None = UNSET
    proxy_max_response_bytes: Annotated[int, Meta(ge=1)] | UnsetType | None = UNSET


SECRET_ATTRS = ("client_secret", "api_key", "password", "bearer_token")
_NOT_SETTINGS = frozenset({"slug", "owner_id", *SECRET_ATTRS})


def given(body: msgspec.Struct) -> dict[str, Any]:
    """The fields the body actually carries (``null`` included), by attribute name."""
    return {f: getattr(body, f) for f in body.__struct_fields__ if getattr(body, f) is not UNSET}


def split_integration_body(body: IntegrationBody) -> tuple[dict[str, Any], dict[str, str | None]]:
    """(settings given, secrets given); a ``None`` value means "remove" / "clear".

    A secret header's value moves to the secrets (field ``header:<lower-case name>``) and its
    setting keeps only the marker ``{"secret": true}``; raises :class:`ValidationFailed` for a
    secret value that could not be sent, before anything is sealed.
    """
    fields = given(body)
    settings = {k: v for k, v in fields.items() if k not in _NOT_SETTINGS}
    secrets = {k: v for k, v in fields.items() if k in SECRET_ATTRS}
    if isinstance(settings.get("headers"), dict):
        settings["headers"], header_secrets = split_headers(settings["headers"])
        secrets.update(header_secrets)
    return settings, secrets


def split_headers(headers: dict[str, str | SecretHeader]) -> tuple[dict[str, Any], dict[str, str]]:
    """(the headers as settings keep them, the secret values by vault field)."""
    out: dict[str, Any] = {}
    values: dict[str, str] = {}
    errors = []
    for name, entry in headers.items():
        if isinstance(entry, str):
            out[name] = entry
            continue
        where = f"headers.{name}"
        if not entry.secret:
            errors.append(field_error(where, "a value that is not secret is given as a template string"))
            continue
        out[name] = dict(rules.SECRET_HEADER)
        if isinstance(entry.value, str):
            problem = rules.secret_header_problem(entry.value)
            if problem:
                errors.append(field_error(where, problem))
            values[rules.secret_header_field(name)] = entry.value
    if errors:
        raise ValidationFailed("A custom header is not valid.", errors)
    return out, values


class ConnectBody(msgspec.Struct, **_STRUCT):
    """``POST /connect``: oauth2 from ``code`` (+ ``redirectUri``, ``codeVerifier`` when PKCE was
    used) or a ``refreshToken``; apikey from ``apiKey``; basic from ``username`` + ``password``;
    bearer from ``bearerToken``."""

    code: Annotated[str, Meta(min_length=1, max_length=4096)] | UnsetType = UNSET
    redirect_uri: Url | UnsetType = UNSET
    code_verifier: Annotated[str, Meta(min_length=43, max_length=128)] | UnsetType = UNSET
    refresh_token: Secret | UnsetType = UNSET
    api_key: Secret | UnsetType = UNSET
    username: Short | UnsetType = UNSET
    password: Secret | UnsetType = UNSET
    bearer_token: Secret | UnsetType = UNSET


class ShareBody(msgspec.Struct, **_STRUCT):
    access_level: int = 1


class OwnerBody(msgspec.Struct, **_STRUCT):
    user_id: Ident | None = None
    team_id: Ident | None = None


class UserBody(msgspec.Struct, **_STRUCT):
    """Create a user (POST) or change one (PATCH; ``id`` not allowed there)."""

    id: Ident | UnsetType = UNSET
    username: Ident | UnsetType = UNSET
    email: Annotated[str, Meta(max_length=320)] | UnsetType = UNSET
    display_name: Short | UnsetType = UNSET
    password: Annotated[str, Meta(min_length=8, max_length=1024)] | UnsetType | None = UNSET
    superuser: bool | UnsetType = UNSET
    permissions: Annotated[list[Permission], Meta(max_length=10)] | UnsetType = UNSET
    custom: Annotated[dict[str, Any], Meta(max_length=100)] | UnsetType = UNSET


class TeamBody(msgspec.Struct, **_STRUCT):
    id: Ident
    name: Name


class MemberBody(msgspec.Struct, **_STRUCT):
    role: Literal["member", "memberPlus", "designer", "dataWizard", "publisher", "admin"] = "member"


class TokenBody(msgspec.Struct, **_STRUCT):
    label: Short = ""


class LoginBody(msgspec.Struct, **_STRUCT):
    username: Annotated[str, Meta(min_length=1, max_length=128)]
    password: Annotated[str, Meta(min_length=1, max_length=1024)]

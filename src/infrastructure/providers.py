"""Provider presets as data: the quirks an OAuth integration needs to get a refresh token and an
identity from well-known providers (peers.md §4.8; pain points 10-12).

- Google: ``access_type=offline`` and ``prompt=consent``, else no refresh token (or none on reconnect).
- Microsoft (OneDrive, SharePoint): ``offline_access`` in the scope, else no refresh token; the
  identity comes from Microsoft Graph ``/me``.
- Dropbox: ``token_access_type=offline``, else a 4-hour token and no refresh token.
- Anything else: generic OAuth 2.0 / OIDC; identity from the userinfo endpoint of the discovery
  document when there is one.

Pure data and pure functions: nothing here talks to the network.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from urllib.parse import urlsplit


@dataclass(frozen=True)
class IdentitySpec:
    """How to ask a provider who the connected account is.

    ``url``: a fixed endpoint, or ``None`` for "the userinfo endpoint from discovery".
    ``name``/``email``/``sub``: dotted paths into the JSON answer, first non-empty one wins.
    """

    url: str | None = None
    method: str = "GET"
    name: tuple[str, ...] = ("name",)
    email: tuple[str, ...] = ("email",)
    sub: tuple[str, ...] = ("sub",)


@dataclass(frozen=True)
class ProviderPreset:
    name: str
    # Extra authorization-request parameters (an ``authUri``'s own query parameters override them).
    auth_params: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    # Scopes the preset needs in every authorization request (added when missing).
    required_scopes: tuple[str, ...] = ()
    identity: IdentitySpec = IdentitySpec()


GOOGLE = ProviderPreset(
    name="google",
    auth_params=MappingProxyType({"access_type": "offline", "prompt": "consent"}),
    identity=IdentitySpec(url="https://openidconnect.googleapis.com/v1/userinfo"),
)
MICROSOFT = ProviderPreset(
    name="microsoft",
    required_scopes=("offline_access",),
    identity=IdentitySpec(
        url="https://graph.microsoft.com/v1.0/me",
        name=("displayName",),
        email=("mail", "userPrincipalName"),
        sub=("id",),
    ),
)
DROPBOX = ProviderPreset(
    name="dropbox",
    auth_params=MappingProxyType({"token_access_type": "offline"}),
    identity=IdentitySpec(
        url="https://api.dropboxapi.com/2/users/get_current_account",
        method="POST",
        name=("name.display_name",),
        email=("email",),
        sub=("account_id",),
    ),
)
OIDC = ProviderPreset(name="oidc")

PRESETS: Mapping[str, ProviderPreset] = MappingProxyType({p.name: p for p in (GOOGLE, MICROSOFT, DROPBOX, OIDC)})

# Integration ``type`` (normalised: lower case, letters and digits only) prefixes → preset.
_TYPE_PREFIXES: tuple[tuple[str, ProviderPreset], ...] = (
    ("google", GOOGLE),  # google-drive, googledrive, google_sheets …
    ("gdrive", GOOGLE),
    ("onedrive", MICROSOFT),
    ("sharepoint", MICROSOFT),
    ("microsoft", MICROSOFT),
    ("msgraph", MICROSOFT),
    ("dropbox", DROPBOX),
)
# Authorization endpoint hosts → preset (exact host match).
_AUTH_HOSTS: Mapping[str, ProviderPreset] = MappingProxyType(
    {
        "accounts.google.com": GOOGLE,
        "login.microsoftonline.com": MICROSOFT,
        "login.microsoftonline.us": MICROSOFT,
        "login.partner.microsoftonline.cn": MICROSOFT,
        "login.live.com": MICROSOFT,
        "www.dropbox.com": DROPBOX,
        "dropbox.com": DROPBOX,
    }
)


def preset_for(integration_type: str | None = None, auth_uri: str | None = None) -> ProviderPreset:
    """The preset for an integration: by its ``type`` first, then by its ``authUri`` host, else OIDC."""
    if integration_type:
        key = re.sub(r"[^a-z0-9]", "", integration_type.lower())
        for prefix, preset in _TYPE_PREFIXES:
            if key.startswith(prefix):
                return preset
    if auth_uri:
        try:
            host = (urlsplit(auth_uri).hostname or "").rstrip(".")
        except ValueError:
            host = ""
        if host in _AUTH_HOSTS:
            return _AUTH_HOSTS[host]
    return OIDC


def auth_params(preset: ProviderPreset, scope: str | None) -> tuple[dict[str, str], str]:
    """``(extra authorization parameters, scope)`` for ``preset``.

    The scope keeps the caller's order, drops duplicates and gains the preset's required scopes at
    the end (e.g. Microsoft's ``offline_access``).
    """
    scopes: list[str] = []
    for item in (scope or "").split():
        if item not in scopes:
            scopes.append(item)
    for required in preset.required_scopes:
        if required not in scopes:
            scopes.append(required)
    return dict(preset.auth_params), " ".join(scopes)

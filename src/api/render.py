"""Resource representations: the contract's camelCase fields, HAL links, ISO-8601 ``...000Z`` times.

Integrations render from one document shape, whether it came from the aggregate (single reads
and writes) or from the listing read model, so both routes show the same fields.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from domain.integration import Integration
from domain.settings import SECRET_FIELDS, UPLOAD_TYPES, camel

_PUBLIC_SETTINGS = (
    "name",
    "type",
    "category",
    "description",
    "mode",
    "auth_type",
    "embedded",
    "library_id",
    "scope",
    "auth_uri",
    "token_uri",
    "api_base_uri",
    "api_base_uri_hosts",
    "revocation_uri",
    "issuer",
    "client_id",
    "token_auth_method",
    "api_key_name",
    "api_key_location",
    "username",
    "image_url",
    "headers",
    "tags",
    "proxy_max_concurrency",
    "proxy_max_response_bytes",
)
_HAS = {
    "client_secret": "hasClientSecret",
    "api_key": "hasApiKey",
    "password": "hasPassword",
    "bearer_token": "hasBearerToken",
}


_PUBLIC_NAMES = tuple((key, camel(key)) for key in _PUBLIC_SETTINGS)


def iso(value: datetime | str | None) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        if len(value) == 32 and value.endswith("+00:00"):  # UTC with microseconds: slice, don't parse
            return value[:23] + "Z"
        value = datetime.fromisoformat(value)
    value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def integration_doc(integration: Integration) -> dict[str, Any]:
    """The aggregate as the listing read model stores it."""
    return {
        "id": str(integration.id),
        "owner_id": integration.owner_id,
        "slug": integration.slug,
        "settings": integration.settings,
        "secret_fields": sorted(integration.secrets),
        "created_at": integration.created_on.isoformat(),
        "updated_at": integration.modified_on.isoformat(),
        "version": integration.version,
    }


def integration(doc: dict[str, Any], *, shared: bool | None = None) -> dict[str, Any]:
    settings = doc["settings"]
    out: dict[str, Any] = {"id": str(doc["id"]), "slug": doc["slug"], "ownerId": doc["owner_id"]}
    for key, name in _PUBLIC_NAMES:
        if key in settings:
            out[name] = settings[key]
    out["supportsUpload"] = settings.get("type") in UPLOAD_TYPES
    secret_fields = set(doc.get("secret_fields") or ())
    for key in SECRET_FIELDS:
        out[_HAS[key]] = key in secret_fields
    if shared is not None:
        out["shared"] = shared
    out["createdAt"] = iso(doc["created_at"])
    out["updatedAt"] = iso(doc["updated_at"])
    out["version"] = doc["version"]
    out["_links"] = {"self": {"href": f"/api/integrations/{doc['id']}"}}
    return out


def headers(settings: dict[str, Any]) -> dict[str, Any]:
    """The custom headers as the API shows them: a template string, or ``{"secret": true}`` for
    a value kept in the vault (the settings hold only that marker, never the value)."""
    return {
        name: value if isinstance(value, str) else {"secret": True}
        for name, value in (settings.get("headers") or {}).items()
    }


def etag(version: int) -> str:
    return f'"{version}"'


def share(integration_id: str, principal_id: str, data: dict[str, Any]) -> dict[str, Any]:
    return {
        "integrationId": integration_id,
        "principalId": principal_id,
        "accessLevel": data["access_level"],
        "createdAt": iso(data.get("created_at")),
        "updatedAt": iso(data.get("updated_at")),
        "_links": {"self": {"href": f"/api/integrations/{integration_id}/shares/{principal_id}"}},
    }


def principal(pid: str, known: dict[str, Any] | None) -> dict[str, Any]:
    if known:
        return {"id": pid, "name": known.get("name", pid), "type": known.get("type", "user")}
    return {"id": pid, "name": pid, "type": "team" if pid.startswith("team:") else "user"}


def user(
    profile: dict[str, Any],
    user_id: str,
    *,
    has_password: bool,
    teams: dict[str, str] | None = None,
    created_at: Any = None,
    updated_at: Any = None,
) -> dict[str, Any]:
    out = {
        "id": user_id,
        "username": profile.get("username"),
        "email": profile.get("email", ""),
        "displayName": profile.get("display_name", ""),
        "superuser": bool(profile.get("superuser")),
        "permissions": list(profile.get("permissions", [])),
        "custom": profile.get("custom", {}),
        "hasPassword": has_password,
        "createdAt": iso(created_at),
        "updatedAt": iso(updated_at),
        "_links": {"self": {"href": f"/api/users/{user_id}"}},
    }
    if teams is not None:
        out["teams"] = [{"teamId": t, "role": r} for t, r in sorted(teams.items())]
    return out


def team(team_id: str, name: str, members: dict[str, str], created_at: Any = None) -> dict[str, Any]:
    return {
        "id": f"team:{team_id}",
        "teamId": team_id,
        "name": name,
        "members": [{"userId": u, "role": r} for u, r in sorted(members.items())],
        "createdAt": iso(created_at),
        "_links": {"self": {"href": f"/api/teams/{team_id}"}},
    }


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def event(e: Any) -> dict[str, Any]:
    """One audit-trail entry. Events hold no secrets (only vault references), so all is shown."""
    data = {
        k: v
        for k, v in vars(e).items()
        if k not in ("originator_id", "originator_version", "timestamp", "actor_id", "originator_topic")
    }
    return {
        "version": e.originator_version,
        "type": getattr(type(e), "TOPIC", type(e).__qualname__),
        "at": iso(e.timestamp),
        "actorId": e.actor_id,
        "data": _plain(data),
    }

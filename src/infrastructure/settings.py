"""Service settings, read once from the environment (and CLI flags) at start-up."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

ENV_PREFIX = "INTEGRATIONS_"


class SettingsError(ValueError):
    """The configuration cannot work; the message names the variable."""


@dataclass(frozen=True)
class PostgresConfig:
    host: str = "127.0.0.1"
    port: int = 5432
    dbname: str = "postgres"
    user: str = "postgres"
    password: str = ""
    schema: str = "public"

    @classmethod
    def from_url(cls, url: str, schema: str | None = None) -> PostgresConfig:
        parts = urlsplit(url)
        if parts.scheme not in ("postgresql", "postgres"):
            raise SettingsError("INTEGRATIONS_DATABASE_URL must start with postgresql://")
        query = parse_qs(parts.query)
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 5432,
            dbname=unquote(parts.path.lstrip("/")) or "postgres",
            user=unquote(parts.username or "postgres"),
            password=unquote(parts.password or ""),
            schema=schema or query.get("schema", ["public"])[0],
        )

    def conninfo(self) -> str:
        from psycopg.conninfo import make_conninfo

        return make_conninfo(
            host=self.host, port=self.port, dbname=self.dbname, user=self.user, password=self.password or None
        )


@dataclass(frozen=True)
class Settings:
    data_dir: Path = Path(".integrations")
    postgres: PostgresConfig | None = None  # None = embedded SQLite in data_dir
    master_keys: str | None = None  # comma-separated base64 keys, the first is active
    admin_token: str | None = None
    allow_http_hosts: frozenset[str] = frozenset()
    public_url: str = "http://127.0.0.1:8000"
    tenant_id: str = "default"
    # "inline": projections run as threads in the server; "external": `integrations projections run`
    projections: str = "inline"
    read_your_writes_timeout: float = 5.0
    ready_max_lag: int = 1000
    session_ttl_seconds: int = 8 * 3600
    max_body_bytes: int = 1_000_000
    auth_cache_seconds: float = 2.0
    egress_allow: str = ""  # INTEGRATIONS_EGRESS_ALLOW: addresses, networks, host names allowed beyond the internet
    return_origins: tuple[str, ...] = ()  # INTEGRATIONS_RETURN_ORIGINS: where ?redirect= may send the browser
    refresh_margin_seconds: float = 60.0  # refresh on use when the token expires within it
    refresher_interval_seconds: float = 30.0  # background refresher period (0: off)
    refresher_margin_seconds: float = 300.0  # the background refresher renews tokens expiring within it
    proxy_deadline_seconds: float = 30.0  # INTEGRATIONS_PROXY_DEADLINE_SECONDS: a whole proxied call
    proxy_connect_timeout_seconds: float = 5.0
    proxy_max_concurrency: int = 64  # in-flight proxied calls per integration and process
    proxy_max_concurrency_per_user: int = 128  # in-flight proxied calls per caller and process
    proxy_max_response_bytes: int = 0  # 0: no cap (an integration may set its own)
    extra: Mapping[str, str] = field(default_factory=dict)

    @property
    def backend(self) -> str:
        return "postgres" if self.postgres else "sqlite"

    @property
    def secure_cookies(self) -> bool:
        return self.public_url.startswith("https://")

    def with_(self, **changes: object) -> Settings:
        return replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        env = os.environ if environ is None else environ

        def get(name: str, default: str | None = None) -> str | None:
            value = env.get(ENV_PREFIX + name)
            return value if value not in (None, "") else default

        url = get("DATABASE_URL")
        projections = get("PROJECTIONS", "inline") or "inline"
        if projections not in ("inline", "external"):
            raise SettingsError("INTEGRATIONS_PROJECTIONS must be 'inline' or 'external'")

        def number(name: str, default: float, kind: type = int, allow_zero: bool = False) -> Any:
            raw = get(name)
            if raw is None:
                return default
            try:
                value = kind(raw)
            except ValueError:
                raise SettingsError(f"{ENV_PREFIX}{name} must be a number") from None
            if value < 0 or (value == 0 and not allow_zero):
                raise SettingsError(f"{ENV_PREFIX}{name} must be positive")
            return value

        hosts = frozenset(h.strip().lower() for h in (get("ALLOW_HTTP_HOSTS", "") or "").split(",") if h.strip())
        settings = cls(
            data_dir=Path(get("DATA_DIR", ".integrations") or ".integrations"),
            postgres=PostgresConfig.from_url(url, get("DATABASE_SCHEMA")) if url else None,
            master_keys=get("MASTER_KEY"),
            admin_token=get("ADMIN_TOKEN"),
            allow_http_hosts=hosts,
            public_url=(get("PUBLIC_URL", cls.public_url) or cls.public_url).rstrip("/"),
            tenant_id=get("TENANT_ID", "default") or "default",
            projections=projections,
            read_your_writes_timeout=number("READ_YOUR_WRITES_TIMEOUT", cls.read_your_writes_timeout, float),
            ready_max_lag=number("READY_MAX_LAG", cls.ready_max_lag),
            session_ttl_seconds=number("SESSION_TTL_SECONDS", cls.session_ttl_seconds),
            max_body_bytes=number("MAX_BODY_BYTES", cls.max_body_bytes),
            auth_cache_seconds=number("AUTH_CACHE_SECONDS", cls.auth_cache_seconds, float, allow_zero=True),
            egress_allow=get("EGRESS_ALLOW", "") or "",
            return_origins=tuple(
                o.strip().rstrip("/") for o in (get("RETURN_ORIGINS", "") or "").split(",") if o.strip()
            ),
            refresh_margin_seconds=number("REFRESH_MARGIN_SECONDS", cls.refresh_margin_seconds, float, allow_zero=True),
            refresher_interval_seconds=number(
                "REFRESHER_INTERVAL_SECONDS", cls.refresher_interval_seconds, float, allow_zero=True
            ),
            refresher_margin_seconds=number("REFRESHER_MARGIN_SECONDS", cls.refresher_margin_seconds, float),
            proxy_deadline_seconds=number("PROXY_DEADLINE_SECONDS", cls.proxy_deadline_seconds, float),
            proxy_connect_timeout_seconds=number(
                "PROXY_CONNECT_TIMEOUT_SECONDS", cls.proxy_connect_timeout_seconds, float
            ),
            proxy_max_concurrency=number("PROXY_MAX_CONCURRENCY", cls.proxy_max_concurrency),
            proxy_max_concurrency_per_user=number("PROXY_MAX_CONCURRENCY_PER_USER", cls.proxy_max_concurrency_per_user),
            proxy_max_response_bytes=number("PROXY_MAX_RESPONSE_BYTES", cls.proxy_max_response_bytes, allow_zero=True),
        )
        return replace(settings, **{k: v for k, v in overrides.items() if v is not None})  # type: ignore[arg-type]

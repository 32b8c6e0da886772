"""URL rules for integration endpoints: absolute https, http only for allow-listed dev hosts."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

URL_MAX = 2048
_PLAIN = re.compile(r"[!-~]*")  # printable ASCII, no space: the common case in one match


@dataclass(frozen=True)
class UrlPolicy:
    allow_http_hosts: frozenset[str] = frozenset()

    def problem(self, value: str) -> str | None:
        """Why ``value`` is not acceptable, or ``None``."""
        if len(value) > URL_MAX:
            return f"must be at most {URL_MAX} characters"
        if not _PLAIN.fullmatch(value) and any(c.isspace() or not c.isprintable() for c in value):
            return "must not contain whitespace or control characters"
        try:
            parts = urlsplit(value)
            port = parts.port  # raises on a malformed port
        except ValueError:
            return "is not a valid URL"
        del port
        if parts.scheme not in ("https", "http") or not parts.hostname:
            return "must be an absolute http(s) URL"
        if parts.username is not None or parts.password is not None:
            return "must not contain credentials"
        if "#" in value:
            return "must not contain a fragment"
        if parts.scheme == "http" and parts.hostname.lower() not in self.allow_http_hosts:
            return "must use https (http is allowed only for hosts in INTEGRATIONS_ALLOW_HTTP_HOSTS)"
        return None

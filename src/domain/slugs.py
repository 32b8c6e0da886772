"""Slug rules: lowercase ASCII letters, digits and single hyphens, 1 to 64 characters."""

from __future__ import annotations

import re
import unicodedata

SLUG_MAX = 64
SLUG_RE = re.compile(r"^[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){0,63}$")


def is_valid_slug(slug: str) -> bool:
    return bool(SLUG_RE.fullmatch(slug))


def slugify(name: str) -> str:
    """A valid slug from a display name (``"Google Drive (EU)"`` -> ``google-drive-eu``)."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_name.lower()).strip("-")
    return slug[:SLUG_MAX].rstrip("-") or "integration"

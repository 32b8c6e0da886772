"""Header templates: ``${user.email}``, ``$user.email``, ``${tenant.id}`` ...

Parsing happens when an integration is saved, so an unknown variable or a malformed template is
a 400 then, never a surprise at request time. Expansion is a single pass over the parsed parts:
a value that itself contains ``${...}`` is inserted literally and never expanded again.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

FIXED_VARIABLES = frozenset(
    {
        "user.id",
        "user.username",
        "user.email",
        "user.displayName",
        "tenant.id",
        "integration.id",
        "integration.slug",
    }
)
CUSTOM_PREFIX = "user.custom."
_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_PATH = re.compile(rf"{_NAME}(?:\.{_NAME})*")
_TOKEN = re.compile(r"\$\{([^}]*)\}|\$([A-Za-z_][A-Za-z0-9_.]*[A-Za-z0-9_])|\$")
_FORBIDDEN_CHARS = ("\r", "\n", "\0")
_VALUE_CTL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class TemplateError(ValueError):
    pass


@dataclass(frozen=True)
class Template:
    parts: tuple[str | tuple[str], ...]  # literal text, or (variable,)

    @property
    def variables(self) -> tuple[str, ...]:
        return tuple(p[0] for p in self.parts if isinstance(p, tuple))

    def expand(self, values: Mapping[str, Any]) -> str:
        out: list[str] = []
        for part in self.parts:
            if isinstance(part, tuple):
                value = values.get(part[0])
                text = "" if value is None else str(value)
                if _VALUE_CTL.search(text):  # never a split or smuggled header
                    raise TemplateError(f"the value of '{part[0]}' contains control characters")
                out.append(text)
            else:
                out.append(part)
        return "".join(out)


def _check_variable(name: str) -> None:
    if not _PATH.fullmatch(name):
        raise TemplateError(f"malformed variable '${{{name}}}'")
    if name in FIXED_VARIABLES:
        return
    if name.startswith(CUSTOM_PREFIX) and re.fullmatch(_NAME, name[len(CUSTOM_PREFIX) :]):
        return
    raise TemplateError(f"unknown variable '{name}'")


@functools.lru_cache(maxsize=4096)  # a pure function of the text; Template is immutable
def parse_template(text: str) -> Template:
    if any(c in text for c in _FORBIDDEN_CHARS):
        raise TemplateError("control characters (CR, LF, NUL) are not allowed")
    parts: list[str | tuple[str]] = []
    pos = 0
    for m in _TOKEN.finditer(text):
        if m.start() > pos:
            parts.append(text[pos : m.start()])
        braced, bare = m.group(1), m.group(2)
        if braced is None and bare is None:
            if text.startswith("$$", m.start()):
                raise TemplateError("a lone '$' must not be followed by '$'")
            if m.end() < len(text) and text[m.end()] == "{":
                raise TemplateError("unterminated '${'")
            parts.append("$")  # a lone dollar sign is literal text
        else:
            name = braced if braced is not None else bare
            _check_variable(name)
            parts.append((name,))
        pos = m.end()
    if pos < len(text):
        parts.append(text[pos:])
    return Template(tuple(parts))


def template_values(
    *, user: Mapping[str, Any], tenant_id: str, integration_id: str, integration_slug: str
) -> dict[str, Any]:
    """The variable table for one request: ``user`` has id, username, email, displayName, custom."""
    values: dict[str, Any] = {
        "user.id": user.get("id"),
        "user.username": user.get("username"),
        "user.email": user.get("email"),
        "user.displayName": user.get("displayName"),
        "tenant.id": tenant_id,
        "integration.id": integration_id,
        "integration.slug": integration_slug,
    }
    for key, value in (user.get("custom") or {}).items():
        values[f"{CUSTOM_PREFIX}{key}"] = value
    return values

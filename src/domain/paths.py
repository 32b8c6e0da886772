"""Path confinement for the request proxy (security note PX-1).

A caller names the upstream resource by a path relative to the integration's ``apiBaseUri``; the
request must never leave that base's scheme, host, port and path prefix. The rules here are pure
string checks that reject, rather than repair, anything that could be read as a way out: an
absolute or scheme-relative URL, a backslash, a dot segment, an encoded dot, slash, backslash or
NUL (once or twice encoded: the upstream, or a gateway before it, may decode), a fragment, a
control character, whitespace or non-ASCII text (percent-encode it instead). The API layer
builds the URL with the HTTP client's own parser and checks the result again (defence in depth).

``@`` inside a segment is fine (``users/@me``): the joined URL never has an authority taken from
the caller, so it cannot become userinfo.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from domain.errors import ValidationFailed, field_error

MAX_RELATIVE_LENGTH = 8192
_BAD_ESCAPES = re.compile(r"%(?:2e|2f|5c|00)", re.IGNORECASE)
_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_ALLOWED = re.compile(r"[!$&'()*+,;=:@/?%A-Za-z0-9._~\-\[\]]*")  # RFC 3986 pchar, "/", "?", brackets


class PathRejected(ValidationFailed):
    """400: the relative URL could leave the integration's base URL; nothing was sent."""

    code = "proxy_path_rejected"

    def __init__(self, reason: str, field: str = "url") -> None:
        super().__init__(f"The request path is not allowed: {reason}.", [field_error(field, reason)])


@dataclass(frozen=True)
class Base:
    """An ``apiBaseUri`` split for joining: ``prefix`` always ends with ``/``."""

    scheme: str
    netloc: str
    prefix: str
    query: str

    @classmethod
    def parse(cls, uri: str) -> Base:
        parts = urlsplit(uri)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValidationFailed(
                "The integration's apiBaseUri is not an absolute http(s) URL.", [field_error("apiBaseUri", "invalid")]
            )
        if parts.username is not None or parts.fragment:
            raise ValidationFailed(
                "The integration's apiBaseUri carries userinfo or a fragment.", [field_error("apiBaseUri", "invalid")]
            )
        prefix = parts.path if parts.path.endswith("/") else parts.path + "/"
        return cls(parts.scheme, parts.netloc, prefix, parts.query)


def _check_text(text: str, what: str) -> None:
    if _ALLOWED.fullmatch(text) and "%" not in text:
        return  # the common case, in one regex: only pchar, "/", "?" and brackets, no escapes
    if any(ord(c) < 0x21 or ord(c) > 0x7E for c in text):
        raise PathRejected(f"control characters, whitespace or non-ASCII text in the {what}")
    if "\\" in text:
        raise PathRejected(f"a backslash in the {what}")
    if "#" in text:
        raise PathRejected(f"a fragment in the {what}")
    if _ESCAPE.search(text):
        raise PathRejected(f"a malformed percent-escape in the {what}")
    if not _ALLOWED.fullmatch(text):
        raise PathRejected(f"characters not allowed in the {what}")


def confine(base: Base, relative: str) -> tuple[str, str]:
    """``(path, query)`` of ``relative`` joined under ``base``; :class:`PathRejected` otherwise.

    ``relative`` is a path with an optional ``?query``; one leading ``/`` is allowed (axios'
    ``baseURL`` semantics: ``/files`` on ``https://h/v1/`` is ``https://h/v1/files``).
    """
    if len(relative) > MAX_RELATIVE_LENGTH:
        raise PathRejected("too long")
    _check_text(relative, "path")
    if "://" in relative:
        raise PathRejected("an absolute URL")
    path, _, query = relative.partition("?")
    if path.startswith("//"):
        raise PathRejected("a scheme-relative URL")
    path = path.removeprefix("/")
    for text in (path, unquote(path)):  # also once decoded: double encoding reaches a decoder too
        if _BAD_ESCAPES.search(text):
            raise PathRejected("an encoded dot, slash, backslash or NUL")
        if "\\" in text or any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
            raise PathRejected("an encoded control character or backslash")
    segments = path.split("/") if path else []
    first = segments[0] if segments else ""
    if ":" in first:
        raise PathRejected("a colon in the first segment (it would read as a scheme)")
    for i, segment in enumerate(segments):
        if segment in (".", "..") or unquote(segment) in (".", ".."):
            raise PathRejected("a dot segment")
        if segment == "" and i != len(segments) - 1:
            raise PathRejected("an empty segment")
    if "%00" in query:  # encoded slashes and dots are ordinary in query values; NUL is not
        raise PathRejected("an encoded NUL in the query")
    joined_query = "&".join(q for q in (base.query, query) if q)
    return base.prefix + path, joined_query


def within(base: Base, scheme: str, netloc: str, path: str) -> bool:
    """The re-check on the URL as the sender parsed it: same origin, path under the prefix."""
    return scheme == base.scheme and netloc.lower() == base.netloc.lower() and path.startswith(base.prefix)

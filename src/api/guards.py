"""Input the stores or the decoder cannot take, refused at the HTTP edge with a 400 (found by fuzzing).

- NUL characters: PostgreSQL text and jsonb cannot store U+0000. In a query parameter or the path
  it failed the read-model query (a 500); in a body it was accepted into an event that the
  projection could never apply (the read model stopped, and every later read was a 503).
- Deeply nested JSON: the decoder raised ``RecursionError`` (a 500), and free-form values such as
  a user's ``custom`` would have to pass the event store's recursive JSON encoder as well.
- Integers beyond 32 bits where a read model keeps them in an ``INTEGER`` column (``accessLevel``).
"""

from __future__ import annotations

import re
from typing import Any

from litestar import Request
from litestar.exceptions import SerializationException
from litestar.types import Scope

from api.errors import ApiError

MAX_JSON_DEPTH = 32
MAX_INT32 = 2**31 - 1
_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})
_TOO_DEEP = object()  # the decoder gave up (RecursionError)

# ``\u0000`` as a JSON escape: preceded by an even number of backslashes (``\\u0000`` is the text
# "\u0000", which is fine). A raw NUL byte is malformed JSON and refused by the decoder.
_JSON_NUL = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")


async def check_input(request: Request[Any, Any, Any]) -> None:
    """``before_request`` hook: no NUL in the path, the query string or the body; bounded nesting.

    The body is decoded here once; Litestar caches the result for the handler's ``data``.
    """
    check_raw(request.scope)
    if request.method not in _WITH_BODY or request.route_handler.opt.get("streamed_body"):
        return  # the proxy streams its body through untouched: reading it here would buffer it all
    body = await request.body()
    if not body:
        return
    check_nul(body)
    try:
        value = await request.json()
    except SerializationException:
        return  # malformed JSON: the handler's own decoding answers it with a 400 and the reason
    except RecursionError:
        value = _TOO_DEEP
    check_depth(value)


def check_raw(scope: Scope) -> None:
    """No NUL in the path or the query string."""
    if "\x00" in scope["path"]:
        raise ApiError(400, "The path must not contain NUL characters.")
    if b"%00" in scope.get("query_string", b""):
        raise ApiError(400, "Query parameters must not contain NUL characters.")


def check_nul(body: bytes) -> None:
    """No ``\\u0000`` escape in a JSON body."""
    if _JSON_NUL.search(body):
        raise ApiError(400, "Text in the request body must not contain NUL characters (\\u0000).")


def too_deep(limit: int = MAX_JSON_DEPTH) -> ApiError:
    return ApiError(400, f"The request body is nested too deeply (at most {limit} levels).")


def check_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> None:
    if value is _TOO_DEEP or not _within_depth(value, limit):
        raise too_deep()


def _within_depth(value: Any, limit: int) -> bool:
    """True when ``value`` nests objects and arrays at most ``limit`` levels deep (iteratively)."""
    level = [value]
    for _ in range(limit + 1):
        level = [
            child
            for item in level
            if isinstance(item, (dict, list))
            for child in (item.values() if isinstance(item, dict) else item)
        ]
        if not level:
            return True
    return False

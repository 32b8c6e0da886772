"""OAuth 2.0 values and the classification of token-endpoint failures (pure rules).

The OAuth client in ``infrastructure.oauth_client`` produces these; the connection commands
decide on them (reauthorize, report a misconfiguration, back off and retry once). Every error's
message and attributes hold no secret (no client secret, code, verifier, token, request body).
Requirement IDs refer to ``shared/notes/security.md``: OA-11, OA-12, OA-13, RL-5, §4.1.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

Phase = Literal["connect", "read"]
Grant = Literal["authorization_code", "refresh_token", "revocation"]


@dataclass(frozen=True)
class TokenSet:
    """A validated token response (OA-11). Tokens are left out of ``repr``.

    ``refresh_token`` is ``None`` when the response carried none: the caller keeps the one it has
    (OA-13). ``scope`` is ``None`` when the provider did not say (= as requested). ``expires_at`` is
    counted from when the request was sent, so it errs early. ``raw_extra`` keeps other scalar,
    non-secret fields (``instance_url``, ``id``, ``account_id`` …).
    """

    access_token: str = field(repr=False)
    token_type: str
    expires_at: datetime
    refresh_token: str | None = field(default=None, repr=False)
    scope: str | None = None
    id_token: str | None = field(default=None, repr=False)
    raw_extra: Mapping[str, Any] = field(default_factory=dict)


class OAuthError(Exception):
    """A token, revocation or identity call failed. ``error`` is an OAuth error code (RFC 6749 §5.2)
    or one of ours; ``description`` is the provider's text, sanitised (never ours, never a secret)."""

    def __init__(self, error: str, *, status: int | None = None, description: str | None = None) -> None:
        self.error = error
        self.status = status
        self.description = description
        where = f" (HTTP {status})" if status is not None else ""
        super().__init__(f"{error}{where}")


class InvalidGrant(OAuthError):
    """The code or refresh token is dead (expired, revoked, reused): reauthorization required."""


class ClientConfigError(OAuthError):
    """The integration is misconfigured: client id/secret/method, scope, endpoint, egress policy."""


class ProtocolError(OAuthError):
    """The provider answered something that is not a valid OAuth response."""


class TransientError(OAuthError):
    """Try again later. ``phase``:

    - ``"connect"``: the provider did not process the request (not sent, or an explicit 429/503
      refusal) — repeating it is safe;
    - ``"read"``: it was sent and may have been processed (read timeout, connection lost, 5xx,
      deadline after sending) — a rotated refresh token may be lost; see :func:`may_retry`.

    ``retry_after`` (seconds, capped) comes from a ``Retry-After`` header. ``cause``: ``deadline``,
    ``timeout``, ``network`` or ``status``.
    """

    def __init__(
        self,
        error: str,
        *,
        phase: Phase,
        retry_after: float | None = None,
        cause: str = "network",
        status: int | None = None,
        description: str | None = None,
    ) -> None:
        super().__init__(error, status=status, description=description)
        self.phase = phase
        self.retry_after = retry_after
        self.cause = cause

    @property
    def maybe_processed(self) -> bool:
        return self.phase == "read"


REAUTH_CODES = frozenset({"invalid_grant", "interaction_required", "consent_required", "login_required"})
CONFIG_CODES = frozenset(
    {
        "invalid_client",
        "unauthorized_client",
        "invalid_request",
        "unsupported_grant_type",
        "invalid_scope",
        "unsupported_token_type",
        "invalid_target",
        "access_denied",
    }
)
TRANSIENT_CODES = frozenset({"temporarily_unavailable", "server_error", "slow_down"})


def may_retry(error: OAuthError, *, grant: Grant, read_retries_done: int = 0) -> bool:
    """Whether repeating the same request is sound (RL-5, §4.1). Backoff and attempt caps are the caller's.

    Not-processed failures may always be repeated. A maybe-processed one: never for a code
    exchange (a replayed code revokes what it issued, OA-9), at most once for a refresh (with a
    rotating provider the retry either succeeds or gets ``invalid_grant``; more is pointless),
    freely for revocation (idempotent).
    """
    if not isinstance(error, TransientError):
        return False
    if error.phase == "connect":
        return True
    if grant == "authorization_code":
        return False
    if grant == "refresh_token":
        return read_retries_done < 1
    return True

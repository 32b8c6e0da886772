"""Domain exceptions. The API maps each to one HTTP status; none carries a secret."""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    """Base of every rule violation the service reports to a caller."""

    def __init__(self, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class ValidationFailed(DomainError):
    """Input breaks a rule (400). ``details`` lists ``{"field", "message"}`` items."""


class NotFound(DomainError):
    """The resource does not exist or the caller may not see it (404)."""


class Forbidden(DomainError):
    """The caller sees the resource but lacks the right for this action (403)."""


class Conflict(DomainError):
    """The request clashes with current state: taken slug, concurrent write (409)."""


class PreconditionFailed(DomainError):
    """``If-Match`` named a version that is no longer current (412)."""


def field_error(field: str, message: str) -> dict[str, str]:
    return {"field": field, "message": message}

"""Every error leaves in the Informer shape ``{"statusCode", "error", "message"}`` (+ ``details``).

Messages never carry request bodies, headers or secrets; an unexpected exception is logged with
its type and a request id and answered with a generic 500 that names the same id.
"""

from __future__ import annotations

import logging
import math
import uuid
from http import HTTPStatus
from typing import Any

from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, ValidationException

from commands.connections import ProviderRejected, ProviderUnavailable
from domain.errors import Conflict, DomainError, Forbidden, NotFound, PreconditionFailed, ValidationFailed

log = logging.getLogger("integrations.api")

_DOMAIN_STATUS: dict[type[DomainError], int] = {
    ValidationFailed: 400,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    PreconditionFailed: 412,
    ProviderRejected: 502,
    ProviderUnavailable: 503,
}


class ApiError(HTTPException):
    """An HTTP error with an explicit status, message and optional machine-readable details."""

    def __init__(
        self,
        status_code: int,
        message: str,
        details: Any = None,
        headers: dict[str, str] | None = None,
        code: str | None = None,
    ):
        super().__init__(detail=message, status_code=status_code, extra=details, headers=headers)
        self.code = code  # machine-readable, e.g. upstream_timeout


def error_body(status: int, message: str, details: Any = None, code: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"statusCode": status, "error": HTTPStatus(status).phrase, "message": message}
    if code is not None:
        body["code"] = code  # machine-readable, e.g. integration_not_connected
    if details is not None:
        body["details"] = details
    return body


def _respond(
    status: int, message: str, details: Any = None, headers: dict[str, str] | None = None, code: str | None = None
) -> Response:
    return Response(
        content=error_body(status, message, details, code),
        status_code=status,
        media_type=MediaType.JSON,
        headers={"Cache-Control": "no-store", **(headers or {})},
    )


def domain_error_handler(_: Request, exc: DomainError) -> Response:
    status = next((s for cls, s in _DOMAIN_STATUS.items() if isinstance(exc, cls)), 400)
    headers = None
    if isinstance(exc, ProviderUnavailable):
        headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after or 1)))}
    return _respond(status, exc.message, exc.details, headers, getattr(exc, "code", None))


def _validation_details(exc: ValidationException) -> list[dict[str, str]]:
    details = []
    for item in exc.extra if isinstance(exc.extra, list) else []:
        if isinstance(item, dict):
            details.append(
                {"field": str(item.get("key") or item.get("source") or ""), "message": str(item.get("message", ""))}
            )
    return details


def http_error_handler(_: Request, exc: HTTPException) -> Response:
    status = exc.status_code
    if isinstance(exc, ValidationException):
        message = _body_message(str(exc.detail))
        return _respond(400, message, _validation_details(exc) or None)
    details = exc.extra if isinstance(exc, ApiError) else None
    message = exc.detail if isinstance(exc.detail, str) and exc.detail else HTTPStatus(status).phrase
    if status == 413:
        message = "The request body is too large."
    return _respond(status, message, details, exc.headers, getattr(exc, "code", None))


def _body_message(detail: str) -> str:
    # Litestar's decode messages name the problem (type, unknown field, malformed JSON) without
    # echoing the body; keep them, but never let a long one through.
    return detail[:300] if detail else "The request is not valid."


def internal_error_handler(request: Request, exc: Exception) -> Response:
    incident = uuid.uuid4().hex[:12]
    # Type and location only: exception messages can quote values that came from the caller.
    log.error(
        "unhandled %s in %s %s (incident %s)",
        type(exc).__name__,
        request.method,
        request.url.path,
        incident,
        exc_info=(type(exc), None, exc.__traceback__),
    )
    return _respond(500, f"Internal error (incident {incident}).")


EXCEPTION_HANDLERS = {
    DomainError: domain_error_handler,
    HTTPException: http_error_handler,
    Exception: internal_error_handler,
}


def error_response(request: Request, exc: Exception) -> Response:
    """The answer the handlers above give ``exc``, for code that runs outside Litestar's exception
    middleware (the proxy's front door): the most specific handler by the exception's MRO, as
    Litestar picks it."""
    for cls in type(exc).__mro__:
        handler = EXCEPTION_HANDLERS.get(cls)
        if handler is not None:
            return handler(request, exc)  # type: ignore[operator]
    return internal_error_handler(request, exc)

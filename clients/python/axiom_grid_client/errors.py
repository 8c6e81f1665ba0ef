"""The exceptions of the client: one class per error code the grid answers, all of them ``GridError``.

The grid answers every error as ``{"error": {"code", "message", "details"}}`` with an HTTP status. The
client raises the class of the code (``quota_exceeded`` -> ``QuotaExceeded``); a code this version does not
know is raised as the class of its status (404 -> ``NotFound``, 409 -> ``Conflict``, ...), so a newer
server never surfaces as a bare exception.

Every exception carries ``code``, ``message``, ``details`` (a dict, ``{}`` when the server sent none),
``status`` (the HTTP status, ``None`` when no answer came), ``retry_after`` (seconds, from the
``Retry-After`` header) and ``request_id`` (the ``X-Request-ID`` response header).

The three refusals of a well-formed call (the quota, a dollar budget, a throttle) share the base
``Refused``: the call was understood and said no, and retrying at once will not change that.
"""

from __future__ import annotations

from typing import Any


class GridError(Exception):
    """Any error answered by the grid, or the lack of an answer (``GridConnectionError``)."""

    default_code = "error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        details: dict[str, Any] | None = None,
        status: int | None = None,
        retry_after: float | None = None,
        request_id: str | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.details: dict[str, Any] = details if isinstance(details, dict) else {}
        self.status = status
        self.retry_after = retry_after
        self.request_id = request_id

    def __str__(self) -> str:
        status = f"{self.status} " if self.status is not None else ""
        return f"{status}{self.code}: {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, status={self.status!r}, message={self.message!r})"


# --- Refusals (429) ----------------------------------------------------------------------------------------


class Refused(GridError):
    """The grid understood the call and refused it for want of room: a quota, a budget, a throttle."""

    default_code = "refused"


class QuotaExceeded(Refused):
    """The quota has less available than asked: ``details`` has ``resource_type``, ``requested``,
    ``available`` and ``resets_at`` (the period's end, also ``retry_after``)."""

    default_code = "quota_exceeded"

    @property
    def available(self) -> int | None:
        return self.details.get("available")

    @property
    def requested(self) -> int | None:
        return self.details.get("requested")


class BudgetExceeded(Refused):
    """A hard dollar budget has no room for the call's cost: ``details`` has the budget's ``budget_id``,
    ``scope``, ``scope_id``, ``window``, ``window_end``, ``limit_usd``, ``spent_usd``, ``reserved_usd`` and
    ``requested_usd``."""

    default_code = "budget_exceeded"

    @property
    def budget_id(self) -> int | None:
        return self.details.get("budget_id")


class AgentThrottled(Refused):
    """The agent is throttled (by an operator or a rule): ``details.reason``, and ``rule`` when a rule set
    it."""

    default_code = "agent_throttled"


# --- Other answers -----------------------------------------------------------------------------------------


class AgentSuspended(GridError):
    """The agent is suspended (403): nothing it asks is done until an operator reactivates it."""

    default_code = "agent_suspended"


class NotFound(GridError):
    """No such agent, allocation, alert, deal or run, or not one this key may see (404)."""

    default_code = "not_found"


class RunNotFound(NotFound):
    default_code = "run_not_found"


class Conflict(GridError):
    """The call contradicts the state it found (409), or its Idempotency-Key was used for another request
    (422 ``idempotency_key_reused``)."""

    default_code = "conflict"


class HoldNotOpen(Conflict):
    """The hold was already settled, released or expired."""

    default_code = "hold_not_open"


class AgentExists(Conflict):
    default_code = "agent_exists"


class RunEnded(Conflict):
    """The run's time is up: calls may not name it any more."""

    default_code = "run_ended"


class IdempotencyKeyReused(Conflict):
    """The same Idempotency-Key came with a different request."""

    default_code = "idempotency_key_reused"


class ValidationError(GridError):
    """The request was malformed or invalid (400, 413, 415): ``details.fields`` says which field and why."""

    default_code = "validation_error"


class AuthenticationError(GridError):
    """No key, or a key the grid does not know or has revoked (401)."""

    default_code = "invalid_api_key"


class PermissionDenied(GridError):
    """The key may not do this (403): an operator route, a feature switched off, ..."""

    default_code = "forbidden"


class ServiceUnavailable(GridError):
    """The grid (or a proxy in front of it) could not serve the call: 502, 503 or 504, still so after the
    client's retries. Nothing was written; the same call (same Idempotency-Key) may be made again."""

    default_code = "service_unavailable"


class ServerError(GridError):
    """The grid failed on the call (500 and other 5xx)."""

    default_code = "internal_error"


class GridConnectionError(GridError):
    """No answer: the grid could not be reached, or the connection failed, still so after the client's
    retries. ``status`` is None."""

    default_code = "connection_error"


class GridTimeout(GridConnectionError):
    """The grid took longer than the client's ``timeout`` to answer. A POST may have been done: make it
    again with the same Idempotency-Key to learn its outcome without doing it twice."""

    default_code = "timeout"


ERRORS_BY_CODE: dict[str, type[GridError]] = {
    "quota_exceeded": QuotaExceeded,
    "budget_exceeded": BudgetExceeded,
    "agent_throttled": AgentThrottled,
    "agent_suspended": AgentSuspended,
    "not_found": NotFound,
    "run_not_found": RunNotFound,
    "team_not_found": NotFound,
    "organization_not_found": NotFound,
    "conflict": Conflict,
    "hold_not_open": HoldNotOpen,
    "agent_exists": AgentExists,
    "run_ended": RunEnded,
    "idempotency_key_reused": IdempotencyKeyReused,
    "idempotency_in_progress": Conflict,
    "validation_error": ValidationError,
    "malformed_json": ValidationError,
    "payload_too_large": ValidationError,
    "unsupported_media_type": ValidationError,
    "invalid_api_key": AuthenticationError,
    "not_authenticated": AuthenticationError,
    "forbidden": PermissionDenied,
    "feature_disabled": PermissionDenied,
    "service_unavailable": ServiceUnavailable,
    "internal_error": ServerError,
}

ERRORS_BY_STATUS: dict[int, type[GridError]] = {
    400: ValidationError,
    401: AuthenticationError,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
    413: ValidationError,
    415: ValidationError,
    422: Conflict,
    429: Refused,
    502: ServiceUnavailable,
    503: ServiceUnavailable,
    504: ServiceUnavailable,
}


def error_class(code: str | None, status: int) -> type[GridError]:
    """The exception class for an answer: by its code, else by its status, else ``GridError`` (a 4xx) or
    ``ServerError`` (a 5xx)."""
    if code in ERRORS_BY_CODE:
        return ERRORS_BY_CODE[code]
    if status in ERRORS_BY_STATUS:
        return ERRORS_BY_STATUS[status]
    return ServerError if status >= 500 else GridError

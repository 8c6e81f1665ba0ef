"""Domain errors. Each carries the machine-readable ``code`` and HTTP ``status`` the API answers with."""

from __future__ import annotations

import datetime as dt

from django.utils import timezone

from ledger.periods import month_bounds


class LedgerError(Exception):
    """A refused operation: nothing was written.

    ``retry_at`` (a moment) or ``retry_after`` (seconds), where known, say when trying again may succeed;
    the API answers them as a ``Retry-After`` header.
    """

    code = "invalid_request"
    status = 400
    retry_at: dt.datetime | None = None
    retry_after: int | None = None

    def __init__(
        self, message: str, *, code: str | None = None, details: dict | None = None, status: int | None = None
    ):
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        if status:
            self.status = status
        self.details = details or {}


class NotFound(LedgerError):
    code = "not_found"
    status = 404


class QuotaExceeded(LedgerError):
    """The quota has no room: it comes back when its monthly period ends (``details.resets_at``)."""

    code = "quota_exceeded"
    status = 429

    def __init__(self, message: str, *, resets_at: dt.datetime | None = None, **kwargs):
        super().__init__(message, **kwargs)
        self.retry_at = resets_at or month_bounds(timezone.now())[1]
        self.details.setdefault("resets_at", self.retry_at.isoformat().replace("+00:00", "Z"))


class AgentThrottled(LedgerError):
    """Refused until an operator or a rule lifts the throttle; rules are evaluated every minute, so that is
    when to look again."""

    code = "agent_throttled"
    status = 429
    retry_after = 60


class AgentSuspended(LedgerError):
    code = "agent_suspended"
    status = 403


class Conflict(LedgerError):
    code = "conflict"
    status = 409


class FeatureDisabled(LedgerError):
    code = "feature_disabled"
    status = 403

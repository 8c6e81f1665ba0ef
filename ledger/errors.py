"""Domain errors. Each carries the machine-readable ``code`` and HTTP ``status`` the API answers with."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

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


class BudgetExceeded(LedgerError):
    """A hard budget has no room for the call's cost: it comes back when the budget's window ends (a run's
    total window never does), its limit is raised or its holds are released."""

    code = "budget_exceeded"
    status = 429

    @classmethod
    def from_detail(cls, detail: dict) -> BudgetExceeded:
        """From the figures the database reports (``allocation.sql.grid_budgets_apply``)."""
        figures = {
            name: format(Decimal(str(detail[name])).normalize(), "f")
            for name in ("limit_usd", "rollover_usd", "spent_usd", "reserved_usd", "requested_usd")
        }
        window_end = _iso(detail.get("window_end"))
        error = cls(
            f"{detail['scope']} {detail['scope_id']}'s {detail['window']} budget has "
            f"${figures['limit_usd']} (rollover ${figures['rollover_usd']}), ${figures['spent_usd']} spent "
            f"and ${figures['reserved_usd']} reserved: no room for ${figures['requested_usd']}",
            details={
                "budget_id": detail["budget_id"],
                "scope": detail["scope"],
                "scope_id": detail["scope_id"],
                "window": detail["window"],
                "window_start": _iso(detail.get("window_start")),
                "window_end": window_end,
                **figures,
            },
        )
        if window_end is not None:
            error.retry_at = dt.datetime.fromisoformat(window_end)
        return error


def _iso(value: str | None) -> str | None:
    """A timestamp from PostgreSQL's JSON as the API writes it (ISO 8601, UTC, ``Z``)."""
    if value is None:
        return None
    return dt.datetime.fromisoformat(value).astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


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


class RunNotFound(NotFound):
    code = "run_not_found"

    def __init__(self, run_id: str):
        super().__init__(f"run {run_id!r} not found")


class RunEnded(Conflict):
    """A run's time is up: calls may not name it any more."""

    code = "run_ended"

    def __init__(self, run_id: str):
        super().__init__(f"run {run_id!r} has ended: a call may not name it any more")


class FeatureDisabled(LedgerError):
    code = "feature_disabled"
    status = 403

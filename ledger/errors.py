"""Domain errors. Each carries the machine-readable ``code`` and HTTP ``status`` the API answers with."""

from __future__ import annotations


class LedgerError(Exception):
    """A refused operation: nothing was written."""

    code = "invalid_request"
    status = 400

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
    code = "quota_exceeded"
    status = 429


class AgentThrottled(LedgerError):
    code = "agent_throttled"
    status = 429


class AgentSuspended(LedgerError):
    code = "agent_suspended"
    status = 403


class Conflict(LedgerError):
    code = "conflict"
    status = 409


class FeatureDisabled(LedgerError):
    code = "feature_disabled"
    status = 403

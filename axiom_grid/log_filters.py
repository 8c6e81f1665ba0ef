"""Logging filters named in ``settings.LOGGING``."""

from __future__ import annotations

import logging


class ServiceUnavailableNotLogged(logging.Filter):
    """For the ``django.request`` logger: drop its line per 503 answer. A 503 means the database is
    unreachable, and ``allocation.api.shared.errors`` logs that once a minute per process instead of once
    per request."""

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "status_code", None) != 503

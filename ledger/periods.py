"""Quota periods: calendar months in UTC."""

from __future__ import annotations

import datetime as dt

UTC = dt.UTC


def month_bounds(at: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    """The [start, end) of the calendar month (UTC) that contains ``at``."""
    at = at.astimezone(UTC)
    start = dt.datetime(at.year, at.month, 1, tzinfo=UTC)
    end = (
        dt.datetime(at.year + 1, 1, 1, tzinfo=UTC)
        if at.month == 12
        else dt.datetime(at.year, at.month + 1, 1, tzinfo=UTC)
    )
    return start, end

"""Quota periods (calendar months in UTC) and budget windows (day, week from Monday, month; all UTC)."""

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


def window_bounds(window: str, at: dt.datetime) -> tuple[dt.datetime, dt.datetime | None]:
    """The [start, end) of the budget window of kind ``window`` that contains ``at``: a UTC day, a week
    from Monday 00:00 UTC, a calendar month; a ``total`` window starts at ``at`` and never ends.
    ``WINDOW_BOUNDS_SQL`` is the same rule for the database."""
    at = at.astimezone(UTC)
    if window == "total":
        return at, None
    if window == "month":
        return month_bounds(at)
    day = dt.datetime(at.year, at.month, at.day, tzinfo=UTC)
    if window == "day":
        return day, day + dt.timedelta(days=1)
    if window == "week":
        start = day - dt.timedelta(days=day.weekday())
        return start, start + dt.timedelta(days=7)
    raise ValueError(f"unknown budget window {window!r}")


# The database's form of ``window_bounds`` for the windows that end (the arithmetic is done on UTC wall
# time, so the session's time zone cannot shift a month).
WINDOW_BOUNDS_SQL = """
CREATE OR REPLACE FUNCTION grid_budget_window(p_window text, p_at timestamptz,
    OUT window_start timestamptz, OUT window_end timestamptz)
LANGUAGE sql IMMUTABLE AS $fn$
    SELECT (t AT TIME ZONE 'UTC'),
           ((t + CASE p_window WHEN 'day' THEN interval '1 day' WHEN 'week' THEN interval '7 days'
                               ELSE interval '1 month' END) AT TIME ZONE 'UTC')
    FROM (SELECT date_trunc(CASE p_window WHEN 'day' THEN 'day' WHEN 'week' THEN 'week' ELSE 'month' END,
                            p_at AT TIME ZONE 'UTC') AS t) AS truncated
$fn$;
"""

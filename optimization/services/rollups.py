"""Keeping the usage rollups up to date: hourly and daily usage and spend per agent and resource type.

Each run recomputes whole hourly buckets from the usage log with one set-based statement per chunk
(``INSERT ... SELECT ... GROUP BY ... ON CONFLICT DO UPDATE``, bounded by ``created_at`` so that a
partitioned log is read only in the partitions concerned), then the daily buckets of the agents and
resource types whose hours changed, from the hourly rows. A bucket whose figures did not change is not
written again.

Why recomputing is exact while rows are still being written: a usage row's ``created_at`` is set before
its transaction commits, so rows reach the log out of the order of their times (and of their ids). A
recomputation counts every row committed when it runs; the rows it cannot see yet are those of
transactions still open, whose times are recent. So each run recomputes every hour from the first one
not yet sealed up to the current one, and then seals the hours that ended more than the late window
(``USAGE_ROLLUP_LATE_SECONDS``, two hours) before it ran: a sealed hour is complete provided no row
commits more than the late window after its ``created_at`` (its transaction's length plus the skew between
the clock of the process that wrote it and the database's). Readers (``optimization.rollups``) take the
sealed hours from the rollups and read the rest raw, so what they return is exact either way.

Rows written with an old time (an import, a clock far behind) are found by id: each run also recomputes
the hours of rows whose id is above the last one seen, written within the lookback
(``USAGE_ROLLUP_LOOKBACK_SECONDS``, seven days) and within the covered range. Older ones need
``manage.py usage_rollups_backfill``, which also builds the rollups of the history from before the first
run.

Only one writer works at a time (a transaction-level advisory lock), so that an older snapshot never
overwrites a newer one's figures.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from optimization.models import FleetUsageRollup, UsageRollupState
from optimization.rollups import (
    CONSUMPTION_SQL,
    DAY,
    HOUR,
    ROLLUP_TABLE,
    STATE_NAME,
    USAGE_TABLE,
    floor_day,
    floor_hour,
)

DEFAULT_LATE_SECONDS = 2 * 3600
# Hours recomputed per transaction by the upkeep: an hour of a busy fleet is one statement of seconds, so
# a run that catches up after an outage makes progress in every run, whatever the time limit.
DEFAULT_CHUNK_HOURS = 1
DEFAULT_LOOKBACK_SECONDS = 7 * 24 * 3600  # a week
# A run stops starting chunks after this long (each chunk is at most a day), well within the task's time
# limit; the next run goes on from the last sealed hour.
DEFAULT_RUN_SECONDS = 120

FLEET_TABLE = f'"{FleetUsageRollup._meta.db_table}"'

# The advisory lock of every rollup write, in its own namespace ("ROLL") of two-integer keys.
LOCK_NAMESPACE = 0x524F4C4C
LOCK_KEY = 1

_HOURS_SQL = f"""
INSERT INTO {ROLLUP_TABLE} AS r
    (granularity, bucket_start, agent_id, resource_type_id, period_start, units, cost_usd, calls, updated_at)
SELECT 'hour', date_trunc('hour', u.created_at, 'UTC'), u.agent_id, u.resource_type_id, u.period_start,
       coalesce(sum(u.amount) FILTER (WHERE u.kind IN ({CONSUMPTION_SQL})), 0)::bigint,
       sum(u.cost_usd), count(*), %(stamp)s
FROM {USAGE_TABLE} u
WHERE u.created_at >= %(lo)s AND u.created_at < %(hi)s
GROUP BY 2, 3, 4, 5
ON CONFLICT (granularity, bucket_start, agent_id, resource_type_id, period_start) DO UPDATE
SET units = EXCLUDED.units, cost_usd = EXCLUDED.cost_usd, calls = EXCLUDED.calls,
    updated_at = EXCLUDED.updated_at
WHERE (r.units, r.cost_usd, r.calls) IS DISTINCT FROM (EXCLUDED.units, EXCLUDED.cost_usd, EXCLUDED.calls)
"""

# The days of the (agent, resource type, period) whose hours this chunk changed (their ``updated_at`` is
# the chunk's stamp), summed from all their hours.
_DAYS_TEMPLATE = f"""
INSERT INTO {ROLLUP_TABLE} AS r
    (granularity, bucket_start, agent_id, resource_type_id, period_start, units, cost_usd, calls, updated_at)
SELECT 'day', c.day, h.agent_id, h.resource_type_id, h.period_start,
       sum(h.units)::bigint, sum(h.cost_usd), sum(h.calls)::bigint, %(stamp)s
FROM (
    SELECT DISTINCT date_trunc('day', bucket_start, 'UTC') AS day, agent_id, resource_type_id, period_start
    FROM {ROLLUP_TABLE}
    WHERE granularity = 'hour' AND bucket_start >= %(lo)s AND bucket_start < %(hi)s {{changed}}
) c
JOIN {ROLLUP_TABLE} h
  ON h.agent_id = c.agent_id AND h.granularity = 'hour'
 AND h.bucket_start >= c.day AND h.bucket_start < c.day + interval '24 hours'
 AND h.resource_type_id = c.resource_type_id AND h.period_start = c.period_start
GROUP BY c.day, h.agent_id, h.resource_type_id, h.period_start
ON CONFLICT (granularity, bucket_start, agent_id, resource_type_id, period_start) DO UPDATE
SET units = EXCLUDED.units, cost_usd = EXCLUDED.cost_usd, calls = EXCLUDED.calls,
    updated_at = EXCLUDED.updated_at
WHERE (r.units, r.cost_usd, r.calls) IS DISTINCT FROM (EXCLUDED.units, EXCLUDED.cost_usd, EXCLUDED.calls)
"""

# The fleet's hours and day (``FleetUsageRollup``) from the agents' hours of [lo, hi), all within one UTC day:
# the hours are summed over every agent, the day from the fleet's hours. Buckets whose figures did not change
# are not written again.
_FLEET_SQL = f"""
WITH hours AS (
    INSERT INTO {FLEET_TABLE} AS f
        (granularity, bucket_start, resource_type_id, period_start, units, cost_usd, calls, updated_at)
    SELECT 'hour', bucket_start, resource_type_id, period_start,
           sum(units)::bigint, sum(cost_usd), sum(calls)::bigint, %(stamp)s
    FROM {ROLLUP_TABLE}
    WHERE granularity = 'hour' AND bucket_start >= %(lo)s AND bucket_start < %(hi)s
    GROUP BY bucket_start, resource_type_id, period_start
    ON CONFLICT (granularity, bucket_start, resource_type_id, period_start) DO UPDATE
    SET units = EXCLUDED.units, cost_usd = EXCLUDED.cost_usd, calls = EXCLUDED.calls,
        updated_at = EXCLUDED.updated_at
    WHERE (f.units, f.cost_usd, f.calls) IS DISTINCT FROM (EXCLUDED.units, EXCLUDED.cost_usd, EXCLUDED.calls)
    RETURNING bucket_start, resource_type_id, period_start, units, cost_usd, calls
),
merged AS (
    -- The day's other hours as they were, with the ones just written (a statement sees the table as it
    -- was before it began).
    SELECT resource_type_id, period_start, units, cost_usd, calls FROM hours
    UNION ALL
    SELECT f.resource_type_id, f.period_start, f.units, f.cost_usd, f.calls
    FROM {FLEET_TABLE} f
    WHERE f.granularity = 'hour'
      AND f.bucket_start >= %(day)s AND f.bucket_start < %(day)s + interval '24 hours'
      AND NOT EXISTS (SELECT 1 FROM hours h WHERE h.bucket_start = f.bucket_start
                      AND h.resource_type_id = f.resource_type_id AND h.period_start = f.period_start)
)
INSERT INTO {FLEET_TABLE} AS f
    (granularity, bucket_start, resource_type_id, period_start, units, cost_usd, calls, updated_at)
SELECT 'day', %(day)s, resource_type_id, period_start,
       sum(units)::bigint, sum(cost_usd), sum(calls)::bigint, %(stamp)s
FROM merged
GROUP BY resource_type_id, period_start
ON CONFLICT (granularity, bucket_start, resource_type_id, period_start) DO UPDATE
SET units = EXCLUDED.units, cost_usd = EXCLUDED.cost_usd, calls = EXCLUDED.calls,
    updated_at = EXCLUDED.updated_at
WHERE (f.units, f.cost_usd, f.calls) IS DISTINCT FROM (EXCLUDED.units, EXCLUDED.cost_usd, EXCLUDED.calls)
"""

# A backfill repairs: every day of the range from its hours, changed or not.
_ALL_DAYS_SQL = _DAYS_TEMPLATE.format(changed="")
_DAYS_SQL = _DAYS_TEMPLATE.format(changed="AND updated_at = %(stamp)s")

# Rows with an id above the last one seen: the highest id, and the hours of those written before ``since``
# (the hours a run recomputes anyway start there). Bounded by time for partition pruning.
_NEW_ROWS_SQL = f"""
SELECT max(id),
       array_agg(DISTINCT date_trunc('hour', created_at, 'UTC')) FILTER (WHERE created_at < %(since)s)
FROM {USAGE_TABLE}
WHERE id > %(last_id)s AND created_at >= %(lookback)s
"""


def late_window() -> dt.timedelta:
    return dt.timedelta(seconds=getattr(settings, "USAGE_ROLLUP_LATE_SECONDS", DEFAULT_LATE_SECONDS))


def lookback_window() -> dt.timedelta:
    return dt.timedelta(seconds=getattr(settings, "USAGE_ROLLUP_LOOKBACK_SECONDS", DEFAULT_LOOKBACK_SECONDS))


@dataclass
class RollupRun:
    hours_written: int = 0
    days_written: int = 0
    chunks: int = 0

    def as_dict(self) -> dict:
        return {"hours_written": self.hours_written, "days_written": self.days_written, "chunks": self.chunks}


def _lock_and_stamp() -> dt.datetime:
    """Take the rollup writers' lock for this transaction; the stamp of the rows it writes (the clock after
    the lock, so that each chunk has its own)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT clock_timestamp() FROM (SELECT pg_advisory_xact_lock(%s, %s)) AS lock",
            [LOCK_NAMESPACE, LOCK_KEY],
        )
        return cursor.fetchone()[0]


def _recompute(*, lo: dt.datetime, hi: dt.datetime, run: RollupRun, every_day: bool = False) -> None:
    """Recompute the hours in [lo, hi) and the days they changed (``every_day``: all their days). Inside the
    caller's transaction, which then holds the lock."""
    stamp = _lock_and_stamp()
    params = {"lo": lo, "hi": hi, "stamp": stamp}
    with connection.cursor() as cursor:
        cursor.execute(_HOURS_SQL, params)
        run.hours_written += cursor.rowcount
        cursor.execute(_ALL_DAYS_SQL if every_day else _DAYS_SQL, params)
        run.days_written += cursor.rowcount
        # Chunks never cross a UTC midnight (``_chunks``): the fleet's rows of [lo, hi) are of one day.
        cursor.execute(_FLEET_SQL, {**params, "day": floor_day(lo)})
    run.chunks += 1


def _chunks(lo: dt.datetime, hi: dt.datetime, hours: int = 24) -> list[tuple[dt.datetime, dt.datetime]]:
    """[lo, hi) cut at each UTC midnight and every ``hours`` hours (``lo`` and ``hi`` on the hour)."""
    chunks = []
    while lo < hi:
        end = min(floor_day(lo) + DAY, lo + dt.timedelta(hours=hours), hi)
        chunks.append((lo, end))
        lo = end
    return chunks


def chunk_hours() -> int:
    return max(1, int(getattr(settings, "USAGE_ROLLUP_CHUNK_HOURS", DEFAULT_CHUNK_HOURS)))


def _merged_hours(hours: list[dt.datetime]) -> list[tuple[dt.datetime, dt.datetime]]:
    ranges: list[tuple[dt.datetime, dt.datetime]] = []
    for hour in sorted(set(hours)):
        if ranges and ranges[-1][1] == hour:
            ranges[-1] = (ranges[-1][0], hour + HOUR)
        else:
            ranges.append((hour, hour + HOUR))
    return [chunk for lo, hi in ranges for chunk in _chunks(lo, hi, chunk_hours())]


def _database_now() -> dt.datetime:
    with connection.cursor() as cursor:
        cursor.execute("SELECT now()")
        return cursor.fetchone()[0]


def usage_rollups_update(*, now: dt.datetime | None = None, run_seconds: float | None = None) -> dict:
    """Bring the rollups up to date: the hours of rows written with an old time since the last run, then
    every hour from the first unsealed one to the current one, an hour per transaction
    (``USAGE_ROLLUP_CHUNK_HOURS``); seal the hours older than the late window. Idempotent: a run that finds
    nothing new writes nothing.

    The first run starts at the beginning of the day the late window begins in; the history before it is
    the backfill's (``usage_rollups_backfill``)."""
    run = RollupRun()
    deadline = time.monotonic() + (DEFAULT_RUN_SECONDS if run_seconds is None else run_seconds)
    with transaction.atomic():
        _lock_and_stamp()
        now = now or _database_now()
        seal_to = floor_hour(now - late_window())
        state = UsageRollupState.objects.filter(name=STATE_NAME).first()
        if state is None:
            start = floor_day(seal_to)
            with connection.cursor() as cursor:
                cursor.execute(f"SELECT coalesce(max(id), 0) FROM {USAGE_TABLE}")
                last_id = cursor.fetchone()[0]
            state = UsageRollupState.objects.create(
                name=STATE_NAME,
                covered_from=start,
                sealed_through=start,
                last_usage_id=last_id,
                updated_at=now,
            )
            old_hours = []
        else:
            start = min(state.sealed_through, seal_to)
            with connection.cursor() as cursor:
                cursor.execute(
                    _NEW_ROWS_SQL,
                    {
                        "since": start,
                        "last_id": state.last_usage_id,
                        # Hours before the covered range are the backfill's: their days have no other hours.
                        "lookback": max(now - lookback_window(), state.covered_from),
                    },
                )
                last_id, old_hours = cursor.fetchone()
            last_id = max(last_id or 0, state.last_usage_id)
        old_hours = old_hours or []

    # Rows written with an old time first: then the id they were found by can be passed.
    for lo, hi in _merged_hours(old_hours):
        with transaction.atomic():
            _recompute(lo=lo, hi=hi, run=run)
    UsageRollupState.objects.filter(name=STATE_NAME, last_usage_id__lt=last_id).update(last_usage_id=last_id)

    sealed = state.sealed_through
    for lo, hi in _chunks(start, floor_hour(now) + HOUR, chunk_hours()):
        if run.chunks and time.monotonic() > deadline:
            break
        with transaction.atomic():
            _recompute(lo=lo, hi=hi, run=run)
            # Sealed hours stay contiguous: a chunk seals only from where the last one left off.
            if lo <= sealed < min(hi, seal_to):
                sealed = min(hi, seal_to)
                UsageRollupState.objects.filter(name=STATE_NAME, sealed_through__lt=sealed).update(
                    sealed_through=sealed, updated_at=now
                )
    return {**run.as_dict(), "sealed_through": sealed.isoformat()}


def usage_rollups_backfill(*, since: dt.datetime, until: dt.datetime, now: dt.datetime | None = None) -> dict:
    """Recompute the rollups of the days from ``since``'s to the one before ``until`` (UTC), the latest
    first, one day per transaction, every daily row from its hours; a day that reaches the complete range
    extends it back to that day's start. Existing rollups of days whose raw rows are gone (retention) are
    kept: a day with no rows writes nothing. Runs the upkeep first if it has never run."""
    if since >= until:
        return RollupRun().as_dict()
    if not UsageRollupState.objects.filter(name=STATE_NAME).exists():
        usage_rollups_update(now=now)
    run = RollupRun()
    day = floor_day(until - dt.timedelta(microseconds=1))
    first = floor_day(since)
    while day >= first:
        with transaction.atomic():
            _recompute(lo=day, hi=day + DAY, run=run, every_day=True)
            UsageRollupState.objects.filter(
                name=STATE_NAME, covered_from__gt=day, covered_from__lte=day + DAY
            ).update(covered_from=day, updated_at=timezone.now())
        day -= DAY
    return run.as_dict()

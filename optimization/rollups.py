"""Exact usage totals over any window of time: from the rollups where they are complete, from the usage rows
elsewhere.

The rollups (``UsageRollup``, kept by ``optimization.services.rollups``) hold the usage log summed per hour
and per day. ``UsageRollupState`` says which hours are complete: every hour in [``covered_from``,
``sealed_through``) counts all its rows, late ones included. A window is read in up to five parts, so that
its totals equal a sum over the raw rows, to the last digit:

- the raw rows from the window's start to the first whole hour in the complete range (at most an hour
  when the range covers the start),
- the hourly rollups up to the first whole day, the daily rollups of the whole days, and the hourly
  rollups after them,
- the raw rows from the end of the complete range (a few hours ago: the late window and the interval of
  the upkeep) to the window's end.

Where nothing is complete (no rollups yet, or a window older than ``covered_from``), the whole window is
read raw, as it was before rollups existed. The state is read inside the same statement, so every reader
stays one statement, and a state read a moment ago is as good as the newest (the complete range only
grows), so the result is the same whatever the upkeep does meanwhile.

Every part is bounded by time on an index (``usage_logs`` by ``created_at``, the rollups by their key or by
agent), so a partitioned usage log is read only in the partitions of the window's edges.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal

from django.db import connection

from ledger.models import UsageLog
from optimization.models import UsageRollup, UsageRollupState

STATE_NAME = "usage"
HOUR = dt.timedelta(hours=1)
DAY = dt.timedelta(days=1)
UTC = dt.UTC

USAGE_TABLE = f'"{UsageLog._meta.db_table}"'
ROLLUP_TABLE = f'"{UsageRollup._meta.db_table}"'
STATE_TABLE = f'"{UsageRollupState._meta.db_table}"'
# The kinds counted as consumed units, as the quotas' ``used`` counts them; written into SQL (no user input).
CONSUMPTION_SQL = ", ".join(f"'{kind}'" for kind in UsageLog.CONSUMPTION_KINDS)


def floor_hour(moment: dt.datetime) -> dt.datetime:
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def ceil_hour(moment: dt.datetime) -> dt.datetime:
    floor = floor_hour(moment)
    return floor if floor == moment else floor + HOUR


def floor_day(moment: dt.datetime) -> dt.datetime:
    return moment.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


@dataclass(frozen=True)
class UsageWindow:
    """[start, end) of ``created_at`` (or [start, end] with ``include_end``); ``end`` None: no end."""

    start: dt.datetime
    end: dt.datetime | None = None
    include_end: bool = False


@dataclass(frozen=True)
class Totals:
    units: int  # consumed units (allocations, settlements, executions)
    cost_usd: Decimal  # every row's cost, purchases included
    calls: int  # rows


def _ceil_day(expression: str) -> str:
    return f"(date_trunc('day', {expression} - interval '1 microsecond', 'UTC') + interval '24 hours')"


def window_sql(window: UsageWindow, *, name: str, where: str = "TRUE") -> tuple[str, str, dict]:
    """The window's parts as SQL: ``(common table expressions, parts, parameters)``.

    The parts are one ``UNION ALL`` of rows ``(at, agent_id, resource_type_id, period_start, units,
    cost_usd, calls)``, ``at`` being a raw row's ``created_at`` or a rollup's ``bucket_start``; their sums
    are the window's totals. ``where`` narrows every part, in the columns both tables have (``agent_id``,
    ``resource_type_id``, ``period_start``) with named parameters. ``name`` prefixes the expressions'
    names and parameters: several windows can be read in one statement.
    """
    end = "infinity" if window.end is None else window.end
    params = {
        f"{name}_start": window.start,
        f"{name}_end": end,
        f"{name}_ceil": ceil_hour(window.start),
        f"{name}_floor": end if window.end is None else floor_hour(window.end),
        f"{name}_state": STATE_NAME,
    }
    # One row of bounds, computed once (MATERIALIZED: each part reads it, none recomputes it).
    ctes = f"""
{name}_bounds AS MATERIALIZED (
    SELECT lo, hi,
           CASE WHEN {_ceil_day("lo")} < date_trunc('day', hi, 'UTC') THEN {_ceil_day("lo")} ELSE hi END
               AS day_lo,
           CASE WHEN {_ceil_day("lo")} < date_trunc('day', hi, 'UTC') THEN date_trunc('day', hi, 'UTC')
               ELSE hi END AS day_hi
    FROM (
        SELECT CASE WHEN lo < hi THEN lo ELSE %({name}_end)s::timestamptz END AS lo,
               CASE WHEN lo < hi THEN hi ELSE %({name}_end)s::timestamptz END AS hi
        FROM (
            SELECT greatest(%({name}_ceil)s::timestamptz, coalesce(state.covered_from, 'infinity')) AS lo,
                   least(%({name}_floor)s::timestamptz, coalesce(state.sealed_through, '-infinity')) AS hi
            FROM (SELECT 1) AS one
            LEFT JOIN {STATE_TABLE} AS state ON state.name = %({name}_state)s
        ) AS cut
    ) AS span
)"""
    bound = f"(SELECT {{}} FROM {name}_bounds)"
    raw = (
        "SELECT created_at AS at, agent_id, resource_type_id, period_start, "
        f"CASE WHEN kind IN ({CONSUMPTION_SQL}) THEN amount ELSE 0 END AS units, cost_usd, 1 AS calls "
        f"FROM {USAGE_TABLE} WHERE ({where}) AND "
    )
    rollup = (
        "SELECT bucket_start AS at, agent_id, resource_type_id, period_start, units, cost_usd, calls "
        f"FROM {ROLLUP_TABLE} WHERE ({where}) AND "
    )
    tail_end = ""
    if window.end is not None:
        tail_end = f" AND created_at {'<=' if window.include_end else '<'} %({name}_end)s"
    parts = [
        raw + f"created_at >= %({name}_start)s AND created_at < {bound.format('lo')}",
        rollup + f"granularity = 'hour' AND bucket_start >= {bound.format('lo')} "
        f"AND bucket_start < {bound.format('day_lo')}",
        rollup + f"granularity = 'day' AND bucket_start >= {bound.format('day_lo')} "
        f"AND bucket_start < {bound.format('day_hi')}",
        rollup + f"granularity = 'hour' AND bucket_start >= {bound.format('day_hi')} "
        f"AND bucket_start < {bound.format('hi')}",
        raw + f"created_at >= {bound.format('hi')}{tail_end}",
    ]
    return ctes, "\nUNION ALL\n".join(parts), params


# What a reader may group by: a column both tables have, or the UTC day of a row or bucket.
GROUPS = {
    "agent_id": "agent_id",
    "resource_type_id": "resource_type_id",
    "period_start": "period_start",
    "day": "(date_trunc('day', at, 'UTC') AT TIME ZONE 'UTC')::date",
}


def usage_totals(
    *,
    windows: dict[str, UsageWindow],
    group_by: Sequence[str] = ("agent_id",),
    where: str = "TRUE",
    params: dict | None = None,
) -> dict[tuple, Totals]:
    """(window name, *group values) -> the totals of the usage rows in that window, for the groups that have
    any row. One statement, whatever the windows. ``where`` and ``params`` as in ``window_sql``."""
    columns = [GROUPS[group] for group in group_by]
    all_params = dict(params or {})
    ctes, selects = [], []
    for index, (label, window) in enumerate(windows.items()):
        name = f"w{index}"
        window_ctes, parts, window_params = window_sql(window, name=name, where=where)
        ctes.append(window_ctes)
        all_params.update(window_params)
        all_params[f"{name}_label"] = label
        selects.append(f"SELECT %({name}_label)s::text AS window_name, * FROM (\n{parts}\n) {name}_parts")
    keys = ", ".join(["window_name", *columns])
    sql = (
        f"WITH {','.join(ctes)}\nSELECT {keys}, sum(units)::bigint, sum(cost_usd), sum(calls)::bigint\n"
        f"FROM (\n{' UNION ALL '.join(selects)}\n) rows\nGROUP BY {keys}"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, all_params)
        width = len(columns) + 1
        return {
            tuple(row[:width]): Totals(units=row[width], cost_usd=row[width + 1], calls=row[width + 2])
            for row in cursor.fetchall()
        }


def agents_sql(agent_ids, *, column: str = "agent_id") -> tuple[str, dict]:
    """A condition with named parameters for ``agent_ids`` as the selectors take it: None (every agent), an
    ``AgentRange`` (by its ``after`` and ``through``) or ids."""
    if agent_ids is None:
        return "TRUE", {}
    if hasattr(agent_ids, "after") and hasattr(agent_ids, "through"):
        parts, params = [], {}
        if agent_ids.after is not None:
            parts.append(f"{column} > %(agents_after)s")
            params["agents_after"] = agent_ids.after
        if agent_ids.through is not None:
            parts.append(f"{column} <= %(agents_through)s")
            params["agents_through"] = agent_ids.through
        return " AND ".join(parts) or "TRUE", params
    return f"{column} = ANY(%(agents_list)s)", {"agents_list": list(agent_ids)}

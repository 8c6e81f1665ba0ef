"""The fleet's quota and budget utilization as distributions, for ``/metrics``.

A series per agent would not do at a million agents (millions of series for Prometheus), and neither would
a query per scrape (every scraper, every 15 seconds, reading millions of rows). So the periodic task
``optimization.fleet_utilization`` reads each table once, with one aggregate query: per resource type, how
many current-period quotas use at most each share of their limit (a histogram's cumulative buckets) and
how many use at least each alert threshold; the same per scope for the budgets. The snapshot goes to the
cache, where every scrape reads it (``axiom_grid.observability.exposition``). Its size depends on the
number of resource types and scopes, never on the number of agents.

A quota's share is ``(used + reserved) / limit``, as ``Quota.utilization_percent`` says it; a budget's is
``(spent + reserved) / (limit + rollover)`` in its current window (a window that has ended and is not rolled
yet counts what is reserved only, as it will after the sweep rolls it; a run that has ended is left out).
Nothing to allow and something used is a share of 1; nothing of either, 0.
"""

from __future__ import annotations

import time

from django.db import connection
from django.utils import timezone

from axiom_grid.observability.exposition import fleet_snapshot_store
from ledger.models import Budget, Quota
from ledger.periods import month_bounds

QUOTA_BOUNDS = (0.1, 0.25, 0.5, 0.75, 0.8, 0.9, 0.95, 1.0)
# A soft budget may go past its limit: the histogram goes on.
BUDGET_BOUNDS = (0.1, 0.25, 0.5, 0.75, 0.8, 0.9, 0.95, 1.0, 1.25, 1.5, 2.0)
THRESHOLDS = (0.8, 0.9, 1.0)


def _counts(bounds: tuple[float, ...]) -> str:
    at_most = [f"count(*) FILTER (WHERE share <= {bound!r})" for bound in bounds]
    at_least = [f"count(*) FILTER (WHERE share >= {threshold!r})" for threshold in THRESHOLDS]
    return ", ".join(["count(*)", "coalesce(sum(share), 0)", *at_most, *at_least])


def _share(taken: str, room: str) -> str:
    return f"CASE WHEN {room} > 0 THEN {taken} / {room} WHEN {taken} > 0 THEN 1.0 ELSE 0.0 END"


# The bounds are this module's own floats, written into the statement (repr is exact): no user input.
_QUOTAS_SQL = f"""
SELECT resource_type_id, {_counts(QUOTA_BOUNDS)}
FROM (
    SELECT resource_type_id, {_share("(used + reserved)::float8", "limit_amount::float8")} AS share
    FROM {Quota._meta.db_table}
    WHERE period_start = %(period_start)s
) AS shares
GROUP BY resource_type_id
"""

_BUDGETS_SQL = f"""
SELECT scope, {_counts(BUDGET_BOUNDS)}
FROM (
    SELECT scope, {_share("taken", "room")} AS share
    FROM (
        SELECT scope,
            (CASE WHEN window_end <= %(now)s THEN 0 ELSE spent_usd END + reserved_usd)::float8 AS taken,
            (limit_usd + CASE WHEN window_end <= %(now)s THEN 0 ELSE rollover_usd END)::float8 AS room
        FROM {Budget._meta.db_table}
        WHERE scope <> 'run' OR expires_at > %(now)s
    ) AS figures
) AS shares
GROUP BY scope
"""


def _distribution(sql: str, params: dict, bounds: tuple[float, ...]) -> dict:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    by = {}
    for label, count, total, *counts in rows:
        by[label] = {
            "count": count,
            "sum": float(total),
            "buckets": counts[: len(bounds)],
            "at_least": counts[len(bounds) :],
        }
    return {"bounds": list(bounds), "thresholds": list(THRESHOLDS), "by": by}


def fleet_utilization(*, now=None) -> dict:
    """The snapshot: two queries, whatever the number of agents."""
    now = now or timezone.now()
    started = time.perf_counter()
    quotas = _distribution(_QUOTAS_SQL, {"period_start": month_bounds(now)[0]}, QUOTA_BOUNDS)
    budgets = _distribution(_BUDGETS_SQL, {"now": now}, BUDGET_BOUNDS)
    return {
        "computed_at": now.timestamp(),
        "seconds": time.perf_counter() - started,
        "quotas": quotas,
        "budgets": budgets,
    }


def fleet_utilization_refresh(*, now=None) -> dict:
    """Compute the snapshot and store it for ``/metrics``. Returns the rows counted, by table."""
    snapshot = fleet_utilization(now=now)
    fleet_snapshot_store(snapshot)
    return {
        "quotas": sum(part["count"] for part in snapshot["quotas"]["by"].values()),
        "budgets": sum(part["count"] for part in snapshot["budgets"]["by"].values()),
    }

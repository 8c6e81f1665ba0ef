"""Trends of one agent over days, and how its last hour compares with its usual week.

- **Daily spend** (``daily_spend``): per UTC day, the cost of the agent's usage rows (every kind, purchases
  included), read from the usage rollups where they are complete and from the raw rows elsewhere
  (``optimization.rollups``), one statement for the whole range. ``budget_usd`` is the limit of the agent's
  day-window budget (the smallest, if it has several) as it stands now, on every day of the range: a
  budget's past limits are not kept. Null when the agent has no daily budget.
- **Cost per successful task** (``cost_per_successful_task``): per UTC day, the day's spend over the day's
  successful executions; null on a day without one. An execution whose outcome was not reported is not a
  success.
- **Degradation** (``degradation``): the last hour against the trailing 7 days before it, for the p95
  duration, the error rate (percent) and the throughput (per hour). ``ratio`` = current / baseline to two
  places, of the exact figures (before they are rounded to two places themselves); null when either side
  has no value or the baseline is zero (nothing to compare with: such a metric never makes a rule fire).
  Executions without a duration are left out of the p95, those without an outcome out of the error rate;
  both count in the throughput.

Every read is bounded by time: executions are partitioned by month on ``created_at``, so only the
partitions of the range are read, through the (agent, created_at) index.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

from django.db import connection
from django.db.models import Count, Min
from django.db.models.functions import TruncDate
from django.utils import timezone

from ledger.errors import LedgerError
from ledger.models import Budget
from ledger.money import cents, money_round
from optimization.models import Execution
from optimization.rollups import UsageWindow, agents_sql, usage_totals

MAX_RANGE_DAYS = 366
WINDOW = dt.timedelta(hours=1)
BASELINE = dt.timedelta(days=7)
BASELINE_HOURS = int(BASELINE.total_seconds() // 3600)
METRICS = ("p95_duration_ms", "error_rate", "throughput_per_hour")


def trend_range_check(*, start: dt.date, end: dt.date) -> None:
    """A range of days is valid when it is in order and at most ``MAX_RANGE_DAYS`` long (both ends count)."""
    if end < start:
        raise LedgerError("end must not be before start", code="invalid_range")
    if end >= dt.date.max:  # its next midnight, the range's end, is past the last representable day
        raise LedgerError("end must be before 9999-12-31", code="invalid_range")
    if (end - start).days + 1 > MAX_RANGE_DAYS:
        raise LedgerError(f"a range is at most {MAX_RANGE_DAYS} days", code="invalid_range")


def _day_start(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day, dt.time.min, tzinfo=dt.UTC)


def _days(start: dt.date, end: dt.date) -> list[dt.date]:
    return [start + dt.timedelta(days=offset) for offset in range((end - start).days + 1)]


def _spend_by_day(*, agent_id: str, start: dt.date, end: dt.date) -> dict[dt.date, Decimal]:
    totals = usage_totals(
        windows={"range": UsageWindow(_day_start(start), _day_start(end + dt.timedelta(days=1)))},
        group_by=("day",),
        where="agent_id = %(trend_agent)s",
        params={"trend_agent": agent_id},
    )
    return {day: figures.cost_usd or Decimal(0) for (_, day), figures in totals.items()}


def daily_budget_usd(*, agent_id: str) -> Decimal | None:
    """The limit of the agent's day-window budget (the smallest of several); None without one."""
    return Budget.objects.filter(
        scope=Budget.Scope.AGENT, agent_id=agent_id, window=Budget.Window.DAY
    ).aggregate(limit=Min("limit_usd"))["limit"]


def daily_spend(*, agent_id: str, start: dt.date, end: dt.date) -> list[dict]:
    """Every day of [start, end]: ``{"day", "spend_usd", "budget_usd"}``, zero-filled. Two queries."""
    trend_range_check(start=start, end=end)
    spend = _spend_by_day(agent_id=agent_id, start=start, end=end)
    budget = daily_budget_usd(agent_id=agent_id)
    return [
        {"day": day, "spend_usd": money_round(spend.get(day, Decimal(0))), "budget_usd": budget}
        for day in _days(start, end)
    ]


def cost_per_successful_task(*, agent_id: str, start: dt.date, end: dt.date) -> list[dict]:
    """Every day of [start, end]: ``{"day", "cost_usd", "successes", "cost_per_success_usd"}``, the last
    null on a day without a successful execution. Two queries."""
    trend_range_check(start=start, end=end)
    spend = _spend_by_day(agent_id=agent_id, start=start, end=end)
    successes = dict(
        Execution.objects.filter(
            agent_id=agent_id,
            created_at__gte=_day_start(start),
            created_at__lt=_day_start(end + dt.timedelta(days=1)),
            success=True,
        )
        .annotate(day=TruncDate("created_at", tzinfo=dt.UTC))
        .values("day")
        .annotate(successes=Count("id"))
        .values_list("day", "successes")
        .order_by()
    )
    result = []
    for day in _days(start, end):
        cost = money_round(spend.get(day, Decimal(0)))
        count = successes.get(day, 0)
        result.append(
            {
                "day": day,
                "cost_usd": cost,
                "successes": count,
                "cost_per_success_usd": money_round(cost / count) if count else None,
            }
        )
    return result


# One pass over the executions of the baseline and the current window of a set of agents (by the agent's
# time index, in the partitions of the last 7 days and an hour): counts and p95 of each window per agent.
_DEGRADATION_SQL = f"""
SELECT e.agent_id,
       count(*) FILTER (WHERE e.current),
       count(*) FILTER (WHERE e.current AND e.success),
       count(*) FILTER (WHERE e.current AND NOT e.success),
       percentile_cont(0.95) WITHIN GROUP (ORDER BY e.duration_ms) FILTER (WHERE e.current),
       count(*) FILTER (WHERE NOT e.current),
       count(*) FILTER (WHERE NOT e.current AND e.success),
       count(*) FILTER (WHERE NOT e.current AND NOT e.success),
       percentile_cont(0.95) WITHIN GROUP (ORDER BY e.duration_ms) FILTER (WHERE NOT e.current)
FROM (
    SELECT x.agent_id, x.success, x.duration_ms, x.created_at >= %(current_start)s AS current
    FROM "{Execution._meta.db_table}" x
    WHERE ({{agents}}) AND x.created_at >= %(baseline_start)s AND x.created_at < %(now)s
) e
GROUP BY e.agent_id
"""


def _figure(current: Decimal | None, baseline: Decimal | None) -> dict:
    """Both sides to two places; the ratio of the exact values (a baseline of 1 execution a week is 0.01 an
    hour to two places, and the ratio to that would be off by two fifths)."""
    ratio = None
    if current is not None and baseline is not None and baseline > 0:
        ratio = cents(current / baseline)
    return {
        "current": None if current is None else cents(current),
        "baseline": None if baseline is None else cents(baseline),
        "ratio": ratio,
    }


def _exact(value: float | None) -> Decimal | None:
    return None if value is None else Decimal(str(value))


def _error_percent(failed: int, known: int) -> Decimal | None:
    return Decimal(failed) * 100 / known if known else None


def degradation_figures(*, now: dt.datetime | None = None, agent_ids=None) -> dict[str, dict]:
    """agent -> ``{metric: {"current", "baseline", "ratio"}}`` for the agents with an execution in the last
    hour or the 7 days before (``agent_ids`` as the selectors take it: None, an ``AgentRange`` or ids).
    One query, whatever the number of agents."""
    now = now or timezone.now()
    current_start = now - WINDOW
    where, params = agents_sql(agent_ids, column="x.agent_id")
    params.update({"now": now, "current_start": current_start, "baseline_start": current_start - BASELINE})
    with connection.cursor() as cursor:
        cursor.execute(_DEGRADATION_SQL.format(agents=where), params)
        rows = cursor.fetchall()
    result = {}
    for agent_id, runs, ok, failed, p95, base_runs, base_ok, base_failed, base_p95 in rows:
        result[agent_id] = {
            "p95_duration_ms": _figure(_exact(p95), _exact(base_p95)),
            "error_rate": _figure(
                _error_percent(failed, ok + failed), _error_percent(base_failed, base_ok + base_failed)
            ),
            "throughput_per_hour": _figure(
                Decimal(runs), Decimal(base_runs) / BASELINE_HOURS if base_runs else None
            ),
        }
    return result


def degradation(*, agent_id: str, now: dt.datetime | None = None) -> dict:
    """The agent's last hour against the 7 days before it (see the module docstring). One query."""
    figures = degradation_figures(now=now, agent_ids=[agent_id]).get(agent_id)
    if figures is None:
        figures = {
            "p95_duration_ms": _figure(None, None),
            "error_rate": _figure(None, None),
            "throughput_per_hour": _figure(Decimal("0.00"), None),
        }
    return {**figures, "window_hours": 1, "baseline_days": 7}

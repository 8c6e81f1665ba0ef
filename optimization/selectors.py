"""Fleet-wide metrics, computed set-based: each function is a fixed number of queries for any number of
agents.

Sweeps (budgets, rules, scaling) read these; per-agent pages read the same functions with ``agent_ids``.
Percentages are Decimal with two places; a metric with nothing to measure is absent from the result.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal

from django.db import connection
from django.db.models import Count, DecimalField, ExpressionWrapper, F, Q, Sum, Value
from django.utils import timezone

from ledger.models import Agent, Budget, Quota
from ledger.money import cents, money_round, percent
from ledger.periods import month_bounds
from optimization.models import Execution
from optimization.rollups import UsageWindow, agents_sql, usage_totals

SPIKE_BASELINE_HOURS = 24


@dataclass(frozen=True)
class AgentRange:
    """The agents whose id sorts after ``after`` and up to ``through`` (None: no bound on that side), in the
    database's order: a sweep's chunk of the fleet. Consecutive chunks' ranges leave no gap between them.

    Passed as ``agent_ids``, it filters by range rather than by a list, so the chunk's rows are read with
    an index range scan (``quota_period_agent_idx`` for this period's quotas)."""

    after: str | None
    through: str | None

    def sql(self, column: str) -> tuple[str, list[str]]:
        """A condition on ``column`` (``TRUE`` for the whole fleet) and its parameters."""
        parts, params = [], []
        if self.after is not None:
            parts.append(f"{column} > %s")
            params.append(self.after)
        if self.through is not None:
            parts.append(f"{column} <= %s")
            params.append(self.through)
        return " AND ".join(parts) or "TRUE", params

    def lookups(self, field: str) -> dict[str, str]:
        found = {}
        if self.after is not None:
            found[f"{field}__gt"] = self.after
        if self.through is not None:
            found[f"{field}__lte"] = self.through
        return found


def agent_chunks(*, size: int, fields: Sequence[str] = ("pk",)) -> Iterator[tuple[AgentRange, list[tuple]]]:
    """The fleet in chunks of ``size`` agents by id, for sweeps: each chunk's range and rows of ``fields``.

    Keyset pagination, one indexed query per chunk whatever the fleet, in the database's order (which the
    range filters use too). The ranges cover every id without a gap, the first open below and the last
    open above, so rows of agents that are gone fall in some chunk's range; an empty fleet is one chunk
    covering everything.
    """
    if fields[0] != "pk":
        raise ValueError("the first field of an agent chunk is its pk")
    after: str | None = None
    while True:
        agents = Agent.objects.order_by("pk")
        if after is not None:
            agents = agents.filter(pk__gt=after)
        rows = list(agents.values_list(*fields)[:size])
        last = len(rows) < size
        yield AgentRange(after, None if last else rows[-1][0]), rows
        if last:
            return
        after = rows[-1][0]


def _agents_filter(queryset, agent_ids, field: str = "agent_id"):
    if agent_ids is None:
        return queryset
    if isinstance(agent_ids, AgentRange):
        return queryset.filter(**agent_ids.lookups(field))
    return queryset.filter(**{f"{field}__in": list(agent_ids)})


def resource_utilization(
    *,
    now: dt.datetime | None = None,
    agent_ids=None,
    at_least: Decimal | None = None,
    at_most: Decimal | None = None,
) -> dict[tuple[str, str], Decimal]:
    """(agent, resource type) -> percent of this period's limit used or held. One query.

    ``at_least`` / ``at_most`` (percent) leave out, in SQL, the rows outside that range before any of them
    reaches Python: a rule over a fleet asks only for the rows that can meet its threshold.
    """
    start, _ = month_bounds(now or timezone.now())
    queryset = _agents_filter(Quota.objects.filter(period_start=start, limit__gt=0), agent_ids)
    if at_least is not None or at_most is not None:
        queryset = queryset.alias(taken_percent=(F("used") + F("reserved")) * 100)
        if at_least is not None:
            queryset = queryset.filter(taken_percent__gte=_times_limit(at_least))
        if at_most is not None:
            queryset = queryset.filter(taken_percent__lte=_times_limit(at_most))
    rows = queryset.values_list("agent_id", "resource_type_id", "used", "reserved", "limit")
    return {
        (agent, code): percent(used + reserved, limit)
        for agent, code, used, reserved, limit in rows.iterator(chunk_size=5000)
    }


def _times_limit(value: Decimal) -> ExpressionWrapper:
    return ExpressionWrapper(
        F("limit") * Value(value, output_field=DecimalField()), output_field=DecimalField()
    )


# Each agent's most used resource, chosen in PostgreSQL: one row per agent leaves the database instead of one
# per quota row. The ratio is compared exactly: ``taken * 10^40 div limit`` tells apart any two different
# fractions of 64-bit integers, where a float (or numeric division's default scale) may not. Ties go to
# the resource type that sorts first byte by byte. The sort is in the "C" collation: the agents' order
# does not matter, and a locale's costs a third of the statement's time.
_MOST_USED_SQL = f"""
SELECT DISTINCT ON (q.agent_id COLLATE "C")
       q.agent_id, q.resource_type_id, q.used + q.reserved, q.limit_amount
FROM "{Quota._meta.db_table}" q
WHERE q.period_start = %s AND q.limit_amount > 0 {{agents}}
ORDER BY q.agent_id COLLATE "C", div((q.used + q.reserved)::numeric * 1e40, q.limit_amount) DESC,
         q.resource_type_id COLLATE "C"
"""


def max_resource_utilization(
    *, now: dt.datetime | None = None, agent_ids=None
) -> dict[str, tuple[str, Decimal]]:
    """agent -> (its most used resource type, that percent); of equally used ones, the first resource type
    by code. One query, whose comparison is exact (``_MOST_USED_SQL``), so only each agent's winner is
    turned into a Decimal percentage.
    """
    start, _ = month_bounds(now or timezone.now())
    params: list = [start]
    agents = ""
    if isinstance(agent_ids, AgentRange):
        condition, bounds = agent_ids.sql("q.agent_id")
        agents, params = f"AND {condition}", [start, *bounds]
    elif agent_ids is not None:
        agents, params = "AND q.agent_id = ANY(%s)", [start, list(agent_ids)]
    with connection.cursor() as cursor:
        cursor.execute(_MOST_USED_SQL.format(agents=agents), params)
        return {agent: (code, percent(taken, limit)) for agent, code, taken, limit in cursor.fetchall()}


def period_spend(*, now: dt.datetime | None = None, agent_ids=None) -> dict[str, Decimal]:
    """agent -> this period's spend, from the quota rows' cached ``spent_usd``. One query."""
    start, _ = month_bounds(now or timezone.now())
    rows = (
        _agents_filter(Quota.objects.filter(period_start=start), agent_ids)
        .values("agent_id")
        .annotate(total=Sum("spent_usd"))
        .values_list("agent_id", "total")
        .order_by()
    )
    return dict(rows)


def budget_utilization(*, now: dt.datetime | None = None, agent_ids=None) -> dict[str, dict]:
    """agent -> spend, budget and percent, for agents with a monthly budget. Two queries."""
    spend = period_spend(now=now, agent_ids=agent_ids)
    budgets = _agents_filter(
        Agent.objects.filter(monthly_budget_usd__gt=0), agent_ids, field="id"
    ).values_list("id", "monthly_budget_usd")
    result = {}
    for agent, budget in budgets:
        spent = spend.get(agent, Decimal(0))
        result[agent] = {"spent_usd": spent, "budget_usd": budget, "percent": percent(spent, budget)}
    return result


# A run's budget is swept for a day after the run ends: what it reached just before is still alerted.
RUN_SWEEP_GRACE = dt.timedelta(days=1)


def budgets_to_sweep(*, now: dt.datetime, after_id: int = 0, limit: int = 2000) -> list[Budget]:
    """The next ``limit`` budgets by id after ``after_id`` that the budget sweep has work on at ``now``:
    some spend to compare with its thresholds, a refusal to resolve, or an ended window to roll. Budgets
    with none of these (idle ones) are not read. One query."""
    return list(
        Budget.objects.filter(pk__gt=after_id)
        .filter(Q(spent_usd__gt=0) | Q(refused_at__isnull=False) | Q(window_end__lte=now))
        .filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now - RUN_SWEEP_GRACE))
        .order_by("pk")[:limit]
    )


def execution_stats(
    *, since: dt.datetime, until: dt.datetime | None = None, agent_ids=None
) -> dict[str, dict]:
    """agent -> executions, failures, error rate %, throughput per hour and output over [since, until).
    One query. An execution whose outcome is unknown (``success`` null) counts in executions, throughput
    and cost, not in successes, failures or the error rate."""
    until = until or timezone.now()
    hours = Decimal((until - since).total_seconds()) / 3600
    rows = (
        _agents_filter(Execution.objects.filter(created_at__gte=since, created_at__lt=until), agent_ids)
        .values("agent_id")
        .annotate(
            executions=Count("id"),
            successes=Count("id", filter=Q(success=True)),
            failures=Count("id", filter=Q(success=False)),
            output=Sum("output_units", filter=Q(success=True)),
            cost=Sum("cost_usd"),
        )
        .order_by()
    )
    return {
        row["agent_id"]: execution_figures(
            executions=row["executions"],
            successes=row["successes"],
            failures=row["failures"],
            output=row["output"],
            cost=row["cost"],
            hours=hours,
        )
        for row in rows
    }


def execution_figures(
    *, executions: int, successes: int, failures: int, output, cost, hours: Decimal
) -> dict:
    """One agent's ``execution_stats`` entry from its counts and sums over a window of ``hours``. The
    error rate is over the executions with a known outcome: null when none has one."""
    return {
        "executions": executions,
        "failures": failures,
        "successes": successes,
        "outcome_unknown": executions - successes - failures,
        "error_rate_percent": percent(failures, successes + failures),
        "throughput_per_hour": cents(Decimal(executions) / hours) if hours else None,
        "output_units": output or 0,
        "cost_usd": cost or Decimal(0),
    }


def percentile_value(value: float) -> Decimal:
    """A ``percentile_cont`` result as ``duration_percentiles`` gives it: Decimal, two places."""
    return cents(Decimal(str(value)))


def duration_percentiles(
    *, since: dt.datetime, until: dt.datetime | None = None, agent_ids=None, percentiles=(50, 95)
) -> dict[str, dict[int, Decimal]]:
    """agent -> {50: p50 ms, 95: p95 ms} of execution durations (``percentile_cont``). One query. Only
    executions with a duration count; an agent with none in the window is left out."""
    until = until or timezone.now()
    queryset = _agents_filter(
        Execution.objects.filter(created_at__gte=since, created_at__lt=until, duration_ms__isnull=False),
        agent_ids,
    )
    sql, params = queryset.values("agent_id", "duration_ms").query.sql_with_params()
    columns = ", ".join(
        f"percentile_cont({p / 100}) WITHIN GROUP (ORDER BY sub.duration_ms)" for p in percentiles
    )
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT sub.agent_id, {columns} FROM ({sql}) sub GROUP BY sub.agent_id", params)
        return {
            row[0]: {p: percentile_value(value) for p, value in zip(percentiles, row[1:], strict=True)}
            for row in cursor.fetchall()
        }


def cost_spike_ratio(*, now: dt.datetime | None = None, agent_ids=None) -> dict[str, dict]:
    """agent -> the last hour's spend against its average hourly spend over the 24 hours before. One query,
    over the usage rollups and the raw rows of the window's edges (``optimization.rollups``).

    Agents with no baseline spend are left out: a first hour of use is not a spike.
    """
    now = now or timezone.now()
    hour_ago = now - dt.timedelta(hours=1)
    baseline_start = hour_ago - dt.timedelta(hours=SPIKE_BASELINE_HOURS)
    where, params = agents_sql(agent_ids)
    totals = usage_totals(
        windows={"baseline": UsageWindow(baseline_start, hour_ago), "last_hour": UsageWindow(hour_ago, now)},
        where=where,
        params=params,
    )
    spend: dict[str, dict[str, Decimal]] = {}
    for (window, agent_id), figures in totals.items():
        spend.setdefault(agent_id, {})[window] = figures.cost_usd
    result = {}
    for agent_id, windows in spend.items():
        baseline = windows.get("baseline") or Decimal(0)
        if baseline <= 0:
            continue
        hourly = baseline / SPIKE_BASELINE_HOURS
        last_hour = windows.get("last_hour") or Decimal(0)
        result[agent_id] = {
            "last_hour_usd": last_hour,
            "baseline_hourly_usd": money_round(hourly),
            "ratio": cents(last_hour / hourly),
        }
    return result

"""Performance analytics of one agent: metrics, bottleneck analysis and an efficiency score.

Everything is read in a fixed number of aggregate queries, whatever the size of the usage log: the
period's counters and spend come from the ``quotas`` rows (a cache of ``usage_logs``), execution figures from
the set-based selectors of ``optimization.selectors`` with ``agent_ids=[agent.id]``, and usage over a window
(the forecast's spend, the burn rate) from the hourly and daily usage rollups, with raw ``usage_logs`` rows
only at the window's edges, bounded by time on the (agent, created_at) index (``optimization.rollups``).
Every service takes ``now=`` so that a report can be computed for any moment (and tested at a fixed one).

Rules
-----
- **Utilization** of a resource = (used + reserved) / limit of the current period, in percent (null when the
  limit is 0).
- **Forecast spend at period end** = spend so far + the spend rate of the trailing 7 days (or of the time
  since the period started, when that is shorter) x the time left in the period. The rate is the
  usage-log cost in that window divided by its length in seconds; at the very start of a period (an empty
  window) the forecast is the spend so far.
- **Cost per successful task** = this period's spend / this period's successful executions; null when the
  agent has no successful execution this period.
- **Bottlenecks**: a resource is a bottleneck when its utilization is at or above 80 % (warning) or 90 %
  (critical), or when it is forecast to run out before the period ends. The forecast uses the burn rate of
  the trailing 24 hours (units of consumption rows - allocation, settlement, execution - per hour);
  ``projected_exhaustion_at`` = now + available units / burn rate (whole seconds), or now when nothing is
  left. A resource only forecast to run out is a warning.
- **Efficiency score** (0-100): the agent's successful output units per dollar spent this period, relative
  to the best agent of the same tier: ``100 * value / max value``, where the max is taken over the tier's
  agents with at least one execution and some spend this period. Null when the agent itself has no spend or
  no execution this period (an agent that spent nothing has no output per dollar to compare).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal, localcontext

from django.conf import settings
from django.db import connection
from django.db.models import Count, Q, Sum
from django.utils import timezone

from ledger.errors import FeatureDisabled, LedgerError
from ledger.models import Agent, Quota, ResourceType
from ledger.money import CENT, COST_QUANTUM, cents, money_round, percent
from ledger.periods import month_bounds
from ledger.selectors import base_limits
from optimization.models import Execution
from optimization.rollups import UsageWindow, usage_totals, window_sql
from optimization.selectors import execution_figures, percentile_value

DEFAULT_WINDOW_HOURS = 24
MAX_WINDOW_HOURS = 720
FORECAST_WINDOW = dt.timedelta(days=7)
BURN_WINDOW = dt.timedelta(hours=24)
WARNING_PERCENT = Decimal("80")
CRITICAL_PERCENT = Decimal("90")
RATIO_QUANTUM = Decimal("0.000001")
ONE_MICROSECOND = dt.timedelta(microseconds=1)


def analytics_ensure_enabled() -> None:
    if not settings.ENABLE_PERFORMANCE_ANALYTICS:
        raise FeatureDisabled("performance analytics is switched off (ENABLE_PERFORMANCE_ANALYTICS)")


def scaled(
    value: Decimal | int, numerator: int, denominator: int, quantum: Decimal = COST_QUANTUM
) -> Decimal:
    """``value * numerator / denominator`` computed at 60 digits (a rate times microseconds outgrows the
    default 28) and rounded half-even to ``quantum``."""
    with localcontext() as context:
        context.prec = 60
        return (Decimal(value) * numerator / denominator).quantize(quantum, rounding=ROUND_HALF_EVEN)


def microseconds(delta: dt.timedelta) -> int:
    return delta // ONE_MICROSECOND


# --- The period and its counters ------------------------------------------------------------------------


@dataclass(frozen=True)
class PeriodClock:
    """The current quota period (a calendar month, UTC) seen from ``now``."""

    start: dt.datetime
    end: dt.datetime
    now: dt.datetime

    @classmethod
    def at(cls, now: dt.datetime | None = None) -> PeriodClock:
        now = now or timezone.now()
        start, end = month_bounds(now)
        return cls(start=start, end=end, now=now)

    @property
    def total_us(self) -> int:
        return microseconds(self.end - self.start)

    @property
    def elapsed_us(self) -> int:
        return microseconds(self.now - self.start)

    @property
    def remaining_us(self) -> int:
        return max(microseconds(self.end - self.now), 0)

    def projected_units(self, used: int) -> int:
        """``used`` extrapolated to the whole period (used / elapsed fraction), rounded up to a whole unit.
        At the very start of a period there is nothing to extrapolate from, so it is ``used``."""
        if self.elapsed_us <= 0:
            return used
        return -(-used * self.total_us // self.elapsed_us)


@dataclass(frozen=True)
class ResourceSnapshot:
    """One resource type's counters for the current period; a period not opened yet reads as unused."""

    resource_type: str
    limit: int
    used: int
    reserved: int
    listed: int
    spent_usd: Decimal

    @property
    def available(self) -> int:
        return self.limit - self.used - self.reserved - self.listed

    @property
    def utilization_percent(self) -> Decimal | None:
        return percent(self.used + self.reserved, self.limit)


def resource_snapshots(*, agent: Agent, clock: PeriodClock) -> list[ResourceSnapshot]:
    """Every resource type's counters for the period, in display order. Two small queries (four when a
    period is not open yet), and no writes."""
    rows = {
        row["resource_type_id"]: row
        for row in Quota.objects.filter(agent=agent, period_start=clock.start).values(
            "resource_type_id", "limit", "used", "reserved", "listed", "spent_usd"
        )
    }
    codes = list(ResourceType.objects.order_by("display_order", "code").values_list("code", flat=True))
    limits = base_limits(agent=agent) if len(rows) < len(codes) else {}
    snapshots = []
    for code in codes:
        row = rows.get(code)
        if row is None:
            snapshots.append(ResourceSnapshot(code, limits.get(code, 0), 0, 0, 0, Decimal(0)))
        else:
            snapshots.append(
                ResourceSnapshot(
                    code, row["limit"], row["used"], row["reserved"], row["listed"], row["spent_usd"]
                )
            )
    return snapshots


def burn_last_24h(*, agent: Agent, now: dt.datetime) -> dict[str, int]:
    """resource type -> units consumed in the 24 hours up to ``now``. One GROUP BY query, over the usage
    rollups and the raw rows of the window's edges."""
    totals = usage_totals(
        windows={"burn": UsageWindow(now - BURN_WINDOW, now, include_end=True)},
        group_by=("resource_type_id",),
        where="agent_id = %(agent)s",
        params={"agent": agent.id},
    )
    return {code: figures.units for (_, code), figures in totals.items() if figures.units > 0}


def exhaustion_at(*, available: int, units_24h: int, now: dt.datetime) -> dt.datetime | None:
    """When ``available`` units run out at the trailing 24 hours' burn rate; None when nothing burns."""
    if available <= 0:
        return now
    if units_24h <= 0:
        return None
    try:
        return now + dt.timedelta(seconds=available * int(BURN_WINDOW.total_seconds()) // units_24h)
    except OverflowError:  # a limit of up to 2^53 units at a trickle: past the year 9999, as good as never
        return None


@dataclass(frozen=True)
class PeriodExecutions:
    executions: int
    successes: int
    failures: int
    output_units: int
    failed_cost_usd: Decimal


def period_executions(*, agent: Agent, clock: PeriodClock) -> PeriodExecutions:
    """This period's executions of the agent, with the cost of the failed ones. One aggregate query."""
    row = Execution.objects.filter(
        agent=agent, created_at__gte=clock.start, created_at__lt=clock.end
    ).aggregate(
        executions=Count("id"),
        successes=Count("id", filter=Q(success=True)),
        failures=Count("id", filter=Q(success=False)),
        output=Sum("output_units", filter=Q(success=True)),
        failed_cost=Sum("cost_usd", filter=Q(success=False)),
    )
    return PeriodExecutions(
        executions=row["executions"],
        successes=row["successes"],
        failures=row["failures"],
        output_units=row["output"] or 0,
        failed_cost_usd=row["failed_cost"] or Decimal(0),
    )


# --- Metrics --------------------------------------------------------------------------------------------


def spend_forecast(
    *, spent_usd: Decimal, window_spend_usd: Decimal, window_start: dt.datetime, clock: PeriodClock
) -> dict:
    """The forecast spend at period end (see the module docstring) from the spend in the window that
    starts at ``forecast_window_start(clock)`` and ends now."""
    window_us = microseconds(clock.now - window_start)
    projected_rest = scaled(window_spend_usd, clock.remaining_us, window_us) if window_us > 0 else Decimal(0)
    return {
        "forecast_usd": money_round(spent_usd + projected_rest),
        "window_start": window_start,
        "window_spend_usd": money_round(window_spend_usd),
    }


def forecast_window_start(clock: PeriodClock) -> dt.datetime:
    return max(clock.now - FORECAST_WINDOW, clock.start)


@dataclass(frozen=True)
class AgentActivity:
    """What ``agent_metrics`` reads besides the quota rows."""

    window_stats: dict | None  # the agent's ``execution_stats`` over the window; None if it ran nothing
    window_durations: dict[int, Decimal]  # ``duration_percentiles`` (50, 95) over the window
    period_successes: int  # successful executions this period
    forecast_spend_usd: Decimal  # usage-log cost from ``forecast_window_start`` to now


# ``agent_activity`` in one statement: one pass over the agent's executions of the window and of the period
# (the agent's time index), with the percentiles as ordered-set aggregates, and the forecast window's spend
# as a subquery over the usage rollups and the raw rows of the window's edges (``optimization.rollups``).
# The same figures as ``execution_stats``, ``duration_percentiles`` and ``period_executions`` give, which a
# test checks; it saves the ORM building four queries and three round trips on every ``/metrics`` (about
# half the endpoint's time on a slow machine, docs/benchmarks.md).
_SPEND_CTES, _SPEND_PARTS, _ = window_sql(
    UsageWindow(
        dt.datetime.min.replace(tzinfo=dt.UTC), dt.datetime.max.replace(tzinfo=dt.UTC), include_end=True
    ),
    name="spend",
    where="agent_id = %(agent)s",
)
_ACTIVITY_SQL = f"""
WITH {_SPEND_CTES}
SELECT count(*) FILTER (WHERE e.in_window),
       count(*) FILTER (WHERE e.in_window AND e.success),
       count(*) FILTER (WHERE e.in_window AND NOT e.success),
       sum(e.output_units) FILTER (WHERE e.in_window AND e.success),
       sum(e.cost_usd) FILTER (WHERE e.in_window),
       percentile_cont(0.5) WITHIN GROUP (ORDER BY e.duration_ms) FILTER (WHERE e.in_window),
       percentile_cont(0.95) WITHIN GROUP (ORDER BY e.duration_ms) FILTER (WHERE e.in_window),
       count(*) FILTER (WHERE e.in_period AND e.success),
       (SELECT sum(spend_parts.cost_usd) FROM ({_SPEND_PARTS}) spend_parts)
FROM (
    SELECT x.success, x.duration_ms, x.output_units, x.cost_usd,
           x.created_at >= %(since)s AND x.created_at < %(now)s AS in_window,
           x.created_at >= %(period_start)s AND x.created_at < %(period_end)s AS in_period
    FROM "{Execution._meta.db_table}" x
    WHERE x.agent_id = %(agent)s AND x.created_at >= %(read_from)s AND x.created_at < %(read_to)s
) e
"""


def agent_activity(*, agent: Agent, since: dt.datetime, clock: PeriodClock) -> AgentActivity:
    """The agent's executions over [since, now) and this period, and its spend over the forecast window,
    in one statement."""
    spend_since = forecast_window_start(clock)
    params = {
        "agent": agent.id,
        "now": clock.now,
        "since": since,
        "period_start": clock.start,
        "period_end": clock.end,
        "read_from": min(since, clock.start),
        "read_to": max(clock.now, clock.end),
        **window_sql(UsageWindow(spend_since, clock.now, include_end=True), name="spend")[2],
    }
    with connection.cursor() as cursor:
        cursor.execute(_ACTIVITY_SQL, params)
        executions, successes, failures, output, cost, p50, p95, period_successes, spend = cursor.fetchone()
    hours = Decimal((clock.now - since).total_seconds()) / 3600
    return AgentActivity(
        window_stats=execution_figures(
            executions=executions,
            successes=successes,
            failures=failures,
            output=output,
            cost=cost,
            hours=hours,
        )
        if executions
        else None,
        # percentile_cont skips null durations: null when no execution of the window has one.
        window_durations={50: percentile_value(p50), 95: percentile_value(p95)} if p50 is not None else {},
        period_successes=period_successes,
        forecast_spend_usd=spend or Decimal(0),
    )


def agent_metrics(
    *, agent: Agent, window_hours: int = DEFAULT_WINDOW_HOURS, now: dt.datetime | None = None
) -> dict:
    """Current counters, performance over the last ``window_hours`` and this period's cost with a forecast."""
    analytics_ensure_enabled()
    if isinstance(window_hours, bool) or not isinstance(window_hours, int):
        raise LedgerError("window_hours must be a whole number", code="invalid_window")
    if not 1 <= window_hours <= MAX_WINDOW_HOURS:
        raise LedgerError(f"window_hours must be between 1 and {MAX_WINDOW_HOURS}", code="invalid_window")
    clock = PeriodClock.at(now)
    snapshots = resource_snapshots(agent=agent, clock=clock)

    since = clock.now - dt.timedelta(hours=window_hours)
    activity = agent_activity(agent=agent, since=since, clock=clock)
    stats, durations = activity.window_stats, activity.window_durations
    performance = {
        "window_hours": window_hours,
        "window_start": since,
        "window_end": clock.now,
        "executions": stats["executions"] if stats else 0,
        "successes": stats["successes"] if stats else 0,
        "failures": stats["failures"] if stats else 0,
        "p50_duration_ms": durations.get(50),
        "p95_duration_ms": durations.get(95),
        "error_rate_percent": stats["error_rate_percent"] if stats else None,
        "throughput_per_hour": stats["throughput_per_hour"] if stats else Decimal("0.00"),
    }

    by_resource = {s.resource_type: money_round(s.spent_usd) for s in snapshots}
    total = sum(by_resource.values(), money_round(Decimal(0)))
    budget = agent.monthly_budget_usd
    forecast = spend_forecast(
        spent_usd=total,
        window_spend_usd=activity.forecast_spend_usd,
        window_start=forecast_window_start(clock),
        clock=clock,
    )
    successes = activity.period_successes
    cost = {
        "period_start": clock.start,
        "period_end": clock.end,
        "by_resource_type": by_resource,
        "total_usd": total,
        "monthly_budget_usd": budget,
        "budget_utilization_percent": percent(total, budget),
        "forecast_period_end_usd": forecast["forecast_usd"],
        "forecast_budget_utilization_percent": percent(forecast["forecast_usd"], budget),
        "forecast_window_start": forecast["window_start"],
        "forecast_window_spend_usd": forecast["window_spend_usd"],
        "successful_executions": successes,
        "cost_per_successful_task_usd": money_round(total / successes) if successes else None,
    }

    return {
        "agent_id": agent.id,
        "generated_at": clock.now,
        "current": {
            s.resource_type: {
                "used": s.used,
                "limit": s.limit,
                "reserved": s.reserved,
                "listed": s.listed,
                "available": max(s.available, 0),
                "utilization_percent": s.utilization_percent,
            }
            for s in snapshots
        },
        "performance": performance,
        "cost": cost,
    }


# --- Analysis -------------------------------------------------------------------------------------------


def bottlenecks_find(
    *, snapshots: list[ResourceSnapshot], burn: dict[str, int], clock: PeriodClock
) -> list[dict]:
    """Resources at or over 80 % / 90 %, or forecast to run out before the period ends; critical first."""
    found = []
    for snapshot in snapshots:
        if snapshot.limit <= 0:
            continue
        utilization = snapshot.utilization_percent
        units_24h = burn.get(snapshot.resource_type, 0)
        runs_out_at = exhaustion_at(available=snapshot.available, units_24h=units_24h, now=clock.now)
        runs_out_in_period = runs_out_at is not None and runs_out_at < clock.end
        reasons = []
        severity = None
        if utilization >= CRITICAL_PERCENT:
            severity, reasons = "critical", ["utilization_critical"]
        elif utilization >= WARNING_PERCENT:
            severity, reasons = "warning", ["utilization_warning"]
        if runs_out_in_period:
            severity = severity or "warning"
            reasons.append("projected_exhaustion")
        if severity is None:
            continue
        found.append(
            {
                "resource_type": snapshot.resource_type,
                "severity": severity,
                "reasons": reasons,
                "utilization_percent": utilization,
                "used": snapshot.used,
                "reserved": snapshot.reserved,
                "limit": snapshot.limit,
                "available": max(snapshot.available, 0),
                "used_last_24h": units_24h,
                "burn_rate_per_hour": scaled(units_24h, 1, 24, CENT),
                "projected_exhaustion_at": runs_out_at,
                "runs_out_before_period_end": runs_out_in_period,
            }
        )
    found.sort(key=lambda item: (item["severity"] != "critical", -item["utilization_percent"]))
    return found


def tier_efficiency(*, tier_id: str, clock: PeriodClock) -> dict[str, dict]:
    """agent -> output units, spend and output per dollar this period, for the tier's agents that have both
    an execution and some spend. Two GROUP BY queries, however many agents the tier has."""
    outputs = {
        row["agent_id"]: row["output"] or 0
        for row in Execution.objects.filter(
            agent__tier_id=tier_id, created_at__gte=clock.start, created_at__lt=clock.end
        )
        .values("agent_id")
        .annotate(output=Sum("output_units", filter=Q(success=True)))
        .order_by()
    }
    spends = (
        Quota.objects.filter(agent__tier_id=tier_id, period_start=clock.start)
        .values("agent_id")
        .annotate(total=Sum("spent_usd"))
        .values_list("agent_id", "total")
        .order_by()
    )
    result = {}
    for agent_id, spend in spends:
        if agent_id in outputs and spend and spend > 0:
            with localcontext() as context:
                context.prec = 60
                value = Decimal(outputs[agent_id]) / spend
            result[agent_id] = {
                "output_units": outputs[agent_id],
                "spend_usd": spend,
                "output_per_usd": value,
            }
    return result


def efficiency_measure(*, agent: Agent, clock: PeriodClock) -> dict:
    """The efficiency score with the numbers behind it (see the module docstring)."""
    peers = tier_efficiency(tier_id=agent.tier_id, clock=clock)
    mine = peers.get(agent.id)
    best = max((peer["output_per_usd"] for peer in peers.values()), default=None)
    if mine is None:
        score = None
    elif not best:
        score = Decimal("0.00")  # every agent of the tier produced nothing: no one is better
    else:
        with localcontext() as context:
            context.prec = 60
            score = cents(100 * mine["output_per_usd"] / best)
    return {
        "score": score,
        "tier": agent.tier_id,
        "output_units": mine["output_units"] if mine else None,
        "spend_usd": money_round(mine["spend_usd"]) if mine else None,
        "output_per_usd": mine["output_per_usd"].quantize(RATIO_QUANTUM) if mine else None,
        "tier_best_output_per_usd": best.quantize(RATIO_QUANTUM) if best is not None else None,
        "tier_agents_compared": len(peers),
    }


def efficiency_score(*, agent: Agent, now: dt.datetime | None = None) -> Decimal | None:
    """The agent's efficiency score (0-100) this period; None when it has no spend or no execution, or when
    analytics is switched off (for pages that show it beside other things)."""
    if not settings.ENABLE_PERFORMANCE_ANALYTICS:
        return None
    return efficiency_measure(agent=agent, clock=PeriodClock.at(now))["score"]


def optimization_actions_derive(*, bottlenecks: list[dict], recommendations: list[dict]) -> list[dict]:
    """A short to-do list: the high and medium recommendations, then bottlenecks that no recommendation
    addresses (a resource running out with no tier, deal, grant or team-mate that relieves it). At most
    five."""
    actions = [
        {
            "type": item["type"],
            "priority": item["priority"],
            "resource_type": item["resource_type"],
            "summary": item["rationale"],
        }
        for item in recommendations
        if item["priority"] in ("high", "medium")
    ]
    relieved = {
        item["resource_type"]
        for item in recommendations
        if item["type"] in ("upgrade_tier", "buy_deal", "grant_quota", "share_from_teammate")
    }
    if any(item["type"] == "upgrade_tier" for item in recommendations):
        relieved |= {item["resource_type"] for item in bottlenecks}
    for item in bottlenecks:
        if item["resource_type"] in relieved:
            continue
        when = item["projected_exhaustion_at"]
        summary = f"{item['resource_type']} is at {item['utilization_percent']}% of its limit"
        if when is not None:
            summary += f" and runs out at {when.isoformat()} at the last 24 hours' rate"
        actions.append(
            {
                "type": "relieve_bottleneck",
                "priority": "high" if item["severity"] == "critical" else "medium",
                "resource_type": item["resource_type"],
                "summary": summary + ": slow it down, or ask an operator for more quota",
            }
        )
    actions.sort(key=lambda action: action["priority"] != "high")
    return actions[:5]


def agent_analysis(*, agent: Agent, now: dt.datetime | None = None) -> dict:
    """Bottlenecks, the efficiency score relative to the tier, and what to do about them."""
    from optimization.services.recommendations import agent_recommendations

    analytics_ensure_enabled()
    clock = PeriodClock.at(now)
    snapshots = resource_snapshots(agent=agent, clock=clock)
    burn = burn_last_24h(agent=agent, now=clock.now)
    bottlenecks = bottlenecks_find(snapshots=snapshots, burn=burn, clock=clock)
    recommendations = agent_recommendations(agent=agent, now=clock.now)
    efficiency = efficiency_measure(agent=agent, clock=clock)
    return {
        "agent_id": agent.id,
        "generated_at": clock.now,
        "period_start": clock.start,
        "period_end": clock.end,
        "bottlenecks": bottlenecks,
        "efficiency_score": efficiency["score"],
        "efficiency": efficiency,
        "optimization_actions": optimization_actions_derive(
            bottlenecks=bottlenecks, recommendations=recommendations
        ),
    }

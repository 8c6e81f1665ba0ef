"""What the resource monitor shows, assembled from the same selectors and services as the API.

Every function returns plain JSON-ready data (money as strings), so the page's first render and its polling
endpoint show exactly the same figures.
"""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal

from django.db import connection
from django.urls import reverse
from django.utils import timezone

from ledger.budgets import budget_figures, budgets_applying
from ledger.models import Agent, Budget, Quota, ResourceType, Tier
from ledger.money import cents, money_text, percent
from ledger.periods import month_bounds
from ledger.services import quotas_open_all
from optimization import selectors
from optimization.models import Alert, FleetUsageRollup, ScalingEvent, UsageRollup
from optimization.rollups import UsageWindow, usage_totals
from optimization.services.analytics import efficiency_score
from optimization.services.recommendations import recommendations_for
from optimization.services.scaling import scaling_policy_resolve
from optimization.services.trends import degradation

WARNING_PERCENT = Decimal("80")
CRITICAL_PERCENT = Decimal("90")
PERFORMANCE_WINDOW = dt.timedelta(hours=24)


def _level(value: Decimal | None) -> str:
    if value is None:
        return "ok"
    if value >= CRITICAL_PERCENT:
        return "critical"
    if value >= WARNING_PERCENT:
        return "warning"
    return "ok"


def resource_url(agent_id: str) -> str:
    return f"{reverse('dashboard:resources')}?agent={agent_id}"


# --- Fleet ----------------------------------------------------------------------------------------------


# The latest scaling events shown are those of the last month: the read stays within the newest partitions.
RECENT_SCALING = dt.timedelta(days=31)
# The tier table counts each (tier, status) exactly up to this many agents and estimates beyond it (from
# PostgreSQL's statistics, by EXPLAIN): the page never counts a whole fleet row by row.
EXACT_COUNT_CAP = 10_000
# The budgets nearest their limits are found among those that crossed an alert threshold this month: the
# newest this many budget alerts, read by their time index, whatever the number of budgets.
NEAREST_ALERTS_READ = 500
NEAREST_SHOWN = 10

_CELL_COUNT_SQL = f"""
SELECT t.code, s.status,
       (SELECT count(*) FROM (SELECT 1 FROM "{Agent._meta.db_table}" a
                              WHERE a.tier_id = t.code AND a.status = s.status LIMIT %(cap)s) capped)
FROM "{Tier._meta.db_table}" t CROSS JOIN unnest(%(statuses)s::text[]) AS s(status)
"""


def _estimated_agents(*, tier: str, status: str) -> int:
    """The planner's estimate of a (tier, status) count: EXPLAIN reads statistics, not rows."""
    sql, params = Agent.objects.filter(tier_id=tier, status=status).values("pk").query.sql_with_params()
    with connection.cursor() as cursor:
        cursor.execute(f"EXPLAIN (FORMAT JSON) {sql}", params)
        plan = cursor.fetchone()[0]
    plan = json.loads(plan) if isinstance(plan, str) else plan
    return int(plan[0]["Plan"]["Plan Rows"])


def agent_counts() -> dict:
    """Agents by tier and status: exact up to ``EXACT_COUNT_CAP`` per cell, estimated beyond (``≈``)."""
    statuses = list(Agent.Status.values)
    cap = EXACT_COUNT_CAP + 1
    with connection.cursor() as cursor:
        cursor.execute(_CELL_COUNT_SQL, {"cap": cap, "statuses": statuses})
        cells = {(tier, status): n for tier, status, n in cursor.fetchall()}
    tiers, total, estimated_total = [], 0, False
    for tier in Tier.objects.values_list("code", flat=True):
        counts, row_total, row_estimated = {}, 0, False
        for status in statuses:
            n = cells.get((tier, status), 0)
            estimated = n >= cap
            if estimated:
                n = max(_estimated_agents(tier=tier, status=status), EXACT_COUNT_CAP)
            counts[status] = {"count": n, "estimated": estimated}
            row_total += n
            row_estimated = row_estimated or estimated
        tiers.append({"tier": tier, "counts": counts, "total": row_total, "estimated": row_estimated})
        total += row_total
        estimated_total = estimated_total or row_estimated
    return {"statuses": statuses, "tiers": tiers, "total": total, "estimated": estimated_total}


def _linear_forecast(*, spent: Decimal, start: dt.datetime, end: dt.datetime, now: dt.datetime) -> Decimal:
    """The period's spend if the rest of it goes at the pace so far."""
    elapsed = max((now - start).total_seconds(), 1.0)
    return spent * Decimal((end - start).total_seconds()) / Decimal(elapsed)


def fleet_spend(*, now: dt.datetime) -> dict:
    """The fleet's spend this period, per day, and the forecast at that pace, from the fleet's daily
    rollups (``FleetUsageRollup``): one query of at most a row per day and resource type, however many
    agents. The figures are those of the rollups' last upkeep run (every five minutes)."""
    start, end = month_bounds(now)
    days = [(start + dt.timedelta(days=i)).date() for i in range((now.date() - start.date()).days + 1)]
    rows = FleetUsageRollup.objects.filter(
        granularity=UsageRollup.Granularity.DAY,
        period_start=start,
    ).values_list("bucket_start", "cost_usd")
    per_day: dict[dt.date, Decimal] = {}
    for bucket_start, cost in rows:
        # A settlement made just after the period ended belongs to it: it counts on the last day shown.
        key = min(max(bucket_start.astimezone(dt.UTC).date(), days[0]), days[-1])
        per_day[key] = per_day.get(key, Decimal(0)) + cost
    spent = sum(per_day.values(), Decimal(0))
    return {
        "period_start": start.date().isoformat(),
        "period_end": (end - dt.timedelta(days=1)).date().isoformat(),
        "spent_usd": str(cents(spent)),
        "forecast_usd": str(cents(_linear_forecast(spent=spent, start=start, end=end, now=now))),
        "days": [{"day": day.isoformat(), "spent_usd": str(cents(per_day.get(day, 0)))} for day in days],
    }


def budgets_nearest_limits(*, now: dt.datetime) -> list[dict]:
    """The budgets nearest their limits, among those that alerted this month (a budget below its first
    threshold is not near its limit): bounded reads whatever the size of the fleet."""
    start, _ = month_bounds(now)
    recent = (
        Alert.objects.filter(kind=Alert.Kind.BUDGET, created_at__gte=start)
        .order_by("-created_at")
        .values_list("data", flat=True)[:NEAREST_ALERTS_READ]
    )
    budget_ids = {row.get("budget_id") for row in recent if isinstance(row, dict) and row.get("budget_id")}
    rows = []
    for budget in Budget.objects.filter(pk__in=budget_ids):
        if budget.expires_at is not None and budget.expires_at <= now:
            continue
        row = _budget_row(budget, now=now)
        rows.append((Decimal(row["percent"] or 0), row))
    rows.sort(key=lambda item: (item[1]["refusing"], item[0]), reverse=True)
    shown = []
    for _, row in rows[:NEAREST_SHOWN]:
        agent_id = row["scope_id"] if row["scope"] in ("agent", "run") else None
        row["agent_id"] = agent_id
        row["url"] = None if agent_id is None else resource_url(agent_id)
        shown.append(row)
    return shown


def fleet_overview(*, now: dt.datetime | None = None) -> dict:
    """The fleet page. A fixed number of bounded queries, whatever the number of agents: no query reads
    every agent, quota or budget row (tests/test_dashboard.py proves it with EXPLAIN)."""
    now = now or timezone.now()
    counts = agent_counts()
    spend = fleet_spend(now=now)
    return {
        "generated_at": now.isoformat(),
        "statuses": counts["statuses"],
        "tiers": counts["tiers"],
        "total_agents": counts["total"],
        "total_estimated": counts["estimated"],
        "spend": spend,
        "budgets_nearest": budgets_nearest_limits(now=now),
        "open_alerts": [_alert(alert) for alert in Alert.objects.filter(acknowledged_at__isnull=True)[:20]],
        "scaling_events": [
            _scaling_event(event)
            for event in ScalingEvent.objects.filter(created_at__gte=now - RECENT_SCALING)[:20]
        ],
    }


# --- One agent ------------------------------------------------------------------------------------------


def _alert(alert: Alert) -> dict:
    return {
        "id": alert.pk,
        "agent_id": alert.agent_id,
        # A team's or an organization's budget alert has no agent (and no monitor page) of its own.
        "url": None if alert.agent_id is None else resource_url(alert.agent_id),
        "kind": alert.kind,
        "severity": alert.severity,
        "title": alert.title,
        "message": alert.message,
        "created_at": alert.created_at.isoformat(),
    }


def _scaling_event(event: ScalingEvent) -> dict:
    return {
        "agent_id": event.agent_id,
        "url": resource_url(event.agent_id),
        "direction": event.direction,
        "kind": event.kind,
        "trigger": event.trigger,
        "resource_type": event.resource_type_id,
        "before": event.before,
        "after": event.after,
        "reason": event.reason,
        "created_at": event.created_at.isoformat(),
    }


def _exhaustion(quota: Quota, now: dt.datetime) -> str | None:
    """When the quota runs out at the last 24 hours' burn rate, if that is before the period ends."""
    since = now - dt.timedelta(hours=24)
    totals = usage_totals(
        windows={"burn": UsageWindow(since, now)},
        group_by=(),
        where="agent_id = %(agent)s AND resource_type_id = %(resource_type)s AND period_start = %(period)s",
        params={
            "agent": quota.agent_id,
            "resource_type": quota.resource_type_id,
            "period": quota.period_start,
        },
    )
    burned = totals["burn",].units if ("burn",) in totals else 0
    if burned <= 0 or quota.available <= 0:
        return now.isoformat() if quota.available <= 0 and quota.limit > 0 else None
    at = now + dt.timedelta(hours=24 * quota.available / burned)
    return at.isoformat() if at < quota.period_end else None


def gauges(*, agent: Agent, now: dt.datetime) -> list[dict]:
    result = []
    for quota in sorted(quotas_open_all(agent=agent, at=now), key=lambda q: q.resource_type.display_order):
        value = percent(quota.used + quota.reserved, quota.limit) if quota.limit else None
        result.append(
            {
                "resource_type": quota.resource_type_id,
                "unit": quota.resource_type.unit,
                "used": quota.used,
                "reserved": quota.reserved,
                "limit": quota.limit,
                "available": quota.available,
                "percent": None if value is None else str(value),
                "level": _level(value),
                "exhaustion_at": _exhaustion(quota, now),
            }
        )
    return result


def cost_chart(*, agent: Agent, now: dt.datetime) -> dict:
    """Cumulative spend per day this period by resource type, the budget line and a straight forecast."""
    start, end = month_bounds(now)
    codes = list(ResourceType.objects.values_list("code", flat=True))
    days = [(start + dt.timedelta(days=i)).date() for i in range((end - start).days)]
    today = now.date()
    # The period's rows, by the period they are charged to: a settlement made just after the period ended
    # belongs to it (and counts on its last day), as in /cost and the budgets. Read from the daily and hourly
    # rollups, with raw rows only where they are not complete yet (``optimization.rollups``).
    daily: dict[tuple[dt.date, str], Decimal] = {}
    totals = usage_totals(
        windows={"period": UsageWindow(start)},
        group_by=("day", "resource_type_id"),
        where="agent_id = %(agent)s AND period_start = %(period)s",
        params={"agent": agent.pk, "period": start},
    )
    for (_, day, code), figures in totals.items():
        key = (min(day, days[-1]), code)
        daily[key] = daily.get(key, Decimal(0)) + figures.cost_usd
    series = []
    for code in codes:
        running = Decimal(0)
        points = []
        for day in days:
            if day > today:
                break
            running += Decimal(daily.get((day, code)) or 0)
            points.append(str(cents(running)))
        series.append({"name": code, "points": points})
    spent = sum((Decimal(value or 0) for value in daily.values()), Decimal(0))
    forecast_total = _linear_forecast(spent=spent, start=start, end=end, now=now)
    return {
        "days": [day.isoformat() for day in days],
        "today_index": min((today - start.date()).days, len(days) - 1),
        "series": series,
        "budget_usd": None if agent.monthly_budget_usd is None else str(agent.monthly_budget_usd),
        "spent_usd": str(cents(spent)),
        "forecast_usd": str(cents(forecast_total)),
    }


def _budget_row(budget: Budget, *, now: dt.datetime) -> dict:
    figures = budget_figures(budget, now=now)
    available = budget.limit_usd + figures.rollover_usd
    used = percent(figures.spent_usd + figures.reserved_usd, available) if available else None
    hard = budget.mode == Budget.Mode.HARD
    # A hard budget with nothing left refuses every call that costs anything; one that refused a call
    # (refused_at, cleared once it has room again) may still fit smaller calls, and is flagged too.
    refusing = hard and (figures.remaining_usd <= 0 or budget.refused_at is not None)
    return {
        "id": budget.pk,
        "scope": budget.scope,
        "scope_id": budget.scope_id,
        "window": budget.window,
        "mode": budget.mode,
        "managed": budget.managed,
        "window_start": figures.window_start.isoformat(),
        "window_end": None if figures.window_end is None else figures.window_end.isoformat(),
        "expires_at": None if budget.expires_at is None else budget.expires_at.isoformat(),
        "limit_usd": money_text(budget.limit_usd),
        "spent_usd": money_text(figures.spent_usd),
        "reserved_usd": money_text(figures.reserved_usd),
        "rollover_usd": money_text(figures.rollover_usd),
        "remaining_usd": money_text(figures.remaining_usd),
        "percent": None if used is None else str(used),
        "refused_at": None if budget.refused_at is None else budget.refused_at.isoformat(),
        "refusing": refusing,
        "level": "critical" if refusing else _level(used),
    }


def budgets(*, agent: Agent, now: dt.datetime) -> list[dict]:
    """Every budget that applies to the agent's calls now (its own, its team's, its organization's, its
    runs that have not ended), with the current window's figures as the next call would find them."""
    return [_budget_row(budget, now=now) for budget in budgets_applying(agent=agent, now=now)]


def budget_outlook(*, cost: dict, budgets: list[dict], now: dt.datetime) -> dict:
    """The page's headline: whether this period's spend, at its pace so far, passes the monthly budget, and
    the day the budget runs out at that pace; a refusing budget comes first. ``level`` is ok, warning or
    critical; ``message`` says it in words."""
    refusing = [row for row in budgets if row["refusing"]]
    if refusing:
        row = refusing[0]
        return {
            "level": "critical",
            "message": f"The {row['window']} budget of {row['scope']} {row['scope_id']} is refusing calls: "
            f"{format_money(row['remaining_usd'])} left of {format_money(row['limit_usd'])}.",
            "runs_out_on": None,
        }
    if cost["budget_usd"] is None:
        return {
            "level": "ok",
            "message": f"No monthly budget set. Forecast {format_money(cost['forecast_usd'])} "
            f"by {format_date(cost['days'][-1])} at the pace so far.",
            "runs_out_on": None,
        }
    budget, spent, forecast = (Decimal(cost[key]) for key in ("budget_usd", "spent_usd", "forecast_usd"))
    start, end = month_bounds(now)
    if spent >= budget:
        return {
            "level": "critical",
            "message": f"Over budget: spent {format_money(spent)} of the {format_money(budget)} monthly "
            "budget.",
            "runs_out_on": None,
        }
    if forecast > budget:
        # At the pace so far the budget is used up after budget/spent of the time elapsed.
        runs_out = start + (now - start) * float(budget / spent)
        day = format_date(runs_out.date().isoformat())
        return {
            "level": "critical",
            "message": f"Forecast {format_money(forecast)} is over the {format_money(budget)} monthly "
            f"budget: at this pace the budget runs out on {day}.",
            "runs_out_on": runs_out.date().isoformat() if runs_out < end else None,
        }
    if forecast * 100 >= budget * WARNING_PERCENT:
        return {
            "level": "warning",
            "message": f"Forecast {format_money(forecast)} is {percent(forecast, budget)}% of the "
            f"{format_money(budget)} monthly budget.",
            "runs_out_on": None,
        }
    return {
        "level": "ok",
        "message": f"On track: forecast {format_money(forecast)} of the {format_money(budget)} monthly "
        "budget.",
        "runs_out_on": None,
    }


def format_money(value: Decimal | str) -> str:
    """Money as the page shows it everywhere: "$1,234.56" (to the cent)."""
    return f"${cents(Decimal(value)):,}"


def format_date(day: str | dt.date) -> str:
    """A day as the page shows it everywhere: ISO 8601, "2026-12-06"."""
    return day if isinstance(day, str) else day.isoformat()


# The longest range the daily table shows: a year of days, read from the agent's daily rollups.
MAX_RANGE_DAYS = 366


def spend_range(*, agent: Agent, since: dt.date, until: dt.date) -> dict:
    """Spend per day by resource type over [since, until] (UTC days, both included), from the rollups (and
    the raw rows of the edges they do not cover yet, ``optimization.rollups``). One statement."""
    start = dt.datetime.combine(since, dt.time(), tzinfo=dt.UTC)
    end = dt.datetime.combine(until + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)
    totals = usage_totals(
        windows={"range": UsageWindow(start, end)},
        group_by=("day", "resource_type_id"),
        where="agent_id = %(agent)s",
        params={"agent": agent.pk},
    )
    codes = list(ResourceType.objects.order_by("display_order", "code").values_list("code", flat=True))
    cells: dict[tuple[dt.date, str], Decimal] = {}
    for (_, day, code), figures in totals.items():
        cells[(day, code)] = cells.get((day, code), Decimal(0)) + figures.cost_usd
    days = []
    for offset in range((until - since).days + 1):
        day = since + dt.timedelta(days=offset)
        by_type = {code: cells.get((day, code), Decimal(0)) for code in codes}
        days.append(
            {
                "day": day.isoformat(),
                "total_usd": str(cents(sum(by_type.values(), Decimal(0)))),
                "by_type": {code: str(cents(value)) for code, value in by_type.items()},
            }
        )
    total = sum(cells.values(), Decimal(0))
    export = reverse("dashboard:usage-csv")
    return {
        "since": since.isoformat(),
        "until": until.isoformat(),
        "resource_types": codes,
        "days": days,
        "total_usd": str(cents(total)),
        "csv_url": f"{export}?agent={agent.pk}&since={since.isoformat()}&until={until.isoformat()}",
    }


def default_range(*, now: dt.datetime) -> tuple[dt.date, dt.date]:
    """This period so far: the first of the month to today."""
    return month_bounds(now)[0].date(), now.date()


def performance(*, agent: Agent, now: dt.datetime) -> dict:
    since = now - PERFORMANCE_WINDOW
    stats = selectors.execution_stats(since=since, until=now, agent_ids=[agent.pk]).get(agent.pk, {})
    pct = selectors.duration_percentiles(since=since, until=now, agent_ids=[agent.pk]).get(agent.pk, {})
    efficiency = efficiency_score(agent=agent, now=now)
    return {
        "window_hours": int(PERFORMANCE_WINDOW.total_seconds() // 3600),
        "executions": stats.get("executions", 0),
        "p50_ms": None if 50 not in pct else str(pct[50]),
        "p95_ms": None if 95 not in pct else str(pct[95]),
        "throughput_per_hour": None
        if stats.get("throughput_per_hour") is None
        else str(stats["throughput_per_hour"]),
        "error_rate_percent": None
        if stats.get("error_rate_percent") is None
        else str(stats["error_rate_percent"]),
        "efficiency_score": None if efficiency is None else str(efficiency),
    }


def recommendations(*, agent: Agent, now: dt.datetime) -> list[dict]:
    return recommendations_for(agent=agent, now=now)


def agent_monitor(
    *,
    agent: Agent,
    now: dt.datetime | None = None,
    since: dt.date | None = None,
    until: dt.date | None = None,
) -> dict:
    now = now or timezone.now()
    policy = scaling_policy_resolve(agent=agent)
    default_since, default_until = default_range(now=now)
    cost = cost_chart(agent=agent, now=now)
    applying = budgets(agent=agent, now=now)
    return {
        "agent": {
            "id": agent.pk,
            "name": agent.name,
            "tier": agent.tier_id,
            "status": agent.status,
            "status_reason": agent.status_reason,
            "instance_count": agent.instance_count,
            "min_instances": agent.min_instances,
            "max_instances": agent.max_instances,
            "monthly_budget_usd": None if agent.monthly_budget_usd is None else str(agent.monthly_budget_usd),
            "team_id": agent.team_id,
            "autoscaling_enabled": bool(policy and policy.enabled),
        },
        "generated_at": now.isoformat(),
        "outlook": budget_outlook(cost=cost, budgets=applying, now=now),
        "gauges": gauges(agent=agent, now=now),
        "budgets": applying,
        "cost": cost,
        "range": spend_range(agent=agent, since=since or default_since, until=until or default_until),
        # The last hour against the 7 days before it: p95 duration, error rate and throughput.
        "degradation": degradation(agent_id=agent.pk, now=now),
        "performance": performance(agent=agent, now=now),
        "alerts": [_alert(alert) for alert in agent.alerts.filter(acknowledged_at__isnull=True)[:50]],
        "scaling_events": [
            _scaling_event(event)
            for event in agent.scaling_events.filter(created_at__gte=now - RECENT_SCALING)[:20]
        ],
        "recommendations": recommendations(agent=agent, now=now),
    }

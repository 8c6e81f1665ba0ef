"""What the resource monitor shows, assembled from the same selectors and services as the API.

Every function returns plain JSON-ready data (money as strings), so the page's first render and its polling
endpoint show exactly the same figures.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

from django.db.models import Count
from django.urls import reverse
from django.utils import timezone

from ledger.budgets import budget_figures, budgets_applying
from ledger.models import Agent, Budget, Quota, ResourceType, Tier
from ledger.money import cents, money_round, money_text, percent
from ledger.periods import month_bounds
from ledger.services import quotas_open_all
from optimization import selectors
from optimization.models import Alert, ScalingEvent
from optimization.rollups import UsageWindow, usage_totals
from optimization.services.analytics import efficiency_score
from optimization.services.recommendations import recommendations_for
from optimization.services.scaling import scaling_policy_resolve

WARNING_PERCENT = Decimal("80")
CRITICAL_PERCENT = Decimal("90")
PERFORMANCE_WINDOW = dt.timedelta(hours=24)


def _money(value: Decimal | None) -> str | None:
    return None if value is None else f"{money_round(Decimal(value)):f}"


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


def fleet_overview(*, now: dt.datetime | None = None) -> dict:
    now = now or timezone.now()
    by_tier_status = {
        (row["tier_id"], row["status"]): row["n"]
        for row in Agent.objects.values("tier_id", "status").annotate(n=Count("id")).order_by()
    }
    statuses = list(Agent.Status.values)
    tiers = [
        {
            "tier": tier,
            "counts": {status: by_tier_status.get((tier, status), 0) for status in statuses},
            "total": sum(by_tier_status.get((tier, status), 0) for status in statuses),
        }
        for tier in Tier.objects.values_list("code", flat=True)
    ]
    spend = selectors.period_spend(now=now)
    top = sorted(spend.items(), key=lambda item: item[1], reverse=True)[:10]
    utilization = selectors.max_resource_utilization(now=now)
    budgets = selectors.budget_utilization(now=now)
    nearest = []
    for agent_id in set(utilization) | set(budgets):
        resource, resource_pct = utilization.get(agent_id, (None, None))
        budget_pct = budgets.get(agent_id, {}).get("percent")
        worst = max(value for value in (resource_pct, budget_pct, Decimal(-1)) if value is not None)
        nearest.append((worst, agent_id, resource, resource_pct, budget_pct))
    nearest.sort(reverse=True)
    return {
        "statuses": statuses,
        "tiers": tiers,
        "total_agents": sum(row["total"] for row in tiers),
        "top_spenders": [
            {"agent_id": agent_id, "spent_usd": _money(value), "url": resource_url(agent_id)}
            for agent_id, value in top
        ],
        "nearest_limits": [
            {
                "agent_id": agent_id,
                "url": resource_url(agent_id),
                "resource_type": resource,
                "resource_percent": None if resource_pct is None else str(resource_pct),
                "budget_percent": None if budget_pct is None else str(budget_pct),
                "level": _level(worst),
            }
            for worst, agent_id, resource, resource_pct, budget_pct in nearest[:10]
        ],
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
    elapsed = max((now - start).total_seconds(), 1.0)
    forecast_total = spent * Decimal((end - start).total_seconds()) / Decimal(elapsed)
    return {
        "days": [day.isoformat() for day in days],
        "today_index": min((today - start.date()).days, len(days) - 1),
        "series": series,
        "budget_usd": None if agent.monthly_budget_usd is None else str(agent.monthly_budget_usd),
        "spent_usd": str(cents(spent)),
        "forecast_usd": str(cents(forecast_total)),
    }


def budgets(*, agent: Agent, now: dt.datetime) -> list[dict]:
    """Every budget that applies to the agent's calls now (its own, its team's, its organization's, its
    runs that have not ended), with the current window's figures as the next call would find them."""
    result = []
    for budget in budgets_applying(agent=agent, now=now):
        figures = budget_figures(budget, now=now)
        available = budget.limit_usd + figures.rollover_usd
        used = percent(figures.spent_usd + figures.reserved_usd, available) if available else None
        hard = budget.mode == Budget.Mode.HARD
        # A hard budget with nothing left refuses every call that costs anything; one that refused a call
        # (refused_at, cleared once it has room again) may still fit smaller calls, and is flagged too.
        refusing = hard and (figures.remaining_usd <= 0 or budget.refused_at is not None)
        result.append(
            {
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
        )
    return result


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


def agent_monitor(*, agent: Agent, now: dt.datetime | None = None) -> dict:
    now = now or timezone.now()
    policy = scaling_policy_resolve(agent=agent)
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
        "gauges": gauges(agent=agent, now=now),
        "budgets": budgets(agent=agent, now=now),
        "cost": cost_chart(agent=agent, now=now),
        "performance": performance(agent=agent, now=now),
        "alerts": [_alert(alert) for alert in agent.alerts.filter(acknowledged_at__isnull=True)[:50]],
        "scaling_events": [
            _scaling_event(event)
            for event in agent.scaling_events.filter(created_at__gte=now - RECENT_SCALING)[:20]
        ],
        "recommendations": recommendations(agent=agent, now=now),
    }

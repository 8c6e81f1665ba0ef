"""Demo data for ``make run``: an admin login and a few agents with realistic usage over the past weeks.

Idempotent: an agent that already exists is left alone, so running the loader again changes nothing.
"""

from __future__ import annotations

import datetime as dt
import random
from decimal import Decimal

from django.contrib.auth import get_user_model
from django.db import transaction
from django.db.models import Sum
from django.db.models.functions import Coalesce
from django.utils import timezone

from ledger.budgets import agent_team_set, budget_create, organization_create, team_create
from ledger.models import Agent, Budget, Organization, Quota, UsageLog
from ledger.money import usage_cost
from ledger.periods import month_bounds
from ledger.selectors import base_limits, prices_in_effect
from ledger.services import agent_create

DEMO_ADMIN_USERNAME = "admin"
DEMO_ADMIN_PASSWORD = "admin"  # a local demo login, printed by `make run`; never created in production
DEMO_DAYS = 21

# agent id, tier, monthly budget, share of each limit used in the current period, custom limits
DEMO_AGENTS: list[tuple[str, str, Decimal | None, float, dict[str, int]]] = [
    ("agent-123", "PRO", Decimal("60.00"), 0.72, {}),
    ("agent-456", "FREE", Decimal("5.00"), 0.92, {}),
    ("agent-789", "ENTERPRISE", Decimal("400.00"), 0.35, {}),
    (
        "agent-research",
        "CUSTOM",
        Decimal("120.00"),
        0.55,
        {
            "COMPUTE_MS": 7_200_000,
            "AI_TOKENS": 5_000_000,
            "STORAGE_KB": 20_971_520,
            "NETWORK_REQS": 20_000,
            "SOLANA_LAMPORTS": 5_000_000,
        },
    ),
]
SUPERPOWERS = ["data_analysis", "web_research", "code_review", "token_swap", "summarize"]


def demo_admin_ensure() -> bool:
    User = get_user_model()
    if User.objects.filter(username=DEMO_ADMIN_USERNAME).exists():
        return False
    User.objects.create_superuser(DEMO_ADMIN_USERNAME, "admin@axiom.local", DEMO_ADMIN_PASSWORD)
    return True


def _demo_calls(
    lo: dt.datetime, hi: dt.datetime, daily: float, rng: random.Random
) -> list[tuple[dt.datetime, float]]:
    """A few calls a day between ``lo`` and ``hi`` (busier on weekdays): ``(time, amount)``, the amounts
    about ``daily`` a day. Every time is in ``[lo, hi)``."""
    calls: list[tuple[dt.datetime, float]] = []
    day_start = lo
    while day_start < hi:
        day_end = min(day_start + dt.timedelta(days=1), hi)
        weight = 1.25 if day_start.weekday() < 5 else 0.4
        share_of_day = (day_end - day_start) / dt.timedelta(days=1)
        count = rng.randint(2, 6)
        for _ in range(count):
            at = day_start + (day_end - day_start) * rng.random()
            calls.append((at, daily * share_of_day * weight / count * rng.uniform(0.6, 1.4)))
        day_start = day_end
    return calls


def _demo_usage(agent: Agent, share: float, now: dt.datetime, rng: random.Random) -> None:
    """``share`` of each limit used in the current period, spread from its start (or from ``DEMO_DAYS``
    ago, if later) up to ``now``, whatever the day of the month; the days of the demo weeks that fall in
    the previous period get the same daily rate as a full month at that share would."""
    limits = base_limits(agent=agent)
    prices = prices_in_effect(at=now)
    rows: list[UsageLog] = []
    first_day = now - dt.timedelta(days=DEMO_DAYS)
    current_start, current_end = month_bounds(now)
    previous_start, previous_end = month_bounds(first_day)
    for resource_type_id, limit in limits.items():
        price = prices[resource_type_id]
        periods = [(current_start, current_end, max(first_day, current_start), now)]
        if first_day < current_start:
            periods.append((previous_start, previous_end, first_day, current_start))
        for period_start, period_end, lo, hi in periods:
            if period_start == current_start:
                calls = _demo_calls(lo, hi, 1.0, rng)
                target = int(limit * share)
                raw_total = sum(amount for _, amount in calls) or 1.0
                # Scaled so that the period holds exactly ``share`` of the limit on any day of the month.
                amounts = [int(amount * target / raw_total) for _, amount in calls]
                amounts[-1] += target - sum(amounts)
            else:
                calls = _demo_calls(lo, hi, limit * share / 30, rng)
                amounts = [int(amount) for _, amount in calls]
            used = sum(amount for amount in amounts if amount > 0)
            if used == 0:
                continue
            quota, _ = Quota.objects.get_or_create(
                agent=agent,
                resource_type_id=resource_type_id,
                period_start=period_start,
                defaults={"period_end": period_end, "base_limit": limit, "limit": limit},
            )
            used = min(used, quota.limit)
            taken = 0
            spent = Decimal(0)
            for (at, _), amount in sorted(zip(calls, amounts, strict=True), key=lambda pair: pair[0][0]):
                amount = min(amount, used - taken)
                if amount <= 0:
                    continue
                taken += amount
                spent += usage_cost(amount, price)
                rows.append(
                    UsageLog(
                        agent=agent,
                        resource_type_id=resource_type_id,
                        quota=quota,
                        amount=amount,
                        unit_price_usd=price,
                        cost_usd=usage_cost(amount, price),
                        task_id=f"demo-{rng.randrange(10**6):06d}",
                        kind=UsageLog.Kind.ALLOCATION,
                        metadata={"superpower": rng.choice(SUPERPOWERS), "demo": True},
                        created_at=at,
                        period_start=quota.period_start,
                    )
                )
            Quota.objects.filter(pk=quota.pk).update(used=taken, spent_usd=spent)
    UsageLog.objects.bulk_create(rows, batch_size=1000)


DEMO_ORGANIZATION = "demo-org"
DEMO_TEAMS = {"demo-research": ["agent-123", "agent-research"], "demo-ops": ["agent-456", "agent-789"]}


@transaction.atomic
def demo_data_load(*, now: dt.datetime | None = None) -> dict[str, int]:
    """Create the demo admin and the demo agents that are missing, each with three weeks of usage."""
    now = now or timezone.now()
    created = {"admin": int(demo_admin_ensure()), "agents": 0}
    for agent_id, tier, budget, share, custom_limits in DEMO_AGENTS:
        if Agent.objects.filter(id=agent_id).exists():
            continue
        agent = agent_create(
            agent_id=agent_id,
            tier_code=tier,
            name=f"Demo {agent_id}",
            monthly_budget_usd=budget,
            custom_limits=custom_limits,
            metadata={"demo": True},
        )
        # Seeded by the agent id, so every fresh install shows the same history.
        _demo_usage(agent, share, now, random.Random(agent_id))
        # The history was written in bulk: its monthly budget counts this month's part of it.
        Budget.objects.filter(agent=agent, managed=True).update(
            spent_usd=Quota.objects.filter(agent=agent, period_start=month_bounds(now)[0]).aggregate(
                total=Coalesce(Sum("spent_usd"), Decimal(0))
            )["total"]
        )
        created["agents"] += 1
    created["budgets"] = _demo_budgets(now)
    return created


def _demo_budgets(now: dt.datetime) -> int:
    """An organization with two teams and their budgets, once: the admin and the dashboard show them."""
    if Organization.objects.filter(pk=DEMO_ORGANIZATION).exists():
        return 0
    organization_create(id=DEMO_ORGANIZATION, name="Demo organization")
    for team_id, members in DEMO_TEAMS.items():
        team_create(id=team_id, name=f"Demo {team_id}", organization_id=DEMO_ORGANIZATION)
        for agent in Agent.objects.filter(pk__in=members):
            agent_team_set(agent=agent, team_id=team_id)
    budgets = [
        budget_create(
            scope="organization", scope_id=DEMO_ORGANIZATION, window="month", limit_usd="2000", now=now
        ),
        budget_create(scope="team", scope_id="demo-research", window="week", limit_usd="400", now=now),
        budget_create(
            scope="team",
            scope_id="demo-ops",
            window="day",
            limit_usd="40",
            mode="soft",
            rollover_percent=25,
            now=now,
        ),
    ]
    return len(budgets)


__all__ = ["demo_data_load"]

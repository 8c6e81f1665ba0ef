"""Demo data for ``make run``: an admin login and a few agents with realistic usage over the past weeks.

Idempotent: an agent that already exists is left alone, so running the loader again changes nothing.
"""

from __future__ import annotations

import datetime as dt
import random
from collections import defaultdict
from decimal import Decimal

from django.contrib.auth import get_user_model
from django.db import transaction
from django.utils import timezone

from ledger.models import Agent, Quota, UsageLog
from ledger.money import usage_cost
from ledger.periods import month_bounds
from ledger.selectors import base_limits, prices_in_effect
from ledger.services import agent_create

DEMO_ADMIN_USERNAME = "admin"
DEMO_ADMIN_PASSWORD = "admin"  # a local demo login, printed by `make run`; never created in production
DEMO_DAYS = 21

# agent id, tier, monthly budget, share of each limit to use over the demo weeks, custom limits
DEMO_AGENTS: list[tuple[str, str, Decimal | None, float, dict[str, int]]] = [
    ("agent-123", "PRO", Decimal("60.00"), 0.72, {}),
    ("agent-456", "FREE", Decimal("5.00"), 0.88, {}),
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


def _demo_usage(agent: Agent, share: float, now: dt.datetime, rng: random.Random) -> None:
    limits = base_limits(agent=agent)
    prices = prices_in_effect(at=now)
    rows: list[UsageLog] = []
    used_by_period: dict[tuple[str, dt.datetime], int] = defaultdict(int)
    spent_by_period: dict[tuple[str, dt.datetime], Decimal] = defaultdict(Decimal)
    quotas: dict[tuple[str, dt.datetime], Quota] = {}
    first_day = now - dt.timedelta(days=DEMO_DAYS)
    for resource_type_id, limit in limits.items():
        # Spread share * limit over the demo weeks in a few calls a day, busier on weekdays.
        daily = limit * share / DEMO_DAYS
        for day in range(DEMO_DAYS):
            day_start = first_day + dt.timedelta(days=day)
            weight = 1.25 if day_start.weekday() < 5 else 0.4
            calls = rng.randint(2, 6)
            for _ in range(calls):
                amount = int(daily * weight / calls * rng.uniform(0.6, 1.4))
                if amount <= 0:
                    continue
                at = day_start + dt.timedelta(seconds=rng.randint(0, 86_399))
                start, end = month_bounds(at)
                key = (resource_type_id, start)
                if key not in quotas:
                    quotas[key] = Quota.objects.get_or_create(
                        agent=agent,
                        resource_type_id=resource_type_id,
                        period_start=start,
                        defaults={"period_end": end, "base_limit": limit, "limit": limit},
                    )[0]
                if used_by_period[key] + amount > limit:
                    continue
                used_by_period[key] += amount
                spent_by_period[key] += usage_cost(amount, prices[resource_type_id])
                rows.append(
                    UsageLog(
                        agent=agent,
                        resource_type_id=resource_type_id,
                        quota=quotas[key],
                        amount=amount,
                        unit_price_usd=prices[resource_type_id],
                        cost_usd=usage_cost(amount, prices[resource_type_id]),
                        task_id=f"demo-{rng.randrange(10**6):06d}",
                        kind=UsageLog.Kind.ALLOCATION,
                        metadata={"superpower": rng.choice(SUPERPOWERS), "demo": True},
                        created_at=at,
                    )
                )
    UsageLog.objects.bulk_create(rows, batch_size=1000)
    for key, used in used_by_period.items():
        Quota.objects.filter(pk=quotas[key].pk).update(used=used, spent_usd=spent_by_period[key])


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
        created["agents"] += 1
    return created


__all__ = ["demo_data_load"]

"""factory_boy factories for the ledger. They expect the reference data (``reference_data`` fixture)."""

from __future__ import annotations

import factory

from ledger.models import Agent, Organization, Team, Tier


class AgentFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Agent
        django_get_or_create = ("id",)

    id = factory.Sequence(lambda n: f"agent-{n:04d}")
    name = factory.LazyAttribute(lambda o: f"Agent {o.id}")
    tier = factory.LazyFunction(lambda: Tier.objects.get(code="PRO"))


class OrganizationFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Organization
        django_get_or_create = ("id",)

    id = factory.Sequence(lambda n: f"org-{n:04d}")
    name = factory.LazyAttribute(lambda o: f"Organization {o.id}")


class TeamFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Team
        django_get_or_create = ("id",)

    id = factory.Sequence(lambda n: f"team-{n:04d}")
    name = factory.LazyAttribute(lambda o: f"Team {o.id}")
    organization = None


def fleet_create(
    prefix: str,
    count: int,
    *,
    at,
    tier: str = "PRO",
    resource_type: str = "AI_TOKENS",
    used: int = 0,
    spent: str = "0",
    budget: str | None = None,
    **agent_fields,
) -> list[str]:
    """``count`` agents named ``{prefix}-0000``... with one quota of ``resource_type`` in the period of
    ``at``, from the tier's limit, ``used`` and ``spent`` already taken. Written in bulk: the fleet is a
    test's setup, not what it tests, and a sweep over 1,000 agents must not take 1,000 service calls to
    set up. Returns the agent ids."""
    from decimal import Decimal

    from ledger.models import Quota, TierQuota
    from ledger.periods import month_bounds

    start, end = month_bounds(at)
    limit = TierQuota.objects.get(tier_id=tier, resource_type_id=resource_type).limit
    ids = [f"{prefix}-{i:04d}" for i in range(count)]
    Agent.objects.bulk_create(
        Agent(
            id=agent_id,
            name=agent_id,
            tier_id=tier,
            monthly_budget_usd=Decimal(budget) if budget is not None else None,
            **agent_fields,
        )
        for agent_id in ids
    )
    Quota.objects.bulk_create(
        Quota(
            agent_id=agent_id,
            resource_type_id=resource_type,
            period_start=start,
            period_end=end,
            base_limit=limit,
            limit=limit,
            used=used,
            spent_usd=Decimal(spent),
        )
        for agent_id in ids
    )
    return ids

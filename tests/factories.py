"""factory_boy factories for the ledger. They expect the reference data (``reference_data`` fixture)."""

from __future__ import annotations

import factory

from ledger.models import Agent, Tier


class AgentFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Agent
        django_get_or_create = ("id",)

    id = factory.Sequence(lambda n: f"agent-{n:04d}")
    name = factory.LazyAttribute(lambda o: f"Agent {o.id}")
    tier = factory.LazyFunction(lambda: Tier.objects.get(code="PRO"))

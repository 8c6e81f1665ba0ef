"""Read queries of the ledger that more than one place needs."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

from django.db.models import Sum
from django.utils import timezone

from ledger.models import Agent, AgentLimitOverride, Quota, ResourcePrice, TierQuota
from ledger.money import COST_QUANTUM
from ledger.periods import month_bounds


def prices_in_effect(*, at: dt.datetime | None = None) -> dict[str, Decimal]:
    """Every resource type's list price at ``at`` (now by default), in one query."""
    at = at or timezone.now()
    prices: dict[str, Decimal] = {}
    for resource_type_id, unit_price in ResourcePrice.objects.in_effect(at).values_list(
        "resource_type_id", "unit_price_usd"
    ):
        prices.setdefault(resource_type_id, unit_price)
    return prices


def price_in_effect(*, resource_type_id: str, at: dt.datetime | None = None) -> Decimal | None:
    return (
        ResourcePrice.objects.in_effect(at or timezone.now())
        .filter(resource_type_id=resource_type_id)
        .values_list("unit_price_usd", flat=True)
        .first()
    )


def base_limits(*, agent: Agent) -> dict[str, int]:
    """The agent's monthly limits before grants: the tier's, replaced where the agent has an override."""
    limits = dict(TierQuota.objects.filter(tier_id=agent.tier_id).values_list("resource_type_id", "limit"))
    limits.update(AgentLimitOverride.objects.filter(agent=agent).values_list("resource_type_id", "limit"))
    return limits


def current_quotas(*, agent: Agent, at: dt.datetime | None = None):
    start, _ = month_bounds(at or timezone.now())
    return Quota.objects.filter(agent=agent, period_start=start).select_related("resource_type")


def quota_reconciliation(*, quota: Quota) -> dict[str, int]:
    """What the counters of ``quota`` should be, recomputed from the append-only rows behind them."""
    from ledger.models import UsageLog

    # A usage row's agent and resource type are its quota's (the composite foreign key): naming them lets
    # the (agent, resource type, time) index find the rows, as usage_logs has no index on quota_id alone.
    rows = UsageLog.objects.filter(
        agent_id=quota.agent_id, resource_type_id=quota.resource_type_id, quota=quota
    )
    used = rows.filter(kind__in=UsageLog.CONSUMPTION_KINDS).aggregate(total=Sum("amount"))["total"] or 0
    # SQLite sums decimals as floats: quantize back to the ledger's precision.
    spent = (rows.aggregate(total=Sum("cost_usd"))["total"] or Decimal(0)).quantize(COST_QUANTUM)
    granted = quota.grants.aggregate(total=Sum("amount"))["total"] or 0
    return {"used": used, "limit": quota.base_limit + granted, "spent_usd": spent}


class _PriceTable:
    """Every price row, cached per process for a few seconds: the allocation hot path reads the price in
    effect without a query. Saving a price clears the cache in this process; other processes see it within
    ``ttl`` seconds, so price changes are best scheduled with an ``effective_from`` a little ahead."""

    ttl = 30.0

    def __init__(self) -> None:
        self._rows: dict[str, list[tuple[dt.datetime, Decimal]]] | None = None
        self._loaded_at = 0.0

    def clear(self) -> None:
        self._rows = None

    def unit_price(self, resource_type_id: str, at: dt.datetime) -> Decimal | None:
        import time

        if self._rows is None or time.monotonic() - self._loaded_at > self.ttl:
            rows: dict[str, list[tuple[dt.datetime, Decimal]]] = {}
            for code, effective_from, price in ResourcePrice.objects.order_by(
                "resource_type_id", "-effective_from"
            ).values_list("resource_type_id", "effective_from", "unit_price_usd"):
                rows.setdefault(code, []).append((effective_from, price))
            self._rows, self._loaded_at = rows, time.monotonic()
        for effective_from, price in self._rows.get(resource_type_id, ()):
            if effective_from <= at:
                return price
        return None


price_table = _PriceTable()

"""Read queries of the ledger that more than one place needs."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from decimal import Decimal

from django.db.models import Q, Sum
from django.utils import timezone

from ledger.invariants import MAX_HOLD_TTL_SECONDS
from ledger.models import Agent, AgentLimitOverride, Quota, ResourcePrice, UsageLog
from ledger.periods import month_bounds
from ledger.reference_cache import tier_limits


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
    """The agent's monthly limits before grants: the tier's (from the reference cache), replaced where the
    agent has an override."""
    limits = dict(tier_limits(agent.tier_id))
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
    # Its rows are written from the period's start until its last hold ends (a hold lives at most
    # MAX_HOLD_TTL_SECONDS): the time bound keeps the read to the period's partitions.
    rows = UsageLog.objects.filter(
        agent_id=quota.agent_id,
        resource_type_id=quota.resource_type_id,
        quota=quota,
        created_at__gte=quota.period_start,
        created_at__lt=quota.period_end + dt.timedelta(seconds=MAX_HOLD_TTL_SECONDS),
    )
    used = rows.filter(kind__in=UsageLog.CONSUMPTION_KINDS).aggregate(total=Sum("amount"))["total"] or 0
    spent = rows.aggregate(total=Sum("cost_usd"))["total"] or Decimal(0)
    granted = quota.grants.aggregate(total=Sum("amount"))["total"] or 0
    return {"used": used, "limit": quota.base_limit + granted, "spent_usd": spent}


def usage_log_chunks(
    *,
    since: dt.datetime,
    until: dt.datetime,
    columns: tuple[str, ...],
    chunk_size: int,
    agent_id: str | None = None,
    resource_type_id: str | None = None,
) -> Iterator[list[dict]]:
    """The usage rows created in [``since``, ``until``), oldest first (by ``created_at``, then ``id``), as
    ``values(*columns)`` dicts in lists of at most ``chunk_size``; ``agent_id`` and ``resource_type_id``
    narrow them.

    Keyset pagination: each chunk is one short query that starts after the last row of the chunk before,
    on the (agent, time), (agent, type, time) or (time) index, so a month of a busy fleet is never in
    memory at once. Between chunks nothing stays open on the server: a server-side cursor would keep a
    transaction (and its snapshot, which holds back vacuum) open for as long as a slow reader takes, and
    does not survive a pooler in transaction mode. The log is append-only and each row carries the time it
    was written, so a range that ended before the writes in flight began reads the same rows whichever way
    it is cut into chunks.
    """
    if "created_at" not in columns or "id" not in columns:
        raise ValueError("the chunks' keys, created_at and id, must be among the columns")
    rows = UsageLog.objects.filter(created_at__gte=since, created_at__lt=until)
    if agent_id is not None:
        rows = rows.filter(agent_id=agent_id)
    if resource_type_id is not None:
        rows = rows.filter(resource_type_id=resource_type_id)
    rows = rows.order_by("created_at", "id").values(*columns)
    chunk = list(rows[:chunk_size])
    while chunk:
        yield chunk
        if len(chunk) < chunk_size:
            return
        last_time, last_id = chunk[-1]["created_at"], chunk[-1]["id"]
        # (created_at, id) > (last_time, last_id), written so that the index bounds the scan by time.
        later = rows.filter(created_at__gte=last_time).filter(Q(created_at__gt=last_time) | Q(id__gt=last_id))
        chunk = list(later[:chunk_size])


# Every quota period whose counters disagree with the usage log: it should return no rows. The README shows
# it to operators; tests run it.
RECONCILIATION_SQL = """
SELECT q.id, q.agent_id, q.resource_type_id, q.period_start, q.used, q.spent_usd
FROM quotas q
LEFT JOIN usage_logs u ON u.quota_id = q.id
GROUP BY q.id
HAVING q.used <> coalesce(sum(u.amount) FILTER (WHERE u.kind IN ('allocation', 'settlement', 'execution')), 0)
    OR q.spent_usd <> coalesce(sum(u.cost_usd), 0);
""".strip()

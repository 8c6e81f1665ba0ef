"""The allocation engine: quota checks, allocations, holds, sharing and cost.

Quota is taken with one conditional UPDATE (``used + reserved + n <= limit``) whose row count says whether
it fitted, and the usage row is written in the same transaction. PostgreSQL serializes the writers on the
quota row, so no interleaving of concurrent allocations can overspend; the CHECK constraints on ``quotas``
back this up. A refused operation raises a ``LedgerError`` and writes nothing.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from decimal import Decimal

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Case, F, Sum, Value, When
from django.utils import timezone

from allocation.models import Allocation
from ledger.errors import (
    AgentSuspended,
    AgentThrottled,
    Conflict,
    FeatureDisabled,
    LedgerError,
    NotFound,
    QuotaExceeded,
)
from ledger.models import Agent, Grant, Quota, ResourceType, UsageLog
from ledger.money import COST_QUANTUM, percent, usage_cost
from ledger.periods import month_bounds
from ledger.selectors import price_table
from ledger.services import quota_open, quotas_open_all

MAX_AMOUNT = 2**53  # the largest whole number every JSON client can represent exactly
DEFAULT_HOLD_TTL = dt.timedelta(minutes=15)
MAX_HOLD_TTL = dt.timedelta(days=7)

_TAKE_USED_SQL = """
UPDATE quotas SET used = used + %s, spent_usd = spent_usd + %s, updated_at = %s
WHERE agent_id = %s AND resource_type_id = %s AND period_start = %s
  AND used + reserved + listed + %s <= limit_amount
RETURNING id
"""
_TAKE_RESERVED_SQL = """
UPDATE quotas SET reserved = reserved + %s, spent_usd = spent_usd + %s, updated_at = %s
WHERE agent_id = %s AND resource_type_id = %s AND period_start = %s
  AND used + reserved + listed + %s <= limit_amount
RETURNING id
"""


@dataclass(frozen=True)
class QuotaCheck:
    allowed: bool
    available: int
    reason: str


def _ensure_resource_type(resource_type_id: str) -> None:
    if resource_type_id not in resource_type_codes():
        raise LedgerError(f"unknown resource type {resource_type_id!r}", code="unknown_resource_type")


_resource_type_codes: frozenset[str] | None = None


def resource_type_codes() -> frozenset[str]:
    """The resource type codes; they are reference data that only a deploy changes, so cache them."""
    global _resource_type_codes
    if _resource_type_codes is None:
        _resource_type_codes = frozenset(ResourceType.objects.values_list("code", flat=True))
    return _resource_type_codes


def resource_type_codes_clear() -> None:
    global _resource_type_codes
    _resource_type_codes = None


def _ensure_amount(amount: int, *, allow_zero: bool = False) -> None:
    if not isinstance(amount, int) or isinstance(amount, bool):
        raise LedgerError("amount must be a whole number of units", code="invalid_amount")
    if amount < (0 if allow_zero else 1) or amount > MAX_AMOUNT:
        raise LedgerError(
            f"amount must be between {0 if allow_zero else 1} and 2^53",
            code="invalid_amount",
            details={"amount": amount},
        )


def _ensure_can_allocate(agent: Agent) -> None:
    if agent.status == Agent.Status.SUSPENDED:
        raise AgentSuspended(f"agent {agent.id} is suspended", details={"reason": agent.status_reason})
    if agent.status == Agent.Status.THROTTLED:
        raise AgentThrottled(
            f"agent {agent.id} is throttled: allocations are refused until it is lifted",
            details={"reason": agent.status_reason},
        )


def _unit_price(resource_type_id: str, at: dt.datetime) -> Decimal:
    price = price_table.unit_price(resource_type_id, at)
    if price is None:
        raise LedgerError(f"{resource_type_id} has no price in effect", code="no_price", status=409)
    return price


def _take(
    *, agent: Agent, resource_type_id: str, amount: int, cost: Decimal, hold: bool, now: dt.datetime
) -> int:
    """Take ``amount`` into ``used`` (or ``reserved`` for a hold) of the current period; return the quota id.

    The first allocation of a period finds no row, opens the period from the agent's base limit and tries
    once more. Raises ``QuotaExceeded`` when it does not fit.
    """
    period_start, _ = month_bounds(now)
    sql = _TAKE_RESERVED_SQL if hold else _TAKE_USED_SQL
    params = [
        amount,
        connection.ops.adapt_decimalfield_value(cost, 28, 12),
        connection.ops.adapt_datetimefield_value(now),
        agent.pk,
        resource_type_id,
        connection.ops.adapt_datetimefield_value(period_start),
        amount,
    ]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
        if row is None:
            quota = quota_open(agent=agent, resource_type_id=resource_type_id, at=now)
            cursor.execute(sql, params)
            row = cursor.fetchone()
            if row is None:
                raise QuotaExceeded(
                    f"{amount:,} {resource_type_id} requested, {max(quota.available, 0):,} available",
                    details={
                        "resource_type": resource_type_id,
                        "requested": amount,
                        "available": max(quota.available, 0),
                    },
                )
    return row[0]


def quota_check(*, agent: Agent, resource_type_id: str, amount: int) -> QuotaCheck:
    """Would ``amount`` fit now? Changes nothing (a throttled agent may still ask)."""
    _ensure_resource_type(resource_type_id)
    _ensure_amount(amount)
    start, _ = month_bounds(timezone.now())
    quota = Quota.objects.filter(agent=agent, resource_type_id=resource_type_id, period_start=start).first()
    if quota is None:
        from ledger.selectors import base_limits

        available = base_limits(agent=agent).get(resource_type_id, 0)
    else:
        available = max(quota.available, 0)
    if agent.status == Agent.Status.SUSPENDED:
        return QuotaCheck(False, available, "agent_suspended")
    if agent.status == Agent.Status.THROTTLED:
        return QuotaCheck(False, available, "agent_throttled")
    if amount > available:
        return QuotaCheck(False, available, "quota_exceeded")
    return QuotaCheck(True, available, "ok")


def allocation_create(
    *,
    agent: Agent,
    resource_type_id: str,
    amount: int,
    task_id: str = "",
    hold: bool = False,
    hold_ttl_seconds: int | None = None,
    idempotency_key: str = "",
    kind: str = UsageLog.Kind.ALLOCATION,
    metadata: dict | None = None,
    now: dt.datetime | None = None,
) -> Allocation:
    """Commit ``amount`` at once (usage row written) or hold it until settled, released or expired."""
    _ensure_resource_type(resource_type_id)
    _ensure_amount(amount)
    _ensure_can_allocate(agent)
    now = now or timezone.now()
    expires_at = None
    if hold:
        ttl = DEFAULT_HOLD_TTL if hold_ttl_seconds is None else dt.timedelta(seconds=hold_ttl_seconds)
        if not dt.timedelta(seconds=1) <= ttl <= MAX_HOLD_TTL:
            raise LedgerError("hold_ttl_seconds must be between 1 and 604800", code="invalid_hold_ttl")
        expires_at = now + ttl
    unit_price = _unit_price(resource_type_id, now)
    cost = Decimal(0) if hold else usage_cost(amount, unit_price)
    with transaction.atomic():
        quota_id = _take(
            agent=agent, resource_type_id=resource_type_id, amount=amount, cost=cost, hold=hold, now=now
        )
        allocation = Allocation(
            agent=agent,
            resource_type_id=resource_type_id,
            quota_id=quota_id,
            amount=amount,
            unit_price_usd=unit_price,
            cost_usd=cost,
            status=Allocation.Status.HELD if hold else Allocation.Status.COMMITTED,
            task_id=task_id,
            expires_at=expires_at,
        )
        allocation.save(force_insert=True)
        if not hold:
            _usage_write(
                allocation,
                amount=amount,
                kind=kind,
                idempotency_key=idempotency_key,
                metadata=metadata,
                at=now,
            )
    return allocation


def _usage_write(
    allocation: Allocation,
    *,
    amount: int,
    kind: str,
    idempotency_key: str,
    metadata: dict | None,
    at: dt.datetime,
) -> UsageLog:
    return UsageLog.objects.create(
        agent_id=allocation.agent_id,
        resource_type_id=allocation.resource_type_id,
        quota_id=allocation.quota_id,
        amount=amount,
        unit_price_usd=allocation.unit_price_usd,
        cost_usd=usage_cost(amount, allocation.unit_price_usd),
        task_id=allocation.task_id,
        kind=kind,
        idempotency_key=idempotency_key,
        metadata={"allocation_id": str(allocation.pk), **(metadata or {})},
        created_at=at,
    )


def _open_hold(
    *, agent: Agent, allocation_id, settling: bool = False, now: dt.datetime | None = None
) -> Allocation:
    allocation = Allocation.objects.filter(pk=allocation_id, agent=agent).first()
    if allocation is None:
        raise NotFound(f"allocation {allocation_id} not found")
    if (
        settling
        and allocation.status == Allocation.Status.HELD
        and allocation.expires_at <= (now or timezone.now())
    ):
        # Past its TTL a hold is as good as released, even before the sweep gets to it.
        raise Conflict(
            f"allocation {allocation_id} expired at {allocation.expires_at:%Y-%m-%d %H:%M:%S}Z",
            code="hold_not_open",
            details={"status": "expired"},
        )
    if allocation.status != Allocation.Status.HELD:
        raise Conflict(
            f"allocation {allocation_id} is {allocation.status}, not an open hold",
            code="hold_not_open",
            details={"status": allocation.status},
        )
    return allocation


def hold_settle(
    *, agent: Agent, allocation_id, amount: int, idempotency_key: str = "", now: dt.datetime | None = None
) -> Allocation:
    """Settle a hold at the ``amount`` actually used, charged at the price quoted when it was held.

    Less than the hold: the rest goes back. More: the difference must be available, else ``QuotaExceeded``
    and the hold stays as it was. The hold is claimed with a conditional UPDATE, so a settle racing a
    release or the expiry sweep takes effect at most once.
    """
    _ensure_amount(amount, allow_zero=True)
    now = now or timezone.now()
    allocation = _open_hold(agent=agent, allocation_id=allocation_id, settling=True, now=now)
    held = allocation.amount
    with transaction.atomic():
        claimed = Allocation.objects.filter(pk=allocation.pk, status=Allocation.Status.HELD).update(
            status=Allocation.Status.SETTLED,
            settled_amount=amount,
            cost_usd=usage_cost(amount, allocation.unit_price_usd),
            finished_at=now,
        )
        if not claimed:
            raise Conflict(f"allocation {allocation.pk} is no longer an open hold", code="hold_not_open")
        extra = amount - held
        updated = Quota.objects.filter(
            pk=allocation.quota_id, limit__gte=F("used") + F("reserved") + F("listed") + extra
        ).update(
            reserved=F("reserved") - held,
            used=F("used") + amount,
            spent_usd=F("spent_usd") + usage_cost(amount, allocation.unit_price_usd),
            updated_at=now,
        )
        if not updated:
            quota = Quota.objects.get(pk=allocation.quota_id)
            raise QuotaExceeded(
                f"settling {amount:,} needs {extra:,} more {allocation.resource_type_id} than held; "
                f"{max(quota.available, 0):,} available",
                details={
                    "resource_type": allocation.resource_type_id,
                    "requested": extra,
                    "available": max(quota.available, 0),
                    "held": held,
                },
            )
        if amount:
            _usage_write(
                allocation,
                amount=amount,
                kind=UsageLog.Kind.SETTLEMENT,
                idempotency_key=idempotency_key,
                metadata=None,
                at=now,
            )
    allocation.refresh_from_db()
    return allocation


def hold_release(*, agent: Agent, allocation_id, now: dt.datetime | None = None) -> Allocation:
    """Give an open hold back in full."""
    now = now or timezone.now()
    allocation = _open_hold(agent=agent, allocation_id=allocation_id)
    with transaction.atomic():
        claimed = Allocation.objects.filter(pk=allocation.pk, status=Allocation.Status.HELD).update(
            status=Allocation.Status.RELEASED, finished_at=now
        )
        if not claimed:
            raise Conflict(f"allocation {allocation.pk} is no longer an open hold", code="hold_not_open")
        Quota.objects.filter(pk=allocation.quota_id).update(
            reserved=F("reserved") - allocation.amount, updated_at=now
        )
    allocation.refresh_from_db()
    return allocation


def holds_expire(*, now: dt.datetime | None = None, batch_size: int = 5000) -> int:
    """Release every hold past its expiry. Set-based: a few queries per batch of holds, however many agents.

    Rows are locked with SKIP LOCKED, so a settle in flight keeps its hold and a second sweep running at the
    same time takes other rows; running it twice releases nothing twice.
    """
    now = now or timezone.now()
    expired_total = 0
    while True:
        with transaction.atomic():
            holds = list(
                Allocation.objects.select_for_update(skip_locked=True)
                .filter(status=Allocation.Status.HELD, expires_at__lte=now)
                .order_by("quota_id", "pk")
                .values_list("pk", "quota_id", "amount")[:batch_size]
            )
            if not holds:
                return expired_total
            Allocation.objects.filter(pk__in=[pk for pk, _, _ in holds]).update(
                status=Allocation.Status.EXPIRED, finished_at=now
            )
            per_quota: dict[int, int] = {}
            for _, quota_id, amount in holds:
                per_quota[quota_id] = per_quota.get(quota_id, 0) + amount
            Quota.objects.filter(pk__in=per_quota).update(
                reserved=F("reserved")
                - Case(
                    *[When(pk=pk, then=Value(total)) for pk, total in per_quota.items()], default=Value(0)
                ),
                updated_at=now,
            )
            expired_total += len(holds)
        if len(holds) < batch_size:
            return expired_total


def quota_share(*, source: Agent, target: Agent, resource_type_id: str, amount: int, actor: str) -> dict:
    """Move unused quota of the current period from ``source`` to ``target``, as grants on both sides.

    Both quota rows are locked in primary-key order, so two agents sharing with each other at once cannot
    deadlock; the source can give only what it has available.
    """
    if not settings.ENABLE_COLLABORATION_SHARING:
        raise FeatureDisabled("resource sharing is switched off (ENABLE_COLLABORATION_SHARING)")
    _ensure_resource_type(resource_type_id)
    _ensure_amount(amount)
    if source.pk == target.pk:
        raise LedgerError("an agent cannot share with itself", code="invalid_target")
    if source.status == Agent.Status.SUSPENDED:
        raise AgentSuspended(f"agent {source.id} is suspended")
    if target.status == Agent.Status.SUSPENDED:
        raise LedgerError(f"target agent {target.id} is suspended", code="target_suspended", status=409)
    now = timezone.now()
    with transaction.atomic():
        # Open (insert) and lock the two periods in agent-id order: two agents sharing with each other at
        # once then wait for one another instead of deadlocking, also inside a caller's transaction.
        opened = {
            agent.pk: quota_open(agent=agent, resource_type_id=resource_type_id, at=now)
            for agent in sorted((source, target), key=lambda a: a.pk)
        }
        source_quota, target_quota = opened[source.pk], opened[target.pk]
        locked = {
            quota.pk: quota
            for quota in Quota.objects.select_for_update()
            .filter(pk__in=[source_quota.pk, target_quota.pk])
            .order_by("agent_id")
        }
        source_quota = locked[source_quota.pk]
        if amount > source_quota.available:
            raise QuotaExceeded(
                f"{source.id} has {max(source_quota.available, 0):,} {resource_type_id} unused, "
                f"{amount:,} asked",
                details={
                    "resource_type": resource_type_id,
                    "requested": amount,
                    "available": max(source_quota.available, 0),
                },
            )
        Quota.objects.filter(pk=source_quota.pk).update(limit=F("limit") - amount, updated_at=now)
        Quota.objects.filter(pk=target_quota.pk).update(limit=F("limit") + amount, updated_at=now)
        Grant.objects.bulk_create(
            [
                Grant(
                    quota_id=source_quota.pk,
                    amount=-amount,
                    reason=Grant.Reason.SHARE_OUT,
                    actor=actor,
                    counterparty_agent=target,
                ),
                Grant(
                    quota_id=target_quota.pk,
                    amount=amount,
                    reason=Grant.Reason.SHARE_IN,
                    actor=actor,
                    counterparty_agent=source,
                ),
            ]
        )
    return {
        "resource_type": resource_type_id,
        "amount": amount,
        "source_agent_id": source.id,
        "target_agent_id": target.id,
        "source_available": source_quota.available - amount,
    }


# --- Reading ---------------------------------------------------------------------------------------------


def agent_quotas(*, agent: Agent) -> list[Quota]:
    """The current period's quota of every resource type, opening the ones not used yet."""
    return quotas_open_all(agent=agent)


def agent_cost(*, agent: Agent, now: dt.datetime | None = None) -> dict:
    """This period's spend by resource type, the total, and how much of the monthly budget it is."""
    now = now or timezone.now()
    start, end = month_bounds(now)
    by_type = dict(
        UsageLog.objects.filter(agent=agent, created_at__gte=start, created_at__lt=end)
        .values_list("resource_type_id")
        .annotate(total=Sum("cost_usd"))
        .order_by()
    )
    ordered = list(ResourceType.objects.values_list("code", flat=True))
    zero = Decimal(0).quantize(COST_QUANTUM)
    spend = {code: by_type.get(code, zero).quantize(COST_QUANTUM) for code in ordered}
    total = sum(spend.values(), zero)
    budget = agent.monthly_budget_usd
    return {
        "agent_id": agent.id,
        "period_start": start,
        "period_end": end,
        "by_resource_type": spend,
        "total_usd": total,
        "monthly_budget_usd": budget,
        "budget_utilization_percent": percent(total, budget),
    }


__all__ = [
    "MAX_AMOUNT",
    "QuotaCheck",
    "agent_cost",
    "agent_quotas",
    "allocation_create",
    "hold_release",
    "hold_settle",
    "holds_expire",
    "quota_check",
    "quota_share",
]

"""The allocation engine: quota checks, allocations, holds, sharing and cost.

Quota is taken with a conditional UPDATE whose condition is the capacity rule (``ledger.invariants``), in
the same transaction as the rows it charges; PostgreSQL serializes the writers on the quota row, so no
interleaving of concurrent allocations can overspend, and the CHECK constraint on ``quotas`` backs it up. A
refused operation raises a ``LedgerError`` and writes nothing.

An allocation is the hot path: one call of the ``grid_allocate`` function (``allocation.sql``), one round
trip that writes the allocation, its usage row and the request's records and takes the quota.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from decimal import Decimal

from django.conf import settings
from django.db import transaction
from django.db.models import BooleanField, CharField, F, Q
from django.db.models.expressions import RawSQL
from django.utils import timezone

from allocation import sql
from allocation.models import Allocation
from axiom_grid.observability.metrics import allocation_count, refusal_count
from ledger.budgets import budget_mark_refused, budget_refusal
from ledger.bulk import bulk_update_columns, plan_by_key
from ledger.errors import (
    AgentSuspended,
    BudgetExceeded,
    Conflict,
    FeatureDisabled,
    LedgerError,
    NotFound,
    QuotaExceeded,
)
from ledger.ids import uuid7
from ledger.invariants import (
    agent_ensure_may_allocate,
    amount_validate,
    hold_expires_at,
    quota_fits,
)
from ledger.models import Agent, Budget, Grant, Quota, ResourceType, UsageLog
from ledger.money import money_round, percent, usage_cost
from ledger.periods import month_bounds
from ledger.reference_cache import price_table, resource_type_codes
from ledger.selectors import base_limits
from ledger.services import quota_open, quotas_open_all


@dataclass(frozen=True)
class QuotaCheck:
    allowed: bool
    available: int
    reason: str
    details: dict | None = None

    def body(self) -> dict:
        body = {"allowed": self.allowed, "available": self.available, "reason": self.reason}
        if self.details is not None:
            body["details"] = self.details
        return body


def _ensure_resource_type(resource_type_id: str) -> None:
    if resource_type_id not in resource_type_codes():
        raise LedgerError(f"unknown resource type {resource_type_id!r}", code="unknown_resource_type")


def _unit_price(resource_type_id: str, at: dt.datetime) -> Decimal:
    price = price_table.unit_price(resource_type_id, at)
    if price is None:
        raise LedgerError(f"{resource_type_id} has no price in effect", code="no_price", status=409)
    return price


def quota_check(*, agent: Agent, resource_type_id: str, amount: int, run_id: str = "") -> QuotaCheck:
    """Would ``amount`` fit now, in the quota and in every budget that applies (the run's too, if named)?
    Changes nothing (a throttled agent may still ask)."""
    _ensure_resource_type(resource_type_id)
    amount_validate(amount)
    now = timezone.now()
    available = max(_available_now(agent, resource_type_id, now), 0)
    try:
        agent_ensure_may_allocate(agent_id=agent.pk, status=agent.status, reason=agent.status_reason)
    except LedgerError as refusal:
        return QuotaCheck(False, available, refusal.code)
    if amount > available:
        return QuotaCheck(False, available, "quota_exceeded")
    price = price_table.unit_price(resource_type_id, now)
    cost = usage_cost(amount, price) if price is not None else Decimal(0)
    refusal = budget_refusal(agent=agent, cost=cost, run_id=run_id, now=now)
    if refusal is not None:
        return QuotaCheck(False, available, refusal.code, refusal.details or None)
    return QuotaCheck(True, available, "ok")


@dataclass(frozen=True)
class AllocationDraft:
    """An allocation checked and priced but not written: ``allocation`` already has its id, price, cost and
    creation time, so a caller can shape its response before the statement that writes it."""

    allocation: Allocation
    now: dt.datetime
    kind: str
    idempotency_key: str
    metadata: dict | None


def allocation_prepare(
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
    run_id: str = "",
) -> AllocationDraft:
    """Check the request and price it; no query (prices are cached). ``allocation_write`` takes the quota.

    The agent's status is not read here: ``allocation_write`` checks it in the statement that takes the
    quota, so a throttle or suspension applies to the very next allocation, whatever copy of the agent the
    caller holds.
    """
    _ensure_resource_type(resource_type_id)
    amount_validate(amount)
    now = now or timezone.now()
    expires_at = hold_expires_at(now=now, ttl_seconds=hold_ttl_seconds) if hold else None
    unit_price = _unit_price(resource_type_id, now)
    allocation = Allocation(
        id=uuid7(),
        agent=agent,
        resource_type_id=resource_type_id,
        amount=amount,
        unit_price_usd=unit_price,
        cost_usd=Decimal(0) if hold else usage_cost(amount, unit_price),
        status=Allocation.Status.HELD if hold else Allocation.Status.COMMITTED,
        task_id=task_id,
        run_id=run_id,
        expires_at=expires_at,
        created_at=timezone.now(),  # the wall clock, as auto_now_add would set it, even when ``now`` is given
    )
    return AllocationDraft(
        allocation=allocation, now=now, kind=kind, idempotency_key=idempotency_key, metadata=metadata
    )


def allocation_write(
    draft: AllocationDraft, *, api_key_id: int | None = None, record: dict | None = None
) -> Allocation:
    """Take the quota and write the allocation, its usage row (unless it is a hold) and ``record`` (the
    request's idempotency and audit records, ``allocation.sql.mutation_record_write``'s argument), provided
    the agent is active and the API key ``api_key_id`` (if given) is not revoked.

    One round trip when the period is open; the first allocation of a period opens it and tries once more.
    Each refusal raises its ``LedgerError`` and writes nothing.
    """
    allocation = draft.allocation
    period_start, _ = month_bounds(draft.now)
    row = sql.AllocationRow(
        agent_id=allocation.agent_id,
        resource_type_id=allocation.resource_type_id,
        period_start=period_start,
        amount=allocation.amount,
        hold=allocation.status == Allocation.Status.HELD,
        now=draft.now,
        allocation_id=allocation.id,
        unit_price_usd=allocation.unit_price_usd,
        cost_usd=allocation.cost_usd,
        task_id=allocation.task_id,
        expires_at=allocation.expires_at,
        created_at=allocation.created_at,
        usage_kind=draft.kind,
        usage_idempotency_key=draft.idempotency_key,
        usage_metadata={"allocation_id": str(allocation.pk), **(draft.metadata or {})},
        api_key_id=api_key_id,
        record=record,
        run_id=allocation.run_id,
        quoted_cost_usd=_quoted_cost(allocation),
    )
    try:
        try:
            allocation.quota_id = sql.allocate(row)
        except sql.PeriodNotOpen:
            # Opened in a transaction with the retry, so a refused first allocation leaves no period row.
            with transaction.atomic():
                quota_open(agent=allocation.agent, resource_type_id=allocation.resource_type_id, at=draft.now)
                allocation.quota_id = sql.allocate(row)
    except sql.QuotaShort as short:
        refusal_count(resource_type=allocation.resource_type_id, reason="quota_exceeded")
        raise _quota_exceeded(
            allocation.resource_type_id, requested=allocation.amount, available=short.available, at=draft.now
        ) from None
    except LedgerError as refusal:
        refusal_count(resource_type=allocation.resource_type_id, reason=refusal.code)
        if isinstance(refusal, BudgetExceeded):
            budget_mark_refused(budget_id=refusal.details["budget_id"], now=draft.now)
        raise
    # Every single allocation (the API's, the compat route's, an execution's) is decided here: counted here.
    allocation_count(resource_type=allocation.resource_type_id, held=row.hold, amount=allocation.amount)
    return allocation


def _quoted_cost(allocation: Allocation) -> Decimal:
    """What an allocation costs at its quoted price: a hold reserves it on the budgets until it is settled."""
    return usage_cost(allocation.amount, allocation.unit_price_usd)


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
    run_id: str = "",
) -> Allocation:
    """Commit ``amount`` at once (usage row written) or hold it until settled, released or expired."""
    draft = allocation_prepare(
        agent=agent,
        resource_type_id=resource_type_id,
        amount=amount,
        task_id=task_id,
        hold=hold,
        hold_ttl_seconds=hold_ttl_seconds,
        idempotency_key=idempotency_key,
        kind=kind,
        metadata=metadata,
        now=now,
        run_id=run_id,
    )
    return allocation_write(draft)


def lease_open(
    *,
    agent: Agent,
    resource_type_id: str,
    amount: int,
    ttl_seconds: int | None = None,
    task_id: str = "",
    idempotency_key: str = "",
    run_id: str = "",
    now: dt.datetime | None = None,
) -> Allocation:
    """Hold ``amount`` as a lease: a hold whose client counts its use locally and settles the total.

    It takes quota and budgets exactly as a hold does and is settled or released the same way. It differs
    only when its client never comes back: a plain hold that expires is released, as nothing was used, but
    the units of a lease may all have been used without the grid hearing of it, so an expired lease is
    charged in full (``holds_expire``). Quota is never exceeded, since the whole amount was reserved, and no
    unit a client used goes unbilled. Call inside a transaction: the hold and its mark are one change.
    """
    allocation = allocation_create(
        agent=agent,
        resource_type_id=resource_type_id,
        amount=amount,
        task_id=task_id,
        hold=True,
        hold_ttl_seconds=ttl_seconds,
        idempotency_key=idempotency_key,
        metadata={"lease": True},
        now=now,
        run_id=run_id,
    )
    Allocation.objects.filter(pk=allocation.pk, agent_id=allocation.agent_id).update(lease=True)
    allocation.lease = True
    return allocation


def _quota_exceeded(
    resource_type_id: str, *, requested: int, available: int, at: dt.datetime, **details
) -> QuotaExceeded:
    available = max(available, 0)
    return QuotaExceeded(
        f"{requested:,} {resource_type_id} requested, {available:,} available",
        resets_at=month_bounds(at)[1],
        details={
            "resource_type": resource_type_id,
            "requested": requested,
            "available": available,
            **details,
        },
    )


def _usage_write(
    allocation: Allocation,
    *,
    amount: int,
    kind: str,
    idempotency_key: str,
    metadata: dict | None,
    at: dt.datetime,
    period_start: dt.datetime,
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
        period_start=period_start,
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
    amount_validate(amount, allow_zero=True)
    now = now or timezone.now()
    allocation = _open_hold(agent=agent, allocation_id=allocation_id, settling=True, now=now)
    held = allocation.amount
    with transaction.atomic():
        claimed = Allocation.objects.filter(
            pk=allocation.pk, agent_id=allocation.agent_id, status=Allocation.Status.HELD
        ).update(
            status=Allocation.Status.SETTLED,
            settled_amount=amount,
            cost_usd=usage_cost(amount, allocation.unit_price_usd),
            finished_at=now,
        )
        if not claimed:
            raise Conflict(f"allocation {allocation.pk} is no longer an open hold", code="hold_not_open")
        _budgets_apply(
            allocation,
            now=now,
            spend=usage_cost(amount, allocation.unit_price_usd),
            release=_quoted_cost(allocation),
        )
        extra = amount - held
        quota_row = Quota.objects.filter(pk=allocation.quota_id, agent_id=allocation.agent_id)
        updated = quota_row.filter(quota_fits(extra)).update(
            reserved=F("reserved") - held,
            used=F("used") + amount,
            spent_usd=F("spent_usd") + usage_cost(amount, allocation.unit_price_usd),
            updated_at=now,
        )
        if not updated:
            quota = quota_row.get()
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
            # A settlement belongs to its hold's period, the one whose quota it was just charged to, even
            # when that period has ended since the hold was taken.
            _usage_write(
                allocation,
                amount=amount,
                kind=UsageLog.Kind.SETTLEMENT,
                idempotency_key=idempotency_key,
                metadata=None,
                at=now,
                period_start=quota_row.values_list("period_start", flat=True).get(),
            )
    return Allocation.objects.get(pk=allocation.pk, agent_id=allocation.agent_id)


def _budgets_apply(allocation: Allocation, *, now: dt.datetime, **change: Decimal) -> None:
    """Move a hold's money on the budgets it reserved on (after its row is claimed, before its quota)."""
    try:
        sql.budgets_apply(allocation.budget_ids, now=now, **change)
    except BudgetExceeded as refusal:
        budget_mark_refused(budget_id=refusal.details["budget_id"], now=now)
        raise


def hold_release(*, agent: Agent, allocation_id, now: dt.datetime | None = None) -> Allocation:
    """Give an open hold back in full."""
    now = now or timezone.now()
    allocation = _open_hold(agent=agent, allocation_id=allocation_id)
    with transaction.atomic():
        claimed = Allocation.objects.filter(
            pk=allocation.pk, agent_id=allocation.agent_id, status=Allocation.Status.HELD
        ).update(status=Allocation.Status.RELEASED, finished_at=now)
        if not claimed:
            raise Conflict(f"allocation {allocation.pk} is no longer an open hold", code="hold_not_open")
        _budgets_apply(allocation, now=now, release=_quoted_cost(allocation))
        Quota.objects.filter(pk=allocation.quota_id, agent_id=allocation.agent_id).update(
            reserved=F("reserved") - allocation.amount, updated_at=now
        )
    return Allocation.objects.get(pk=allocation.pk, agent_id=allocation.agent_id)


def holds_expire(*, now: dt.datetime | None = None, batch_size: int = 5000) -> int:
    """End every hold past its expiry: a plain hold is released, a lease charged in full (``lease_open``
    says why). Returns how many holds were ended.

    The expired holds are worked through in batches of ``batch_size`` in the order of their open-hold index
    (expiry, then id), a keyset that goes on after the last hold of the batch before, so each batch reads
    only its own rows and memory is bounded by the batch. Each batch is its own short transaction with a
    fixed number of statements whatever the number of holds, agents and budgets (``_holds_end``): a crash
    loses only the batch in flight, whose holds are still open for the next run.

    Rows are locked with SKIP LOCKED, so a settle in flight keeps its hold (a hold skipped so is ended by
    the next run if it is still open) and a second sweep running at the same time takes other rows; the
    holds are claimed by their status, so running it twice ends nothing twice.
    """
    now = now or timezone.now()
    expired_total = 0
    after: tuple[dt.datetime, object] | None = None
    while True:
        with transaction.atomic():
            plan_by_key()  # every statement of a batch finds its rows by key
            holds = Allocation.objects.filter(status=Allocation.Status.HELD, expires_at__lte=now)
            if after is not None:
                # After the last hold of the batch before, in (expiry, id) order: one row comparison, so the
                # range scan of allocation_open_hold_order_idx starts right after it, also among the holds
                # that share its expiry, not a read of every expired hold again.
                holds = holds.filter(_after_hold(after))
            holds = list(
                # Only the allocation rows are locked here (not the joined quota): budgets come first.
                holds.select_for_update(skip_locked=True, of=("self",))
                .order_by("expires_at", "pk")
                .values(*_EXPIRING)[:batch_size]
            )
            if not holds:
                return expired_total
            _holds_end(holds, now=now)
            expired_total += len(holds)
        if len(holds) < batch_size:
            return expired_total
        after = (holds[-1]["expires_at"], holds[-1]["pk"])


def _after_hold(after: tuple[dt.datetime, object]) -> RawSQL:
    """``(expires_at, id) > (%s, %s)``: the sweep's keyset, as one condition the index answers."""
    table = Allocation._meta.db_table
    return RawSQL(f'("{table}"."expires_at", "{table}"."id") > (%s, %s)', after, output_field=BooleanField())


_EXPIRING = (
    "pk",
    "agent_id",
    "resource_type_id",
    "quota_id",
    "amount",
    "unit_price_usd",
    "task_id",
    "budget_ids",
    "lease",
    "expires_at",
)


# A row's tuple id, as text (``ledger.bulk.bulk_update_columns``'s ``tids``).
_TID = RawSQL("ctid::text", (), output_field=CharField())


def _holds_end(holds: list[dict], *, now: dt.datetime) -> None:
    """Mark ``holds`` expired and move their quota and money: released, or used in full for a lease.

    A fixed number of statements for any batch: the holds (two), the budgets (lock, roll the leases'
    ended windows, charge the leases), the quotas (lock, update) and the leases' usage rows."""
    leases = [hold for hold in holds if hold["lease"]]
    for hold in holds:
        hold["cost"] = usage_cost(hold["amount"], hold["unit_price_usd"])
    # Driven by the batch's ids (a join over unnest probes the primary key once per hold): an IN list of
    # thousands of ids is planned as a scan of the whole partition whenever the batch is a large part of it.
    plain = [hold for hold in holds if not hold["lease"]]
    bulk_update_columns(
        model=Allocation,
        pks=[hold["pk"] for hold in plain],
        columns={"status": [Allocation.Status.EXPIRED] * len(plain), "finished_at": [now] * len(plain)},
    )
    bulk_update_columns(
        model=Allocation,
        pks=[hold["pk"] for hold in leases],
        columns={
            "status": [Allocation.Status.EXPIRED] * len(leases),
            "settled_amount": [hold["amount"] for hold in leases],
            "cost_usd": [hold["cost"] for hold in leases],
            "finished_at": [now] * len(leases),
        },
    )
    reserved: dict[int, int] = {}
    used: dict[int, int] = {}
    spent: dict[int, Decimal] = {}
    budget_release: dict[int, Decimal] = {}
    lease_charges: dict[int, Decimal] = {}
    for hold in holds:
        quota_id, cost = hold["quota_id"], hold["cost"]
        reserved[quota_id] = reserved.get(quota_id, 0) - hold["amount"]
        if hold["lease"]:
            used[quota_id] = used.get(quota_id, 0) + hold["amount"]
            spent[quota_id] = spent.get(quota_id, Decimal(0)) + cost
            for budget_id in set(hold["budget_ids"]):
                lease_charges[budget_id] = lease_charges.get(budget_id, Decimal(0)) + cost
        else:
            for budget_id in hold["budget_ids"]:
                budget_release[budget_id] = budget_release.get(budget_id, Decimal(0)) + cost
    # Budgets before quotas, all of them locked at once in id order: the lock order of every writer
    # (ledger.budgets). A lease's reserved money becomes spent, in the window open now: the leases' budgets
    # whose window has ended are rolled first (nothing added, so nothing to refuse), then each is charged
    # the sum of its leases.
    sql.budgets_release(budget_release, now=now, also_lock=lease_charges)
    if lease_charges:
        budget_ids = sorted(lease_charges)
        sql.budgets_apply(budget_ids, now=now)
        bulk_update_columns(
            model=Budget,
            pks=budget_ids,
            columns={
                "spent_usd": [lease_charges[pk] for pk in budget_ids],
                "reserved_usd": [-lease_charges[pk] for pk in budget_ids],
            },
            add=True,
            touch=now,
        )
    # The quota rows in the order of every writer that locks several of them (QUOTA_LOCK_ORDER): a second
    # sweep (or a share) taking some of the same rows then waits instead of deadlocking.
    quota_ids = sorted(reserved)
    agent_ids = {hold["agent_id"] for hold in holds}
    # Locked and read at once: each hold's period, for a lease's usage row. Not joined into the read of the
    # holds, which would then join every expired hold it scans rather than the batch alone.
    locked = Quota.objects.filter(pk__in=quota_ids, agent_id__in=agent_ids).locked()
    found = {pk: (period, tid) for pk, period, tid in locked.values_list("pk", "period_start", _TID)}
    periods = {pk: period for pk, (period, _tid) in found.items()}
    updated = bulk_update_columns(
        model=Quota,
        pks=quota_ids,
        columns={
            "reserved": [reserved[pk] for pk in quota_ids],
            "used": [used.get(pk, 0) for pk in quota_ids],
            "spent_usd": [spent.get(pk, Decimal(0)) for pk in quota_ids],
        },
        add=True,
        touch=now,
        tids=[found[pk][1] for pk in quota_ids],  # locked just above: found again on their pages
    )
    if updated != len(quota_ids):  # cannot happen while the rows are locked; never end holds half-way
        raise RuntimeError(f"hold expiry updated {updated} of {len(quota_ids)} quota rows")
    # A lease's charge belongs to its hold's period, as any settlement does.
    UsageLog.objects.bulk_create(
        UsageLog(
            agent_id=hold["agent_id"],
            resource_type_id=hold["resource_type_id"],
            quota_id=hold["quota_id"],
            amount=hold["amount"],
            unit_price_usd=hold["unit_price_usd"],
            cost_usd=hold["cost"],
            task_id=hold["task_id"],
            kind=UsageLog.Kind.SETTLEMENT,
            metadata={"allocation_id": str(hold["pk"]), "lease_expired": True},
            created_at=now,
            period_start=periods[hold["quota_id"]],
        )
        for hold in leases
    )


def quota_share(
    *,
    source: Agent,
    target_id: str,
    resource_type_id: str,
    amount: int,
    actor: str,
    now: dt.datetime | None = None,
) -> dict:
    """Move unused quota of the current period from ``source`` to the agent ``target_id``, as grants on
    both sides.

    Both quota rows are locked in the order of every writer (``QUOTA_LOCK_ORDER``: by agent, then id), so
    two agents sharing with each other at once cannot deadlock; the source can give only what it has
    available. A refusal must not tell whether the target exists (a key may not even learn which agents
    there are): the source's own room is checked before the target is looked up, and a suspended target is
    answered as a missing one.
    """
    if not settings.ENABLE_COLLABORATION_SHARING:
        raise FeatureDisabled("resource sharing is switched off (ENABLE_COLLABORATION_SHARING)")
    _ensure_resource_type(resource_type_id)
    amount_validate(amount)
    if source.pk == target_id:
        raise LedgerError("an agent cannot share with itself", code="invalid_target")
    if source.status == Agent.Status.SUSPENDED:
        raise AgentSuspended(f"agent {source.id} is suspended")
    now = now or timezone.now()
    # A read, not quota_open: nothing is written before the periods are opened in agent-id order below.
    available = _available_now(source, resource_type_id, now)
    if amount > available:
        raise _share_exceeds(source, resource_type_id, amount, available=available)
    target = Agent.objects.filter(pk=target_id).exclude(status=Agent.Status.SUSPENDED).first()
    if target is None:
        raise NotFound(f"target agent {target_id!r} not found")
    with transaction.atomic():
        # Open (insert) and lock the two periods in agent-id order: two agents sharing with each other at
        # once then wait for one another instead of deadlocking, also inside a caller's transaction.
        opened = {
            agent.pk: quota_open(agent=agent, resource_type_id=resource_type_id, at=now)
            for agent in sorted((source, target), key=lambda a: a.pk)
        }
        source_quota, target_quota = opened[source.pk], opened[target.pk]
        # FOR NO KEY UPDATE, not FOR UPDATE: an allocation holds a key-share lock on its quota row (its
        # INSERTs' foreign keys) while it waits for the budgets; FOR UPDATE would wait for it, and it for
        # whoever holds the budgets and waits for this share (test_budget_concurrency's opposing orders).
        locked = {
            quota.pk: quota
            for quota in Quota.objects.filter(
                Q(pk=source_quota.pk, agent_id=source.pk) | Q(pk=target_quota.pk, agent_id=target.pk)
            ).locked()
        }
        source_quota = locked[source_quota.pk]
        if amount > source_quota.available:
            raise _share_exceeds(source, resource_type_id, amount, available=source_quota.available)
        Quota.objects.filter(pk=source_quota.pk, agent_id=source.pk).update(
            limit=F("limit") - amount, updated_at=now
        )
        Quota.objects.filter(pk=target_quota.pk, agent_id=target.pk).update(
            limit=F("limit") + amount, updated_at=now
        )
        Grant.objects.bulk_create(
            [
                Grant(
                    quota_id=source_quota.pk,
                    agent_id=source.pk,
                    resource_type_id=resource_type_id,
                    amount=-amount,
                    reason=Grant.Reason.SHARE_OUT,
                    actor=actor,
                    counterparty_agent=target,
                ),
                Grant(
                    quota_id=target_quota.pk,
                    agent_id=target.pk,
                    resource_type_id=resource_type_id,
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


def _available_now(agent: Agent, resource_type_id: str, now: dt.datetime) -> int:
    """What the agent's quota of the period containing ``now`` has available, without opening it."""
    start, _ = month_bounds(now)
    quota = Quota.objects.filter(agent=agent, resource_type_id=resource_type_id, period_start=start).first()
    return quota.available if quota is not None else base_limits(agent=agent).get(resource_type_id, 0)


def _share_exceeds(source: Agent, resource_type_id: str, amount: int, *, available: int) -> QuotaExceeded:
    available = max(available, 0)
    return QuotaExceeded(
        f"{source.id} has {available:,} {resource_type_id} unused, {amount:,} asked",
        details={"resource_type": resource_type_id, "requested": amount, "available": available},
    )


def agent_cost(*, agent: Agent, now: dt.datetime | None = None) -> dict:
    """This period's spend by resource type, the total, and how much of the monthly budget it is."""
    now = now or timezone.now()
    start, end = month_bounds(now)
    # The quota rows cache each period's spend (updated in the same statement as every charge), so this is
    # one indexed read of five rows instead of a scan of the period's usage log.
    by_type = dict(
        Quota.objects.filter(agent=agent, period_start=start).values_list("resource_type_id", "spent_usd")
    )
    ordered = list(ResourceType.objects.values_list("code", flat=True))
    zero = money_round(Decimal(0))
    spend = {code: money_round(by_type.get(code, zero)) for code in ordered}
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
    "AllocationDraft",
    "QuotaCheck",
    "agent_cost",
    "agent_quotas",
    "allocation_create",
    "allocation_prepare",
    "allocation_write",
    "hold_release",
    "hold_settle",
    "holds_expire",
    "lease_open",
    "quota_check",
    "quota_share",
]

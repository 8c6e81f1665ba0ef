"""Execution tracking ("track superpower execution"): take every resource of a run, all or nothing."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from allocation import sql
from allocation.services import allocation_create
from ledger.errors import FeatureDisabled, LedgerError, QuotaExceeded
from ledger.models import Agent, Quota, UsageLog
from ledger.periods import month_bounds
from ledger.reference_cache import resource_type_codes
from ledger.services import quotas_open
from optimization.models import Execution


def execution_record(
    *,
    agent: Agent,
    superpower: str,
    resources: dict[str, int],
    duration_ms: int | None = None,
    success: bool | None = None,
    output_units: int | None = None,
    task_id: str = "",
    idempotency_key: str = "",
    run_id: str = "",
    now: dt.datetime | None = None,
) -> Execution:
    """Allocate every listed resource and record the execution; one refused resource refuses them all.
    Each allocation is charged to the agent's budgets, and to run ``run_id``'s if named.

    ``duration_ms`` None: the execution counts in cost, not in latency. ``success`` None: the outcome is
    unknown; it counts in cost and throughput, not in success or error rates, and has no output by default.

    Before the first resource is taken, the agent's budgets (by id) and then its quota rows of the listed
    resources (in ``QUOTA_LOCK_ORDER``, by agent then id) are locked, each set in one statement: the lock
    order of every writer (``ledger.budgets``), so an execution and a share, a purchase, a batch or another
    execution touching the same rows wait for one another instead of deadlocking.
    """
    if not settings.ENABLE_SUPERPOWERS_TRACKING:
        raise FeatureDisabled("execution tracking is switched off (ENABLE_SUPERPOWERS_TRACKING)")
    if not resources:
        raise LedgerError("an execution lists at least one resource", code="invalid_resources")
    now = now or timezone.now()
    with transaction.atomic():
        execution = Execution.objects.create(
            agent=agent,
            superpower=superpower,
            resources=dict(sorted(resources.items())),
            duration_ms=duration_ms,
            success=success,
            output_units=(1 if success is True else 0) if output_units is None else output_units,
            cost_usd=Decimal(0),
            task_id=task_id,
            created_at=now,
        )
        _locks_take(agent=agent, resource_type_ids=set(resources), run_id=run_id, now=now)
        total = Decimal(0)
        for resource_type_id, amount in sorted(resources.items()):
            try:
                allocation = allocation_create(
                    agent=agent,
                    resource_type_id=resource_type_id,
                    amount=amount,
                    task_id=task_id,
                    kind=UsageLog.Kind.EXECUTION,
                    idempotency_key=idempotency_key,
                    metadata={"execution_id": execution.pk, "superpower": superpower},
                    now=now,
                    run_id=run_id,
                )
            except QuotaExceeded as exc:
                raise QuotaExceeded(
                    f"{resource_type_id}: {exc.message}; nothing was taken for this execution",
                    details={**exc.details, "resource_type": resource_type_id},
                ) from exc
            total += allocation.cost_usd
        execution.cost_usd = total
        execution.save(update_fields=["cost_usd"])
    return execution


def _locks_take(*, agent: Agent, resource_type_ids: set[str], run_id: str, now: dt.datetime) -> None:
    """Open the periods of the known resource types (an unknown one is refused by its allocation), then
    lock the budgets the allocations charge and those quota rows, in the lock order of every writer."""
    known = resource_type_ids & set(resource_type_codes())
    quotas_open({(agent.pk, code) for code in known}, tiers={agent.pk: agent.tier_id}, at=now)
    sql.budgets_release({}, now=now, also_lock=sql.agent_budget_ids(agent.pk, run_id=run_id, now=now))
    start, _ = month_bounds(now)
    list(
        Quota.objects.filter(agent_id=agent.pk, resource_type_id__in=known, period_start=start)
        .locked()
        .values_list("pk")
    )

"""Execution tracking ("track superpower execution"): take every resource of a run, all or nothing."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from allocation.services import allocation_create
from ledger.errors import FeatureDisabled, LedgerError, QuotaExceeded
from ledger.models import Agent, UsageLog
from optimization.models import Execution


def execution_record(
    *,
    agent: Agent,
    superpower: str,
    resources: dict[str, int],
    duration_ms: int,
    success: bool,
    output_units: int | None = None,
    task_id: str = "",
    idempotency_key: str = "",
    run_id: str = "",
    now: dt.datetime | None = None,
) -> Execution:
    """Allocate every listed resource and record the execution; one refused resource refuses them all.
    Each allocation is charged to the agent's budgets, and to run ``run_id``'s if named.

    Resources are taken in resource-type order, so two executions of one agent lock its quota rows in the
    same order and cannot deadlock.
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
            output_units=(1 if success else 0) if output_units is None else output_units,
            cost_usd=Decimal(0),
            task_id=task_id,
            created_at=now,
        )
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

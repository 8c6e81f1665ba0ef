"""Periodic work of the allocation engine. Thin: each task calls one idempotent service, once per tick
however many beats send it (``ledger.periodic``)."""

from __future__ import annotations

from allocation.api.shared.idempotency import idempotency_cleanup
from allocation.services import holds_expire
from ledger.periodic import periodic_task

TASK_OPTIONS = {"acks_late": True, "reject_on_worker_lost": True, "time_limit": 300, "soft_time_limit": 240}


@periodic_task(name="allocation.holds_expire", **TASK_OPTIONS)
def holds_expire_task() -> int:
    return holds_expire()


@periodic_task(name="allocation.idempotency_cleanup", **TASK_OPTIONS)
def idempotency_cleanup_task() -> int:
    return idempotency_cleanup()

"""Periodic work of the ledger. Thin: each task calls one idempotent service, once per tick however many
beats send it (``ledger.periodic``)."""

from __future__ import annotations

from ledger.partitions import partitions_maintain
from ledger.periodic import periodic_task

# Dumping a month of a large table takes longer than a sweep: a longer limit than the other tasks', still
# below the broker's visibility timeout (an hour), so that no second worker is handed a run in progress.
TASK_OPTIONS = {"acks_late": True, "reject_on_worker_lost": True, "time_limit": 1800, "soft_time_limit": 1700}


@periodic_task(name="ledger.partitions_maintain", **TASK_OPTIONS)
def partitions_maintain_task() -> dict:
    return partitions_maintain()

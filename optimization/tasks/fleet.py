"""Fleet utilization task: thin, it refreshes the snapshot that /metrics shows (``optimization.fleet``)."""

from __future__ import annotations

from ledger.periodic import periodic_task
from optimization.fleet import fleet_utilization_refresh
from optimization.tasks.common import TASK_OPTIONS

__all__ = ["fleet_utilization_task"]


@periodic_task(name="optimization.fleet_utilization", **TASK_OPTIONS)
def fleet_utilization_task() -> dict:
    return fleet_utilization_refresh()

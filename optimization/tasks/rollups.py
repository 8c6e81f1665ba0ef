"""Usage rollups task: thin, it brings the hourly and daily rollups up to date
(``optimization.services.rollups``)."""

from __future__ import annotations

from ledger.periodic import periodic_task
from optimization.services.rollups import usage_rollups_update
from optimization.tasks.common import TASK_OPTIONS

__all__ = ["usage_rollups_update_task"]


@periodic_task(name="optimization.usage_rollups_update", **TASK_OPTIONS)
def usage_rollups_update_task() -> dict:
    return usage_rollups_update()

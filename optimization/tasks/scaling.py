"""Auto-scaling task: thin, it runs the set-based, idempotent evaluation (a second run is in cooldown)."""

from __future__ import annotations

from ledger.periodic import periodic_task
from optimization.services.scaling import scaling_evaluate
from optimization.tasks.common import TASK_OPTIONS

__all__ = ["scaling_evaluate_task"]


@periodic_task(name="optimization.scaling_evaluate", **TASK_OPTIONS)
def scaling_evaluate_task() -> dict:
    return scaling_evaluate()

"""Auto-scaling task: thin, it runs the evaluation, which streams through the fleet in chunks of agents, each
its own short transaction. Idempotent: a run after a crash finds the agents of the chunks done in their
cooldown, and goes on with the rest."""

from __future__ import annotations

from ledger.periodic import periodic_task
from optimization.services.scaling import scaling_evaluate
from optimization.tasks.common import SWEEP_TASK_OPTIONS

__all__ = ["scaling_evaluate_task"]


@periodic_task(name="optimization.scaling_evaluate", **SWEEP_TASK_OPTIONS)
def scaling_evaluate_task() -> dict:
    return scaling_evaluate()

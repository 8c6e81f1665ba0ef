"""Periodic work on budgets and alerts. Thin: each task calls one idempotent service.

Running any of them twice in a row creates nothing twice: alerts are unique per dedup key, rule states
remember when they fired, and each delivery attempt is claimed with a conditional UPDATE.
"""

from __future__ import annotations

import logging

from celery import shared_task

from ledger.periodic import periodic_task
from optimization.services.alert_delivery import alert_delivery_attempt, alerts_deliver
from optimization.services.alerts import budget_sweep, budgets_resolve, cost_spike_sweep
from optimization.services.rules import rules_evaluate
from optimization.tasks.common import SWEEP_TASK_OPTIONS, TASK_OPTIONS

logger = logging.getLogger(__name__)

DELIVERY_CHAIN_MAX = 30  # runs in a row, each within the run's time budget (two minutes)

__all__ = [
    "alert_delivery_task",
    "alerts_deliver_task",
    "budget_sweep_task",
    "budgets_resolve_task",
    "cost_spike_sweep_task",
    "rules_evaluate_task",
]


@periodic_task(name="optimization.budget_sweep", **SWEEP_TASK_OPTIONS)
def budget_sweep_task() -> int:
    return budget_sweep()


@shared_task(name="optimization.budgets_resolve", **TASK_OPTIONS)
def budgets_resolve_task(budget_ids: list[int]) -> int:
    """Say at once that these budgets have room again, rather than at the next sweep: for what gives a
    budget room outside the sweep (a raised limit, a released hold). Enqueued by name
    (``send_task("optimization.budgets_resolve", args=[[id]])``) from apps that may not import this one."""
    return budgets_resolve(budget_ids=budget_ids)


@periodic_task(name="optimization.rules_evaluate", **SWEEP_TASK_OPTIONS)
def rules_evaluate_task() -> dict:
    return rules_evaluate()


@periodic_task(name="optimization.cost_spike_sweep", **SWEEP_TASK_OPTIONS)
def cost_spike_sweep_task() -> int:
    return cost_spike_sweep()


@periodic_task(name="optimization.alerts_deliver", **TASK_OPTIONS)
def alerts_deliver_task(chained: int = 0) -> int:
    """Deliver what is due. A run that used its whole time budget enqueues the next at once, so that a
    backlog (a sweep of a large fleet) drains continuously rather than a run a minute: at most
    ``DELIVERY_CHAIN_MAX`` runs in a row, then the schedule starts the next chain."""
    run = alerts_deliver()
    if run.more and chained < DELIVERY_CHAIN_MAX:
        try:
            # A second's delay lets this run's locks go before the next run tries them.
            alerts_deliver_task.apply_async(kwargs={"chained": chained + 1}, countdown=1)
        except Exception:  # any broker error: the schedule delivers the rest
            logger.warning("could not enqueue the next alert delivery run", exc_info=True)
    return run.delivered


@shared_task(name="optimization.alert_delivery", **TASK_OPTIONS)
def alert_delivery_task(delivery_id: int) -> str | None:
    """Attempt one delivery now. Retries are not scheduled here: a failed attempt records when the next one
    is due, and the periodic ``optimization.alerts_deliver`` makes it."""
    return alert_delivery_attempt(delivery_id=delivery_id)

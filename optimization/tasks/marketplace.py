"""Marketplace task: thin, it runs the idempotent refresh (expire, return unsold quota, restock, reprice)."""

from __future__ import annotations

from ledger.periodic import periodic_task
from optimization.services.marketplace import marketplace_refresh
from optimization.tasks.common import TASK_OPTIONS

__all__ = ["marketplace_refresh_task"]


@periodic_task(name="optimization.marketplace_refresh", **TASK_OPTIONS)
def marketplace_refresh_task() -> dict:
    return marketplace_refresh()

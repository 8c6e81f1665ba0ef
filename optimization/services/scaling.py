"""Scaling: horizontal (instance count within bounds) and vertical (a quota grant for the period)."""

from __future__ import annotations

import datetime as dt

from django.db import transaction
from django.utils import timezone

from ledger.errors import LedgerError
from ledger.models import Agent
from optimization.models import ScalingEvent


@transaction.atomic
def scaling_apply(
    *,
    agent: Agent,
    direction: str,
    trigger: str,
    reason: str,
    actor: str = "",
    step: int = 1,
    now: dt.datetime | None = None,
) -> ScalingEvent | None:
    """Change the agent's instance count by ``step`` in ``direction``, clamped to its min and max.

    Returns the scaling event, or None when the agent is already at the bound (nothing changes).
    """
    if direction not in ScalingEvent.Direction.values:
        raise LedgerError(f"direction must be up or down, not {direction!r}", code="invalid_direction")
    if step < 1:
        raise LedgerError("step must be at least 1", code="invalid_step")
    agent = Agent.objects.select_for_update().get(pk=agent.pk)
    before = agent.instance_count
    wanted = before + step if direction == ScalingEvent.Direction.UP else before - step
    after = min(max(wanted, agent.min_instances), agent.max_instances)
    if after == before:
        return None
    Agent.objects.filter(pk=agent.pk).update(instance_count=after, updated_at=timezone.now())
    return ScalingEvent.objects.create(
        agent=agent,
        direction=direction,
        kind=ScalingEvent.Kind.HORIZONTAL,
        trigger=trigger,
        before=before,
        after=after,
        reason=reason[:300],
        actor=actor,
        created_at=now or timezone.now(),
    )

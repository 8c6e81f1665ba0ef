"""A/B testing of optimization strategies: deterministic assignment of agents to arms, and a report per arm.

Assignment hashes (experiment name, agent id) with SHA-256 onto the arms' cumulative weights (arms in name
order), so the same agent always lands in the same arm of the same experiment, on any machine, without
storing a seed. An agent keeps its first assignment: adding an arm or changing weights later moves only
agents assigned afterwards.

The report compares arms on what the experiment is about: executions, successes, spend (the executions'
``cost_usd`` from ``started_at`` until ``ended_at``, or now) and cost per successful task (null when an arm
had no success).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterable
from decimal import Decimal

from django.db import transaction
from django.db.models import Count, Q, Sum
from django.utils import timezone

from ledger.errors import LedgerError
from ledger.models import Agent
from ledger.money import money_round
from optimization.models import Experiment, ExperimentArm, ExperimentAssignment
from optimization.services.analytics import analytics_ensure_enabled


def experiment_bucket(*, experiment_name: str, agent_id: str, total_weight: int) -> int:
    """A stable number in [0, total_weight) for this agent in this experiment."""
    digest = hashlib.sha256(f"{experiment_name}\x00{agent_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % total_weight


def experiment_arm_pick(*, experiment: Experiment, arms: list[ExperimentArm], agent_id: str) -> ExperimentArm:
    weighted = [arm for arm in arms if arm.weight > 0]
    total = sum(arm.weight for arm in weighted)
    if not total:
        raise LedgerError(
            f"experiment {experiment.name!r} has no arm with a positive weight", code="experiment_has_no_arms"
        )
    bucket = experiment_bucket(experiment_name=experiment.name, agent_id=agent_id, total_weight=total)
    for arm in weighted:
        if bucket < arm.weight:
            return arm
        bucket -= arm.weight
    raise AssertionError("unreachable: the bucket is below the total weight")


@transaction.atomic
def experiment_assign(*, experiment: Experiment, agents: Iterable[Agent]) -> list[ExperimentAssignment]:
    """Assign each agent to an arm (deterministically; an agent already assigned keeps its arm) and return
    the assignments in the order of ``agents``. A fixed number of queries for any number of agents."""
    agents = list(agents)
    arms = list(experiment.arms.order_by("name", "pk"))
    new = [
        ExperimentAssignment(
            experiment=experiment,
            arm=experiment_arm_pick(experiment=experiment, arms=arms, agent_id=agent.pk),
            agent=agent,
        )
        for agent in agents
    ]
    # A concurrent or earlier assignment of the same agent wins: the unique constraint keeps one arm.
    ExperimentAssignment.objects.bulk_create(new, ignore_conflicts=True)
    assigned = {
        assignment.agent_id: assignment
        for assignment in ExperimentAssignment.objects.filter(
            experiment=experiment, agent_id__in=[agent.pk for agent in agents]
        ).select_related("arm")
    }
    return [assigned[agent.pk] for agent in agents]


def experiment_report(*, experiment: Experiment, now: dt.datetime | None = None) -> list[dict]:
    """Per arm: agents, executions, successes, spend and cost per successful task over the experiment's
    time (``started_at`` until ``ended_at``, or now). Two queries. Part of performance analytics."""
    analytics_ensure_enabled()
    until = experiment.ended_at or now or timezone.now()
    in_time = Q(
        agent__executions__created_at__gte=experiment.started_at, agent__executions__created_at__lt=until
    )
    totals = {
        row["arm_id"]: row
        for row in ExperimentAssignment.objects.filter(experiment=experiment)
        .values("arm_id")
        .annotate(
            agents=Count("agent_id", distinct=True),
            executions=Count("agent__executions", filter=in_time),
            successes=Count("agent__executions", filter=in_time & Q(agent__executions__success=True)),
            spend=Sum("agent__executions__cost_usd", filter=in_time),
        )
        .order_by()
    }
    report = []
    for arm in experiment.arms.order_by("name", "pk"):
        row = totals.get(arm.pk, {})
        successes = row.get("successes", 0)
        spend = money_round(row.get("spend") or Decimal(0))
        report.append(
            {
                "arm_id": arm.pk,
                "arm": arm.name,
                "weight": arm.weight,
                "agents": row.get("agents", 0),
                "executions": row.get("executions", 0),
                "successes": successes,
                "spend_usd": spend,
                "cost_per_successful_task_usd": money_round(spend / successes) if successes else None,
                "period_start": experiment.started_at,
                "period_end": until,
            }
        )
    return report

"""Scaling: horizontal (instance count within bounds) and vertical (a quota grant for the period).

Auto-scaling (``scaling_evaluate``, every five minutes) follows these rules:

* **Policy**: the agent's *effective* policy (``agents_with_effective_scaling_policy``, one SQL fragment):
  the policy of its arm when it is assigned to an arm of a running experiment (``ended_at`` null) that has
  one, else its own (the override an operator PUTs), else its tier's. Every tier has a default policy
  (``TIER_DEFAULT_POLICIES``: on for PRO and ENTERPRISE, off for FREE and CUSTOM). No policy, or a policy
  with ``enabled=False``, means the agent is not auto-scaled (an agent's disabled policy also hides its
  tier's: that is how one agent of a tier is taken out of auto-scaling).
* **Metric**: ``resource_utilization_percent`` is the agent's most utilized resource this period
  (used + reserved over the limit); ``budget_utilization_percent`` is this period's spend over the monthly
  budget. An agent with nothing to measure (no quota opened this period, no budget) is left alone.
* **Decision**: above ``scale_up_threshold`` scale up, below ``scale_down_threshold`` scale down, in between
  do nothing. The model requires ``down < up``: the gap between the two is the hysteresis.
* **Cooldown**: nothing happens within ``cooldown_seconds`` of the agent's last scaling event of any kind
  or trigger (a manual one included).
* **No flapping**: the direction never reverses within twice the cooldown of the last event in the
  opposite direction.
* **Bounds**: the narrower of the policy's and the agent's min/max instances (the policy can narrow the
  agent's range, never leave it). A step stops at the bound.
* **Vertical**: scaling up at the upper bound with ``quota_step_percent > 0`` grants
  ``ceil(base_limit * quota_step_percent / 100)`` units of the agent's most utilized resource for the
  period (a ``scaling`` grant), recorded as a ``vertical`` event whose before/after is that quota's limit.
  Nothing is ever taken away vertically.

Every change is recorded with its ``scaling`` alert and the alert's webhook deliveries (when an enabled
endpoint listens to the agent), in one statement (``optimization/services/scaling_events.py``): an
orchestrator hears of each one, auto, rule or manual.

Only changes are recorded: a decision that changes nothing (at a bound, in cooldown) writes no event, so it
does not restart the cooldown either. An event at the evaluation's own time or later also counts as a
cooldown, so an evaluation run again at the same time changes nothing, whatever the cooldown.

The evaluation streams through the fleet: chunks of agents by id, each in its own short transaction with a
fixed number of set-based statements (one for the chunk's instance counts, one for its quota limits, one
for its grants, one for its events with their alerts and deliveries), reading the metrics for the chunk's
id range only. Each chunk first locks the agents it may scale, so two evaluations running at once take
turns chunk by chunk and the second sees the first one's events (and is then in cooldown). No lock outlives
its chunk, and a crash loses only the chunk in flight: the next evaluation finds the agents of the chunks
done in their cooldown.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal

from django.db import IntegrityError, transaction
from django.db.models import (
    BigIntegerField,
    Case,
    CharField,
    Max,
    OuterRef,
    QuerySet,
    Subquery,
    Value,
    When,
)
from django.db.models.functions import Coalesce
from django.utils import timezone

from ledger.bulk import bulk_update_column
from ledger.errors import Conflict, LedgerError
from ledger.models import Agent, Grant, Quota, Tier
from ledger.periods import month_bounds
from optimization import selectors
from optimization.models import ExperimentAssignment, ScalingEvent, ScalingPolicy
from optimization.selectors import AgentRange, agent_chunks
from optimization.services.scaling_events import ScalingChange, scaling_events_record

AUTO_ACTOR = "auto-scaler"
RESOURCE_METRIC = "resource_utilization_percent"
BUDGET_METRIC = "budget_utilization_percent"
UP = ScalingEvent.Direction.UP
DOWN = ScalingEvent.Direction.DOWN

POLICY_FIELDS = (
    "metric",
    "scale_up_threshold",
    "scale_down_threshold",
    "step",
    "min_instances",
    "max_instances",
    "quota_step_percent",
    "cooldown_seconds",
    "enabled",
)


# Each tier's default policy, created where missing (never overwritten) by the data migration
# optimization 0014 and by ``load_reference_data``. The thresholds are the product description's: 80 %
# utilization is its warning level (scale up past it); below 30 % an instance is mostly idle. FREE is off
# (one instance is what the tier buys) and so is CUSTOM (a contract's agents are scaled as agreed, by an
# operator's policy per agent); both can be switched on per agent or for the tier.
TIER_DEFAULT_POLICIES: dict[str, dict] = {
    "FREE": {"enabled": False, "max_instances": 2, "quota_step_percent": 0, "cooldown_seconds": 600},
    "PRO": {"enabled": True, "max_instances": 10, "quota_step_percent": 0, "cooldown_seconds": 600},
    "ENTERPRISE": {"enabled": True, "max_instances": 50, "quota_step_percent": 10, "cooldown_seconds": 300},
    "CUSTOM": {"enabled": False, "max_instances": 10, "quota_step_percent": 0, "cooldown_seconds": 600},
}
TIER_POLICY_COMMON = {
    "metric": RESOURCE_METRIC,
    "scale_up_threshold": Decimal("80"),
    "scale_down_threshold": Decimal("30"),
    "step": 1,
    "min_instances": 1,
}


class PolicySource:
    """Where an agent's effective policy comes from, in the order that decides."""

    EXPERIMENT = "experiment"
    AGENT = "agent"
    TIER = "tier"


# --- Policies and bounds --------------------------------------------------------------------------------


def agents_with_effective_scaling_policy(agents: QuerySet[Agent]) -> QuerySet[Agent]:
    """``agents`` annotated with ``effective_policy_id`` and ``effective_policy_source``: the one place that
    says which policy governs an agent, for one agent (``scaling_policy_effective``) and for a sweep's chunk
    alike. In this order:

    1. ``experiment``: the scaling policy of the agent's arm in a running experiment (``ended_at`` null),
       when the arm has one; in several, the experiment started last;
    2. ``agent``: the agent's own policy (the override);
    3. ``tier``: its tier's policy.

    Null, both, when none applies. Three index lookups per agent, in the query that reads the agents."""
    running_arm = (
        ExperimentAssignment.objects.filter(
            agent_id=OuterRef("pk"), experiment__ended_at__isnull=True, arm__scaling_policy__isnull=False
        )
        .order_by("-experiment__started_at", "-experiment_id")
        .values("arm__scaling_policy_id")[:1]
    )
    own = ScalingPolicy.objects.filter(agent_id=OuterRef("pk")).values("pk")[:1]
    of_tier = ScalingPolicy.objects.filter(tier_id=OuterRef("tier_id")).values("pk")[:1]
    return agents.annotate(
        experiment_policy_id=Subquery(running_arm, output_field=BigIntegerField()),
        own_policy_id=Subquery(own, output_field=BigIntegerField()),
        tier_policy_id=Subquery(of_tier, output_field=BigIntegerField()),
    ).annotate(
        effective_policy_id=Coalesce(
            "experiment_policy_id", "own_policy_id", "tier_policy_id", output_field=BigIntegerField()
        ),
        effective_policy_source=Case(
            When(experiment_policy_id__isnull=False, then=Value(PolicySource.EXPERIMENT)),
            When(own_policy_id__isnull=False, then=Value(PolicySource.AGENT)),
            When(tier_policy_id__isnull=False, then=Value(PolicySource.TIER)),
            default=None,
            output_field=CharField(),
        ),
    )


def scaling_policy_effective(*, agent: Agent) -> tuple[ScalingPolicy | None, str | None]:
    """The policy that governs ``agent`` (enabled or not) and where it comes from (a ``PolicySource``), or
    (None, None). Two queries."""
    found = (
        agents_with_effective_scaling_policy(Agent.objects.filter(pk=agent.pk))
        .values_list("effective_policy_id", "effective_policy_source")
        .first()
    )
    if found is None or found[0] is None:
        return None, None
    policy = ScalingPolicy.objects.filter(pk=found[0]).first()
    return policy, (found[1] if policy is not None else None)


def scaling_policy_resolve(*, agent: Agent) -> ScalingPolicy | None:
    """The policy that governs ``agent`` (``scaling_policy_effective``), enabled or not."""
    return scaling_policy_effective(agent=agent)[0]


def scaling_policy_override_delete(*, agent: Agent) -> bool:
    """Drop the agent's own policy, so that its tier's governs it again. Returns whether there was one."""
    deleted, _ = ScalingPolicy.objects.filter(agent_id=agent.pk).delete()
    return bool(deleted)


def tier_scaling_policies_ensure() -> int:
    """Create the default policy (``TIER_DEFAULT_POLICIES``) of every tier that has none. A tier's policy
    an operator has written is left as it is. Returns how many were created."""
    have = set(ScalingPolicy.objects.filter(tier_id__isnull=False).values_list("tier_id", flat=True))
    missing = [
        ScalingPolicy(tier_id=code, **TIER_POLICY_COMMON, **TIER_DEFAULT_POLICIES[code])
        for code in Tier.objects.filter(code__in=list(TIER_DEFAULT_POLICIES)).values_list("code", flat=True)
        if code not in have
    ]
    # ignore_conflicts: a load running at the same time may have created one meanwhile; it is the same.
    return len(ScalingPolicy.objects.bulk_create(missing, ignore_conflicts=True))


def scaling_bounds(*, agent_min: int, agent_max: int, policy: ScalingPolicy | None) -> tuple[int, int]:
    """The narrower of the agent's and an enabled policy's instance bounds, always inside the agent's own
    (which a database constraint enforces), so a policy can narrow the range but never leave it."""
    low, high = agent_min, agent_max
    if policy is not None and policy.enabled:
        low, high = max(low, policy.min_instances), min(high, policy.max_instances)
    high = max(high, agent_min)
    low = min(low, high)
    return low, high


def _step_target(*, before: int, direction: str, step: int, low: int, high: int) -> int:
    """Where one step in ``direction`` lands. It never moves against ``direction``: an instance count
    already outside the bounds (a policy narrowed since) is only brought back by a step towards them."""
    if direction == UP:
        return min(before + step, high) if before < high else before
    return max(before - step, low) if before > low else before


@transaction.atomic
def scaling_policy_set(*, agent: Agent, **fields) -> tuple[ScalingPolicy, bool]:
    """Create or change the agent's own policy; return it and whether it was created.

    Fields not given keep their value; a new policy starts from its tier's policy (so that turning
    auto-scaling off for one agent is ``enabled=False`` and nothing else), else from the model defaults.
    """
    unknown = sorted(set(fields) - set(POLICY_FIELDS))
    if unknown:
        raise LedgerError(f"unknown policy fields: {', '.join(unknown)}", code="invalid_policy")
    policy = ScalingPolicy.objects.select_for_update().filter(agent_id=agent.pk).first()
    created = policy is None
    if created:
        tier_policy = ScalingPolicy.objects.filter(tier_id=agent.tier_id).first()
        policy = ScalingPolicy(agent_id=agent.pk)
        if tier_policy is not None:
            for name in POLICY_FIELDS:
                setattr(policy, name, getattr(tier_policy, name))
    for name, value in fields.items():
        setattr(policy, name, value)
    if not policy.scale_down_threshold < policy.scale_up_threshold:
        raise LedgerError(
            "scale_down_threshold must be below scale_up_threshold (the gap stops flapping)",
            code="invalid_policy",
            details={
                "scale_down_threshold": str(policy.scale_down_threshold),
                "scale_up_threshold": str(policy.scale_up_threshold),
            },
        )
    if not policy.min_instances <= policy.max_instances:
        raise LedgerError("min_instances cannot exceed max_instances", code="invalid_policy")
    if policy.step < 1:
        raise LedgerError("step must be at least 1", code="invalid_policy")
    try:
        with transaction.atomic():
            policy.save()
    except IntegrityError as exc:  # a concurrent first PUT created it in the meantime
        raise Conflict("the scaling policy changed meanwhile; try again", code="policy_conflict") from exc
    return policy, created


# --- One agent, now -------------------------------------------------------------------------------------


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
    """Change the agent's instance count by ``step`` in ``direction``, within its bounds (the narrower of
    the agent's and its enabled policy's). No cooldown: this is what an operator or a rule asks for now.

    Returns the scaling event, or None when the agent is already at the bound (nothing changes).
    """
    if direction not in ScalingEvent.Direction.values:
        raise LedgerError(f"direction must be up or down, not {direction!r}", code="invalid_direction")
    if trigger not in ScalingEvent.Trigger.values:
        raise LedgerError(f"unknown scaling trigger {trigger!r}", code="invalid_trigger")
    if not isinstance(step, int) or isinstance(step, bool) or step < 1:
        raise LedgerError("step must be at least 1", code="invalid_step")
    now = now or timezone.now()
    # NO KEY UPDATE: allocations inserting rows that reference the agent are not blocked by this lock.
    agent = Agent.objects.select_for_update(no_key=True).get(pk=agent.pk)
    low, high = scaling_bounds(
        agent_min=agent.min_instances,
        agent_max=agent.max_instances,
        policy=scaling_policy_resolve(agent=agent),
    )
    before = agent.instance_count
    after = _step_target(before=before, direction=direction, step=step, low=low, high=high)
    if after == before:
        return None
    Agent.objects.filter(pk=agent.pk).update(instance_count=after, updated_at=now)
    (event,) = scaling_events_record(
        changes=[ScalingChange(agent.pk, direction, ScalingEvent.Kind.HORIZONTAL, before, after, reason)],
        trigger=trigger,
        actor=actor,
        now=now,
    )
    return event


# --- The fleet, in chunks -------------------------------------------------------------------------------

# Agents per chunk of the evaluation: each chunk is one short transaction, and what it reads (agents, their
# metrics, their recent events) is bounded by it, not by the fleet. An allocation on a quota that the chunk
# grants to waits for the chunk's commit, so a chunk is kept short: 2,000 agents took about 0.5 s at most
# on a busy two-core machine (5,000 took 1.4 s), for a sweep about a sixth slower.
SCALING_CHUNK = 2000


@dataclass
class _Decision(ScalingChange):
    """A change the sweep decided, with what a vertical one needs to be applied."""

    quota_step_percent: int = 0
    quota_id: int | None = None


def _threshold(value: Decimal) -> str:
    return f"{value.normalize():f}"


def _last_by_direction(*, since: dt.datetime, agents: AgentRange) -> dict[tuple[str, str], dt.datetime]:
    """(agent, direction) -> the agent's last scaling event in that direction since ``since``, for the
    chunk's agents. One query (``scaling_agent_time_idx``)."""
    rows = (
        ScalingEvent.objects.filter(created_at__gte=since, **agents.lookups("agent_id"))
        .values("agent_id", "direction")
        .annotate(last=Max("created_at"))
        .order_by()
    )
    return {(row["agent_id"], row["direction"]): row["last"] for row in rows}


def _summary() -> dict:
    return {
        "evaluated": 0,
        "scaled_up": 0,
        "scaled_down": 0,
        "vertical": 0,
        "in_cooldown": 0,
        "held_against_flapping": 0,
        "at_bound": 0,
        "no_metric": 0,
        "chunks": 0,
    }


def _chunks(size: int) -> Iterator[AgentRange]:
    """The fleet's chunks by agent id (``agent_chunks``). A generator, so the next chunk is read between
    two chunks' transactions, when the evaluation holds no lock."""
    for agents, _ in agent_chunks(size=size):
        yield agents


def scaling_evaluate(*, now: dt.datetime | None = None, chunk_size: int = SCALING_CHUNK) -> dict:
    """Evaluate every agent's scaling policy and apply the decisions (see the module docstring).

    The fleet is worked through in chunks of ``chunk_size`` agents by id, each in its own short transaction
    with a fixed number of statements (``_chunk_evaluate``): memory is bounded by the chunk, no lock
    outlives its chunk (a vertical grant's quota rows are free again as soon as its chunk commits), and a
    crash loses only the chunk in flight. The next evaluation goes on from there: every agent scaled in a
    chunk that committed has its event, so it is in cooldown. Returns counts of what happened.
    """
    now = now or timezone.now()
    summary = _summary()
    if not ScalingPolicy.objects.filter(enabled=True).exists():
        return summary
    for agents in _chunks(chunk_size):
        with transaction.atomic():
            _chunk_evaluate(agents=agents, now=now, summary=summary)
        summary["chunks"] += 1
    return summary


def _chunk_evaluate(*, agents: AgentRange, now: dt.datetime, summary: dict) -> None:
    """Evaluate and scale the agents in ``agents``' id range, adding to ``summary``. Call it in a
    transaction: at most eleven statements whatever the number of agents (the agents' lock with their
    effective policies, those policies, the metrics in three queries, their recent events, then one
    statement each for the instance counts, the quota locks, the limits, the grants and the events with
    their alerts and deliveries)."""
    # Lock first, read the rest after: an evaluation running at the same time waits here for this chunk and
    # then sees its events (and is in cooldown). NO KEY UPDATE: allocations, whose rows only reference the
    # agent, are not blocked by it. Only agents whose effective policy is enabled are locked.
    rows = list(
        agents_with_effective_scaling_policy(
            Agent.objects.select_for_update(no_key=True, of=("self",)).filter(**agents.lookups("pk"))
        )
        .filter(effective_policy_id__in=Subquery(ScalingPolicy.objects.filter(enabled=True).values("pk")))
        .order_by("pk")
        .values_list("pk", "instance_count", "min_instances", "max_instances", "effective_policy_id")
    )
    if not rows:
        return
    policies = ScalingPolicy.objects.in_bulk({row[4] for row in rows})
    governed = [
        (agent_id, count, agent_min, agent_max, policies[policy_id])
        for agent_id, count, agent_min, agent_max, policy_id in rows
        if policy_id in policies and policies[policy_id].enabled
    ]
    if not governed:
        return
    summary["evaluated"] += len(governed)
    active = [entry[4] for entry in governed]
    needs_resources = any(p.metric == RESOURCE_METRIC or p.quota_step_percent for p in active)
    resource = selectors.max_resource_utilization(now=now, agent_ids=agents) if needs_resources else {}
    budget = (
        selectors.budget_utilization(now=now, agent_ids=agents)
        if any(p.metric == BUDGET_METRIC for p in active)
        else {}
    )
    # Twice the longest cooldown covers both guards: the cooldown (an event of any direction) and the
    # flapping guard (one in the opposite direction). Older events decide nothing.
    longest = max(p.cooldown_seconds for p in active)
    last_directed = _last_by_direction(since=now - dt.timedelta(seconds=2 * longest), agents=agents)
    last_any: dict[str, dt.datetime] = {}
    for (agent_id, _), last in last_directed.items():
        last_any[agent_id] = max(last, last_any.get(agent_id, last))

    decisions: list[_Decision] = []
    for agent_id, count, agent_min, agent_max, policy in governed:
        most_used = resource.get(agent_id)  # (resource type, percent) or None
        if policy.metric == RESOURCE_METRIC:
            value = most_used[1] if most_used else None
            subject = f" ({most_used[0]})" if most_used else ""
        else:
            value = budget.get(agent_id, {}).get("percent")
            subject = ""
        if value is None:
            summary["no_metric"] += 1
            continue
        cooldown = dt.timedelta(seconds=policy.cooldown_seconds)
        last_at = last_any.get(agent_id)
        # An event at ``now`` or later is this very evaluation's (one that ran again at the same time after
        # a crash) or newer: acting again would scale twice, even with no cooldown.
        if last_at is not None and (now - last_at < cooldown or last_at >= now):
            summary["in_cooldown"] += 1
            continue
        if value > policy.scale_up_threshold:
            direction, opposite = UP, DOWN
            reason = f"{policy.metric} {value} > {_threshold(policy.scale_up_threshold)}{subject}"
        elif value < policy.scale_down_threshold:
            direction, opposite = DOWN, UP
            reason = f"{policy.metric} {value} < {_threshold(policy.scale_down_threshold)}{subject}"
        else:
            continue
        opposite_at = last_directed.get((agent_id, opposite))
        if opposite_at is not None and now - opposite_at < 2 * cooldown:
            summary["held_against_flapping"] += 1
            continue
        low, high = scaling_bounds(agent_min=agent_min, agent_max=agent_max, policy=policy)
        after = _step_target(before=count, direction=direction, step=policy.step, low=low, high=high)
        if after != count:
            decisions.append(
                _Decision(agent_id, direction, ScalingEvent.Kind.HORIZONTAL, count, after, reason)
            )
        elif direction == UP and policy.quota_step_percent and most_used:
            decisions.append(
                _Decision(
                    agent_id,
                    UP,
                    ScalingEvent.Kind.VERTICAL,
                    0,
                    0,
                    f"{reason}; at max instances ({high}): +{policy.quota_step_percent}% of the base "
                    f"limit of {most_used[0]}",
                    resource_type_id=most_used[0],
                    quota_step_percent=policy.quota_step_percent,
                )
            )
        else:
            summary["at_bound"] += 1

    horizontal = [d for d in decisions if d.kind == ScalingEvent.Kind.HORIZONTAL]
    vertical = [d for d in decisions if d.kind == ScalingEvent.Kind.VERTICAL]
    if horizontal:
        bulk_update_column(
            model=Agent,
            field="instance_count",
            values={d.agent_id: d.after for d in horizontal},
            touch=now,
        )
    grants = _vertical_apply(decisions=vertical, now=now)
    decisions = [d for d in decisions if d.kind == ScalingEvent.Kind.HORIZONTAL or d.quota_id]
    scaling_events_record(
        changes=decisions,
        trigger=ScalingEvent.Trigger.AUTO,
        actor=AUTO_ACTOR,
        now=now,
    )
    summary["scaled_up"] += sum(1 for d in horizontal if d.direction == UP)
    summary["scaled_down"] += sum(1 for d in horizontal if d.direction == DOWN)
    summary["vertical"] += grants
    summary["at_bound"] += len(vertical) - grants  # a base limit of 0 has no step to grant


def _vertical_apply(*, decisions: list[_Decision], now: dt.datetime) -> int:
    """Grant each decision's quota step on its resource for the period, in three queries for all of them.

    Fills in each decision's quota and its before/after limit; returns how many grants were made.
    """
    if not decisions:
        return 0
    start, _ = month_bounds(now)
    wanted = {(d.agent_id, d.resource_type_id): d for d in decisions}
    # The quota rows are locked in the order of every writer that locks several of them (QUOTA_LOCK_ORDER).
    quotas = Quota.objects.filter(
        period_start=start, agent_id__in=list({d.agent_id for d in decisions})
    ).locked()
    amounts: dict[int, int] = {}
    made: list[Grant] = []
    for quota in quotas:
        decision = wanted.get((quota.agent_id, quota.resource_type_id))
        if decision is None:
            continue
        amount = -(-quota.base_limit * decision.quota_step_percent // 100)  # ceil, in whole units
        if amount <= 0:
            continue
        decision.quota_id = quota.pk
        decision.before, decision.after = quota.limit, quota.limit + amount
        amounts[quota.pk] = amount
        made.append(
            Grant(
                quota_id=quota.pk,
                agent_id=quota.agent_id,
                resource_type_id=quota.resource_type_id,
                amount=amount,
                reason=Grant.Reason.SCALING,
                actor=AUTO_ACTOR,
                note=f"vertical scaling: +{decision.quota_step_percent}% of the base limit",
            )
        )
    if not amounts:
        return 0
    # A positive grant always fits (limit only grows), so the UPDATE needs no condition beyond its rows.
    bulk_update_column(model=Quota, field="limit", values=amounts, add=True, touch=now)
    Grant.objects.bulk_create(made)
    return len(made)


__all__ = [
    "POLICY_FIELDS",
    "SCALING_CHUNK",
    "TIER_DEFAULT_POLICIES",
    "PolicySource",
    "agents_with_effective_scaling_policy",
    "scaling_apply",
    "scaling_bounds",
    "scaling_evaluate",
    "scaling_policy_effective",
    "scaling_policy_override_delete",
    "scaling_policy_resolve",
    "scaling_policy_set",
    "tier_scaling_policies_ensure",
]

"""A/B testing of optimization strategies: experiments and their arms, the assignment of agents to arms, the
strategy an arm gives its agents, a report per arm with confidence intervals and a winner, and the end.

Assignment hashes (experiment name, agent id) with SHA-256 onto the arms' cumulative weights (arms in name
order), so the same agent always lands in the same arm of the same experiment, on any machine, without
storing a seed. An agent keeps its first assignment: adding an arm or changing weights later moves only
agents assigned afterwards. An agent is in one open experiment at a time.

Strategy. While an experiment runs (``started_at <= now`` and not ended), an agent assigned to an arm runs
under the arm's strategy:

- rules: a rule that belongs to an arm (of any experiment) applies only through arms: to the agents of the
  running arms that hold it, within the rule's own scope (a global rule: all of them; a tier rule: those of
  the tier). It applies to nobody else, so a rule made for an arm never reaches the rest of the fleet, not
  even once the experiment is over. The arm's rules *replace* the agent's own (agent-scoped) rules, which
  are not evaluated for it while it is in the arm; global and tier rules that are in no arm still apply to
  everyone. See ``arm_rule_targets`` and ``optimization.services.rules``.
- scaling policy: the arm's (a ``ScalingPolicy`` owned by no agent or tier) comes before the agent's own
  and its tier's; the scaling service resolves it.
- deal buying: ``buy_deals`` false keeps the optimizer from buying deals for the arm's agents, and
  ``deal_max_unit_price_usd`` from buying a deal dearer than that a unit (``arm_deal_refusal``).

Once the experiment ends its agents go back to their own strategy. Stopping it with ``apply_winner`` gives
every assigned agent the winning arm's strategy as its own first: a copy of each arm rule that reaches it
(within the rule's scope), scoped to the agent (the agent's earlier agent-scoped rules are disabled, as the
arm's replaced them), and the arm's
scaling policy as the agent's own. A deal preference has no per-agent home and ends with the experiment.

Report. Per arm, over the executions of its agents from ``started_at`` until ``ended_at`` (or now):

- success rate = successes / executions whose outcome is known (an unknown outcome, a null ``success``,
  counts in neither); 95 % Wilson score interval.
- p95 duration (ms, ``percentile_cont``, over executions with a duration); 95 % distribution-free interval
  from order statistics: the ranks np -/+ 1.96 sqrt(np(1-p)) (floor, and ceiling plus one, within 1..n)
  of the sorted durations, the normal approximation of the binomial count below the true p95.
- cost per successful task = spend (every execution's cost, failed or unknown too) / successes; 95 % normal
  interval with the delta method's standard error of a ratio of means, executions taken as independent.

The winner is decided on cost per successful task: the cheapest arm wins when a two-sided z-test on the
difference of the ratios (the two delta-method standard errors combined) rejects equality against every
other arm at alpha = 0.05, Bonferroni-corrected for the number of comparisons (k - 1 for k arms). Each arm
needs ``MIN_EXECUTIONS`` executions and a success, or there is no winner; ``winner_reason`` says why.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
from collections.abc import Iterable
from decimal import Decimal
from statistics import NormalDist

from django.core.exceptions import ValidationError
from django.db import IntegrityError, connection, transaction
from django.db.models import Count, Q
from django.utils import timezone

from ledger.errors import Conflict, LedgerError
from ledger.models import Agent, OptimizationRule
from ledger.money import cents, money_round
from optimization.models import Execution, Experiment, ExperimentArm, ExperimentAssignment, ScalingPolicy
from optimization.services.analytics import analytics_ensure_enabled
from optimization.services.scaling import POLICY_FIELDS

# What a scaling policy of an arm may set: everything but its owner, as for any policy.
ARM_POLICY_FIELDS = POLICY_FIELDS
# Copied from an arm rule into the agent's own rule when the winner is applied.
RULE_COPY_FIELDS = (
    "description",
    "metric",
    "operator",
    "threshold",
    "duration_seconds",
    "severity",
    "action",
    "cooldown_seconds",
    "enabled",
)
MIN_EXECUTIONS = 30  # per arm, for the normal approximations of the intervals and the test
ALPHA = 0.05
CONFIDENCE = 0.95
Z_95 = NormalDist().inv_cdf(1 - (1 - CONFIDENCE) / 2)  # 1.959964...
P95 = 0.95
# pg_advisory_xact_lock's key while agents are assigned: one open experiment per agent, checked and written
# under it (assignments are rare, operator actions).
_ASSIGNMENT_LOCK = 0x4558504552  # "EXPER"
WINNER_TEST = (
    "cost per successful task: two-sided z-test (delta-method standard errors) of the cheapest arm against "
    "each other arm, alpha 0.05 Bonferroni-corrected for the number of comparisons"
)


def experiment_running_q(now: dt.datetime, prefix: str = "") -> Q:
    """Experiments (or, with ``prefix`` such as ``"experiment__"``, rows of them) running at ``now``."""
    return Q(**{f"{prefix}started_at__lte": now}) & (
        Q(**{f"{prefix}ended_at__isnull": True}) | Q(**{f"{prefix}ended_at__gt": now})
    )


def experiment_is_running(experiment: Experiment, now: dt.datetime) -> bool:
    return experiment.started_at <= now and (experiment.ended_at is None or experiment.ended_at > now)


# --- Assignment -----------------------------------------------------------------------------------------


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
    the assignments in the order of ``agents``. A fixed number of queries for any number of agents.

    Refused (409 ``agent_in_another_experiment``, nothing written) when an agent is assigned to another
    experiment that has not ended: an agent runs under one arm's strategy at a time."""
    agents = list(agents)
    arms = list(experiment.arms.order_by("name", "pk"))
    agent_ids = [agent.pk for agent in agents]
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_ASSIGNMENT_LOCK])
    now = timezone.now()
    taken = sorted(
        ExperimentAssignment.objects.filter(agent_id__in=agent_ids)
        .exclude(experiment=experiment)
        .filter(Q(experiment__ended_at__isnull=True) | Q(experiment__ended_at__gt=now))
        .values_list("agent_id", flat=True)
        .distinct()
    )
    if taken:
        raise Conflict(
            f"{len(taken)} agent(s) are in another experiment that has not ended: {', '.join(taken[:20])}",
            code="agent_in_another_experiment",
            details={"agents": taken[:100]},
        )
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
            experiment=experiment, agent_id__in=agent_ids
        ).select_related("arm")
    }
    return [assigned[agent.pk] for agent in agents]


def _agents_get(agent_ids: list[str]) -> list[Agent]:
    unique = list(dict.fromkeys(agent_ids))
    found = Agent.objects.in_bulk(unique)
    unknown = [agent_id for agent_id in unique if agent_id not in found]
    if unknown:
        raise LedgerError(
            f"unknown agents: {', '.join(unknown[:20])}",
            code="unknown_agents",
            details={"agents": unknown[:100]},
        )
    return [found[agent_id] for agent_id in unique]


# --- Creating, adding agents, stopping ------------------------------------------------------------------


def _arm_policy(fields: dict) -> ScalingPolicy:
    """An arm's scaling policy, owned by no agent or tier, checked against the model's constraints (the one
    home of what a policy may be) before it is written."""
    unknown = sorted(set(fields) - set(ARM_POLICY_FIELDS))
    if unknown:
        raise LedgerError(f"unknown policy fields: {', '.join(unknown)}", code="invalid_policy")
    policy = ScalingPolicy(**fields)
    try:
        policy.full_clean(exclude=["agent", "tier"])
    except ValidationError as exc:
        raise LedgerError(
            f"invalid scaling policy: {'; '.join(exc.messages)}",
            code="invalid_policy",
            details={"fields": exc.message_dict} if hasattr(exc, "error_dict") else {},
        ) from exc
    return policy


def _arms_check(arms: list[dict]) -> None:
    if not arms:
        raise LedgerError("an experiment needs at least one arm", code="invalid_experiment")
    names = [arm["name"] for arm in arms]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise LedgerError(f"duplicate arm names: {', '.join(duplicates)}", code="invalid_experiment")
    bad_weights = [arm["name"] for arm in arms if arm.get("weight", 1) <= 0]
    if bad_weights:
        raise LedgerError(
            f"arm weights must be positive: {', '.join(bad_weights)}", code="invalid_experiment"
        )
    price = [arm["name"] for arm in arms if (arm.get("deal_max_unit_price_usd") or 0) < 0]
    if price:
        raise LedgerError(
            f"deal_max_unit_price_usd cannot be negative: {', '.join(price)}", code="invalid_experiment"
        )


@transaction.atomic
def experiment_create(
    *,
    name: str,
    arms: list[dict],
    agent_ids: list[str] | None = None,
    description: str = "",
    now: dt.datetime | None = None,
) -> Experiment:
    """Create a running experiment (started now) with its arms, and assign ``agent_ids`` to them by weight.

    Each arm is a dict: ``name``, and optionally ``weight`` (default 1), ``rule_ids``, ``scaling_policy``
    (policy fields: a new policy owned by the arm) and the deal preference (``buy_deals``,
    ``deal_max_unit_price_usd``). Everything is checked before anything is written: a refusal writes
    nothing."""
    now = now or timezone.now()
    _arms_check(arms)
    if Experiment.objects.filter(name=name).exists():
        raise Conflict(f"an experiment named {name!r} exists already", code="already_exists")
    rule_ids = sorted({rule_id for arm in arms for rule_id in arm.get("rule_ids", ())})
    known = set(OptimizationRule.objects.filter(pk__in=rule_ids).values_list("pk", flat=True))
    unknown = [rule_id for rule_id in rule_ids if rule_id not in known]
    if unknown:
        raise LedgerError(
            f"unknown rules: {', '.join(map(str, unknown))}", code="unknown_rules", details={"rules": unknown}
        )
    policies = {
        arm["name"]: _arm_policy(arm["scaling_policy"])
        for arm in arms
        if arm.get("scaling_policy") is not None
    }
    agents = _agents_get(agent_ids or [])

    try:
        with transaction.atomic():
            experiment = Experiment.objects.create(name=name, description=description, started_at=now)
    except IntegrityError as exc:  # a concurrent create of the same name committed first
        raise Conflict(f"an experiment named {name!r} exists already", code="already_exists") from exc
    for arm_in in arms:
        policy = policies.get(arm_in["name"])
        if policy is not None:
            policy.save()
        arm = ExperimentArm.objects.create(
            experiment=experiment,
            name=arm_in["name"],
            weight=arm_in.get("weight", 1),
            scaling_policy=policy,
            buy_deals=arm_in.get("buy_deals", True),
            deal_max_unit_price_usd=arm_in.get("deal_max_unit_price_usd"),
        )
        arm.rules.set(arm_in.get("rule_ids", ()))
    if agents:
        experiment_assign(experiment=experiment, agents=agents)
    return experiment


@transaction.atomic
def experiment_agents_add(
    *, experiment: Experiment, agent_ids: list[str], now: dt.datetime | None = None
) -> list[ExperimentAssignment]:
    """Assign more agents to an experiment that has not ended (by the same hash as at creation)."""
    now = now or timezone.now()
    experiment = Experiment.objects.select_for_update().get(pk=experiment.pk)
    if experiment.ended_at is not None and experiment.ended_at <= now:
        raise Conflict(f"experiment {experiment.name!r} has ended", code="experiment_ended")
    return experiment_assign(experiment=experiment, agents=_agents_get(agent_ids))


def _rule_copy_name(rule: OptimizationRule, agent_id: str) -> str:
    name = f"{rule.name} @{agent_id}"
    if len(name) <= 100:
        return name
    digest = hashlib.sha256(f"{rule.pk}\x00{agent_id}".encode()).hexdigest()[:16]
    return f"{rule.name[:60]} @{agent_id[:20]}~{digest}"[:100]


def _rule_reaches(rule: OptimizationRule, *, agent_id: str, tier_id: str) -> bool:
    """Whether an arm's ``rule`` reached an agent of the arm: within its own scope (``_scope`` in the rules
    evaluation)."""
    if rule.scope == OptimizationRule.Scope.TIER:
        return rule.tier_id == tier_id
    if rule.scope == OptimizationRule.Scope.AGENT:
        return rule.agent_id == agent_id
    return True


def _strategy_apply(*, experiment: Experiment, arm: ExperimentArm) -> dict:
    """Give every agent assigned to ``experiment`` the strategy of ``arm`` as its own, set-based: a fixed
    number of statements for any number of agents."""
    tiers = dict(
        ExperimentAssignment.objects.filter(experiment=experiment)
        .order_by("agent_id")
        .values_list("agent_id", "agent__tier_id")
    )
    agent_ids = list(tiers)
    arm_rules = list(arm.rules.order_by("pk"))
    arm_rule_ids = {rule.pk for rule in arm_rules}
    # The arm's rules replaced the agents' own agent-scoped rules while it ran; they still do.
    disabled = (
        OptimizationRule.objects.filter(
            scope=OptimizationRule.Scope.AGENT, agent_id__in=agent_ids, enabled=True
        )
        .exclude(pk__in=arm_rule_ids)
        .update(enabled=False)
    )
    copies = [
        OptimizationRule(
            name=_rule_copy_name(rule, agent_id),
            scope=OptimizationRule.Scope.AGENT,
            agent_id=agent_id,
            **{name: getattr(rule, name) for name in RULE_COPY_FIELDS},
        )
        for rule in arm_rules
        for agent_id in agent_ids
        if _rule_reaches(rule, agent_id=agent_id, tier_id=tiers[agent_id])
    ]
    # By name: a copy made for the agent by an earlier experiment is brought up to date and enabled again.
    OptimizationRule.objects.bulk_create(
        copies,
        update_conflicts=True,
        unique_fields=["name"],
        update_fields=[*RULE_COPY_FIELDS, "scope", "agent", "tier", "updated_at"],
        batch_size=1000,
    )
    policies = 0
    if arm.scaling_policy_id is not None and agent_ids:
        source = arm.scaling_policy
        now = timezone.now()
        overrides = [
            ScalingPolicy(
                agent_id=agent_id,
                updated_at=now,
                **{name: getattr(source, name) for name in ARM_POLICY_FIELDS},
            )
            for agent_id in agent_ids
        ]
        ScalingPolicy.objects.bulk_create(
            overrides,
            update_conflicts=True,
            unique_fields=["agent"],
            update_fields=[*ARM_POLICY_FIELDS, "updated_at"],
            batch_size=1000,
        )
        policies = len(overrides)
    return {
        "arm": arm.name,
        "agents": len(agent_ids),
        "rules_copied": len(copies),
        "own_rules_disabled": disabled,
        "scaling_policies_set": policies,
    }


@transaction.atomic
def experiment_stop(
    *, experiment: Experiment, apply_winner: bool = False, now: dt.datetime | None = None
) -> dict:
    """End a running experiment now. With ``apply_winner`` the report's winner (see the module docstring)
    first becomes every assigned agent's own strategy; without a winner that is refused (409 ``no_winner``,
    the experiment still running). Ending is claimed with a conditional update, so two stops end it once.
    """
    now = now or timezone.now()
    claimed = Experiment.objects.filter(pk=experiment.pk).filter(
        Q(ended_at__isnull=True) | Q(ended_at__gt=now)
    )
    # The row lock keeps a concurrent stop (or assignment) out until this one has committed.
    if not list(claimed.select_for_update().values_list("pk", flat=True)):
        raise Conflict(f"experiment {experiment.name!r} has already ended", code="experiment_ended")
    applied = None
    arm = None
    if apply_winner:
        summary = _summary(experiment=experiment, until=now)
        if summary["winner"] is None:
            raise Conflict(
                f"no winner to apply: {summary['winner_reason']}",
                code="no_winner",
                details={"reason": summary["winner_reason"]},
            )
        arm = ExperimentArm.objects.select_related("scaling_policy").get(pk=summary["winner"]["arm_id"])
        applied = _strategy_apply(experiment=experiment, arm=arm)
    claimed.update(ended_at=now, applied_arm=arm)
    experiment.refresh_from_db()
    return {"experiment": experiment, "applied": applied}


# --- While it runs: what the rules evaluation and the optimizer read ------------------------------------


def arm_rule_targets(*, now: dt.datetime) -> tuple[set[int], dict[int, set[int]]]:
    """The ids of every rule that belongs to an arm (of any experiment), and for each rule the running arms
    that hold it. Two queries, whatever the fleet."""
    through = ExperimentArm.rules.through
    in_arms = set(through.objects.values_list("optimizationrule_id", flat=True).distinct())
    running: dict[int, set[int]] = {}
    for rule_id, arm_id in through.objects.filter(
        experimentarm__in=ExperimentArm.objects.filter(experiment_running_q(now, "experiment__"))
    ).values_list("optimizationrule_id", "experimentarm_id"):
        running.setdefault(rule_id, set()).add(arm_id)
    return in_arms, running


def arm_of_agents(*, agent_ids, now: dt.datetime) -> dict[str, int]:
    """agent id -> the arm of the running experiment it is assigned to, for ``agent_ids`` (a list or an
    ``AgentRange``). One query."""
    from optimization.selectors import AgentRange

    assignments = ExperimentAssignment.objects.filter(experiment_running_q(now, "experiment__"))
    if isinstance(agent_ids, AgentRange):
        assignments = assignments.filter(**agent_ids.lookups("agent_id"))
    else:
        assignments = assignments.filter(agent_id__in=list(agent_ids))
    return dict(assignments.values_list("agent_id", "arm_id"))


def experiment_arm_running(*, agent_id: str, now: dt.datetime | None = None) -> ExperimentArm | None:
    """The arm of the running experiment ``agent_id`` is assigned to, with its scaling policy; or None."""
    now = now or timezone.now()
    return (
        ExperimentArm.objects.filter(
            experiment_running_q(now, "experiment__"), assignments__agent_id=agent_id
        )
        .select_related("scaling_policy", "experiment")
        .first()
    )


def arm_deal_refusal(*, arm: ExperimentArm | None, unit_price_usd: Decimal) -> str | None:
    """Why the optimizer must not buy a deal at ``unit_price_usd`` for an agent in ``arm`` (None: it may)."""
    if arm is None:
        return None
    where = f"experiment {arm.experiment.name!r}, arm {arm.name!r}"
    if not arm.buy_deals:
        return f"the agent's {where} buys no deals automatically"
    if arm.deal_max_unit_price_usd is not None and unit_price_usd > arm.deal_max_unit_price_usd:
        return (
            f"the deal's unit price {unit_price_usd.normalize():f} is over the "
            f"{arm.deal_max_unit_price_usd.normalize():f} the agent's {where} pays at most"
        )
    return None


# --- Report ---------------------------------------------------------------------------------------------

_STATS_SQL = """
SELECT a.arm_id,
       count(e.id) AS executions,
       count(e.id) FILTER (WHERE e.success) AS successes,
       count(e.id) FILTER (WHERE e.success IS NOT NULL) AS known,
       COALESCE(sum(e.cost_usd), 0) AS spend,
       COALESCE(sum(e.cost_usd * e.cost_usd), 0) AS spend_squares,
       COALESCE(sum(e.cost_usd) FILTER (WHERE e.success), 0) AS spend_successful
FROM {assignments} a
JOIN {executions} e ON e.agent_id = a.agent_id AND e.created_at >= %(since)s AND e.created_at < %(until)s
WHERE a.experiment_id = %(experiment)s
GROUP BY a.arm_id
"""

# The p95 and the order statistics at the ranks of its distribution-free interval (module docstring).
_DURATION_SQL = """
WITH d AS (
    SELECT a.arm_id, e.duration_ms AS v,
           row_number() OVER (PARTITION BY a.arm_id ORDER BY e.duration_ms) AS r,
           count(*) OVER (PARTITION BY a.arm_id) AS n
    FROM {assignments} a
    JOIN {executions} e ON e.agent_id = a.agent_id AND e.created_at >= %(since)s AND e.created_at < %(until)s
    WHERE a.experiment_id = %(experiment)s AND e.duration_ms IS NOT NULL
)
SELECT arm_id, max(n),
       percentile_cont(%(p)s) WITHIN GROUP (ORDER BY v),
       max(v) FILTER (WHERE r = GREATEST(1, floor(n * %(p)s - %(z)s * sqrt(n * %(p)s * (1 - %(p)s))))),
       max(v) FILTER (WHERE r = LEAST(n, ceil(n * %(p)s + %(z)s * sqrt(n * %(p)s * (1 - %(p)s))) + 1))
FROM d
GROUP BY arm_id
"""


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float] | None:
    """The Wilson score interval of a proportion; None without trials."""
    if trials <= 0:
        return None
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def ratio_standard_error(
    *, n: int, spend: float, spend_squares: float, successes: int, spend_successful: float
) -> float | None:
    """The delta method's standard error of spend / successes, a ratio of the per-execution means of cost
    and success (1 or 0); None when it is not defined (fewer than two executions or no success)."""
    if n < 2 or successes == 0:
        return None
    mean_cost, mean_success = spend / n, successes / n
    ratio = spend / successes
    var_cost = spend_squares / n - mean_cost**2
    var_success = mean_success - mean_success**2
    covariance = spend_successful / n - mean_cost * mean_success
    variance = (var_cost - 2 * ratio * covariance + ratio**2 * var_success) / (n * mean_success**2)
    return math.sqrt(max(variance, 0.0))


def _money(value: float) -> Decimal:
    return money_round(Decimal(repr(value)))


def _percent(value: float) -> Decimal:
    return cents(Decimal(repr(value * 100)))


def _arm_rows(*, experiment: Experiment, until: dt.datetime) -> list[dict]:
    params = {
        "experiment": experiment.pk,
        "since": experiment.started_at,
        "until": until,
        "p": P95,
        "z": Z_95,
    }
    tables = {"assignments": ExperimentAssignment._meta.db_table, "executions": Execution._meta.db_table}
    agents = dict(
        ExperimentAssignment.objects.filter(experiment=experiment)
        .values("arm_id")
        .annotate(agents=Count("agent_id"))
        .values_list("arm_id", "agents")
        .order_by()
    )
    with connection.cursor() as cursor:
        cursor.execute(_STATS_SQL.format(**tables), params)
        stats = {row[0]: row[1:] for row in cursor.fetchall()}
        cursor.execute(_DURATION_SQL.format(**tables), params)
        durations = {row[0]: row[1:] for row in cursor.fetchall()}
    rows = []
    for arm in experiment.arms.order_by("name", "pk"):
        executions, successes, known, spend, spend_squares, spend_successful = stats.get(
            arm.pk, (0, 0, 0, Decimal(0), Decimal(0), Decimal(0))
        )
        spend = money_round(spend)
        cost = money_round(spend / successes) if successes else None
        error = ratio_standard_error(
            n=executions,
            spend=float(spend),
            spend_squares=float(spend_squares),
            successes=successes,
            spend_successful=float(spend_successful),
        )
        cost_interval = None
        if error is not None:
            cost_interval = [_money(max(0.0, float(cost) - Z_95 * error)), _money(float(cost) + Z_95 * error)]
        wilson = wilson_interval(successes, known)
        timed, p95, p95_low, p95_high = durations.get(arm.pk, (0, None, None, None))
        rows.append(
            {
                "arm_id": arm.pk,
                "arm": arm.name,
                "weight": arm.weight,
                "agents": agents.get(arm.pk, 0),
                "executions": executions,
                "successes": successes,
                "outcomes_known": known,
                "spend_usd": spend,
                "cost_per_successful_task_usd": cost,
                "cost_per_successful_task_ci95_usd": cost_interval,
                "cost_per_successful_task_standard_error_usd": None if error is None else _money(error),
                "success_rate_percent": None if not known else _percent(successes / known),
                "success_rate_ci95_percent": None if wilson is None else [_percent(b) for b in wilson],
                "timed_executions": timed,
                "p95_duration_ms": None if p95 is None else cents(Decimal(repr(float(p95)))),
                "p95_duration_ci95_ms": None if p95 is None else [Decimal(p95_low), Decimal(p95_high)],
                "period_start": experiment.started_at,
                "period_end": until,
            }
        )
    return rows


def experiment_winner(rows: list[dict]) -> tuple[dict | None, str | None, list[dict]]:
    """The winning arm's row (or None and the reason), and the comparisons made (see the module
    docstring)."""
    if len(rows) < 2:
        return None, "an experiment with one arm has nothing to compare", []
    thin = [row["arm"] for row in rows if row["executions"] < MIN_EXECUTIONS]
    if thin:
        return None, f"too few executions (under {MIN_EXECUTIONS}) in arm(s): {', '.join(thin)}", []
    unsuccessful = [row["arm"] for row in rows if not row["successes"]]
    if unsuccessful:
        return None, f"no successful task yet in arm(s): {', '.join(unsuccessful)}", []
    best = min(rows, key=lambda row: (row["cost_per_successful_task_usd"], row["arm"]))
    others = [row for row in rows if row is not best]
    alpha = ALPHA / len(others)
    comparisons, not_significant = [], []
    for other in others:
        difference = float(other["cost_per_successful_task_usd"] - best["cost_per_successful_task_usd"])
        error = math.hypot(
            float(best["cost_per_successful_task_standard_error_usd"]),
            float(other["cost_per_successful_task_standard_error_usd"]),
        )
        if error > 0:
            z = difference / error
            p_value = 2 * (1 - NormalDist().cdf(abs(z)))
        else:
            z, p_value = (math.inf, 0.0) if difference else (0.0, 1.0)
        significant = difference > 0 and p_value < alpha
        comparisons.append(
            {
                "arm": best["arm"],
                "against": other["arm"],
                "difference_usd": _money(difference),
                "z": None if math.isinf(z) else round(z, 4),
                "p_value": round(p_value, 6),
                "alpha": round(alpha, 6),
                "significant": significant,
            }
        )
        if not significant:
            not_significant.append(f"{best['arm']} vs {other['arm']} (p = {p_value:.4f} >= {alpha:.4f})")
    if not_significant:
        return (
            None,
            f"no significant difference in cost per successful task: {'; '.join(not_significant)}",
            (comparisons),
        )
    return best, None, comparisons


def _summary(*, experiment: Experiment, until: dt.datetime) -> dict:
    rows = _arm_rows(experiment=experiment, until=until)
    winner, reason, comparisons = experiment_winner(rows)
    return {
        "arms": rows,
        "winner": None if winner is None else {"arm_id": winner["arm_id"], "arm": winner["arm"]},
        "winner_reason": reason,
        "comparisons": comparisons,
        "test": WINNER_TEST,
        "min_executions_per_arm": MIN_EXECUTIONS,
    }


def experiment_summary(*, experiment: Experiment, now: dt.datetime | None = None) -> dict:
    """The report per arm (see the module docstring), the winner or why there is none, and the comparisons
    behind it, over ``started_at`` until ``ended_at`` (or now). Three queries. Part of performance
    analytics."""
    analytics_ensure_enabled()
    return _summary(experiment=experiment, until=experiment.ended_at or now or timezone.now())


def experiment_report(*, experiment: Experiment, now: dt.datetime | None = None) -> list[dict]:
    """The report's rows per arm (``experiment_summary`` without the verdict)."""
    return experiment_summary(experiment=experiment, now=now)["arms"]

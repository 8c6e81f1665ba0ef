"""Optimization rules: evaluate every enabled rule against fleet-wide metrics and act on what fires.

A rule's condition is checked per subject: an agent, or an agent's resource type for per-resource metrics.
``RuleState`` remembers since when a condition has held, so ``duration: 5m`` fires only after five minutes
of it holding, and ``last_fired_at`` keeps a rule quiet for its cooldown. The metrics come from
``optimization.selectors``, one query per metric and window for the whole fleet, so an evaluation costs the
same number of queries for ten agents or ten thousand. Only the actions that call a per-agent service
(throttle, lift, scale) cost queries per agent acted on.
"""

from __future__ import annotations

import datetime as dt
import logging
import operator
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal

from django.db import transaction
from django.utils import timezone

from ledger.errors import LedgerError
from ledger.models import Agent, OptimizationRule
from ledger.services import agent_set_status
from optimization.models import Alert, RuleState
from optimization.selectors import (
    budget_utilization,
    cost_spike_ratio,
    duration_percentiles,
    execution_stats,
    resource_utilization,
)
from optimization.services.alerts import alerts_create
from optimization.services.scaling import scaling_apply

logger = logging.getLogger(__name__)

Metric = OptimizationRule.Metric
Action = OptimizationRule.Action

METRIC_WINDOW_MIN = dt.timedelta(hours=1)
THROTTLE_REASON_PREFIX = "rule:"

OPERATORS: dict[str, Callable[[Decimal, Decimal], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
}

DEFAULT_RECOMMENDATIONS = {
    Metric.RESOURCE_UTILIZATION_PERCENT: (
        "{subject} is running out: buy units in the marketplace, ask for a grant or move to a bigger tier."
    ),
    Metric.BUDGET_UTILIZATION_PERCENT: "Raise the monthly budget or cut the most expensive resource use.",
    Metric.ERROR_RATE_PERCENT: "Look into the failing executions: failed runs still spend quota.",
    Metric.COST_SPIKE_RATIO: "Check for a runaway loop or an unusually large job in the last hour.",
    Metric.P95_DURATION_MS: "Slow executions: consider scaling up or splitting the work.",
    Metric.THROUGHPUT_PER_HOUR: "Throughput is off its usual level: consider scaling to match the load.",
}

# About the largest value RuleState.last_value holds (20 digits, 6 of them decimals; a whole number, so
# that SQLite's floats keep it exact). A cost spike against a near-zero baseline can be larger, and one
# unstorable value must not stop the whole evaluation.
LAST_VALUE_MAX = Decimal("99999999999999")

# subject "" stands for the agent itself; per-resource metrics use the resource type code.
Values = dict[tuple[str, str], Decimal]


def throttle_reason(rule: OptimizationRule) -> str:
    return f"{THROTTLE_REASON_PREFIX}{rule.name}"


def rule_window(rule: OptimizationRule) -> dt.timedelta:
    """The look-back of windowed metrics: the last hour, or the rule's duration if that is longer."""
    return max(METRIC_WINDOW_MIN, dt.timedelta(seconds=rule.duration_seconds))


class _Metrics:
    """The selectors' results for one evaluation, each computed at most once per window."""

    def __init__(self, now: dt.datetime):
        self.now = now
        self._cache: dict[tuple, object] = {}

    def _once(self, key: tuple, compute: Callable[[], object]):
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def values(self, rule: OptimizationRule) -> Values:
        now, metric = self.now, rule.metric
        since = now - rule_window(rule)
        if metric == Metric.RESOURCE_UTILIZATION_PERCENT:
            rows = self._once(("resources",), lambda: resource_utilization(now=now))
            return dict(rows)
        if metric == Metric.BUDGET_UTILIZATION_PERCENT:
            rows = self._once(("budget",), lambda: budget_utilization(now=now))
            return {(agent, ""): row["percent"] for agent, row in rows.items() if row["percent"] is not None}
        if metric == Metric.COST_SPIKE_RATIO:
            rows = self._once(("spike",), lambda: cost_spike_ratio(now=now))
            return {(agent, ""): row["ratio"] for agent, row in rows.items()}
        if metric == Metric.P95_DURATION_MS:
            rows = self._once(
                ("p95", since), lambda: duration_percentiles(since=since, until=now, percentiles=(95,))
            )
            return {(agent, ""): row[95] for agent, row in rows.items()}
        if metric in (Metric.ERROR_RATE_PERCENT, Metric.THROUGHPUT_PER_HOUR):
            rows = self._once(("executions", since), lambda: execution_stats(since=since, until=now))
            column = "error_rate_percent" if metric == Metric.ERROR_RATE_PERCENT else "throughput_per_hour"
            return {(agent, ""): row[column] for agent, row in rows.items() if row[column] is not None}
        logger.warning("rule %s has an unknown metric %r", rule.name, metric)
        return {}


@dataclass
class _AgentRow:
    tier_id: str
    status: str
    status_reason: str


@dataclass
class RulesReport:
    rules: int = 0
    conditions_true: int = 0
    fired: int = 0
    alerts: int = 0
    throttled: int = 0
    lifted: int = 0
    scaled: int = 0
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "rules": self.rules,
            "conditions_true": self.conditions_true,
            "fired": self.fired,
            "alerts": self.alerts,
            "throttled": self.throttled,
            "lifted": self.lifted,
            "scaled": self.scaled,
            "errors": self.errors,
        }


def _in_scope(rule: OptimizationRule, agents: dict[str, _AgentRow]) -> set[str]:
    if rule.scope == OptimizationRule.Scope.AGENT:
        return {rule.agent_id} & agents.keys()
    if rule.scope == OptimizationRule.Scope.TIER:
        return {agent_id for agent_id, row in agents.items() if row.tier_id == rule.tier_id}
    return set(agents)


def _true_subjects(rule: OptimizationRule, metrics: _Metrics, agents: dict[str, _AgentRow]) -> Values:
    """(agent, subject) -> value for the in-scope subjects whose condition holds now."""
    scope = _in_scope(rule, agents)
    values = {key: value for key, value in metrics.values(rule).items() if key[0] in scope}
    if rule.metric == Metric.THROUGHPUT_PER_HOUR:
        # An agent that ran nothing in the window has a throughput of zero, not an unknown one.
        for agent_id in scope:
            values.setdefault((agent_id, ""), Decimal("0.00"))
    compare = OPERATORS[rule.operator]
    return {key: value for key, value in values.items() if compare(value, rule.threshold)}


def _fire_alert(
    rule: OptimizationRule,
    agent_id: str,
    subject: str,
    value: Decimal,
    now: dt.datetime,
    *,
    outcome: str = "",
) -> Alert:
    on = f" on {subject}" if subject else ""
    threshold = f"{rule.threshold.normalize():f}"
    data = {
        "rule": rule.name,
        "metric": rule.metric,
        "operator": rule.operator,
        "threshold": threshold,
        "value": str(value),
        "subject": subject,
        "duration_seconds": rule.duration_seconds,
        "action": rule.action,
    }
    held = f" for {rule.duration_seconds} s or more" if rule.duration_seconds else ""
    message = (
        f"Rule {rule.name} ({rule.condition}) holds for agent {agent_id}{on}{held}: the value is {value}."
    )
    if rule.action == Action.RECOMMEND:
        template = rule.description.strip() or DEFAULT_RECOMMENDATIONS.get(rule.metric, "Review this agent.")
        data["recommendation"] = template.replace("{subject}", subject or agent_id)
        message += f" Recommendation: {data['recommendation']}"
    if outcome:
        message += f" {outcome}"
    return Alert(
        agent_id=agent_id,
        kind=Alert.Kind.RULE,
        severity=rule.severity,
        rule=rule,
        title=f"{rule.name}: {rule.metric}{on} is {value} ({rule.operator} {threshold})"[:200],
        message=message,
        data=data,
        dedup_key=f"rule:{rule.pk}:{agent_id}:{subject}:{now.isoformat()}",
    )


@transaction.atomic
def rules_evaluate(*, now: dt.datetime | None = None) -> dict:
    """Evaluate every enabled rule for every subject in its scope, keep the rule states, and run the actions
    of the rules that fire. Returns counts of what happened.

    The enabled rules are locked for the evaluation, so two evaluations running at once take turns instead
    of both firing the same condition.
    """
    now = now or timezone.now()
    report = RulesReport()
    rules = list(OptimizationRule.objects.select_for_update().filter(enabled=True).order_by("pk"))
    report.rules = len(rules)
    agents = {
        agent_id: _AgentRow(tier_id, status, reason)
        for agent_id, tier_id, status, reason in Agent.objects.values_list(
            "id", "tier_id", "status", "status_reason"
        )
    }
    metrics = _Metrics(now)
    # A state of a rule that is no longer enabled means nothing any more.
    RuleState.objects.exclude(rule_id__in=[rule.pk for rule in rules]).delete()
    states: dict[int, dict[tuple[str, str], RuleState]] = defaultdict(dict)
    for state in RuleState.objects.all():
        states[state.rule_id][(state.agent_id, state.subject)] = state

    new_states: list[RuleState] = []
    changed_states: dict[int, RuleState] = {}
    stale_state_ids: list[int] = []
    fired: list[tuple[OptimizationRule, str, str, Decimal]] = []
    holding: dict[int, set[str]] = {}  # throttle rule -> agents for which its condition holds now

    for rule in rules:
        true_now = _true_subjects(rule, metrics, agents)
        report.conditions_true += len(true_now)
        if rule.action == Action.THROTTLE:
            holding[rule.pk] = {agent_id for agent_id, _ in true_now}
        for (agent_id, subject), value in true_now.items():
            stored = max(min(value, LAST_VALUE_MAX), -LAST_VALUE_MAX)
            state = states[rule.pk].get((agent_id, subject))
            if state is None:
                state = RuleState(
                    rule=rule, agent_id=agent_id, subject=subject, true_since=now, last_value=stored
                )
                new_states.append(state)
            elif state.last_value != stored:
                state.last_value = stored
                changed_states[state.pk] = state
            held_long_enough = now - state.true_since >= dt.timedelta(seconds=rule.duration_seconds)
            cooled_down = state.last_fired_at is None or now - state.last_fired_at >= dt.timedelta(
                seconds=rule.cooldown_seconds
            )
            if held_long_enough and cooled_down:
                state.last_fired_at = now
                if state.pk is not None:
                    changed_states[state.pk] = state
                fired.append((rule, agent_id, subject, value))
        stale_state_ids += [state.pk for key, state in states[rule.pk].items() if key not in true_now]

    # False conditions reset: the next time one holds, its duration counts from then.
    if stale_state_ids:
        RuleState.objects.filter(pk__in=stale_state_ids).delete()
    if new_states:
        RuleState.objects.bulk_create(new_states, ignore_conflicts=True)
    if changed_states:
        RuleState.objects.bulk_update(list(changed_states.values()), ["last_value", "last_fired_at"])

    alerts = _actions_run(fired, agents, now, report)
    alerts += _throttles_lift(rules, holding, agents, now, report)
    report.fired = len(fired)
    report.alerts = alerts_create(alerts=alerts, now=now)
    return report.as_dict()


def _actions_run(
    fired: list[tuple[OptimizationRule, str, str, Decimal]],
    agents: dict[str, _AgentRow],
    now: dt.datetime,
    report: RulesReport,
) -> list[Alert]:
    alerts: list[Alert] = []
    acted: set[tuple[int, str]] = set()  # agent-wide actions run once per rule and agent
    agent_objects = Agent.objects.in_bulk(
        {agent_id for rule, agent_id, _, _ in fired if rule.action not in (Action.NOTIFY, Action.RECOMMEND)}
    )
    for rule, agent_id, subject, value in fired:
        if rule.action in (Action.NOTIFY, Action.RECOMMEND):
            alerts.append(_fire_alert(rule, agent_id, subject, value, now))
            continue
        if (rule.pk, agent_id) in acted:
            continue
        acted.add((rule.pk, agent_id))
        if rule.action == Action.THROTTLE:
            row = agents[agent_id]
            # Only an active agent is throttled: a suspension is stronger and must not be softened, and an
            # agent already throttled (by this rule or by hand) keeps its reason.
            if row.status != Agent.Status.ACTIVE:
                continue
            agent = agent_set_status(
                agent=agent_objects[agent_id], status=Agent.Status.THROTTLED, reason=throttle_reason(rule)
            )
            row.status, row.status_reason = agent.status, agent.status_reason
            report.throttled += 1
            outcome = "The agent is throttled until the rule no longer holds."
            alerts.append(_fire_alert(rule, agent_id, subject, value, now, outcome=outcome))
        elif rule.action in (Action.SCALE_UP, Action.SCALE_DOWN):
            direction = "up" if rule.action == Action.SCALE_UP else "down"
            on = f" on {subject}" if subject else ""
            try:
                event = scaling_apply(
                    agent=agent_objects[agent_id],
                    direction=direction,
                    trigger="rule",
                    reason=f"rule {rule.name}: {rule.metric}{on} = {value} ({rule.condition})",
                )
            except LedgerError as exc:
                report.errors.append(f"{rule.name} {agent_id}: {exc.message}")
                continue
            report.scaled += event is not None
    return alerts


def _throttles_lift(
    rules: list[OptimizationRule],
    holding: dict[int, set[str]],
    agents: dict[str, _AgentRow],
    now: dt.datetime,
    report: RulesReport,
) -> list[Alert]:
    """Set back to active the agents a rule throttled once that rule no longer holds for them (or is no
    longer an enabled throttle rule). Agents throttled by hand, or suspended, are left alone."""
    throttle_rules = {throttle_reason(rule): rule for rule in rules if rule.action == Action.THROTTLE}
    to_lift = []
    for agent_id, row in agents.items():
        if row.status != Agent.Status.THROTTLED or not row.status_reason.startswith(THROTTLE_REASON_PREFIX):
            continue
        rule = throttle_rules.get(row.status_reason)
        if rule is None or agent_id not in holding.get(rule.pk, set()):
            to_lift.append((agent_id, row, rule))
    agent_objects = Agent.objects.in_bulk([agent_id for agent_id, _, _ in to_lift])
    alerts = []
    for agent_id, row, rule in to_lift:
        reason = row.status_reason
        agent_set_status(agent=agent_objects[agent_id], status=Agent.Status.ACTIVE, reason="")
        row.status, row.status_reason = Agent.Status.ACTIVE, ""
        report.lifted += 1
        why = (
            "its condition no longer holds"
            if rule is not None
            else "the rule is no longer an enabled throttle"
        )
        alerts.append(
            Alert(
                agent_id=agent_id,
                kind=Alert.Kind.RULE,
                severity=OptimizationRule.Severity.INFO,
                rule=rule,
                title=f"Throttle lifted: {reason.removeprefix(THROTTLE_REASON_PREFIX)}"[:200],
                message=f"Agent {agent_id} is active again: it was throttled by {reason} and {why}.",
                data={"rule": reason.removeprefix(THROTTLE_REASON_PREFIX), "lifted": True},
                dedup_key=f"rule-lift:{agent_id}:{reason}:{now.isoformat()}"[:300],
            )
        )
    return alerts

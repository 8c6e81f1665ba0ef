"""Optimization rules: evaluate every enabled rule against fleet-wide metrics and act on what fires.

A rule's condition is checked per subject: an agent, or an agent's resource type for per-resource metrics.
``RuleState`` remembers since when a condition has held, so ``duration: 5m`` fires at the first evaluation
five minutes after the one that saw it hold, whatever the evaluations' jitter (``rule_held_since``), and
``last_fired_at`` keeps a rule quiet for its cooldown. The metrics come from
``optimization.selectors``, one query per metric and window for the whole fleet, so an evaluation costs the
same number of queries for ten agents or ten thousand. The states are kept set-based too: two statements
per rule, whatever the number of subjects, and no state is loaded into Python. Only the
actions that call a per-agent service (throttle, lift, scale) cost queries per agent acted on.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal

from django.db import transaction
from django.utils import timezone

from ledger.bulk import server_bound_cursor
from ledger.errors import LedgerError
from ledger.invariants import RULE_THROTTLE_PREFIX
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
from optimization.services.alerts import alerts_create, alerts_dispatch
from optimization.services.scaling import scaling_apply

logger = logging.getLogger(__name__)

Metric = OptimizationRule.Metric
Action = OptimizationRule.Action

METRIC_WINDOW_MIN = dt.timedelta(hours=1)
THROTTLE_REASON_PREFIX = RULE_THROTTLE_PREFIX  # the status reason of a rule's throttle: "rule:<name>"

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

# About the largest value RuleState.last_value holds (20 digits, 6 of them decimals). A cost spike against
# a near-zero baseline can be larger, and one unstorable value must not stop the whole evaluation.
LAST_VALUE_MAX = Decimal("99999999999999")
ROUNDING_MARGIN = Decimal("0.01")
ALERT_ONLY_ACTIONS = (Action.NOTIFY, Action.RECOMMEND)

# subject "" stands for the agent itself; per-resource metrics use the resource type code.
Values = dict[tuple[str, str], Decimal]


def throttle_reason(rule: OptimizationRule) -> str:
    return f"{THROTTLE_REASON_PREFIX}{rule.name}"


def rule_window(rule: OptimizationRule) -> dt.timedelta:
    """The look-back of windowed metrics: the last hour, or the rule's duration if that is longer."""
    return max(METRIC_WINDOW_MIN, dt.timedelta(seconds=rule.duration_seconds))


# Evaluations follow their schedule (every minute by default) a little late and unevenly: beat sends each
# run some time after it is due and the run waits its turn in the queue. A state's ``true_since`` is the
# evaluation that first saw its condition, so the evaluation one duration later can find a few seconds less
# than the duration since then, and a ``duration: 1m`` rule would fire at the next evaluation, 2 minutes
# in. So a duration counts as held this much early: more than the evaluations' jitter, well under their
# interval, so a rule fires neither an evaluation late nor one early.
EVALUATION_JITTER = dt.timedelta(seconds=10)


def rule_held_since(rule: OptimizationRule, now: dt.datetime) -> dt.datetime:
    """A condition true since this instant or earlier has held for ``rule``'s duration at ``now``.

    A rule without a duration fires at the evaluation that first sees its condition; a rule with one never
    does (the allowance stops a microsecond short of ``now``), however short the duration.
    """
    if not rule.duration_seconds:
        return now
    allowed = dt.timedelta(seconds=rule.duration_seconds) - EVALUATION_JITTER
    return now - max(allowed, dt.timedelta(microseconds=1))


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
            # One row per agent and resource type: only the rows that can meet the threshold leave the
            # database. The range is widened by a hundredth, what rounding to two places can move a value.
            at_least = at_most = None
            if rule.operator in (">", ">=", "=="):
                at_least = rule.threshold - ROUNDING_MARGIN
            if rule.operator in ("<", "<=", "=="):
                at_most = rule.threshold + ROUNDING_MARGIN
            return self._once(
                ("resources", at_least, at_most),
                lambda: resource_utilization(now=now, at_least=at_least, at_most=at_most),
            )
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


class _Scopes:
    """Which agents each rule covers. The fleet's agents are read (one query) only for a rule that needs
    them listed: a tier's rule, or a throughput rule (an agent that ran nothing has a throughput of 0).
    A fleet-wide rule covers whoever has a value, and an agent's rule its agent."""

    def __init__(self) -> None:
        self._tiers: dict[str, str] | None = None

    def _agent_tiers(self) -> dict[str, str]:
        if self._tiers is None:
            self._tiers = dict(Agent.objects.values_list("id", "tier_id"))
        return self._tiers

    def of(self, rule: OptimizationRule) -> set[str] | None:
        """The agents ``rule`` covers; None for every agent with a value."""
        if rule.scope == OptimizationRule.Scope.AGENT:
            return {rule.agent_id}
        if rule.scope == OptimizationRule.Scope.TIER:
            return {agent_id for agent_id, tier_id in self._agent_tiers().items() if tier_id == rule.tier_id}
        if rule.metric == Metric.THROUGHPUT_PER_HOUR:
            return set(self._agent_tiers())
        return None


def _true_subjects(rule: OptimizationRule, metrics: _Metrics, scopes: _Scopes) -> Values:
    """(agent, subject) -> value for the in-scope subjects whose condition holds now."""
    scope = scopes.of(rule)
    values = metrics.values(rule)
    if scope is not None:
        values = {key: value for key, value in values.items() if key[0] in scope}
    compare = OPERATORS[rule.operator]
    if rule.metric == Metric.THROUGHPUT_PER_HOUR:
        # An agent that ran nothing in the window has a throughput of zero, not an unknown one.
        for agent_id in scope:
            values.setdefault((agent_id, ""), Decimal("0.00"))
    return {key: value for key, value in values.items() if compare(value, rule.threshold)}


@dataclass(frozen=True)
class _AlertParts:
    """What a rule's alerts say that does not depend on the subject: the Python path (``_fire_alert``) and
    the set-based one (``_FIRE_AND_ALERT_SQL``) both build their texts from these, and a test holds their
    outputs together."""

    title_head: str  # then "{on} is {value}", then title_tail
    title_tail: str
    message_head: str  # then "{agent}{on}", then held, then ": the value is {value}."
    held: str
    recommendation: str | None  # a template with "{subject}", for recommend rules
    data: dict  # then "value" and "subject" (and "recommendation")


def _alert_parts(rule: OptimizationRule) -> _AlertParts:
    threshold = f"{rule.threshold.normalize():f}"
    recommendation = None
    if rule.action == Action.RECOMMEND:
        recommendation = rule.description.strip() or DEFAULT_RECOMMENDATIONS.get(
            rule.metric, "Review this agent."
        )
    return _AlertParts(
        title_head=f"{rule.name}: {rule.metric}",
        title_tail=f" ({rule.operator} {threshold})",
        message_head=f"Rule {rule.name} ({rule.condition}) holds for agent ",
        held=f" for {rule.duration_seconds} s or more" if rule.duration_seconds else "",
        recommendation=recommendation,
        data={
            "rule": rule.name,
            "metric": rule.metric,
            "operator": rule.operator,
            "threshold": threshold,
            "duration_seconds": rule.duration_seconds,
            "action": rule.action,
        },
    )


def _fire_alert(
    rule: OptimizationRule,
    agent_id: str,
    subject: str,
    value: Decimal,
    now: dt.datetime,
    *,
    outcome: str = "",
) -> Alert:
    parts = _alert_parts(rule)
    on = f" on {subject}" if subject else ""
    data = {**parts.data, "value": str(value), "subject": subject}
    message = f"{parts.message_head}{agent_id}{on}{parts.held}: the value is {value}."
    if parts.recommendation is not None:
        data["recommendation"] = parts.recommendation.replace("{subject}", subject or agent_id)
        message += f" Recommendation: {data['recommendation']}"
    if outcome:
        message += f" {outcome}"
    return Alert(
        agent_id=agent_id,
        kind=Alert.Kind.RULE,
        severity=rule.severity,
        rule=rule,
        title=f"{parts.title_head}{on} is {value}{parts.title_tail}"[:200],
        message=message,
        data=data,
        dedup_key=_dedup_key(rule, agent_id, subject, now),
    )


def _dedup_key(rule: OptimizationRule, agent_id: str, subject: str, now: dt.datetime) -> str:
    return f"rule:{rule.pk}:{agent_id}:{subject}:{now.isoformat()}"


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
    scopes = _Scopes()
    metrics = _Metrics(now)
    # A state of a rule that is no longer enabled means nothing any more.
    RuleState.objects.exclude(rule_id__in=[rule.pk for rule in rules]).delete()

    fired: list[tuple[OptimizationRule, str, str, Decimal]] = []
    holding: dict[int, set[str]] = {}  # throttle rule -> agents for which its condition holds now
    alerted_in_sql = 0
    for rule in rules:
        true_now = _true_subjects(rule, metrics, scopes)
        report.conditions_true += len(true_now)
        if rule.action == Action.THROTTLE:
            holding[rule.pk] = {agent_id for agent_id, _ in true_now}
        advanced = _states_advance(rule, true_now, now)
        fired += [
            (rule, agent_id, subject, true_now[agent_id, subject]) for agent_id, subject in advanced.fired
        ]
        report.fired += advanced.fired_in_sql
        alerted_in_sql += advanced.alerts_in_sql

    alerts = _actions_run(fired, now, report)
    alerts += _throttles_lift(rules, holding, now, report)
    report.fired += len(fired)
    report.alerts = alerts_create(alerts=alerts, now=now) + alerted_in_sql
    if alerted_in_sql:
        alerts_dispatch(now=now)
    return report.as_dict()


@dataclass
class _Advanced:
    fired: list[tuple[str, str]]  # (agent, subject) that fired, for the caller to act on
    fired_in_sql: int = 0  # fired and alerted on in the database, by an alert-only rule
    alerts_in_sql: int = 0


def _states_advance(rule: OptimizationRule, true_now: Values, now: dt.datetime) -> _Advanced:
    """Bring ``rule``'s states up to date with the subjects whose condition holds now, and fire those held
    for the rule's duration and out of its cooldown (their ``last_fired_at`` set to ``now``).

    A subject whose condition no longer holds loses its state (the next time it holds, its duration counts
    from then); a new one starts its state at ``now``. Two statements per rule whatever the number of
    subjects: an alert-only rule (notify, recommend) also writes its alerts in the second, so what fired
    never comes back to Python. For rules whose action runs a service, the subjects that fired are returned.
    """
    keys = sorted(true_now)
    stored = [max(min(true_now[key], LAST_VALUE_MAX), -LAST_VALUE_MAX) for key in keys]
    return _states_advance_sql(rule, keys, stored, [str(true_now[key]) for key in keys], now)


# Keep the states of a rule's true subjects and fire those held long enough and out of cooldown, in one
# upsert: a new subject starts its state at ``now`` (and fires at once if the rule has no duration); an
# existing one takes its latest value and, if it fires, ``last_fired_at = now``. Its rows come back only
# when they changed, flagged ``fired``. ``last_fired_at = now`` tells a firing apart because a state that
# fired at this very ``now`` already (an evaluation run twice for one instant) is left as it is.
_STATES_UPSERT_SQL = """
INSERT INTO {states} AS s (rule_id, agent_id, subject, true_since, last_value, last_fired_at)
SELECT %(rule)s, t.agent_id, t.subject, %(now)s, t.value,
       CASE WHEN %(now)s <= %(held_since)s THEN %(now)s END
FROM unnest(%(agents)b::text[], %(subjects)b::text[], %(stored)b::numeric[]) AS t(agent_id, subject, value)
ON CONFLICT (rule_id, agent_id, subject) DO UPDATE SET
    last_value = EXCLUDED.last_value,
    last_fired_at = CASE WHEN {fires} THEN %(now)s ELSE s.last_fired_at END
WHERE s.last_fired_at IS DISTINCT FROM %(now)s
  AND (s.last_value IS DISTINCT FROM EXCLUDED.last_value OR {fires})
RETURNING s.agent_id, s.subject, s.last_fired_at = %(now)s AS fired
"""
_FIRES = (
    "(s.true_since <= %(held_since)s AND (s.last_fired_at IS NULL OR s.last_fired_at <= %(cooled_since)s))"
)

# For an alert-only rule the upsert's fired rows feed the INSERT of their alerts, worded as ``_fire_alert``
# words them; ``values`` are the values' texts, by subject.
_FIRE_AND_ALERT_SQL = """
WITH kept AS ({upsert}), shown AS (
    SELECT k.agent_id, k.subject, v.value,
           CASE WHEN k.subject <> '' THEN ' on ' || k.subject ELSE '' END AS on_subject,
           replace(%(recommendation)s, '{{subject}}', COALESCE(NULLIF(k.subject, ''), k.agent_id)) AS advice
    FROM kept k
    JOIN unnest(%(agents)b::text[], %(subjects)b::text[], %(values)b::text[]) AS v(agent_id, subject, value)
      ON v.agent_id = k.agent_id AND v.subject = k.subject
    WHERE k.fired
), inserted AS (
    INSERT INTO {alerts} (agent_id, kind, severity, rule_id, title, message, data, dedup_key, created_at,
                          acknowledged_by)
    SELECT s.agent_id, %(kind)s, %(severity)s, %(rule)s,
           left(%(title_head)s || s.on_subject || ' is ' || s.value || %(title_tail)s, 200),
           %(message_head)s || s.agent_id || s.on_subject || %(held)s || ': the value is ' || s.value || '.'
               || COALESCE(' Recommendation: ' || s.advice, ''),
           %(data)s::jsonb || jsonb_build_object('value', s.value, 'subject', s.subject) || {advice_data},
           'rule:' || %(rule)s || ':' || s.agent_id || ':' || s.subject || ':' || %(now_iso)s,
           %(created_at)s, ''
    FROM shown s
    ON CONFLICT (dedup_key) DO NOTHING
    RETURNING 1
)
SELECT (SELECT count(*) FROM shown), (SELECT count(*) FROM inserted)
"""


def _states_advance_sql(
    rule: OptimizationRule,
    keys: list[tuple[str, str]],
    stored: list[Decimal],
    values: list[str],
    now: dt.datetime,
) -> _Advanced:
    """Two statements: drop the states of subjects no longer true, then the upsert (with the alerts of an
    alert-only rule)."""
    states = RuleState._meta.db_table
    agents = [agent_id for agent_id, _ in keys]
    subjects = [subject for _, subject in keys]
    with server_bound_cursor() as cursor:  # the arrays (``%b``) in binary
        cursor.execute(
            f"DELETE FROM {states} AS s WHERE s.rule_id = %s AND NOT EXISTS ("
            "SELECT 1 FROM unnest(%b::text[], %b::text[]) AS t(agent_id, subject) "
            "WHERE t.agent_id = s.agent_id AND t.subject = s.subject)",
            [rule.pk, agents, subjects],
        )
        if not keys:
            return _Advanced([])
        params = {
            "rule": rule.pk,
            "now": now,
            "held_since": rule_held_since(rule, now),
            "cooled_since": now - dt.timedelta(seconds=rule.cooldown_seconds),
            "agents": agents,
            "subjects": subjects,
            "stored": stored,
        }
        upsert = _STATES_UPSERT_SQL.format(states=states, fires=_FIRES)
        if rule.action not in ALERT_ONLY_ACTIONS:
            cursor.execute(f"WITH kept AS ({upsert}) SELECT agent_id, subject FROM kept WHERE fired", params)
            return _Advanced(sorted(cursor.fetchall()))
        parts = _alert_parts(rule)
        sql = _FIRE_AND_ALERT_SQL.format(
            upsert=upsert,
            alerts=Alert._meta.db_table,
            # jsonb_build_object('recommendation', NULL) is not NULL: only recommend rules add the key.
            advice_data="jsonb_build_object('recommendation', s.advice)"
            if parts.recommendation is not None
            else "'{}'::jsonb",
        )
        params |= {
            "values": values,
            "recommendation": parts.recommendation,
            "kind": Alert.Kind.RULE.value,
            "severity": rule.severity,
            "title_head": parts.title_head,
            "title_tail": parts.title_tail,
            "message_head": parts.message_head,
            "held": parts.held,
            "data": json.dumps(parts.data),
            "now_iso": now.isoformat(),
            "created_at": timezone.now(),
        }
        cursor.execute(sql, params)
        fired, alerts = cursor.fetchone()
    return _Advanced([], fired_in_sql=fired, alerts_in_sql=alerts)


def _actions_run(
    fired: list[tuple[OptimizationRule, str, str, Decimal]],
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
            # Only an active agent is throttled: a suspension is stronger and must not be softened, and an
            # agent already throttled (by this rule or by hand) keeps its reason.
            if agent_objects[agent_id].status != Agent.Status.ACTIVE:
                continue
            agent_objects[agent_id] = agent_set_status(
                agent=agent_objects[agent_id], status=Agent.Status.THROTTLED, reason=throttle_reason(rule)
            )
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
    now: dt.datetime,
    report: RulesReport,
) -> list[Alert]:
    """Set back to active the agents a rule throttled once that rule no longer holds for them (or is no
    longer an enabled throttle rule). Agents throttled by hand, or suspended, are left alone."""
    throttle_rules = {throttle_reason(rule): rule for rule in rules if rule.action == Action.THROTTLE}
    throttled = Agent.objects.filter(
        status=Agent.Status.THROTTLED, status_reason__startswith=THROTTLE_REASON_PREFIX
    ).order_by("pk")
    to_lift = []
    for agent in throttled:
        rule = throttle_rules.get(agent.status_reason)
        if rule is None or agent.pk not in holding.get(rule.pk, set()):
            to_lift.append((agent, rule))
    alerts = []
    for agent, rule in to_lift:
        agent_id, reason = agent.pk, agent.status_reason
        agent_set_status(agent=agent, status=Agent.Status.ACTIVE, reason="")
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

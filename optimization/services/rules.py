"""Optimization rules: evaluate every enabled rule against fleet metrics and act on what fires.

A rule's condition is checked per subject: an agent, or an agent's resource type for per-resource metrics.
``RuleState`` remembers since when a condition has held, so ``duration: 5m`` fires at the first evaluation
five minutes after the one that saw it hold, whatever the evaluations' jitter (``rule_held_since``), and
``last_fired_at`` keeps a rule quiet for its cooldown. Since when the condition holds names its episode:
a rule's alert is one per episode, sent out again each cooldown while the episode lasts.

The fleet is evaluated in chunks of agents by id, each in its own short transaction. The metrics come
from ``optimization.selectors`` for the chunk's id range, one query per metric and window; the states are
kept set-based, two statements per rule, and no state is loaded into Python; throttles and lifts are one
statement each per chunk. Only scaling calls a per-agent service, for the agents a rule scales.

A/B experiments: an agent assigned to an arm of a running experiment is evaluated against the arm's rules
instead of its own agent-scoped ones, and a rule that belongs to an arm reaches only the agents of the
running arms that hold it (``optimization.services.experiments``). What the arms hold is read once per
evaluation, the chunk's assignments once per chunk (only while an experiment runs): still no statement per
agent.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal

from django.db import connection, transaction
from django.utils import timezone

from ledger.bulk import server_bound_cursor
from ledger.errors import LedgerError
from ledger.invariants import RULE_THROTTLE_PREFIX
from ledger.models import Agent, OptimizationRule
from ledger.periodic import session_lock
from optimization.models import Alert, AlertDelivery, Experiment, RuleState
from optimization.selectors import (
    AgentRange,
    agent_chunks,
    budget_utilization,
    cost_spike_ratio,
    duration_percentiles,
    execution_stats,
    resource_utilization,
)
from optimization.services.alerts import alerts_dispatch
from optimization.services.experiments import arm_of_agents, arm_rule_targets, experiment_running_q
from optimization.services.scaling import scaling_apply
from optimization.services.trends import degradation_figures

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
    Metric.P95_DURATION_VS_BASELINE: "Executions are slower than over the past week: look for what changed.",
    Metric.ERROR_RATE_VS_BASELINE: "Executions fail more than over the past week: look for what changed.",
    Metric.THROUGHPUT_VS_BASELINE: "Throughput is off its level of the past week: consider scaling to match.",
}

# Metrics comparing the last hour with the 7 days before it (``optimization.services.trends``): the key of
# the figure whose ratio they read.
BASELINE_METRICS = {
    Metric.P95_DURATION_VS_BASELINE: "p95_duration_ms",
    Metric.ERROR_RATE_VS_BASELINE: "error_rate",
    Metric.THROUGHPUT_VS_BASELINE: "throughput_per_hour",
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
    """The selectors' results for one chunk of the fleet, each computed at most once per window."""

    def __init__(self, now: dt.datetime, agents: AgentRange):
        self.now = now
        self.agents = agents
        self._cache: dict[tuple, object] = {}

    def _once(self, key: tuple, compute: Callable[[], object]):
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def values(self, rule: OptimizationRule) -> Values:
        now, metric, agents = self.now, rule.metric, self.agents
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
                lambda: resource_utilization(now=now, agent_ids=agents, at_least=at_least, at_most=at_most),
            )
        if metric == Metric.BUDGET_UTILIZATION_PERCENT:
            rows = self._once(("budget",), lambda: budget_utilization(now=now, agent_ids=agents))
            return {(agent, ""): row["percent"] for agent, row in rows.items() if row["percent"] is not None}
        if metric == Metric.COST_SPIKE_RATIO:
            rows = self._once(("spike",), lambda: cost_spike_ratio(now=now, agent_ids=agents))
            return {(agent, ""): row["ratio"] for agent, row in rows.items()}
        if metric == Metric.P95_DURATION_MS:
            rows = self._once(
                ("p95", since),
                lambda: duration_percentiles(since=since, until=now, agent_ids=agents, percentiles=(95,)),
            )
            return {(agent, ""): row[95] for agent, row in rows.items()}
        if metric in (Metric.ERROR_RATE_PERCENT, Metric.THROUGHPUT_PER_HOUR):
            rows = self._once(
                ("executions", since), lambda: execution_stats(since=since, until=now, agent_ids=agents)
            )
            column = "error_rate_percent" if metric == Metric.ERROR_RATE_PERCENT else "throughput_per_hour"
            return {(agent, ""): row[column] for agent, row in rows.items() if row[column] is not None}
        if metric in BASELINE_METRICS:
            # The three share one query per chunk; an agent without a ratio (no baseline) has no value.
            rows = self._once(("degradation",), lambda: degradation_figures(now=now, agent_ids=agents))
            figure = BASELINE_METRICS[metric]
            return {
                (agent, ""): row[figure]["ratio"]
                for agent, row in rows.items()
                if row[figure]["ratio"] is not None
            }
        logger.warning("rule %s has an unknown metric %r", rule.name, metric)
        return {}


@dataclass
class RulesReport:
    rules: int = 0
    chunks: int = 0
    conditions_true: int = 0
    fired: int = 0
    alerts: int = 0
    renotified: int = 0
    throttled: int = 0
    lifted: int = 0
    scaled: int = 0
    skipped: bool = False
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "rules": self.rules,
            "chunks": self.chunks,
            "conditions_true": self.conditions_true,
            "fired": self.fired,
            "alerts": self.alerts,
            "renotified": self.renotified,
            "throttled": self.throttled,
            "lifted": self.lifted,
            "scaled": self.scaled,
            "skipped": self.skipped,
            "errors": self.errors,
        }


@dataclass(frozen=True)
class _Chunk:
    """A chunk of the fleet, by agent id: the agents read (with what the evaluation needs of them) and the
    id range the metrics are read for."""

    agents: dict[str, tuple[str, str, str]]  # id -> (tier, status, status reason)
    range: AgentRange
    arms: dict[str, int] = field(default_factory=dict)  # id -> arm of a running experiment, if assigned

    def in_tier(self, tier_id: str) -> set[str]:
        return {agent_id for agent_id, (tier, _, _) in self.agents.items() if tier == tier_id}


@dataclass(frozen=True)
class _Arms:
    """What the experiments' arms hold at ``now``: every rule that belongs to an arm, the running arms of
    each, and whether any experiment runs (else no chunk needs its assignments)."""

    rules_in_arms: set[int]
    running_arms_of_rule: dict[int, set[int]]
    any_running: bool

    @classmethod
    def read(cls, now: dt.datetime) -> _Arms:
        in_arms, running = arm_rule_targets(now=now)
        return cls(in_arms, running, Experiment.objects.filter(experiment_running_q(now)).exists())


def _chunks(size: int, arms: _Arms | None = None, now: dt.datetime | None = None) -> Iterator[_Chunk]:
    for agents_range, rows in agent_chunks(size=size, fields=("pk", "tier_id", "status", "status_reason")):
        assigned = {}
        if arms is not None and arms.any_running:
            assigned = arm_of_agents(agent_ids=agents_range, now=now)
        yield _Chunk(
            agents={pk: (tier, status, reason) for pk, tier, status, reason in rows},
            range=agents_range,
            arms=assigned,
        )


def _scope(rule: OptimizationRule, chunk: _Chunk, arms: _Arms | None = None) -> set[str] | None:
    """The chunk's agents ``rule`` covers; None for every agent of the chunk with a value.

    A rule of an arm covers, within its own scope, the agents of the running arms that hold it, and nobody
    else. An agent in a running arm is not covered by its own agent-scoped rules: the arm's replace them."""
    if arms is not None and rule.pk in arms.rules_in_arms:
        running = arms.running_arms_of_rule.get(rule.pk, set())
        members = {agent_id for agent_id, arm_id in chunk.arms.items() if arm_id in running}
        natural = _scope(rule, chunk)
        return members & (chunk.agents.keys() if natural is None else natural)
    if rule.scope == OptimizationRule.Scope.AGENT:
        return {rule.agent_id} & chunk.agents.keys() - chunk.arms.keys()
    if rule.scope == OptimizationRule.Scope.TIER:
        return chunk.in_tier(rule.tier_id)
    if rule.metric == Metric.THROUGHPUT_PER_HOUR:
        return set(chunk.agents)
    return None


def _true_subjects(
    rule: OptimizationRule, metrics: _Metrics, chunk: _Chunk, arms: _Arms | None = None
) -> Values:
    """(agent, subject) -> value for the chunk's in-scope subjects whose condition holds now."""
    scope = _scope(rule, chunk, arms)
    # An agent created in the chunk's id range after the chunk was read waits for the next evaluation.
    known = chunk.agents.keys() if scope is None else scope
    values = {key: value for key, value in metrics.values(rule).items() if key[0] in known}
    compare = OPERATORS[rule.operator]
    if rule.metric == Metric.THROUGHPUT_PER_HOUR:
        # An agent that ran nothing in the window has a throughput of zero, not an unknown one.
        for agent_id in scope:
            values.setdefault((agent_id, ""), Decimal("0.00"))
    return {key: value for key, value in values.items() if compare(value, rule.threshold)}


@dataclass(frozen=True)
class _AlertParts:
    """What a rule's alerts say that does not depend on the subject; ``_FIRE_AND_ALERT_SQL`` adds the
    subject, the value and the action's outcome."""

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


def _dedup_key(rule: OptimizationRule, agent_id: str, subject: str, since: dt.datetime) -> str:
    """One key per episode of a condition: the rule, the subject, and since when the condition holds (in
    UTC to the microsecond, as ``_EPISODE_SQL`` writes it)."""
    episode = since.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")
    return f"rule:{rule.pk}:{agent_id}:{subject}:{episode}"


_EPISODE_SQL = """to_char(f.true_since AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US')"""

RULES_CHUNK = 5000
# pg_try_advisory_lock's key for the evaluation: one at a time across every worker and node.
_EVALUATION_LOCK = 0x52554C4553  # "RULES"


def rules_evaluate(*, now: dt.datetime | None = None, chunk_size: int = RULES_CHUNK) -> dict:
    """Evaluate every enabled rule for every subject in its scope, keep the rule states, and run the actions
    of the rules that fire. Returns counts of what happened.

    The fleet is worked through in chunks of ``chunk_size`` agents by id, each in its own short
    transaction with a fixed number of statements (the metrics for the chunk's id range, two per rule, one
    per kind of action), so memory is bounded by the chunk, no lock outlives its chunk, and a crash loses
    the chunk in flight only: the states of the chunks done are kept, and the next evaluation goes on from
    them (a subject that fired keeps its cooldown). One evaluation runs at a time (an advisory lock); one
    that finds another running returns at once with ``skipped``.
    """
    now = now or timezone.now()
    report = RulesReport()
    with session_lock(_EVALUATION_LOCK) as alone:
        if not alone:
            report.skipped = True
            logger.info("rules evaluation skipped: another one is running")
            return report.as_dict()
        rules = list(OptimizationRule.objects.filter(enabled=True).order_by("pk"))
        report.rules = len(rules)
        arms = _Arms.read(now)
        dispatch = False
        for chunk in _chunks(chunk_size, arms, now):
            with transaction.atomic():
                dispatch |= _chunk_evaluate(rules, chunk, now, report, arms)
            report.chunks += 1
    if dispatch:
        alerts_dispatch(now=now)
    return report.as_dict()


def _chunk_evaluate(
    rules: list[OptimizationRule],
    chunk: _Chunk,
    now: dt.datetime,
    report: RulesReport,
    arms: _Arms | None = None,
) -> bool:
    """Evaluate ``rules`` for one chunk; whether alerts were written in SQL (and want dispatching)."""
    metrics = _Metrics(now, chunk.range)
    in_chunk, bounds = chunk.range.sql("agent_id")
    with connection.cursor() as cursor:
        # A state of a rule that is no longer enabled means nothing any more.
        cursor.execute(
            f"DELETE FROM {RuleState._meta.db_table} WHERE {in_chunk} AND NOT (rule_id = ANY(%s))",
            [*bounds, [rule.pk for rule in rules]],
        )
    to_scale: list[_Fired] = []
    holding: dict[int, set[str]] = {}  # throttle rule -> agents for which its condition holds now
    alerted = False
    for rule in rules:
        true_now = _true_subjects(rule, metrics, chunk, arms)
        report.conditions_true += len(true_now)
        if rule.action == Action.THROTTLE:
            holding[rule.pk] = {agent_id for agent_id, _ in true_now}
        advanced = _states_advance(rule, true_now, chunk.range, now)
        to_scale += [
            _Fired(rule, agent_id, subject, true_now[agent_id, subject])
            for agent_id, subject in advanced.to_scale
        ]
        report.fired += advanced.fired
        report.throttled += advanced.throttled
        report.alerts += advanced.alerts
        report.renotified += advanced.renotified
        alerted |= bool(advanced.alerts or advanced.renotified)

    _scaling_run(to_scale, report)
    lifted = _throttles_lift(rules, holding, chunk, now)
    report.lifted += lifted
    return alerted or bool(lifted)


@dataclass(frozen=True)
class _Fired:
    rule: OptimizationRule
    agent_id: str
    subject: str
    value: Decimal


@dataclass
class _Advanced:
    to_scale: list[tuple[str, str]] = field(default_factory=list)  # (agent, subject) a scale rule fired for
    fired: int = 0
    throttled: int = 0
    alerts: int = 0  # alerts inserted: episodes that fired for the first time
    renotified: int = 0  # open alerts of episodes that fired again, sent out again


def _states_advance(
    rule: OptimizationRule, true_now: Values, agents: AgentRange, now: dt.datetime
) -> _Advanced:
    """Bring ``rule``'s states in the chunk up to date with the subjects whose condition holds now, and fire
    those held for the rule's duration and out of its cooldown (their ``last_fired_at`` set to ``now``).

    A subject whose condition no longer holds loses its state (the next time it holds, its duration counts
    from then: a new episode); a new one starts its state at ``now``. Two statements per rule whatever the
    number of subjects: an alert-only rule (notify, recommend) also writes its alerts in the second, so
    what fired never comes back to Python. For rules whose action runs a service, the subjects that fired
    are returned.
    """
    keys = sorted(true_now)
    stored = [max(min(true_now[key], LAST_VALUE_MAX), -LAST_VALUE_MAX) for key in keys]
    return _states_advance_sql(rule, keys, stored, [str(true_now[key]) for key in keys], agents, now)


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
RETURNING s.agent_id, s.subject, s.true_since, s.last_fired_at = %(now)s AS fired
"""
_FIRES = (
    "(s.true_since <= %(held_since)s AND (s.last_fired_at IS NULL OR s.last_fired_at <= %(cooled_since)s))"
)

# A rule's firings and their alerts in one statement. ``fired`` is one row per subject that fired (for a
# throttle rule, one per agent: its first subject). ``acted`` is who the action reached: every agent fired
# for an alert-only rule; for a throttle rule, the agents it throttled (only an active agent is: a
# suspension is stronger and must not be softened, and an agent already throttled, by a rule or by hand,
# keeps its reason). Their alerts are worded from ``_AlertParts``; ``values`` are the values' texts.
#
# The alert's key is the episode's, so a subject firing again in the same episode (after the cooldown)
# updates its alert instead of adding one: the latest value, one more notification, and its deliveries sent
# again. An acknowledged alert stays quiet until its episode ends.
_FIRE_AND_ALERT_SQL = """
WITH kept AS ({upsert}), fired AS (
    SELECT DISTINCT ON (k.agent_id{per_subject}) k.agent_id, k.subject, k.true_since
    FROM kept k WHERE k.fired
    ORDER BY k.agent_id{per_subject}, k.subject
), acted AS ({act}), shown AS (
    SELECT f.agent_id, f.subject, v.value, {episode} AS episode,
           CASE WHEN f.subject <> '' THEN ' on ' || f.subject ELSE '' END AS on_subject,
           replace(%(recommendation)s, '{{subject}}', COALESCE(NULLIF(f.subject, ''), f.agent_id)) AS advice
    FROM fired f
    JOIN acted USING (agent_id)
    JOIN unnest(%(agents)b::text[], %(subjects)b::text[], %(values)b::text[]) AS v(agent_id, subject, value)
      ON v.agent_id = f.agent_id AND v.subject = f.subject
), written AS (
    INSERT INTO {alerts} AS a (agent_id, kind, severity, rule_id, title, message, data, dedup_key, created_at,
                               acknowledged_by)
    SELECT s.agent_id, %(kind)s, %(severity)s, %(rule)s,
           left(%(title_head)s || s.on_subject || ' is ' || s.value || %(title_tail)s, 200),
           %(message_head)s || s.agent_id || s.on_subject || %(held)s || ': the value is ' || s.value || '.'
               || COALESCE(' Recommendation: ' || s.advice, '') || %(outcome)s,
           %(data)s::jsonb || jsonb_build_object('value', s.value, 'subject', s.subject) || {advice_data},
           'rule:' || %(rule)s || ':' || s.agent_id || ':' || s.subject || ':' || s.episode,
           %(created_at)s, ''
    FROM shown s
    ON CONFLICT (dedup_key) DO UPDATE SET
        severity = EXCLUDED.severity, title = EXCLUDED.title, message = EXCLUDED.message,
        data = EXCLUDED.data, notifications = a.notifications + 1, notified_at = EXCLUDED.created_at
    WHERE a.acknowledged_at IS NULL
    RETURNING a.id, a.notifications = 1 AS new
), resent AS (
    UPDATE {deliveries} AS d
    SET status = %(pending)s, attempts = 0, next_attempt_at = %(created_at)s, last_error = '',
        last_status_code = NULL
    FROM written w
    WHERE d.alert_id = w.id AND NOT w.new AND d.status <> %(pending)s
    RETURNING 1
)
SELECT (SELECT count(*) FROM kept WHERE fired), (SELECT count(*) FROM acted),
       (SELECT count(*) FILTER (WHERE new) FROM written),
       (SELECT count(*) FILTER (WHERE NOT new) FROM written), (SELECT count(*) FROM resent)
"""
_ACTED_ALL = "SELECT DISTINCT agent_id FROM fired"
_ACTED_THROTTLED = """
    UPDATE {agents} AS g SET status = %(throttled)s, status_reason = %(reason)s, updated_at = %(created_at)s
    FROM fired f WHERE g.id = f.agent_id AND g.status = %(active)s
    RETURNING g.id AS agent_id
"""
THROTTLE_OUTCOME = "The agent is throttled until the rule no longer holds."


def _states_advance_sql(
    rule: OptimizationRule,
    keys: list[tuple[str, str]],
    stored: list[Decimal],
    values: list[str],
    agents_range: AgentRange,
    now: dt.datetime,
) -> _Advanced:
    """Two statements: drop the chunk's states of subjects no longer true, then the upsert (with the action
    and the alerts, but for a scale rule)."""
    states = RuleState._meta.db_table
    agents = [agent_id for agent_id, _ in keys]
    subjects = [subject for _, subject in keys]
    in_chunk, bounds = agents_range.sql("s.agent_id")
    with server_bound_cursor() as cursor:  # the arrays (``%b``) in binary
        cursor.execute(
            # NOT IN, a hashed subplan whatever the planner's estimates: an anti-join that misjudges the
            # chunk's states as few loops over the arrays once per state.
            f"DELETE FROM {states} AS s WHERE s.rule_id = %s AND {in_chunk} AND (s.agent_id, s.subject) "
            "NOT IN (SELECT t.a, t.s FROM unnest(%b::text[], %b::text[]) AS t(a, s))",
            [rule.pk, *bounds, agents, subjects],
        )
        if not keys:
            return _Advanced()
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
        if rule.action not in (*ALERT_ONLY_ACTIONS, Action.THROTTLE):
            cursor.execute(f"WITH kept AS ({upsert}) SELECT agent_id, subject FROM kept WHERE fired", params)
            fired = sorted(cursor.fetchall())
            return _Advanced(to_scale=fired, fired=len(fired))
        parts = _alert_parts(rule)
        throttle = rule.action == Action.THROTTLE
        sql = _FIRE_AND_ALERT_SQL.format(
            upsert=upsert,
            per_subject="" if throttle else ", k.subject",
            act=_ACTED_THROTTLED.format(agents=Agent._meta.db_table) if throttle else _ACTED_ALL,
            episode=_EPISODE_SQL,
            alerts=Alert._meta.db_table,
            deliveries=AlertDelivery._meta.db_table,
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
            "outcome": f" {THROTTLE_OUTCOME}" if throttle else "",
            "data": json.dumps(parts.data),
            "created_at": timezone.now(),
            "pending": AlertDelivery.Status.PENDING.value,
            "reason": throttle_reason(rule),
            "active": Agent.Status.ACTIVE.value,
            "throttled": Agent.Status.THROTTLED.value,
        }
        cursor.execute(sql, params)
        fired, acted, alerts, renotified, _ = cursor.fetchone()
    return _Advanced(fired=fired, throttled=acted if throttle else 0, alerts=alerts, renotified=renotified)


def _scaling_run(fired: list[_Fired], report: RulesReport) -> None:
    """Scale the agents a scale rule fired for, once per rule and agent."""
    if not fired:
        return
    acted: set[tuple[int, str]] = set()
    agent_objects = Agent.objects.in_bulk({event.agent_id for event in fired})
    for event in fired:
        rule = event.rule
        if (rule.pk, event.agent_id) in acted or event.agent_id not in agent_objects:
            continue
        acted.add((rule.pk, event.agent_id))
        direction = "up" if rule.action == Action.SCALE_UP else "down"
        on = f" on {event.subject}" if event.subject else ""
        try:
            scaled = scaling_apply(
                agent=agent_objects[event.agent_id],
                direction=direction,
                trigger="rule",
                reason=f"rule {rule.name}: {rule.metric}{on} = {event.value} ({rule.condition})",
            )
        except LedgerError as exc:
            report.errors.append(f"{rule.name} {event.agent_id}: {exc.message}")
            continue
        report.scaled += scaled is not None


# The chunk's lifts and their alerts in one statement. Back to active only if still throttled for the
# reason read: a change by hand meanwhile is kept.
_LIFT_SQL = """
WITH lifted AS (
    UPDATE {agents} AS g SET status = %(active)s, status_reason = '', updated_at = %(at)s
    FROM unnest(%(ids)b::text[], %(reasons)b::text[], %(rules)b::bigint[], %(whys)b::text[])
         AS d(id, reason, rule_id, why)
    WHERE g.id = d.id AND g.status = %(throttled)s AND g.status_reason = d.reason
    RETURNING g.id, d.reason, d.rule_id, d.why
), written AS (
    INSERT INTO {alerts} (agent_id, kind, severity, rule_id, title, message, data, dedup_key, created_at,
                          acknowledged_by)
    SELECT l.id, %(kind)s, %(severity)s, l.rule_id,
           left('Throttle lifted: ' || substr(l.reason, %(name_from)s), 200),
           'Agent ' || l.id || ' is active again: it was throttled by ' || l.reason
               || ' and ' || l.why || '.',
           jsonb_build_object('rule', substr(l.reason, %(name_from)s), 'lifted', true),
           left('rule-lift:' || l.id || ':' || l.reason || ':' || %(now_iso)s, 300),
           %(at)s, ''
    FROM lifted l
    ON CONFLICT (dedup_key) DO NOTHING
)
SELECT count(*) FROM lifted
"""
LIFT_WHY_CLEARED = "its condition no longer holds"
LIFT_WHY_GONE = "the rule is no longer an enabled throttle"


def _throttles_lift(
    rules: list[OptimizationRule], holding: dict[int, set[str]], chunk: _Chunk, now: dt.datetime
) -> int:
    """Set back to active the chunk's agents a rule throttled once that rule no longer holds for them (or is
    no longer an enabled throttle rule), with an alert each, in one statement. Agents throttled by hand, or
    suspended, are left alone. Returns how many were lifted."""
    throttle_rules = {throttle_reason(rule): rule for rule in rules if rule.action == Action.THROTTLE}
    ids, reasons, rule_ids, whys = [], [], [], []
    for agent_id, (_, status, reason) in chunk.agents.items():
        if status != Agent.Status.THROTTLED or not reason.startswith(THROTTLE_REASON_PREFIX):
            continue
        rule = throttle_rules.get(reason)
        if rule is None or agent_id not in holding.get(rule.pk, set()):
            ids.append(agent_id)
            reasons.append(reason)
            rule_ids.append(None if rule is None else rule.pk)
            whys.append(LIFT_WHY_CLEARED if rule is not None else LIFT_WHY_GONE)
    if not ids:
        return 0
    with server_bound_cursor() as cursor:
        cursor.execute(
            _LIFT_SQL.format(agents=Agent._meta.db_table, alerts=Alert._meta.db_table),
            {
                "ids": ids,
                "reasons": reasons,
                "rules": rule_ids,
                "whys": whys,
                "at": timezone.now(),
                "now_iso": now.isoformat(),
                "active": Agent.Status.ACTIVE.value,
                "throttled": Agent.Status.THROTTLED.value,
                "kind": Alert.Kind.RULE.value,
                "severity": OptimizationRule.Severity.INFO.value,
                "name_from": len(THROTTLE_REASON_PREFIX) + 1,
            },
        )
        return cursor.fetchone()[0]

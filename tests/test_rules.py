"""Optimization rules: durations, cooldowns, scopes, every metric, the actions (notify, throttle and its
automatic lift, scale, recommend), and an evaluation whose query count does not grow with the fleet."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from allocation.services import allocation_create
from ledger.errors import AgentThrottled
from ledger.models import Agent, OptimizationRule, Quota
from ledger.periods import UTC
from ledger.services import agent_create, agent_set_status, quota_open
from optimization.models import Alert, Execution, RuleState, ScalingEvent
from optimization.services.rules import rules_evaluate
from tests.factories import fleet_create

pytestmark = pytest.mark.django_db

T0 = dt.datetime(2025, 6, 15, 12, 0, tzinfo=UTC)
MINUTE = dt.timedelta(minutes=1)
PRO_AI_TOKENS = 1_000_000


@pytest.fixture
def seed_rules(reference_data):
    """The two seed rules: HighResourceUtilization (> 80 for 5m, notify) and BudgetExceeded (> 90 for 1m,
    throttle)."""
    return {rule.name: rule for rule in OptimizationRule.objects.all()}


@pytest.fixture
def only_rule(reference_data):
    """Replace the seed rules by one rule made for the test."""

    def make(**fields) -> OptimizationRule:
        OptimizationRule.objects.all().delete()
        defaults = {"name": "test-rule", "operator": ">", "duration_seconds": 0, "cooldown_seconds": 3600}
        return OptimizationRule.objects.create(**{**defaults, **fields})

    return make


def use_tokens(agent_id: str, used: int, *, at=T0) -> Agent:
    """An agent (created if new) with ``used`` of its PRO tier's 1,000,000 AI tokens used this period."""
    agent = Agent.objects.filter(pk=agent_id).first() or agent_create(agent_id=agent_id, tier_code="PRO")
    quota = quota_open(agent=agent, resource_type_id="AI_TOKENS", at=at)
    Quota.objects.filter(pk=quota.pk).update(used=used)
    return agent


def spend(agent_id: str, spent: str, *, budget: str = "100", at=T0) -> Agent:
    agent = Agent.objects.filter(pk=agent_id).first() or agent_create(
        agent_id=agent_id, tier_code="PRO", monthly_budget_usd=Decimal(budget)
    )
    quota = quota_open(agent=agent, resource_type_id="AI_TOKENS", at=at)
    Quota.objects.filter(pk=quota.pk).update(spent_usd=Decimal(spent))
    return agent


def executions(
    agent: Agent, *, count: int, failures: int = 0, duration_ms: int | list[int] = 100, at=T0
) -> None:
    """``count`` executions in the minutes before ``at``, the first ``failures`` of them failed."""
    durations = duration_ms if isinstance(duration_ms, list) else [duration_ms] * count
    Execution.objects.bulk_create(
        Execution(
            agent=agent,
            superpower="summarize",
            resources={},
            duration_ms=durations[i],
            success=i >= failures,
            cost_usd=Decimal("0"),
            created_at=at - dt.timedelta(minutes=1 + i % 50),
        )
        for i in range(count)
    )


def rule_alerts(**filters) -> list[Alert]:
    return list(Alert.objects.filter(kind="rule", **filters).order_by("created_at", "id"))


# --- Duration and cooldown ------------------------------------------------------------------------------


def test_a_rule_with_a_duration_fires_only_after_the_condition_held_that_long(seed_rules):
    use_tokens("busy", 850_000)  # 85% > 80

    assert rules_evaluate(now=T0)["fired"] == 0
    state = RuleState.objects.get(rule=seed_rules["HighResourceUtilization"])
    assert (state.agent_id, state.subject, state.true_since, state.last_value) == (
        "busy",
        "AI_TOKENS",
        T0,
        Decimal("85.00"),
    )
    assert rules_evaluate(now=T0 + 4 * MINUTE)["fired"] == 0
    assert rule_alerts() == []

    assert rules_evaluate(now=T0 + 5 * MINUTE)["fired"] == 1
    (alert,) = rule_alerts()
    assert (alert.agent_id, alert.severity, alert.rule_id) == (
        "busy",
        "warning",
        seed_rules["HighResourceUtilization"].pk,
    )
    # One alert per episode: the key names since when the condition holds, not when the rule fired.
    assert alert.dedup_key == (
        f"rule:{seed_rules['HighResourceUtilization'].pk}:busy:AI_TOKENS:2025-06-15T12:00:00.000000"
    )
    assert (alert.notifications, alert.notified_at) == (1, None)
    assert alert.title == "HighResourceUtilization: resource_utilization_percent on AI_TOKENS is 85.00 (> 80)"
    assert alert.data["value"] == "85.00"
    assert alert.data["subject"] == "AI_TOKENS"
    state.refresh_from_db()
    assert (state.true_since, state.last_fired_at) == (T0, T0 + 5 * MINUTE)


def test_cooldown_keeps_a_rule_quiet_and_a_false_condition_resets_the_duration(seed_rules):
    use_tokens("busy", 850_000)
    rules_evaluate(now=T0)
    assert rules_evaluate(now=T0 + 5 * MINUTE)["fired"] == 1
    # Still true, inside the hour of cooldown: quiet; evaluating twice at one moment alerts once.
    assert rules_evaluate(now=T0 + 30 * MINUTE)["fired"] == 0
    assert rules_evaluate(now=T0 + 30 * MINUTE)["fired"] == 0
    assert rules_evaluate(now=T0 + 65 * MINUTE)["fired"] == 1
    assert rules_evaluate(now=T0 + 65 * MINUTE)["fired"] == 0
    # Fired again in the same episode: the episode's one alert is sent out again, not repeated.
    (alert,) = rule_alerts()
    assert alert.notifications == 2

    use_tokens("busy", 500_000)  # false: the state is gone
    rules_evaluate(now=T0 + 70 * MINUTE)
    assert not RuleState.objects.exists()
    use_tokens("busy", 900_000)  # true again: the five minutes count from now
    rules_evaluate(now=T0 + 71 * MINUTE)
    assert RuleState.objects.get().true_since == T0 + 71 * MINUTE
    assert rules_evaluate(now=T0 + 75 * MINUTE)["fired"] == 0
    assert rules_evaluate(now=T0 + 76 * MINUTE)["fired"] == 1
    assert [alert.notifications for alert in rule_alerts()] == [2, 1]  # a new episode, a new alert


# A condition starting at 12:00:02, first seen by the evaluation at 12:00:04; evaluations every minute, each
# a few seconds late, as beat and the queue make them.
CONDITION_START = T0 + dt.timedelta(seconds=2)
JITTERED_EVALUATIONS = [
    T0 + index * MINUTE + dt.timedelta(seconds=late) for index, late in enumerate([4, 3, 5, 0, 2, 3, 1])
]


@pytest.mark.parametrize("duration_seconds", [0, 5, 60, 120, 300])
def test_a_rule_fires_at_the_first_evaluation_after_its_duration_despite_jitter(only_rule, duration_seconds):
    """``duration: 1m`` fires at 12:01:03, 59 s after the evaluation that first saw its condition, not at
    12:02:05; ``5m`` at 12:05:03 (299 s after); a duration under the jitter allowance (5 s) waits for the
    next evaluation all the same; no duration fires at once."""
    only_rule(
        metric="resource_utilization_percent",
        threshold=50,
        duration_seconds=duration_seconds,
        action="notify",
    )
    use_tokens("jittery", 600_000)
    fired_at = [at for at in JITTERED_EVALUATIONS if rules_evaluate(now=at)["fired"]]
    due = CONDITION_START + dt.timedelta(seconds=duration_seconds)
    assert fired_at == [next(at for at in JITTERED_EVALUATIONS if at >= due)]
    assert len(rule_alerts()) == 1


def test_a_condition_that_stops_before_its_duration_never_fires(only_rule):
    only_rule(metric="resource_utilization_percent", threshold=50, duration_seconds=60, action="notify")
    first, second, third, fourth = JITTERED_EVALUATIONS[:4]
    use_tokens("brief", 600_000)
    assert rules_evaluate(now=first)["fired"] == 0
    use_tokens("brief", 400_000)  # false again before its minute was up
    assert rules_evaluate(now=second)["fired"] == 0
    assert not RuleState.objects.exists()
    assert rule_alerts() == []

    use_tokens("brief", 600_000)  # true again: the minute counts from the evaluation that sees it
    assert rules_evaluate(now=third)["fired"] == 0
    assert rules_evaluate(now=fourth)["fired"] == 1


def test_each_resource_of_an_agent_is_its_own_subject(seed_rules):
    agent = use_tokens("two", 900_000)
    compute = quota_open(agent=agent, resource_type_id="COMPUTE_MS", at=T0)
    Quota.objects.filter(pk=compute.pk).update(used=3_000_000)  # 83.33% of 3,600,000
    rules_evaluate(now=T0)
    assert rules_evaluate(now=T0 + 5 * MINUTE)["fired"] == 2
    assert {alert.data["subject"] for alert in rule_alerts()} == {"AI_TOKENS", "COMPUTE_MS"}


def test_a_rule_without_duration_fires_at_once_and_disabling_a_rule_drops_its_states(only_rule):
    rule = only_rule(metric="resource_utilization_percent", threshold=50, action="notify")
    use_tokens("now", 600_000)
    assert rules_evaluate(now=T0)["fired"] == 1
    assert RuleState.objects.get().last_fired_at == T0
    OptimizationRule.objects.filter(pk=rule.pk).update(enabled=False)
    assert rules_evaluate(now=T0 + MINUTE)["rules"] == 0
    assert not RuleState.objects.exists()


def test_deleting_an_agent_or_a_rule_deletes_their_states(seed_rules):
    """The states have no foreign-key constraints in the database (``RuleState``): Django's ``on_delete``
    still removes them with their agent or rule."""
    use_tokens("gone", 850_000)
    use_tokens("kept", 850_000)
    rules_evaluate(now=T0)
    assert set(RuleState.objects.values_list("agent_id", flat=True)) == {"gone", "kept"}

    Agent.objects.filter(pk="gone").delete()
    assert list(RuleState.objects.values_list("agent_id", flat=True)) == ["kept"]
    seed_rules["HighResourceUtilization"].delete()
    assert not RuleState.objects.exists()


def test_an_evaluation_prunes_states_whose_agent_or_rule_is_gone(only_rule):
    """A state left behind by a delete that went around Django (raw SQL) goes at the next evaluation."""
    rule = only_rule(
        metric="resource_utilization_percent", threshold=50, duration_seconds=600, action="notify"
    )
    use_tokens("live", 600_000)
    rules_evaluate(now=T0)
    state = RuleState.objects.get()
    RuleState.objects.bulk_create(
        [
            RuleState(
                rule_id=rule.pk, agent_id="no-such-agent", subject="AI_TOKENS", true_since=T0, last_value=90
            ),
            RuleState(
                rule_id=rule.pk + 1000, agent_id="live", subject="AI_TOKENS", true_since=T0, last_value=90
            ),
        ]
    )

    assert rules_evaluate(now=T0 + MINUTE)["fired"] == 0
    assert list(RuleState.objects.values_list("pk", "agent_id", "rule_id")) == [(state.pk, "live", rule.pk)]


def test_rule_states_have_no_foreign_key_checks_in_the_database(db):
    """Each foreign-key check would run per inserted state at COMMIT (migration optimization 0004)."""
    with connection.cursor() as cursor:
        constraints = connection.introspection.get_constraints(cursor, RuleState._meta.db_table)
    assert [name for name, info in constraints.items() if info["foreign_key"]] == []
    assert any(
        info["unique"] and info["columns"] == ["rule_id", "agent_id", "subject"]
        for info in constraints.values()
    )


# --- Scopes ---------------------------------------------------------------------------------------------


def test_tier_and_agent_rules_apply_only_to_their_agents(only_rule):
    use_tokens("pro-agent", 900_000)
    free = agent_create(agent_id="free-agent", tier_code="FREE")
    Quota.objects.filter(pk=quota_open(agent=free, resource_type_id="AI_TOKENS", at=T0).pk).update(
        used=90_000
    )
    only_rule(
        name="free-only", scope="tier", tier_id="FREE", metric="resource_utilization_percent", threshold=80
    )
    OptimizationRule.objects.create(
        name="pro-agent-only",
        scope="agent",
        agent_id="pro-agent",
        metric="resource_utilization_percent",
        operator=">",
        threshold=80,
    )
    assert rules_evaluate(now=T0)["fired"] == 2
    assert {(alert.rule.name, alert.agent_id) for alert in rule_alerts()} == {
        ("free-only", "free-agent"),
        ("pro-agent-only", "pro-agent"),
    }


# --- Metrics --------------------------------------------------------------------------------------------


def test_error_rate_uses_the_last_hour_or_the_rules_longer_duration(only_rule):
    agent = agent_create(agent_id="flaky", tier_code="PRO")
    executions(agent, count=10, failures=3)  # 30% in the last hour
    # Older failures, 90 minutes ago: outside an hour, inside a two-hour duration.
    executions(agent, count=10, failures=10, at=T0 - dt.timedelta(minutes=90))
    only_rule(name="errors-1h", metric="error_rate_percent", threshold=25)
    OptimizationRule.objects.create(
        name="errors-2h",
        metric="error_rate_percent",
        operator=">=",
        threshold=65,
        duration_seconds=7200,
    )
    rules_evaluate(now=T0)
    values = dict(RuleState.objects.values_list("rule__name", "last_value"))
    assert values == {"errors-1h": Decimal("30.00"), "errors-2h": Decimal("65.00")}  # 13 of 20
    assert [alert.rule.name for alert in rule_alerts()] == ["errors-1h"]  # the other waits two hours


def test_p95_duration_throughput_and_idle_agents(only_rule):
    slow = agent_create(agent_id="slow", tier_code="PRO")
    agent_create(agent_id="idle", tier_code="PRO")
    executions(slow, count=21, duration_ms=[100 * (i + 1) for i in range(21)])  # p95 = 2,000 ms
    only_rule(name="slow", metric="p95_duration_ms", operator=">=", threshold=2000)
    OptimizationRule.objects.create(
        name="idle", metric="throughput_per_hour", operator="<", threshold=1, action="recommend"
    )
    OptimizationRule.objects.create(
        name="busy", metric="throughput_per_hour", operator=">=", threshold=21, action="notify"
    )
    rules_evaluate(now=T0)
    fired = {(alert.rule.name, alert.agent_id, alert.data["value"]) for alert in rule_alerts()}
    assert fired == {("slow", "slow", "2000.00"), ("idle", "idle", "0.00"), ("busy", "slow", "21.00")}
    (idle,) = rule_alerts(rule__name="idle")
    assert idle.data["recommendation"].startswith("Throughput is off its usual level")


def test_budget_and_cost_spike_metrics(only_rule):
    spend("spender", "91")
    spiky = agent_create(agent_id="spiky", tier_code="CUSTOM", custom_limits={"NETWORK_REQS": 10**9})
    allocation_create(agent=spiky, resource_type_id="NETWORK_REQS", amount=2_400, now=T0 - 3 * 60 * MINUTE)
    allocation_create(agent=spiky, resource_type_id="NETWORK_REQS", amount=500, now=T0 - 10 * MINUTE)
    only_rule(name="budget", metric="budget_utilization_percent", threshold=90)
    OptimizationRule.objects.create(name="spike", metric="cost_spike_ratio", operator=">=", threshold=5)
    rules_evaluate(now=T0)
    fired = {(alert.rule.name, alert.agent_id, alert.data["value"]) for alert in rule_alerts()}
    assert fired == {("budget", "spender", "91.00"), ("spike", "spiky", "5.00")}  # $0.50 against $0.10/h


# --- Actions --------------------------------------------------------------------------------------------


def test_budget_exceeded_throttles_after_its_duration_and_lifts_when_it_no_longer_holds(seed_rules):
    agent = spend("spender", "95")
    rules_evaluate(now=T0)
    agent.refresh_from_db()
    assert agent.status == "active"

    result = rules_evaluate(now=T0 + MINUTE)
    assert (result["fired"], result["throttled"]) == (1, 1)
    agent.refresh_from_db()
    assert (agent.status, agent.status_reason) == ("throttled", "rule:BudgetExceeded")
    (alert,) = rule_alerts()
    assert (alert.severity, alert.agent_id) == ("critical", "spender")
    assert "The agent is throttled until the rule no longer holds." in alert.message
    with pytest.raises(AgentThrottled):
        allocation_create(agent=agent, resource_type_id="AI_TOKENS", amount=1)

    # Still over budget: stays throttled, and is not throttled (or alerted) again after the cooldown.
    assert rules_evaluate(now=T0 + 2 * 60 * MINUTE)["throttled"] == 0
    assert len(rule_alerts()) == 1

    Agent.objects.filter(pk=agent.pk).update(monthly_budget_usd=Decimal("200"))  # 47.5%: no longer holds
    result = rules_evaluate(now=T0 + 3 * 60 * MINUTE)
    assert result["lifted"] == 1
    agent.refresh_from_db()
    assert (agent.status, agent.status_reason) == ("active", "")
    lifted = rule_alerts(title__startswith="Throttle lifted")
    assert [alert.severity for alert in lifted] == ["info"]
    assert rules_evaluate(now=T0 + 3 * 60 * MINUTE + MINUTE)["lifted"] == 0


def test_rules_never_lift_a_manual_throttle_nor_soften_a_suspension(seed_rules):
    manual = spend("manual", "10")
    agent_set_status(agent=manual, status="throttled", reason="operator: abuse")
    suspended = spend("suspended", "99")
    agent_set_status(agent=suspended, status="suspended", reason="unpaid")
    rules_evaluate(now=T0)
    result = rules_evaluate(now=T0 + 2 * MINUTE)
    assert (result["throttled"], result["lifted"]) == (0, 0)
    assert dict(Agent.objects.values_list("id", "status_reason")) == {
        "manual": "operator: abuse",
        "suspended": "unpaid",
    }


def test_an_agent_throttled_by_a_rule_that_is_disabled_is_lifted(seed_rules):
    agent = spend("spender", "95")
    rules_evaluate(now=T0)
    rules_evaluate(now=T0 + MINUTE)
    assert Agent.objects.get(pk=agent.pk).status == "throttled"
    OptimizationRule.objects.filter(name="BudgetExceeded").update(enabled=False)
    assert rules_evaluate(now=T0 + 2 * MINUTE)["lifted"] == 1
    assert Agent.objects.get(pk=agent.pk).status == "active"


def test_scale_rules_call_scaling_once_per_agent(only_rule):
    agent = use_tokens("scaler", 900_000)
    compute = quota_open(agent=agent, resource_type_id="COMPUTE_MS", at=T0)
    Quota.objects.filter(pk=compute.pk).update(used=3_500_000)
    only_rule(name="scale-up", metric="resource_utilization_percent", threshold=80, action="scale_up")
    result = rules_evaluate(now=T0)
    assert (result["fired"], result["scaled"]) == (2, 1)  # two resources, one agent, one step
    agent.refresh_from_db()
    assert agent.instance_count == 2
    event = ScalingEvent.objects.get()
    assert (event.direction, event.trigger, event.before, event.after) == ("up", "rule", 1, 2)
    assert event.reason.startswith("rule scale-up: resource_utilization_percent on ")


def test_recommend_rules_alert_with_the_rules_description_as_recommendation(only_rule):
    use_tokens("advised", 950_000)
    only_rule(
        name="advise",
        metric="resource_utilization_percent",
        threshold=90,
        action="recommend",
        severity="info",
        description="Buy {subject} in the marketplace before the period runs out.",
    )
    rules_evaluate(now=T0)
    (alert,) = rule_alerts()
    assert alert.data["recommendation"] == "Buy AI_TOKENS in the marketplace before the period runs out."
    assert alert.severity == "info"


# --- Set-based ------------------------------------------------------------------------------------------


def test_rule_evaluation_query_count_does_not_grow_with_agents(seed_rules):
    for rule_fields in (
        {"name": "errors", "metric": "error_rate_percent", "threshold": 50},
        {"name": "p95", "metric": "p95_duration_ms", "threshold": 10_000},
        {"name": "idle", "metric": "throughput_per_hour", "operator": "<", "threshold": 0},
        {"name": "spike", "metric": "cost_spike_ratio", "threshold": 100},
    ):
        OptimizationRule.objects.create(**{"operator": ">", **rule_fields})
    counts = []
    for count, prefix in ((10, "small"), (1000, "large")):
        Agent.objects.all().delete()
        fleet_create(prefix, count, at=T0, used=900_000, budget="1000")
        with CaptureQueriesContext(connection) as creating_states:
            assert rules_evaluate(now=T0)["conditions_true"] == count
        with CaptureQueriesContext(connection) as firing:
            result = rules_evaluate(now=T0 + 5 * MINUTE)
        assert (result["fired"], result["alerts"]) == (count, count)
        counts.append((len(creating_states), len(firing)))
        Alert.objects.all().delete()
        RuleState.objects.all().delete()
    assert counts[0] == counts[1], counts


def test_a_ratio_too_large_to_store_still_fires(only_rule):
    from ledger.models import UsageLog
    from ledger.services import quota_open

    agent = agent_create(agent_id="from-nothing", tier_code="PRO")
    for cost, at in ((Decimal("0.000000000001"), T0 - 5 * 60 * MINUTE), (Decimal("1000"), T0 - 5 * MINUTE)):
        quota = quota_open(agent=agent, resource_type_id="AI_TOKENS", at=at)
        UsageLog.objects.create(
            agent=agent,
            resource_type_id="AI_TOKENS",
            quota=quota,
            amount=1,
            unit_price_usd=cost,
            cost_usd=cost,
            kind="allocation",
            created_at=at,
            period_start=quota.period_start,
        )
    only_rule(name="spike", metric="cost_spike_ratio", threshold=3)
    assert rules_evaluate(now=T0)["fired"] == 1
    assert RuleState.objects.get().last_value == Decimal("99999999999999")
    (alert,) = rule_alerts()
    assert alert.data["value"] == "24000000000000000.00"


@pytest.mark.parametrize("action", ["notify", "recommend", "throttle"])
@pytest.mark.parametrize("metric", ["resource_utilization_percent", "budget_utilization_percent"])
def test_a_rules_alert_says_what_held_with_what_value_and_what_was_done(only_rule, action, metric):
    """Alerts are written in SQL, by the statement that fires the rule: every text, quoted or not."""
    spend("worded", "95.5")  # of a budget of 100
    use_tokens("worded", 950_000)
    rule = only_rule(
        name="100% 'odd' {name}",
        metric=metric,
        threshold=Decimal("90.50"),
        duration_seconds=60,
        action=action,
        severity="critical",
        description="Buy {subject} now, 100% sure." if action == "recommend" else "",
    )
    assert rules_evaluate(now=T0)["fired"] == 0
    fired_at = T0 + 2 * MINUTE
    assert rules_evaluate(now=fired_at)["alerts"] == 1
    (alert,) = rule_alerts()
    subject = "AI_TOKENS" if metric == "resource_utilization_percent" else ""
    value = "95.00" if subject else "95.50"
    on = f" on {subject}" if subject else ""
    message = f"Rule 100% 'odd' {{name}} ({metric} > 90.5) holds for agent worded{on} for 60 s or more: "
    message += f"the value is {value}."
    data = {
        "rule": "100% 'odd' {name}",
        "metric": metric,
        "operator": ">",
        "threshold": "90.5",
        "duration_seconds": 60,
        "action": action,
        "value": value,
        "subject": subject,
    }
    if action == "recommend":
        data["recommendation"] = f"Buy {subject or 'worded'} now, 100% sure."
        message += f" Recommendation: {data['recommendation']}"
    if action == "throttle":
        message += " The agent is throttled until the rule no longer holds."
    assert (alert.title, alert.message, alert.data) == (
        f"100% 'odd' {{name}}: {metric}{on} is {value} (> 90.5)",
        message,
        data,
    )
    assert (alert.dedup_key, alert.severity, alert.kind, alert.rule_id) == (
        f"rule:{rule.pk}:worded:{subject}:2025-06-15T12:00:00.000000",
        "critical",
        "rule",
        rule.pk,
    )

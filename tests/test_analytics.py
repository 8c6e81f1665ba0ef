"""Performance analytics: metrics, bottleneck analysis, efficiency scores, A/B experiments, and their API.

Every history is built at fixed moments of June 2025 (a 30-day period), and the services are asked at
NOW = 11 June 00:00 UTC, a third of the way through it, so every number below can be worked out by hand.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from decimal import Decimal

import pytest
from django.urls import reverse
from django.utils import timezone

from allocation.keys import api_key_issue
from allocation.services import allocation_create
from ledger.models import Agent
from ledger.services import agent_create
from optimization.models import Execution, Experiment, ExperimentArm, ExperimentAssignment, ScalingPolicy
from optimization.services.analytics import agent_analysis, agent_metrics, efficiency_score
from optimization.services.executions import execution_record
from optimization.services.experiments import experiment_assign, experiment_report

pytest.register_assert_rewrite("tests.api_fixtures")

from tests.api_fixtures import assert_error, client_with_key  # noqa: E402

pytest_plugins = ["tests.api_fixtures"]

pytestmark = pytest.mark.django_db

UTC = dt.UTC
NOW = dt.datetime(2025, 6, 11, tzinfo=UTC)
HOUR = dt.timedelta(hours=1)


def _run(
    agent: Agent, at: dt.datetime, *, duration_ms: int = 100, success: bool = True, **extra
) -> Execution:
    resources = extra.pop("resources", {"NETWORK_REQS": 10})  # 10 requests: $0.01
    return execution_record(
        agent=agent,
        superpower=extra.pop("superpower", "search"),
        resources=resources,
        duration_ms=duration_ms,
        success=success,
        now=at,
        **extra,
    )


@pytest.fixture
def frozen_now(monkeypatch):
    """The API has no ``now=``: freeze the clock every service reads."""
    monkeypatch.setattr(timezone, "now", lambda: NOW)
    return NOW


@pytest.fixture
def history(reference_data) -> Agent:
    """A PRO agent with a $50 budget and this June history:

    - 1 Jun 12:00  300,000 AI tokens allocated                 $0.30
    - 2 Jun 00:00  a successful execution of 5,000 ms          $0.01
    - 7 Jun 00:00  100,000 compute ms allocated                $1.00
    - 10 Jun 00:00 a 50,000 AI token hold (reserved, no cost)
    - the last 24 hours: five executions of 100, 200, 300, 400 and 1,000 ms, the 1,000 ms one failed, $0.01
      each
    - May (the previous period): an execution and an allocation that must not count.
    """
    agent = agent_create(agent_id="metrics-agent", tier_code="PRO", monthly_budget_usd=Decimal("50"))
    allocation_create(
        agent=agent, resource_type_id="AI_TOKENS", amount=300_000, now=dt.datetime(2025, 6, 1, 12, tzinfo=UTC)
    )
    _run(agent, dt.datetime(2025, 6, 2, tzinfo=UTC), duration_ms=5_000)
    allocation_create(
        agent=agent, resource_type_id="COMPUTE_MS", amount=100_000, now=dt.datetime(2025, 6, 7, tzinfo=UTC)
    )
    allocation_create(
        agent=agent,
        resource_type_id="AI_TOKENS",
        amount=50_000,
        hold=True,
        now=dt.datetime(2025, 6, 10, tzinfo=UTC),
    )
    for hours_ago, duration, success in [(20, 100, True), (15, 200, True), (10, 300, True), (5, 400, True)]:
        _run(agent, NOW - hours_ago * HOUR, duration_ms=duration, success=success)
    _run(agent, NOW - 1 * HOUR, duration_ms=1_000, success=False)
    _run(agent, dt.datetime(2025, 5, 30, tzinfo=UTC), duration_ms=9_999)
    allocation_create(
        agent=agent, resource_type_id="AI_TOKENS", amount=999_000, now=dt.datetime(2025, 5, 20, tzinfo=UTC)
    )
    return agent


# --- Metrics --------------------------------------------------------------------------------------------


def test_metrics_current_shows_used_limit_reserved_and_utilization_of_every_resource(history):
    current = agent_metrics(agent=history, now=NOW)["current"]

    assert list(current) == ["COMPUTE_MS", "AI_TOKENS", "STORAGE_KB", "NETWORK_REQS", "SOLANA_LAMPORTS"]
    assert current["AI_TOKENS"] == {
        "used": 300_000,
        "limit": 1_000_000,
        "reserved": 50_000,
        "listed": 0,
        "available": 650_000,
        "utilization_percent": Decimal("35.00"),
    }
    assert current["NETWORK_REQS"]["used"] == 60  # six June executions of 10 requests
    assert current["NETWORK_REQS"]["utilization_percent"] == Decimal("0.60")
    # A resource never used this period reads from the tier without opening (writing) a quota row.
    assert current["SOLANA_LAMPORTS"] == {
        "used": 0,
        "limit": 10_000_000,
        "reserved": 0,
        "listed": 0,
        "available": 10_000_000,
        "utilization_percent": Decimal("0.00"),
    }


def test_metrics_performance_over_the_default_24_hour_window(history):
    performance = agent_metrics(agent=history, now=NOW)["performance"]

    assert performance["window_hours"] == 24
    assert performance["executions"] == 5
    assert performance["successes"] == 4
    assert performance["failures"] == 1
    # Sorted durations 100, 200, 300, 400, 1000: p50 is the middle one; p95 sits at position 0.95 * 4 = 3.8,
    # i.e. 400 + 0.8 * (1000 - 400), interpolated like PostgreSQL's percentile_cont.
    assert performance["p50_duration_ms"] == Decimal("300.00")
    assert performance["p95_duration_ms"] == Decimal("880.00")
    assert performance["error_rate_percent"] == Decimal("20.00")
    assert performance["throughput_per_hour"] == Decimal("0.21")  # 5 / 24


def test_metrics_window_hours_widens_the_performance_window(history):
    performance = agent_metrics(agent=history, now=NOW, window_hours=720)["performance"]

    # 720 hours back from 11 June reaches 12 May: the 2 June (5,000 ms) and 30 May (9,999 ms) runs count.
    assert performance["executions"] == 7
    # 100, 200, 300, 400, 1000, 5000, 9999: p50 is 400; p95 at position 5.7 is 5000 + 0.7 * 4999.
    assert performance["p50_duration_ms"] == Decimal("400.00")
    assert performance["p95_duration_ms"] == Decimal("8499.30")
    assert performance["error_rate_percent"] == Decimal("14.29")
    assert performance["throughput_per_hour"] == Decimal("0.01")  # 7 / 720


def test_metrics_performance_without_executions_is_empty_not_an_error(reference_data):
    agent = agent_create(agent_id="idle", tier_code="FREE")
    performance = agent_metrics(agent=agent, now=NOW)["performance"]
    assert performance["executions"] == 0
    assert performance["p50_duration_ms"] is None
    assert performance["p95_duration_ms"] is None
    assert performance["error_rate_percent"] is None
    assert performance["throughput_per_hour"] == Decimal("0.00")


def test_metrics_cost_spend_by_resource_budget_forecast_and_cost_per_successful_task(history):
    cost = agent_metrics(agent=history, now=NOW)["cost"]

    assert cost["by_resource_type"] == {
        "COMPUTE_MS": Decimal("1.00"),
        "AI_TOKENS": Decimal("0.30"),
        "STORAGE_KB": Decimal("0"),
        "NETWORK_REQS": Decimal("0.06"),
        "SOLANA_LAMPORTS": Decimal("0"),
    }
    assert cost["total_usd"] == Decimal("1.36")
    assert cost["monthly_budget_usd"] == Decimal("50.00")
    assert cost["budget_utilization_percent"] == Decimal("2.72")
    # The trailing 7 days (4-11 June) cost $1.05: the compute on 7 June and the five recent runs. At that
    # rate the 20 days left add 1.05 * 20 / 7 = $3.00.
    assert cost["forecast_window_start"] == dt.datetime(2025, 6, 4, tzinfo=UTC)
    assert cost["forecast_window_spend_usd"] == Decimal("1.05")
    assert cost["forecast_period_end_usd"] == Decimal("4.36")
    assert cost["forecast_budget_utilization_percent"] == Decimal("8.72")
    # $1.36 over the five successful executions of June (the failed one and May's do not count).
    assert cost["successful_executions"] == 5
    assert cost["cost_per_successful_task_usd"] == Decimal("0.272")


def test_forecast_early_in_the_period_uses_the_time_since_the_period_started(reference_data):
    agent = agent_create(agent_id="early", tier_code="PRO")
    allocation_create(
        agent=agent, resource_type_id="AI_TOKENS", amount=300_000, now=dt.datetime(2025, 6, 1, 12, tzinfo=UTC)
    )
    cost = agent_metrics(agent=agent, now=dt.datetime(2025, 6, 3, tzinfo=UTC))["cost"]

    # Two days in, $0.30 spent: 0.30 + 0.30 / 2 days * 28 days left.
    assert cost["forecast_window_start"] == dt.datetime(2025, 6, 1, tzinfo=UTC)
    assert cost["forecast_period_end_usd"] == Decimal("4.50")
    assert cost["monthly_budget_usd"] is None
    assert cost["budget_utilization_percent"] is None
    assert cost["cost_per_successful_task_usd"] is None  # no execution: nothing to divide by


def test_period_spend_is_read_from_the_quota_rows_not_the_usage_log(history):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as queries:
        agent_metrics(agent=history, now=NOW)
    usage_reads = [q["sql"] for q in queries if '"usage_logs"' in q["sql"]]
    # The only read of usage_logs is the forecast's 7-day window, bounded by time on the agent's index.
    assert len(usage_reads) == 1
    assert "created_at" in usage_reads[0]
    assert len(queries) <= 10
    # The executions and the forecast spend: one statement.
    assert [q["sql"] for q in queries if '"optimization_execution"' in q["sql"]] == usage_reads


@pytest.mark.parametrize("window_hours", [1, 5, 24, 240, 720])
def test_metrics_activity_in_one_statement_gives_what_the_selectors_give(history, window_hours):
    """``agent_activity`` reads the executions and the forecast spend in one statement; the figures are those
    of the selectors (``execution_stats``, ``duration_percentiles``, ``period_executions``), executions on
    the window's edges included."""
    from django.db import connection
    from django.db.models import Sum
    from django.test.utils import CaptureQueriesContext

    from ledger.models import UsageLog
    from optimization.selectors import duration_percentiles, execution_stats
    from optimization.services.analytics import (
        PeriodClock,
        agent_activity,
        forecast_window_start,
        period_executions,
    )

    since = NOW - window_hours * HOUR
    _run(history, since, duration_ms=777)  # on the window's first instant: inside
    _run(history, NOW, duration_ms=888, success=False)  # at now: outside ([since, now) like the selectors)
    _run(history, dt.datetime(2025, 6, 1, tzinfo=UTC), duration_ms=50)  # the period's first instant
    clock = PeriodClock.at(NOW)

    with CaptureQueriesContext(connection) as queries:
        activity = agent_activity(agent=history, since=since, clock=clock)

    assert len(queries) == 1
    assert (
        activity.window_stats == execution_stats(since=since, until=NOW, agent_ids=[history.id])[history.id]
    )
    assert (
        activity.window_durations
        == duration_percentiles(since=since, until=NOW, agent_ids=[history.id])[history.id]
    )
    assert activity.period_successes == period_executions(agent=history, clock=clock).successes
    spend = UsageLog.objects.filter(
        agent=history, created_at__gte=forecast_window_start(clock), created_at__lte=NOW
    ).aggregate(total=Sum("cost_usd"))["total"]
    assert activity.forecast_spend_usd == spend


def test_metrics_of_an_agent_that_ran_nothing_in_one_statement(reference_data):
    from optimization.services.analytics import PeriodClock, agent_activity

    agent = agent_create(agent_id="idle-pg", tier_code="FREE")
    activity = agent_activity(agent=agent, since=NOW - 24 * HOUR, clock=PeriodClock.at(NOW))
    assert (activity.window_stats, activity.window_durations, activity.period_successes) == (None, {}, 0)
    assert activity.forecast_spend_usd == Decimal(0)


def test_metrics_refuse_a_window_out_of_range(history):
    from ledger.errors import LedgerError

    for bad in (0, 721, "24"):
        with pytest.raises(LedgerError) as refused:
            agent_metrics(agent=history, now=NOW, window_hours=bad)
        assert refused.value.code == "invalid_window"


# --- Analysis -------------------------------------------------------------------------------------------


@pytest.fixture
def busy(reference_data) -> Agent:
    """A FREE agent (AI 100,000 / compute 180,000 / network 1,000 a month) close to its limits."""
    agent = agent_create(agent_id="busy", tier_code="FREE")
    old = dt.datetime(2025, 6, 5, tzinfo=UTC)
    allocation_create(agent=agent, resource_type_id="AI_TOKENS", amount=70_000, now=old)
    allocation_create(agent=agent, resource_type_id="AI_TOKENS", amount=12_000, now=NOW - 6 * HOUR)
    allocation_create(agent=agent, resource_type_id="NETWORK_REQS", amount=300, now=old)
    allocation_create(agent=agent, resource_type_id="NETWORK_REQS", amount=200, now=NOW - 2 * HOUR)
    allocation_create(agent=agent, resource_type_id="COMPUTE_MS", amount=170_000, now=old)
    allocation_create(agent=agent, resource_type_id="STORAGE_KB", amount=10, now=NOW - HOUR)
    return agent


def test_analysis_finds_bottlenecks_by_threshold_and_by_projected_exhaustion(busy):
    bottlenecks = agent_analysis(agent=busy, now=NOW)["bottlenecks"]

    assert [(b["resource_type"], b["severity"], b["reasons"]) for b in bottlenecks] == [
        ("COMPUTE_MS", "critical", ["utilization_critical"]),
        ("AI_TOKENS", "warning", ["utilization_warning", "projected_exhaustion"]),
        ("NETWORK_REQS", "warning", ["projected_exhaustion"]),
    ]
    compute, tokens, network = bottlenecks
    # 170,000 of 180,000 and nothing in the last 24 hours: critical, but no burn to run out at.
    assert compute["utilization_percent"] == Decimal("94.44")
    assert compute["projected_exhaustion_at"] is None
    assert compute["runs_out_before_period_end"] is False
    # 82,000 of 100,000; 12,000 in the last 24 hours is 500 an hour, so the 18,000 left last 36 hours.
    assert tokens["utilization_percent"] == Decimal("82.00")
    assert tokens["used_last_24h"] == 12_000
    assert tokens["burn_rate_per_hour"] == Decimal("500.00")
    assert tokens["projected_exhaustion_at"] == dt.datetime(2025, 6, 12, 12, tzinfo=UTC)
    # Only half used, but 200 requests a day leave the last 500 for 2.5 days: before the period ends.
    assert network["utilization_percent"] == Decimal("50.00")
    assert network["projected_exhaustion_at"] == dt.datetime(2025, 6, 13, 12, tzinfo=UTC)
    assert network["runs_out_before_period_end"] is True


def test_analysis_burn_rate_counts_consumption_only_not_holds(busy):
    allocation_create(
        agent=busy, resource_type_id="STORAGE_KB", amount=900_000, hold=True, now=NOW - HOUR
    )  # held, not consumed: 86 % reserved is a warning, but no burn
    storage = next(
        b for b in agent_analysis(agent=busy, now=NOW)["bottlenecks"] if b["resource_type"] == "STORAGE_KB"
    )
    assert storage["utilization_percent"] == Decimal("85.83")
    assert storage["used_last_24h"] == 10
    assert storage["reasons"] == ["utilization_warning"]


def test_analysis_optimization_actions_name_bottlenecks_that_nothing_else_relieves(busy):
    analysis = agent_analysis(agent=busy, now=NOW)
    actions = analysis["optimization_actions"]
    assert len(actions) <= 5
    # AI tokens and network are projected short and PRO covers every projection: an upgrade relieves them,
    # so the first action is that upgrade (high: AI tokens run out within 7 days).
    assert actions[0]["type"] == "upgrade_tier" and actions[0]["priority"] == "high"
    assert "PRO" in actions[0]["summary"]
    assert all(action["type"] != "relieve_bottleneck" for action in actions)


def test_analysis_action_for_a_bottleneck_no_tier_relieves_is_a_grant(reference_data):
    agent = agent_create(agent_id="top", tier_code="ENTERPRISE")  # no dearer tier to move to
    # and no vertical scaling either: the tier's default policy (which grows limits) switched off.
    ScalingPolicy.objects.filter(tier_id="ENTERPRISE").update(enabled=False)
    allocation_create(agent=agent, resource_type_id="NETWORK_REQS", amount=95_000, now=NOW - HOUR)
    actions = agent_analysis(agent=agent, now=NOW)["optimization_actions"]
    assert actions[0]["type"] == "grant_quota"
    assert actions[0]["priority"] == "high"
    assert actions[0]["resource_type"] == "NETWORK_REQS"
    # The grant relieves the bottleneck: it is not listed again as one without a remedy.
    assert not [action for action in actions if action["type"] == "relieve_bottleneck"]


def test_analysis_action_for_a_bottleneck_without_a_remedy(reference_data):
    # Running out within the week, but the projection fits the limit: nothing is short, nothing to grant.
    agent = agent_create(agent_id="top", tier_code="ENTERPRISE")
    allocation_create(agent=agent, resource_type_id="NETWORK_REQS", amount=30_000, now=NOW - HOUR)
    actions = agent_analysis(agent=agent, now=NOW)["optimization_actions"]
    assert actions[0]["type"] == "relieve_bottleneck"
    assert actions[0]["priority"] == "medium"  # forecast to run out, not yet at 90 %
    assert actions[0]["resource_type"] == "NETWORK_REQS"


def _efficiency_history():
    """Three PRO agents and a FREE one in June; every execution costs $0.01 (10 network requests)."""
    a = agent_create(agent_id="eff-a", tier_code="PRO")  # 10 outputs for $0.10: 100 per dollar
    for i in range(10):
        _run(a, NOW - (i + 1) * HOUR)
    b = agent_create(agent_id="eff-b", tier_code="PRO")  # 20 outputs for $0.05: 400 per dollar, the best
    for i in range(4):
        _run(b, NOW - (i + 1) * HOUR, output_units=5)
    _run(b, NOW - 5 * HOUR, success=False)
    c = agent_create(agent_id="eff-c", tier_code="PRO")  # spend but no execution
    allocation_create(agent=c, resource_type_id="AI_TOKENS", amount=1_000, now=NOW - HOUR)
    d = agent_create(agent_id="eff-d", tier_code="FREE")  # 1,000 per dollar, but in another tier
    _run(d, NOW - HOUR, output_units=10)
    e = agent_create(agent_id="eff-e", tier_code="PRO")  # nothing at all this period
    return a, b, c, d, e


def test_efficiency_score_is_relative_to_the_best_agent_of_the_same_tier(reference_data):
    a, b, c, d, e = _efficiency_history()

    scores = {agent.id: agent_analysis(agent=agent, now=NOW)["efficiency"] for agent in (a, b, c, d, e)}

    assert scores["eff-b"]["score"] == Decimal("100.00")
    assert scores["eff-a"]["score"] == Decimal("25.00")
    assert scores["eff-a"]["output_per_usd"] == Decimal("100")
    assert scores["eff-a"]["tier_best_output_per_usd"] == Decimal("400")
    assert scores["eff-a"]["tier_agents_compared"] == 2  # a and b: c has no execution, e nothing
    assert scores["eff-d"]["score"] == Decimal("100.00")  # alone in FREE
    assert scores["eff-c"]["score"] is None  # spend but no execution
    assert scores["eff-e"]["score"] is None  # neither
    assert agent_analysis(agent=a, now=NOW)["efficiency_score"] == Decimal("25.00")
    assert efficiency_score(agent=a, now=NOW) == Decimal("25.00")
    assert efficiency_score(agent=c, now=NOW) is None


def test_efficiency_counts_only_this_period(reference_data):
    a, b, *_ = _efficiency_history()
    for i in range(30):  # May: a very efficient month of b's that must not count in June
        _run(b, dt.datetime(2025, 5, 2, tzinfo=UTC) + i * HOUR, output_units=100)
    assert agent_analysis(agent=a, now=NOW)["efficiency"]["score"] == Decimal("25.00")


# --- A/B experiments ------------------------------------------------------------------------------------


@pytest.fixture
def experiment(reference_data) -> Experiment:
    experiment = Experiment.objects.create(
        name="cheap-vs-fast",
        started_at=dt.datetime(2025, 6, 1, tzinfo=UTC),
        ended_at=dt.datetime(2025, 6, 10, tzinfo=UTC),
    )
    ExperimentArm.objects.create(experiment=experiment, name="control", weight=1)
    ExperimentArm.objects.create(experiment=experiment, name="treatment", weight=3)
    return experiment


def _expected_arm(experiment_name: str, agent_id: str) -> str:
    # The documented rule: SHA-256 of "name\0agent id", first 8 bytes mod the total weight (1 + 3),
    # over the arms in name order: control takes bucket 0, treatment buckets 1-3.
    bucket = (
        int.from_bytes(hashlib.sha256(f"{experiment_name}\x00{agent_id}".encode()).digest()[:8], "big") % 4
    )
    return "control" if bucket < 1 else "treatment"


def test_experiment_assignment_is_deterministic_by_hash_over_the_arm_weights(experiment):
    agents = [agent_create(agent_id=f"ab-{i:02d}", tier_code="PRO") for i in range(40)]

    assignments = experiment_assign(experiment=experiment, agents=agents)

    assert [a.agent_id for a in assignments] == [agent.id for agent in agents]
    assert {a.agent_id: a.arm.name for a in assignments} == {
        agent.id: _expected_arm("cheap-vs-fast", agent.id) for agent in agents
    }
    arms = [a.arm.name for a in assignments]
    assert 0 < arms.count("control") < arms.count("treatment")  # about 1 : 3

    # Assigning again (even after forgetting every assignment) gives the same arms.
    ExperimentAssignment.objects.all().delete()
    again = experiment_assign(experiment=experiment, agents=reversed(agents))
    assert {a.agent_id: a.arm_id for a in again} == {a.agent_id: a.arm_id for a in assignments}


def test_experiment_assignment_keeps_an_agents_first_arm(experiment):
    agent = agent_create(agent_id="ab-sticky", tier_code="PRO")
    (first,) = experiment_assign(experiment=experiment, agents=[agent])
    other = ExperimentArm.objects.exclude(pk=first.arm_id).get(experiment=experiment)
    ExperimentAssignment.objects.filter(pk=first.pk).update(arm=other)

    (second,) = experiment_assign(experiment=experiment, agents=[agent])

    assert second.arm_id == other.pk
    assert ExperimentAssignment.objects.filter(agent=agent).count() == 1


def test_experiment_without_weighted_arms_refuses_to_assign(experiment):
    from ledger.errors import LedgerError

    experiment.arms.update(weight=0)
    with pytest.raises(LedgerError) as refused:
        experiment_assign(experiment=experiment, agents=[agent_create(agent_id="ab-x", tier_code="PRO")])
    assert refused.value.code == "experiment_has_no_arms"
    assert not ExperimentAssignment.objects.exists()


@pytest.fixture
def experiment_history(experiment):
    """Two agents in control, one in treatment, with executions inside and outside the experiment's time."""
    control = ExperimentArm.objects.get(experiment=experiment, name="control")
    treatment = ExperimentArm.objects.get(experiment=experiment, name="treatment")
    c1, c2, t1 = (agent_create(agent_id=name, tier_code="PRO") for name in ("ctl-1", "ctl-2", "trt-1"))
    for agent, arm in ((c1, control), (c2, control), (t1, treatment)):
        ExperimentAssignment.objects.create(experiment=experiment, arm=arm, agent=agent)
    inside = dt.datetime(2025, 6, 5, tzinfo=UTC)
    _run(c1, inside)  # $0.01
    _run(c1, inside, success=False)  # $0.01
    _run(c2, inside, resources={"NETWORK_REQS": 30})  # $0.03
    _run(t1, inside, resources={"NETWORK_REQS": 5})  # $0.005
    _run(t1, inside, resources={"NETWORK_REQS": 5})  # $0.005
    _run(t1, dt.datetime(2025, 5, 31, tzinfo=UTC))  # before the start
    _run(t1, dt.datetime(2025, 6, 10, tzinfo=UTC))  # at the end (exclusive)
    return experiment


def test_experiment_report_per_arm(experiment_history):
    report = experiment_report(experiment=experiment_history)

    assert [
        (
            r["arm"],
            r["agents"],
            r["executions"],
            r["successes"],
            r["spend_usd"],
            r["cost_per_successful_task_usd"],
        )
        for r in report
    ] == [
        ("control", 2, 3, 2, Decimal("0.05"), Decimal("0.025")),
        ("treatment", 1, 2, 2, Decimal("0.01"), Decimal("0.005")),
    ]


def test_experiment_report_of_an_arm_without_success_has_no_cost_per_task(experiment):
    report = experiment_report(experiment=experiment, now=NOW)
    assert [(r["arm"], r["agents"], r["executions"], r["cost_per_successful_task_usd"]) for r in report] == [
        ("control", 0, 0, None),
        ("treatment", 0, 0, None),
    ]


def test_experiment_report_runs_until_now_while_the_experiment_is_open(experiment_history):
    Experiment.objects.filter(pk=experiment_history.pk).update(ended_at=None)
    experiment_history.refresh_from_db()
    report = experiment_report(experiment=experiment_history, now=NOW)
    assert report[1]["executions"] == 3  # the 10 June run is inside now


# --- API ------------------------------------------------------------------------------------------------


@pytest.fixture
def history_client(history):
    _, raw_key = api_key_issue(agent=history)
    return client_with_key(raw_key)


def test_metrics_endpoint_renders_the_same_numbers_as_strings(history_client, frozen_now):
    response = history_client.get(reverse("optimization:agent-metrics", args=["metrics-agent"]))

    assert response.status_code == 200, response.content
    body = response.json()
    assert body["agent_id"] == "metrics-agent"
    assert body["current"]["AI_TOKENS"]["utilization_percent"] == "35.00"
    assert body["performance"]["p50_duration_ms"] == "300.00"
    assert body["performance"]["p95_duration_ms"] == "880.00"
    assert body["performance"]["error_rate_percent"] == "20.00"
    assert body["performance"]["throughput_per_hour"] == "0.21"
    assert body["cost"]["total_usd"] == "1.360000000000"
    assert body["cost"]["by_resource_type"]["COMPUTE_MS"] == "1.000000000000"
    assert body["cost"]["forecast_period_end_usd"] == "4.360000000000"
    assert body["cost"]["cost_per_successful_task_usd"] == "0.272000000000"
    assert body["cost"]["period_start"] == "2025-06-01T00:00:00Z"


def test_metrics_endpoint_takes_window_hours_and_refuses_bad_values(history_client, frozen_now):
    url = reverse("optimization:agent-metrics", args=["metrics-agent"])
    assert history_client.get(url, {"window_hours": 720}).json()["performance"]["executions"] == 7
    for bad in ("0", "721", "abc", "1.5"):
        details = assert_error(history_client.get(url, {"window_hours": bad}), 400, "validation_error")
        assert "window_hours" in details["fields"]
    assert_error(history_client.get(url, {"window": 5}), 400, "validation_error")


def test_analysis_endpoint(reference_data, frozen_now):
    agent = agent_create(agent_id="busy-api", tier_code="FREE")
    allocation_create(
        agent=agent, resource_type_id="AI_TOKENS", amount=70_000, now=dt.datetime(2025, 6, 5, tzinfo=UTC)
    )
    allocation_create(agent=agent, resource_type_id="AI_TOKENS", amount=12_000, now=NOW - 6 * HOUR)
    _, raw_key = api_key_issue(agent=agent)

    response = client_with_key(raw_key).get(reverse("optimization:agent-analysis", args=["busy-api"]))

    assert response.status_code == 200, response.content
    body = response.json()
    assert body["bottlenecks"][0]["resource_type"] == "AI_TOKENS"
    assert body["bottlenecks"][0]["projected_exhaustion_at"] == "2025-06-12T12:00:00Z"
    assert body["efficiency_score"] is None  # spend, but no execution
    assert isinstance(body["optimization_actions"], list)


def test_analytics_endpoints_are_isolated_per_agent(history, agent_b, operator_client, frozen_now):
    for name in ("agent-metrics", "agent-analysis", "agent-recommendations"):
        url = reverse(f"optimization:{name}", args=["metrics-agent"])
        assert_error(agent_b.client.get(url), 404, "not_found")
        assert operator_client.get(url).status_code == 200
    assert_error(client_with_key(None).get(url), 401, "not_authenticated")


def test_analytics_endpoints_answer_feature_disabled_when_the_flag_is_off(
    history, operator_client, settings, frozen_now, experiment
):
    settings.ENABLE_PERFORMANCE_ANALYTICS = False
    for name in ("agent-metrics", "agent-analysis", "agent-recommendations"):
        response = operator_client.get(reverse(f"optimization:{name}", args=["metrics-agent"]))
        assert_error(response, 403, "feature_disabled")
    response = operator_client.post(
        reverse("optimization:agent-optimize", args=["metrics-agent"]), {}, format="json"
    )
    assert_error(response, 403, "feature_disabled")
    response = operator_client.get(reverse("optimization:experiment-report", args=[experiment.pk]))
    assert_error(response, 403, "feature_disabled")


def test_experiment_report_endpoint_is_for_operators_only(experiment_history, operator_client, agent_a):
    url = reverse("optimization:experiment-report", args=[experiment_history.pk])

    assert_error(agent_a.client.get(url), 403, "forbidden")
    response = operator_client.get(url)

    assert response.status_code == 200, response.content
    body = response.json()
    assert body["name"] == "cheap-vs-fast"
    assert [(arm["arm"], arm["spend_usd"], arm["cost_per_successful_task_usd"]) for arm in body["arms"]] == [
        ("control", "0.050000000000", "0.025000000000"),
        ("treatment", "0.010000000000", "0.005000000000"),
    ]
    assert_error(
        operator_client.get(reverse("optimization:experiment-report", args=[999_999])), 404, "not_found"
    )


def test_compat_metrics_have_camel_case_keys_and_the_same_numbers(history_client, frozen_now):
    from optimization.api.analytics import compat_metrics

    request = type("Request", (), {"query_params": _QueryDict({"windowHours": "24"})})()
    body = compat_metrics(request, Agent.objects.get(pk="metrics-agent"))

    assert body["agentId"] == "metrics-agent"
    assert body["performance"]["p95DurationMs"] == "880.00"
    assert body["performance"]["errorRatePercent"] == "20.00"
    assert body["cost"]["totalUSD"] == "1.360000000000"
    assert body["cost"]["forecastPeriodEndUSD"] == "4.360000000000"
    assert body["cost"]["costPerSuccessfulTaskUSD"] == "0.272000000000"
    assert body["cost"]["byResourceType"]["AI_TOKENS"] == "0.300000000000"  # codes are data: kept
    assert body["current"]["AI_TOKENS"]["utilizationPercent"] == "35.00"


class _QueryDict(dict):
    def dict(self):
        return dict(self)


# --- Admin ----------------------------------------------------------------------------------------------


def test_execution_admin_is_read_only_with_a_date_hierarchy(history, admin_client_logged_in):
    execution = Execution.objects.order_by("pk").first()
    changelist = admin_client_logged_in.get(
        reverse("admin:optimization_execution_changelist"), {"created_at__year": 2025, "created_at__month": 6}
    )
    assert changelist.status_code == 200
    assert changelist.context["cl"].result_count == 6  # June's executions only
    assert admin_client_logged_in.get(reverse("admin:optimization_execution_add")).status_code == 403
    change = admin_client_logged_in.get(reverse("admin:optimization_execution_change", args=[execution.pk]))
    assert change.status_code == 200
    posted = admin_client_logged_in.post(
        reverse("admin:optimization_execution_change", args=[execution.pk]), {"duration_ms": 1}
    )
    assert posted.status_code == 403
    assert Execution.objects.get(pk=execution.pk).duration_ms == execution.duration_ms


def test_experiment_admin_shows_arms_inline_and_the_report_per_arm(
    experiment_history, admin_client_logged_in
):
    response = admin_client_logged_in.get(
        reverse("admin:optimization_experiment_change", args=[experiment_history.pk])
    )
    assert response.status_code == 200
    page = response.content.decode()
    assert 'name="arms-0-weight"' in page
    # Money as money: trailing zeros trimmed, cents kept.
    assert "<td>$0.05</td>" in page and "<td>$0.025</td>" in page
    assert "0.050000000000" not in page
    assert admin_client_logged_in.get(reverse("admin:optimization_experiment_changelist")).status_code == 200
    assert admin_client_logged_in.get(reverse("admin:optimization_experiment_add")).status_code == 200


def test_experiment_admin_action_assigns_every_active_agent(experiment, admin_client_logged_in):
    from ledger.services import agent_set_status

    agents = [agent_create(agent_id=f"adm-{i}", tier_code="PRO") for i in range(5)]
    agent_set_status(agent=agents[0], status="suspended")

    response = admin_client_logged_in.post(
        reverse("admin:optimization_experiment_changelist"),
        {"action": "assign_active_agents", "_selected_action": [experiment.pk]},
        follow=True,
    )

    assert response.status_code == 200
    assigned = dict(ExperimentAssignment.objects.values_list("agent_id", "arm__name"))
    assert assigned == {agent.id: _expected_arm("cheap-vs-fast", agent.id) for agent in agents[1:]}
    assignment = ExperimentAssignment.objects.order_by("pk").first()
    assert (
        admin_client_logged_in.get(reverse("admin:optimization_experimentassignment_changelist")).status_code
        == 200
    )
    change = reverse("admin:optimization_experimentassignment_change", args=[assignment.pk])
    assert admin_client_logged_in.get(change).status_code == 200
    assert (
        admin_client_logged_in.get(reverse("admin:optimization_experimentassignment_add")).status_code == 403
    )

"""A/B experiments that test strategies: an arm's rules, scaling policy and deal buying apply to its agents
while the experiment runs; the report's intervals and its winner; stopping, with or without applying the
winner; and the operator API with its validation."""

from __future__ import annotations

import datetime as dt
import hashlib
from decimal import Decimal

import pytest
from django.urls import reverse
from django.utils import timezone

from allocation.services import allocation_create
from ledger.models import Agent, OptimizationRule, Quota
from ledger.services import agent_create, quota_open
from optimization.models import (
    Alert,
    Deal,
    Execution,
    Experiment,
    ExperimentArm,
    ExperimentAssignment,
    Purchase,
    ScalingPolicy,
)
from optimization.services.experiments import (
    experiment_create,
    experiment_stop,
    experiment_summary,
    wilson_interval,
)
from optimization.services.recommendations import optimization_run
from optimization.services.rules import rules_evaluate

pytest.register_assert_rewrite("tests.api_fixtures")

from tests.api_fixtures import assert_error  # noqa: E402

pytest_plugins = ["tests.api_fixtures"]

pytestmark = pytest.mark.django_db

UTC = dt.UTC
T0 = dt.datetime(2025, 6, 15, 12, 0, tzinfo=UTC)
DAY = dt.timedelta(days=1)


def _agent_at(agent_id: str, percent: int) -> Agent:
    """A PRO agent with ``percent`` of its 1,000,000 AI tokens used this period."""
    agent = Agent.objects.filter(pk=agent_id).first() or agent_create(agent_id=agent_id, tier_code="PRO")
    quota = quota_open(agent=agent, resource_type_id="AI_TOKENS", at=T0)
    Quota.objects.filter(pk=quota.pk).update(used=percent * 10_000)
    return agent


def _rule(name: str, **fields) -> OptimizationRule:
    defaults = {
        "metric": "resource_utilization_percent",
        "operator": ">",
        "threshold": 80,
        "duration_seconds": 0,
        "cooldown_seconds": 3600,
    }
    return OptimizationRule.objects.create(name=name, **{**defaults, **fields})


def _experiment(name: str = "exp", *, started_at=T0 - DAY, ended_at=None, **arms) -> Experiment:
    """An experiment with the given arms (name -> list of agents), each arm created empty of rules."""
    experiment = Experiment.objects.create(name=name, started_at=started_at, ended_at=ended_at)
    for arm_name, agents in arms.items():
        arm = ExperimentArm.objects.create(experiment=experiment, name=arm_name)
        for agent in agents:
            ExperimentAssignment.objects.create(experiment=experiment, arm=arm, agent=agent)
    return experiment


def _fired() -> set[tuple[str, str]]:
    return {(alert.rule.name, alert.agent_id) for alert in Alert.objects.filter(kind="rule")}


# --- Rules ----------------------------------------------------------------------------------------------


@pytest.fixture
def no_seed_rules(reference_data):
    OptimizationRule.objects.all().delete()


def test_an_arms_rule_fires_for_its_agents_only(no_seed_rules):
    treated, control, outsider = (_agent_at(name, 90) for name in ("treated", "control", "outsider"))
    experiment = _experiment(treatment=[treated], control=[control])
    arm_rule = _rule("arm-rule")  # global scope, but in an arm: it reaches only the arm's agents
    experiment.arms.get(name="treatment").rules.add(arm_rule)
    _rule("fleet-rule", threshold=85)  # in no arm: everyone

    report = rules_evaluate(now=T0)

    assert _fired() == {
        ("arm-rule", "treated"),
        ("fleet-rule", "treated"),
        ("fleet-rule", "control"),
        ("fleet-rule", "outsider"),
    }
    assert report["fired"] == 4


def test_an_arm_rule_keeps_its_own_scope_within_the_arm(no_seed_rules):
    pro = _agent_at("pro-in-arm", 90)
    free = agent_create(agent_id="free-in-arm", tier_code="FREE")
    Quota.objects.filter(pk=quota_open(agent=free, resource_type_id="AI_TOKENS", at=T0).pk).update(
        used=90_000
    )
    experiment = _experiment(treatment=[pro, free])
    experiment.arms.get().rules.add(_rule("free-tier-arm-rule", scope="tier", tier_id="FREE"))

    rules_evaluate(now=T0)

    assert _fired() == {("free-tier-arm-rule", "free-in-arm")}


def test_an_arms_rules_replace_the_agents_own_until_the_experiment_ends(no_seed_rules):
    treated = _agent_at("treated", 90)
    experiment = _experiment(treatment=[treated])
    # No cooldown: each rule fires at every evaluation in which it reaches the agent.
    experiment.arms.get().rules.add(_rule("arm-rule", cooldown_seconds=0))
    _rule("own-rule", scope="agent", agent_id="treated", cooldown_seconds=0)

    rules_evaluate(now=T0)
    assert _fired() == {("arm-rule", "treated")}

    Experiment.objects.filter(pk=experiment.pk).update(ended_at=T0 + dt.timedelta(minutes=1))
    Alert.objects.all().delete()
    rules_evaluate(now=T0 + dt.timedelta(minutes=2))

    # Back to its own strategy: its own rule, and the arm's rule reaches nobody any more.
    assert _fired() == {("own-rule", "treated")}


def test_an_arms_throttle_is_lifted_once_the_experiment_ends(no_seed_rules):
    treated = _agent_at("treated", 90)
    experiment = _experiment(treatment=[treated])
    experiment.arms.get().rules.add(_rule("arm-throttle", action="throttle"))

    rules_evaluate(now=T0)
    treated.refresh_from_db()
    assert (treated.status, treated.status_reason) == ("throttled", "rule:arm-throttle")

    experiment_stop(experiment=experiment, now=T0 + dt.timedelta(minutes=1))
    rules_evaluate(now=T0 + dt.timedelta(minutes=2))

    treated.refresh_from_db()
    assert (treated.status, treated.status_reason) == ("active", "")


def test_an_experiment_not_yet_started_changes_nothing(no_seed_rules):
    treated = _agent_at("treated", 90)
    experiment = _experiment(treatment=[treated], started_at=T0 + DAY)
    experiment.arms.get().rules.add(_rule("arm-rule"))
    _rule("own-rule", scope="agent", agent_id="treated")

    rules_evaluate(now=T0)

    assert _fired() == {("own-rule", "treated")}


def test_rules_with_experiments_cost_a_fixed_number_of_queries_per_chunk(no_seed_rules):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    def queries(agents: int) -> int:
        treated = [_agent_at(f"t-{i:03d}", 90) for i in range(agents)]
        experiment = _experiment(f"exp-{agents}", treatment=treated)
        experiment.arms.get().rules.add(_rule(f"arm-rule-{agents}"))
        with CaptureQueriesContext(connection) as captured:
            result = rules_evaluate(now=T0, chunk_size=1000)
        assert result["fired"] == agents
        Alert.objects.all().delete()
        Experiment.objects.all().delete()
        OptimizationRule.objects.all().delete()
        Agent.objects.all().delete()
        return len(captured)

    assert queries(3) == queries(30)


# --- Deal buying ----------------------------------------------------------------------------------------


NOW = dt.datetime(2025, 6, 11, tzinfo=UTC)


@pytest.fixture
def short_of_tokens(reference_data, monkeypatch) -> tuple[Agent, Deal]:
    """A FREE agent with a $1 budget projected short of AI tokens, and a deal under list price for them (as
    in test_recommendations: the optimizer would buy it)."""
    monkeypatch.setattr(timezone, "now", lambda: NOW)
    agent = agent_create(agent_id="opt", tier_code="FREE", monthly_budget_usd=Decimal("1"))
    allocation_create(
        agent=agent, resource_type_id="AI_TOKENS", amount=85_000, now=NOW - dt.timedelta(hours=12)
    )
    deal = Deal.objects.create(
        resource_type_id="AI_TOKENS",
        amount_total=15_000,
        amount_left=15_000,
        unit_price_usd=Decimal("0.0000005"),
        expires_at=NOW + DAY,
    )
    return agent, deal


def _deal_skip(result: dict) -> str | None:
    return next((item["reason"] for item in result["skipped"] if item["type"] == "buy_deal"), None)


def test_an_arm_that_buys_no_deals_keeps_the_optimizer_from_buying(short_of_tokens):
    agent, _ = short_of_tokens
    experiment = _experiment(treatment=[agent], started_at=NOW - DAY)
    experiment.arms.update(buy_deals=False)

    result = optimization_run(agent=agent, actor="ops")

    assert "buys no deals automatically" in _deal_skip(result)
    assert not Purchase.objects.exists()


def test_an_arms_price_cap_holds_back_dearer_deals_only(short_of_tokens):
    agent, deal = short_of_tokens
    experiment = _experiment(treatment=[agent], started_at=NOW - DAY)
    experiment.arms.update(deal_max_unit_price_usd=Decimal("0.0000004"))

    result = optimization_run(agent=agent, actor="ops")
    assert "is over the 0.0000004" in _deal_skip(result)
    assert not Purchase.objects.exists()

    experiment.arms.update(deal_max_unit_price_usd=Decimal("0.0000005"))
    result = optimization_run(agent=agent, actor="ops")
    assert _deal_skip(result) is None
    assert Purchase.objects.get().deal_id == deal.pk


def test_an_ended_experiments_deal_preference_no_longer_applies(short_of_tokens):
    agent, _ = short_of_tokens
    experiment = _experiment(treatment=[agent], started_at=NOW - 2 * DAY, ended_at=NOW - DAY)
    experiment.arms.update(buy_deals=False)

    optimization_run(agent=agent, actor="ops")

    assert Purchase.objects.filter(buyer=agent).exists()


# --- Report ---------------------------------------------------------------------------------------------


def _executions(agent: Agent, costs: list[str], *, successes: int | None = None, durations=None, start=T0):
    """One execution per cost, an hour apart from ``start``; the first ``successes`` succeed (all by
    default)."""
    successes = len(costs) if successes is None else successes
    durations = durations or [100] * len(costs)
    Execution.objects.bulk_create(
        Execution(
            agent=agent,
            superpower="search",
            resources={},
            duration_ms=durations[i],
            success=i < successes,
            cost_usd=Decimal(cost),
            created_at=start + i * dt.timedelta(minutes=1),
        )
        for i, cost in enumerate(costs)
    )


@pytest.fixture
def two_arms(reference_data):
    cheap, dear = (
        agent_create(agent_id="cheap", tier_code="PRO"),
        agent_create(agent_id="dear", tier_code="PRO"),
    )
    experiment = _experiment("cost", started_at=T0 - DAY, cheap=[cheap], dear=[dear])
    return experiment, cheap, dear


def test_report_names_a_clear_winner_with_its_test(two_arms):
    experiment, cheap, dear = two_arms
    _executions(cheap, ["0.01", "0.02"] * 20, successes=36)  # $0.60 for 36 successes
    _executions(dear, ["0.03", "0.04"] * 20, successes=36)  # $1.40 for 36 successes

    summary = experiment_summary(experiment=experiment, now=T0 + DAY)

    assert summary["winner"] == {"arm_id": experiment.arms.get(name="cheap").pk, "arm": "cheap"}
    assert summary["winner_reason"] is None
    (comparison,) = summary["comparisons"]
    assert (comparison["arm"], comparison["against"], comparison["significant"]) == ("cheap", "dear", True)
    assert comparison["p_value"] < 0.001
    assert "z-test" in summary["test"]
    cheap_row, dear_row = summary["arms"]
    assert cheap_row["cost_per_successful_task_usd"] == Decimal("0.016666666667")
    assert dear_row["cost_per_successful_task_usd"] == Decimal("0.038888888889")
    low, high = cheap_row["cost_per_successful_task_ci95_usd"]
    assert (
        low
        < cheap_row["cost_per_successful_task_usd"]
        < high
        < dear_row["cost_per_successful_task_ci95_usd"][0]
    )
    # Wilson 95 % for 36 of 40, worked out by hand: 76.95 % to 96.04 %.
    assert cheap_row["success_rate_percent"] == Decimal("90.00")
    assert cheap_row["success_rate_ci95_percent"] == [Decimal("76.95"), Decimal("96.04")]


def test_report_has_no_winner_when_the_difference_is_noise(two_arms):
    experiment, cheap, dear = two_arms
    _executions(cheap, ["0.01", "0.03"] * 20, successes=30)
    _executions(dear, ["0.03", "0.01"] * 20, successes=31)

    summary = experiment_summary(experiment=experiment, now=T0 + DAY)

    assert summary["winner"] is None
    assert summary["winner_reason"].startswith("no significant difference in cost per successful task")
    (comparison,) = summary["comparisons"]
    assert comparison["significant"] is False and comparison["p_value"] > 0.05


def test_report_has_no_winner_on_too_few_executions(two_arms):
    experiment, cheap, dear = two_arms
    _executions(cheap, ["0.01"] * 29)
    _executions(dear, ["0.05"] * 40)

    summary = experiment_summary(experiment=experiment, now=T0 + DAY)

    assert summary["winner"] is None
    assert summary["winner_reason"] == "too few executions (under 30) in arm(s): cheap"


def test_report_p95_and_its_order_statistic_interval(two_arms):
    experiment, cheap, _ = two_arms
    _executions(cheap, ["0.01"] * 100, durations=list(range(1, 101)))

    cheap_row, dear_row = experiment_summary(experiment=experiment, now=T0 + DAY)["arms"]

    # percentile_cont(0.95) of 1..100; ranks 95 -/+ 1.96 x sqrt(100 x 0.95 x 0.05): floor 90.7, ceil 99.3 + 1.
    assert cheap_row["p95_duration_ms"] == Decimal("95.05")
    assert cheap_row["p95_duration_ci95_ms"] == [Decimal(90), Decimal(100)]
    assert (dear_row["executions"], dear_row["p95_duration_ms"], dear_row["success_rate_percent"]) == (
        0,
        None,
        None,
    )


def test_report_counts_only_the_experiments_time(two_arms):
    experiment, cheap, _ = two_arms
    _executions(cheap, ["0.01"] * 3, start=T0 - 2 * DAY)  # before it started
    _executions(cheap, ["0.01"] * 2)
    (cheap_row, _) = experiment_summary(experiment=experiment, now=T0 + DAY)["arms"]
    assert cheap_row["executions"] == 2


def test_wilson_interval_without_trials_is_none():
    assert wilson_interval(0, 0) is None
    low, high = wilson_interval(0, 10)
    assert abs(low) < 1e-12 and 0.2 < high < 0.35


# --- Stopping and applying the winner -------------------------------------------------------------------


def test_apply_winner_gives_every_agent_the_winning_strategy(two_arms):
    experiment, cheap, dear = two_arms
    other = agent_create(agent_id="cheap-2", tier_code="PRO")
    cheap_arm = experiment.arms.get(name="cheap")
    ExperimentAssignment.objects.create(experiment=experiment, arm=cheap_arm, agent=other)
    policy = ScalingPolicy.objects.create(scale_up_threshold=70, scale_down_threshold=20, max_instances=4)
    cheap_arm.scaling_policy = policy
    cheap_arm.save()
    cheap_arm.rules.add(_rule("cheap-rule", action="notify", threshold=75))
    cheap_arm.rules.add(_rule("free-tier-rule", scope="tier", tier_id="FREE", threshold=77))  # no PRO agent
    own = _rule("dear-own-rule", scope="agent", agent_id="dear")
    ScalingPolicy.objects.create(agent=dear, scale_up_threshold=95, scale_down_threshold=50)
    _executions(cheap, ["0.01", "0.02"] * 20, successes=36)
    _executions(dear, ["0.03", "0.04"] * 20, successes=36)

    result = experiment_stop(experiment=experiment, apply_winner=True, now=T0 + DAY)

    experiment.refresh_from_db()
    assert (experiment.ended_at, experiment.applied_arm_id) == (T0 + DAY, cheap_arm.pk)
    assert result["applied"]["agents"] == 3
    copies = OptimizationRule.objects.filter(
        scope="agent", metric="resource_utilization_percent", threshold=75
    )
    assert sorted(copies.values_list("agent_id", flat=True)) == ["cheap", "cheap-2", "dear"]
    assert not OptimizationRule.objects.filter(scope="agent", threshold=77).exists()
    own.refresh_from_db()
    assert own.enabled is False  # the arm's rules replaced the agent's own
    for agent_id in ("cheap", "cheap-2", "dear"):
        override = ScalingPolicy.objects.get(agent_id=agent_id)
        assert (override.scale_up_threshold, override.scale_down_threshold, override.max_instances) == (
            70,
            20,
            4,
        )
    # The arm's own policy is left as it was, owned by nobody.
    policy.refresh_from_db()
    assert (policy.agent_id, policy.tier_id) == (None, None)


def test_apply_winner_without_a_winner_is_refused_and_the_experiment_runs_on(two_arms):
    experiment, cheap, dear = two_arms
    _executions(cheap, ["0.01"] * 5)
    from ledger.errors import Conflict

    with pytest.raises(Conflict) as refused:
        experiment_stop(experiment=experiment, apply_winner=True, now=T0 + DAY)
    assert refused.value.code == "no_winner"
    experiment.refresh_from_db()
    assert experiment.ended_at is None
    assert not ScalingPolicy.objects.filter(agent__isnull=False).exists()


def test_stopping_twice_is_refused(two_arms):
    from ledger.errors import Conflict

    experiment, *_ = two_arms
    experiment_stop(experiment=experiment, now=T0)
    with pytest.raises(Conflict) as refused:
        experiment_stop(experiment=experiment, now=T0 + DAY)
    assert refused.value.code == "experiment_ended"


def test_an_agent_is_in_one_open_experiment_at_a_time(reference_data):
    from ledger.errors import Conflict

    agent_create(agent_id="busy", tier_code="PRO")
    experiment_create(name="first", arms=[{"name": "a"}], agent_ids=["busy"])
    with pytest.raises(Conflict) as refused:
        experiment_create(name="second", arms=[{"name": "a"}], agent_ids=["busy"])
    assert refused.value.code == "agent_in_another_experiment"
    assert list(Experiment.objects.values_list("name", flat=True)) == ["first"]


# --- API ------------------------------------------------------------------------------------------------


def _bucket_arm(experiment_name: str, agent_id: str) -> str:
    # Arms in name order, weights a=1, b=3: bucket 0 is a, 1-3 are b.
    bucket = (
        int.from_bytes(hashlib.sha256(f"{experiment_name}\x00{agent_id}".encode()).digest()[:8], "big") % 4
    )
    return "a" if bucket < 1 else "b"


def _written() -> tuple:
    return (
        Experiment.objects.count(),
        ExperimentArm.objects.count(),
        ExperimentAssignment.objects.count(),
        ScalingPolicy.objects.count(),
    )


def test_api_creates_lists_shows_and_stops_an_experiment(operator_client):
    agents = [agent_create(agent_id=f"api-{i:02d}", tier_code="PRO").pk for i in range(12)]
    rule = _rule("api-arm-rule")
    url = reverse("optimization:experiments")

    response = operator_client.post(
        url,
        {
            "name": "api-exp",
            "arms": [
                {"name": "a", "weight": 1},
                {
                    "name": "b",
                    "weight": 3,
                    "rules": [rule.pk],
                    "scaling_policy": {"scale_up_threshold": "70", "scale_down_threshold": "20"},
                    "buy_deals": False,
                    "deal_max_unit_price_usd": "0.0001",
                },
            ],
            "agents": agents,
        },
        format="json",
    )

    assert response.status_code == 201, response.content
    body = response.json()
    assert body["status"] == "running" and body["ended_at"] is None
    assert body["agents"] == 12
    arm_a, arm_b = body["arms"]
    assert (arm_a["name"], arm_a["rules"], arm_a["scaling_policy"], arm_a["buy_deals"]) == (
        "a",
        [],
        None,
        True,
    )
    assert (arm_b["name"], arm_b["weight"], arm_b["rules"], arm_b["buy_deals"]) == ("b", 3, [rule.pk], False)
    assert arm_b["scaling_policy"]["scale_up_threshold"] == "70.00"
    assert arm_b["deal_max_unit_price_usd"] == "0.000100000000"
    policy = ScalingPolicy.objects.get(pk=arm_b["scaling_policy"]["id"])
    assert (policy.agent_id, policy.tier_id) == (None, None)
    assigned = dict(ExperimentAssignment.objects.values_list("agent_id", "arm__name"))
    assert assigned == {agent_id: _bucket_arm("api-exp", agent_id) for agent_id in agents}
    assert arm_a["agents"] + arm_b["agents"] == 12

    listing = operator_client.get(url).json()
    assert [item["name"] for item in listing["results"]] == ["api-exp"]
    detail = operator_client.get(reverse("optimization:experiment", args=[body["id"]]))
    assert detail.json() == body

    extra = agent_create(agent_id="api-late", tier_code="PRO")
    added = operator_client.post(
        reverse("optimization:experiment-agents", args=[body["id"]]), {"agents": [extra.pk]}, format="json"
    )
    assert added.status_code == 200, added.content
    assert added.json()["assignments"] == [
        {"agent_id": "api-late", "arm": _bucket_arm("api-exp", "api-late")}
    ]

    report = operator_client.get(reverse("optimization:experiment-report", args=[body["id"]]))
    assert report.status_code == 200, report.content
    assert report.json()["winner"] is None
    assert report.json()["winner_reason"].startswith("too few executions")

    stop_url = reverse("optimization:experiment-stop", args=[body["id"]])
    no_winner = operator_client.post(stop_url, {"apply_winner": True}, format="json")
    assert_error(no_winner, 409, "no_winner")
    stopped = operator_client.post(stop_url, {}, format="json")
    assert stopped.status_code == 200, stopped.content
    assert (stopped.json()["status"], stopped.json()["applied"]) == ("ended", None)
    assert stopped.json()["ended_at"] is not None
    assert_error(operator_client.post(stop_url, {}, format="json"), 409, "experiment_ended")
    late = operator_client.post(
        reverse("optimization:experiment-agents", args=[body["id"]]), {"agents": ["api-00"]}, format="json"
    )
    assert_error(late, 409, "experiment_ended")


def test_api_stop_applies_the_winner(operator_client, two_arms):
    experiment, cheap, dear = two_arms
    Experiment.objects.filter(pk=experiment.pk).update(started_at=timezone.now() - DAY)
    now = timezone.now()
    _executions(cheap, ["0.01", "0.02"] * 20, successes=36, start=now - dt.timedelta(hours=2))
    _executions(dear, ["0.03", "0.04"] * 20, successes=36, start=now - dt.timedelta(hours=2))

    response = operator_client.post(
        reverse("optimization:experiment-stop", args=[experiment.pk]), {"apply_winner": True}, format="json"
    )

    assert response.status_code == 200, response.content
    body = response.json()
    assert (body["status"], body["applied_arm"], body["applied"]["arm"]) == ("ended", "cheap", "cheap")
    assert body["applied"]["agents"] == 2


@pytest.mark.parametrize(
    ("payload", "status", "code"),
    [
        ({"name": "x", "arms": []}, 400, "validation_error"),
        ({"name": "x"}, 400, "validation_error"),
        ({"name": "x", "arms": [{"name": "a"}, {"name": "a"}]}, 400, "invalid_experiment"),
        ({"name": "x", "arms": [{"name": "a", "weight": 0}]}, 400, "validation_error"),
        ({"name": "x", "arms": [{"name": "a", "weight": -2}]}, 400, "validation_error"),
        ({"name": "x", "arms": [{"name": "a", "rules": [999_999]}]}, 400, "unknown_rules"),
        ({"name": "x", "arms": [{"name": "a"}], "agents": ["nobody"]}, 400, "unknown_agents"),
        ({"name": "x", "arms": [{"name": "a", "colour": "red"}]}, 400, "validation_error"),
        (
            {
                "name": "x",
                "arms": [
                    {"name": "a", "scaling_policy": {"min_instances": 1}},
                    {
                        "name": "b",
                        "scaling_policy": {"scale_up_threshold": "20", "scale_down_threshold": "30"},
                    },
                ],
            },
            400,
            "invalid_policy",
        ),
        ({"name": "taken", "arms": [{"name": "a"}]}, 409, "already_exists"),
    ],
)
def test_api_refuses_a_bad_experiment_and_writes_nothing(operator_client, payload, status, code):
    Experiment.objects.create(name="taken", started_at=timezone.now())
    before = _written()

    response = operator_client.post(reverse("optimization:experiments"), payload, format="json")

    assert_error(response, status, code)
    assert _written() == before


def test_api_is_for_operators_only(agent_a, reference_data):
    experiment = Experiment.objects.create(name="ops-only", started_at=timezone.now())
    for response in (
        agent_a.client.get(reverse("optimization:experiments")),
        agent_a.client.post(
            reverse("optimization:experiments"), {"name": "x", "arms": [{"name": "a"}]}, format="json"
        ),
        agent_a.client.get(reverse("optimization:experiment", args=[experiment.pk])),
        agent_a.client.post(reverse("optimization:experiment-stop", args=[experiment.pk]), {}, format="json"),
    ):
        assert_error(response, 403, "forbidden")
    assert Experiment.objects.count() == 1


def test_api_unknown_experiment_is_404(operator_client):
    for name in ("experiment", "experiment-report"):
        assert_error(operator_client.get(reverse(f"optimization:{name}", args=[999_999])), 404, "not_found")
    assert_error(
        operator_client.post(reverse("optimization:experiment-stop", args=[999_999]), {}, format="json"),
        404,
        "not_found",
    )

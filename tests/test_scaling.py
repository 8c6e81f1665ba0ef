"""Auto-scaling and manual scaling: policies, cooldown, bounds, hysteresis, vertical grants, the API, the
admin, and an evaluation whose query count does not grow with the fleet."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
from django.contrib import messages
from django.db import IntegrityError, connection, transaction
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from allocation.services import allocation_create
from ledger.models import Agent, Grant, Quota, Tier
from ledger.periods import month_bounds
from ledger.services import agent_create, quota_open
from optimization.models import Execution, ScalingEvent, ScalingPolicy
from optimization.services.scaling import scaling_apply, scaling_evaluate
from optimization.tasks.scaling import scaling_evaluate_task

pytest.register_assert_rewrite("tests.api_fixtures")

from tests.api_fixtures import assert_error, keyed_agent  # noqa: E402

pytest_plugins = ["tests.api_fixtures"]

pytestmark = pytest.mark.django_db

PERIOD_START, PERIOD_END = month_bounds(timezone.now())
T0 = PERIOD_START + dt.timedelta(days=10, hours=12)  # well inside the period, whatever today is
COOLDOWN = 600
PRO_TOKENS = 1_000_000


def _at(seconds: int) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def _agent(agent_id: str, *, instances: int = 2, lowest: int = 1, highest: int = 10, **kwargs) -> Agent:
    agent = agent_create(agent_id=agent_id, tier_code=kwargs.pop("tier", "PRO"), **kwargs)
    Agent.objects.filter(pk=agent_id).update(
        instance_count=instances, min_instances=lowest, max_instances=highest
    )
    agent.refresh_from_db()
    return agent


def _policy(agent: Agent | None = None, tier: str | None = None, **fields) -> ScalingPolicy:
    values = {
        "scale_up_threshold": Decimal("80"),
        "scale_down_threshold": Decimal("30"),
        "step": 1,
        "min_instances": 1,
        "max_instances": 5,
        "cooldown_seconds": COOLDOWN,
        **fields,
    }
    if tier is not None:  # every tier has its default policy (reference data): this rewrites it
        return ScalingPolicy.objects.update_or_create(tier_id=tier, defaults=values)[0]
    return ScalingPolicy.objects.create(agent=agent, **values)


def _use(agent: Agent, amount: int, resource_type: str = "AI_TOKENS") -> None:
    allocation_create(agent=agent, resource_type_id=resource_type, amount=amount, now=T0)


def _count(agent_id: str) -> int:
    return Agent.objects.get(pk=agent_id).instance_count


# --- Auto-scaling: decisions ----------------------------------------------------------------------------


def test_evaluation_scales_up_above_the_threshold_and_records_why(reference_data):
    agent = _agent("busy", instances=2)
    _policy(agent)
    _use(agent, 912_000)

    summary = scaling_evaluate(now=T0)

    assert summary["scaled_up"] == 1 and summary["evaluated"] == 1
    assert _count("busy") == 3
    event = ScalingEvent.objects.get(agent=agent)
    assert (event.direction, event.kind, event.trigger) == ("up", "horizontal", "auto")
    assert (event.before, event.after, event.created_at) == (2, 3, T0)
    assert event.reason == "resource_utilization_percent 91.20 > 80 (AI_TOKENS)"
    assert event.actor == "auto-scaler"


def test_a_second_run_inside_the_cooldown_changes_nothing(reference_data):
    agent = _agent("busy", instances=2)
    _policy(agent)
    _use(agent, 912_000)
    scaling_evaluate(now=T0)

    again = scaling_evaluate(now=T0)
    later = scaling_evaluate(now=_at(COOLDOWN - 1))

    assert again["in_cooldown"] == later["in_cooldown"] == 1
    assert _count("busy") == 3 and ScalingEvent.objects.count() == 1
    assert scaling_evaluate(now=_at(COOLDOWN))["scaled_up"] == 1  # the cooldown is over
    assert _count("busy") == 4


def test_a_manual_event_starts_the_cooldown_too(reference_data):
    agent = _agent("busy", instances=2)
    _policy(agent)
    _use(agent, 912_000)
    scaling_apply(agent=agent, direction="up", trigger="manual", reason="ops", now=T0)

    assert scaling_evaluate(now=_at(60))["in_cooldown"] == 1
    assert _count("busy") == 3


def test_scales_down_only_below_the_lower_threshold(reference_data):
    agent = _agent("calm", instances=3)
    _policy(agent)
    _use(agent, 500_000)  # 50%: between the thresholds

    assert scaling_evaluate(now=T0)["scaled_down"] == 0
    assert _count("calm") == 3 and not ScalingEvent.objects.exists()

    idle = _agent("idle", instances=3)
    _policy(idle)
    _use(idle, 120_000)  # 12%
    assert scaling_evaluate(now=T0)["scaled_down"] == 1
    event = ScalingEvent.objects.get(agent=idle)
    assert (event.direction, event.before, event.after) == ("down", 3, 2)
    assert event.reason == "resource_utilization_percent 12.00 < 30 (AI_TOKENS)"


def test_thresholds_without_a_gap_are_refused_by_the_database(reference_data):
    agent = _agent("flappy")
    with pytest.raises(IntegrityError), transaction.atomic():
        _policy(agent, scale_up_threshold=Decimal("50"), scale_down_threshold=Decimal("50"))


def test_direction_never_reverses_within_twice_the_cooldown(reference_data):
    agent = _agent("spiky", instances=2)
    _policy(agent)
    _use(agent, 912_000)
    scaling_evaluate(now=T0)  # up: 2 -> 3
    Quota.objects.filter(agent=agent).update(used=100_000)  # the load drops to 10%

    held = scaling_evaluate(now=_at(COOLDOWN + 100))  # out of cooldown, within 2x cooldown of the up

    assert held["held_against_flapping"] == 1
    assert _count("spiky") == 3
    assert scaling_evaluate(now=_at(2 * COOLDOWN))["scaled_down"] == 1
    assert _count("spiky") == 2
    assert list(ScalingEvent.objects.order_by("created_at").values_list("direction", flat=True)) == [
        "up",
        "down",
    ]


def test_the_same_direction_is_not_held_by_the_flapping_guard(reference_data):
    agent = _agent("growing", instances=2)
    _policy(agent)
    _use(agent, 912_000)
    scaling_evaluate(now=T0)
    assert scaling_evaluate(now=_at(COOLDOWN))["scaled_up"] == 1


@pytest.mark.parametrize(
    ("agent_max", "policy_max", "instances", "step", "expected"),
    [
        (10, 3, 3, 1, 3),  # the policy's max is narrower
        (2, 5, 2, 1, 2),  # the agent's max is narrower
        (10, 4, 1, 5, 4),  # a big step stops at the bound
    ],
)
def test_scaling_up_stays_within_the_narrower_bounds(
    reference_data, agent_max, policy_max, instances, step, expected
):
    agent = _agent("bounded", instances=instances, highest=agent_max)
    _policy(agent, max_instances=policy_max, step=step)
    _use(agent, 950_000)

    summary = scaling_evaluate(now=T0)

    assert _count("bounded") == expected
    assert summary["at_bound"] == (1 if expected == instances else 0)
    assert ScalingEvent.objects.count() == (0 if expected == instances else 1)


def test_scaling_down_stays_within_the_narrower_lower_bound(reference_data):
    agent = _agent("floor", instances=4, lowest=1)
    _policy(agent, min_instances=3, step=3)
    _use(agent, 10_000)
    scaling_evaluate(now=T0)
    assert _count("floor") == 3
    assert scaling_evaluate(now=_at(COOLDOWN))["at_bound"] == 1
    assert _count("floor") == 3


def test_vertical_grant_at_max_instances(reference_data):
    agent = _agent("maxed", instances=5)
    _policy(agent, max_instances=5, quota_step_percent=10)
    _use(agent, 912_000)

    summary = scaling_evaluate(now=T0)

    assert summary["vertical"] == 1 and summary["scaled_up"] == 0
    assert _count("maxed") == 5
    quota = Quota.objects.get(agent=agent, resource_type_id="AI_TOKENS")
    assert (quota.base_limit, quota.limit, quota.used) == (PRO_TOKENS, 1_100_000, 912_000)
    grant = Grant.objects.get(quota=quota)
    assert (grant.amount, grant.reason, grant.actor) == (100_000, "scaling", "auto-scaler")
    event = ScalingEvent.objects.get(agent=agent)
    assert (event.kind, event.direction, event.resource_type_id) == ("vertical", "up", "AI_TOKENS")
    assert (event.before, event.after) == (1_000_000, 1_100_000)
    assert event.reason.startswith("resource_utilization_percent 91.20 > 80 (AI_TOKENS); at max instances")
    assert scaling_evaluate(now=_at(1))["in_cooldown"] == 1  # and it is a scaling event like any other


def test_vertical_grant_rounds_up_to_whole_units_on_the_most_used_resource(reference_data):
    agent = _agent(
        "custom", tier="CUSTOM", instances=2, custom_limits={"AI_TOKENS": 999, "COMPUTE_MS": 1_000}
    )
    _policy(agent, max_instances=2, quota_step_percent=15)
    _use(agent, 900, "AI_TOKENS")  # 90.09%
    _use(agent, 850, "COMPUTE_MS")  # 85%

    scaling_evaluate(now=T0)

    limits = dict(Quota.objects.filter(agent=agent).values_list("resource_type_id", "limit"))
    assert limits == {"AI_TOKENS": 999 + 150, "COMPUTE_MS": 1_000}  # ceil(999 * 15 / 100) = 150


def test_the_most_used_resource_is_chosen_exactly_and_a_tie_goes_to_the_first_code(reference_data):
    """``max_resource_utilization`` compares the fractions exactly (in SQL on PostgreSQL): 10^17 of
    3 x 10^17 + 1 is below 1 of 3 by less than a float can tell; equal fractions go to the first code."""
    from optimization.selectors import max_resource_utilization

    def counters(agent: Agent, resource_type: str, used: int, limit: int) -> None:
        quota = quota_open(agent=agent, resource_type_id=resource_type, at=T0)
        Quota.objects.filter(pk=quota.pk).update(used=used, limit=limit)

    near, tie = _agent("near"), _agent("tie")
    counters(near, "AI_TOKENS", 10**17, 3 * 10**17 + 1)
    counters(near, "COMPUTE_MS", 1, 3)
    counters(tie, "STORAGE_KB", 50, 200)
    counters(tie, "NETWORK_REQS", 25, 100)
    assert float(10**17) / (3 * 10**17 + 1) == 1 / 3  # what a float comparison would see: a tie

    assert max_resource_utilization(now=T0, agent_ids=["near", "tie"]) == {
        "near": ("COMPUTE_MS", Decimal("33.33")),
        "tie": ("NETWORK_REQS", Decimal("25.00")),
    }
    assert set(max_resource_utilization(now=T0)) >= {"near", "tie"}


def test_no_vertical_grant_without_a_quota_step(reference_data):
    agent = _agent("maxed", instances=5)
    _policy(agent, max_instances=5, quota_step_percent=0)
    _use(agent, 912_000)
    assert scaling_evaluate(now=T0)["at_bound"] == 1
    assert not Grant.objects.exists() and not ScalingEvent.objects.exists()


def test_budget_metric_scales_on_the_share_of_the_budget_spent(reference_data):
    agent = _agent("spender", instances=1, monthly_budget_usd=Decimal("1.00"))
    _policy(agent, metric="budget_utilization_percent", scale_up_threshold=Decimal("90"))
    _use(agent, 950_000)  # 950,000 tokens at $0.000001: $0.95 of $1.00

    scaling_evaluate(now=T0)

    event = ScalingEvent.objects.get(agent=agent)
    assert event.reason == "budget_utilization_percent 95.00 > 90"
    assert _count("spender") == 2


# --- Policies: resolution, on and off --------------------------------------------------------------------


def test_tier_policy_applies_unless_the_agent_has_its_own(reference_data):
    tier_scaled = _agent("tier-scaled", instances=2)
    own_off = _agent("own-off", instances=2)
    other_tier = _agent("free-agent", instances=2, tier="FREE")
    _policy(tier="PRO")
    _policy(own_off, enabled=False)  # the agent's own (disabled) policy wins over its tier's
    for agent in (tier_scaled, own_off):
        _use(agent, 900_000)
    _use(other_tier, 90_000)  # 90% of FREE, but FREE has no policy

    summary = scaling_evaluate(now=T0)

    assert summary["evaluated"] == 1
    assert (_count("tier-scaled"), _count("own-off"), _count("free-agent")) == (3, 2, 2)


def test_agents_with_nothing_to_measure_are_left_alone(reference_data):
    agent = _agent("fresh", instances=3)
    _policy(agent, metric="budget_utilization_percent")  # no budget
    assert scaling_evaluate(now=T0)["no_metric"] == 1
    assert _count("fresh") == 3


def test_policy_switched_off_and_on_through_the_api(reference_data, operator_client):
    agent = _agent("toggled", instances=2)
    _use(agent, 900_000)
    url = reverse("optimization:scaling-policy", args=["toggled"])

    created = operator_client.put(url, {"enabled": False, "max_instances": 4}, format="json")
    assert created.status_code == 201, created.content
    assert created.json()["scope"] == "agent" and created.json()["enabled"] is False
    assert scaling_evaluate(now=T0)["evaluated"] == 0
    assert _count("toggled") == 2

    switched_on = operator_client.put(url, {"enabled": True}, format="json")
    assert switched_on.status_code == 200
    assert switched_on.json()["max_instances"] == 4  # fields not given keep their value
    assert scaling_evaluate(now=T0)["scaled_up"] == 1
    assert _count("toggled") == 3


def test_new_agent_policy_starts_from_the_tier_policy(reference_data, operator_client):
    _agent("heir")
    _policy(tier="PRO", scale_up_threshold=Decimal("70"), cooldown_seconds=900)
    url = reverse("optimization:scaling-policy", args=["heir"])

    inherited = operator_client.get(url).json()
    assert (inherited["scope"], inherited["tier"], inherited["scale_up_threshold"]) == (
        "tier",
        "PRO",
        "70.00",
    )

    own = operator_client.put(url, {"enabled": False}, format="json").json()
    assert (own["scope"], own["scale_up_threshold"], own["cooldown_seconds"]) == ("agent", "70.00", 900)


def test_policy_api_refuses_bad_input_and_agents(reference_data, operator_client):
    keyed = keyed_agent(id="self-managed")
    url = reverse("optimization:scaling-policy", args=[keyed.id])

    inherited = operator_client.get(url)  # every agent has a policy: its tier's until it has its own
    assert (inherited.status_code, inherited.json()["source"]) == (200, "tier")
    assert_error(keyed.client.put(url, {"enabled": False}, format="json"), 403, "forbidden")
    assert_error(keyed.client.delete(url), 403, "forbidden")
    overlapping = {"scale_up_threshold": "40", "scale_down_threshold": "60"}
    assert_error(operator_client.put(url, overlapping, format="json"), 400, "invalid_policy")
    assert_error(operator_client.put(url, {"cooldown": 5}, format="json"), 400, "validation_error")
    assert_error(operator_client.delete(url), 404, "not_found")  # no override to drop
    assert not ScalingPolicy.objects.filter(agent__isnull=False).exists()

    operator_client.put(url, {"max_instances": 3}, format="json")
    assert keyed.client.get(url).json()["max_instances"] == 3  # an agent may read its own


# --- Manual scaling -------------------------------------------------------------------------------------


def test_operator_scales_an_agent_manually(reference_data, operator_client):
    _agent("manual", instances=2)
    url = reverse("optimization:scaling", args=["manual"])

    response = operator_client.post(url, {"direction": "up", "step": 2}, format="json")

    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["before"], body["after"], body["trigger"], body["kind"]) == (2, 4, "manual", "horizontal")
    assert body["actor"] == "operator:ops"
    assert _count("manual") == 4


def test_manual_scaling_at_a_bound_changes_nothing(reference_data, operator_client):
    agent = _agent("capped", instances=3)
    _policy(agent, max_instances=3)
    response = operator_client.post(
        reverse("optimization:scaling", args=["capped"]), {"direction": "up"}, format="json"
    )
    assert response.status_code == 200
    assert response.json() == {
        "changed": False,
        "agent_id": "capped",
        "direction": "up",
        "instance_count": 3,
        "min_instances": 1,
        "max_instances": 3,
        "reason": "already at the maximum of 3 instances",
    }
    assert not ScalingEvent.objects.exists()


def test_agents_cannot_scale_themselves_nor_see_others(reference_data):
    own = keyed_agent(id="agent-own")
    other = keyed_agent(id="agent-other")
    before = list(Agent.objects.order_by("pk").values_list("pk", "instance_count"))

    own_response = own.client.post(
        reverse("optimization:scaling", args=[own.id]), {"direction": "up"}, format="json"
    )
    other_response = own.client.post(
        reverse("optimization:scaling", args=[other.id]), {"direction": "up"}, format="json"
    )
    events = own.client.get(reverse("optimization:scaling-events", args=[other.id]))
    policy = own.client.get(reverse("optimization:scaling-policy", args=[other.id]))

    assert_error(own_response, 403, "forbidden")
    assert_error(other_response, 404, "not_found")
    assert_error(events, 404, "not_found")
    assert_error(policy, 404, "not_found")
    assert list(Agent.objects.order_by("pk").values_list("pk", "instance_count")) == before
    assert not ScalingEvent.objects.exists()


def test_manual_scaling_refuses_bad_input(reference_data, operator_client):
    _agent("strict")
    url = reverse("optimization:scaling", args=["strict"])
    assert_error(operator_client.post(url, {"direction": "sideways"}, format="json"), 400, "validation_error")
    assert_error(
        operator_client.post(url, {"direction": "up", "step": 0}, format="json"), 400, "validation_error"
    )
    assert_error(operator_client.post(url, {}, format="json"), 400, "validation_error")
    assert_error(
        operator_client.post(
            reverse("optimization:scaling", args=["ghost"]), {"direction": "up"}, format="json"
        ),
        404,
        "not_found",
    )
    assert _count("strict") == 2


def test_scaling_events_are_listed_newest_first_and_paginated(reference_data, operator_client):
    keyed = keyed_agent(id="evented")
    Agent.objects.filter(pk="evented").update(max_instances=10)
    for seconds in range(3):
        scaling_apply(
            agent=keyed.agent, direction="up", trigger="manual", reason=f"#{seconds}", now=_at(seconds)
        )
    url = reverse("optimization:scaling-events", args=["evented"])

    first = keyed.client.get(url, {"page_size": 2}).json()
    second = keyed.client.get(first["next"]).json()

    assert [event["reason"] for event in first["results"]] == ["#2", "#1"]
    assert [event["reason"] for event in second["results"]] == ["#0"]
    assert [event["after"] for event in operator_client.get(url).json()["results"]] == [4, 3, 2]


# --- Set-based evaluation -------------------------------------------------------------------------------


def _fleet(size: int) -> None:
    """``size`` PRO agents under the PRO tier policy: a third to scale up, a third down, a third at max
    instances for a vertical grant. Written in bulk, as the fleet is the setup, not what is tested."""
    start, end = month_bounds(T0)
    pro = Tier.objects.get(code="PRO")
    agents, quotas = [], []
    for i in range(size):
        kind = i % 3
        agents.append(
            Agent(id=f"fleet-{size}-{i:04d}", tier=pro, instance_count=(2, 3, 5)[kind], max_instances=10)
        )
        quotas.append(
            Quota(
                agent_id=agents[-1].id,
                resource_type_id="AI_TOKENS",
                period_start=start,
                period_end=end,
                base_limit=PRO_TOKENS,
                limit=PRO_TOKENS,
                used=(900_000, 100_000, 950_000)[kind],
            )
        )
    Agent.objects.bulk_create(agents)
    Quota.objects.bulk_create(quotas)


def test_evaluation_query_count_does_not_grow_with_the_fleet(reference_data):
    _policy(tier="PRO", max_instances=5, quota_step_percent=10)
    statements = {}
    for size in (10, 1000):
        savepoint = transaction.savepoint()
        _fleet(size)
        with CaptureQueriesContext(connection) as queries:
            summary = scaling_evaluate(now=T0)
        assert summary["scaled_up"] + summary["scaled_down"] + summary["vertical"] == size
        assert summary["vertical"] == size // 3 + (size % 3 > 2)
        statements[size] = [query["sql"].split()[0] for query in queries.captured_queries]
        transaction.savepoint_rollback(savepoint)
    assert statements[10] == statements[1000]


def test_fleet_evaluation_applies_every_decision_exactly(reference_data):
    _policy(tier="PRO", max_instances=5, quota_step_percent=10)
    _fleet(30)

    scaling_evaluate(now=T0)

    counts = dict(Agent.objects.values_list("pk", "instance_count"))
    assert {counts[f"fleet-30-{i:04d}"] for i in range(0, 30, 3)} == {3}
    assert {counts[f"fleet-30-{i:04d}"] for i in range(1, 30, 3)} == {2}
    assert {counts[f"fleet-30-{i:04d}"] for i in range(2, 30, 3)} == {5}
    assert set(Quota.objects.filter(agent__instance_count=5).values_list("limit", flat=True)) == {1_100_000}
    assert Grant.objects.filter(reason="scaling").count() == 10
    assert ScalingEvent.objects.count() == 30
    assert scaling_evaluate(now=T0)["in_cooldown"] == 30  # and the second run changes nothing
    assert ScalingEvent.objects.count() == 30


@pytest.mark.parametrize("model", [ScalingEvent, Execution], ids=["scaling events", "executions"])
def test_append_only_histories_keep_only_the_indexes_their_reads_use(db, model):
    """By agent and time, by time, by id (migrations optimization 0005 and 0006): no index per foreign key
    and no ``varchar_pattern_ops`` twin, which every row would write. The table is partitioned by month, so
    its primary key holds the time too (optimization 0011)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT indexdef FROM pg_indexes WHERE tablename = %s", [model._meta.db_table])
        columns = sorted(definition.split("(", 1)[1].rstrip(")") for (definition,) in cursor.fetchall())
    assert columns == ["agent_id, created_at", "created_at", "id, created_at"]


def test_task_runs_the_evaluation(reference_data):
    agent = _agent("tasked", instances=1)
    _policy(agent)
    quota = quota_open(agent=agent, resource_type_id="AI_TOKENS")
    Quota.objects.filter(pk=quota.pk).update(used=900_000)
    result = scaling_evaluate_task.apply().get()
    assert scaling_evaluate_task.name == "optimization.scaling_evaluate"
    assert result["scaled_up"] == 1


# --- Admin ----------------------------------------------------------------------------------------------


def test_admin_actions_scale_the_policy_agents(reference_data, admin_client_logged_in):
    agent = _agent("admin-scaled", instances=2)
    agent_policy = _policy(agent)
    tier_policy = _policy(tier="PRO")
    url = reverse("admin:optimization_scalingpolicy_changelist")

    response = admin_client_logged_in.post(
        url,
        {"action": "scale_up_now", "_selected_action": [agent_policy.pk, tier_policy.pk]},
        follow=True,
    )

    assert response.status_code == 200
    assert _count("admin-scaled") == 3
    event = ScalingEvent.objects.get()
    assert (event.trigger, event.actor) == ("manual", "operator")
    levels = {message.level for message in response.context["messages"]}
    assert {messages.SUCCESS, messages.WARNING} <= levels  # the tier policy is skipped, with a word why


def test_admin_scaling_pages_render(reference_data, admin_client_logged_in):
    agent = _agent("shown")
    policy = _policy(agent)
    scaling_apply(agent=agent, direction="up", trigger="manual", reason="r")
    for url in (
        reverse("admin:optimization_scalingpolicy_changelist"),
        reverse("admin:optimization_scalingpolicy_change", args=[policy.pk]),
        reverse("admin:optimization_scalingevent_changelist"),
        reverse("admin:optimization_scalingevent_change", args=[ScalingEvent.objects.get().pk]),
    ):
        assert admin_client_logged_in.get(url).status_code == 200
    assert admin_client_logged_in.get(reverse("admin:optimization_scalingevent_add")).status_code == 403

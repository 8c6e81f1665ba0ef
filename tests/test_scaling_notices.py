"""Scaling that an orchestrator hears of, and the policies every agent has.

* Every scaling decision (the auto-scaling sweep, a rule's scale action, an operator through the API or the
  admin) reaches the webhook endpoints as a signed ``scaling`` message with the documented payload, and a
  failed attempt is retried with the same ``webhook-id``. The receivers are local HTTP servers.
* The sweep writes a chunk's notices and deliveries in the chunk's own statements.
* Tiers carry default policies (migration 0014, ``load_reference_data``); an agent inherits its tier's,
  overrides it (PUT), goes back to it (DELETE), and an arm of a running experiment beats both.
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
from decimal import Decimal
from pathlib import Path

import pytest
from django.apps import apps as django_apps
from django.urls import reverse
from django.utils import timezone
from standardwebhooks import Webhook

from ledger.models import Agent, OptimizationRule, Quota
from ledger.periods import month_bounds
from ledger.services import agent_create, quota_open, reference_data_load
from optimization.models import (
    Alert,
    AlertDelivery,
    Experiment,
    ExperimentArm,
    ExperimentAssignment,
    ScalingEvent,
    ScalingPolicy,
    WebhookEndpoint,
)
from optimization.services.alert_delivery import alerts_deliver, delivery_message_id
from optimization.services.rules import rules_evaluate
from optimization.services.scaling import (
    TIER_DEFAULT_POLICIES,
    scaling_evaluate,
    tier_scaling_policies_ensure,
)

pytest.register_assert_rewrite("tests.api_fixtures")

from tests.api_fixtures import assert_error  # noqa: E402
from tests.test_sweep_stream_scaling import _statements_per_chunk, tier_policy  # noqa: E402
from tests.test_webhooks import Receiver  # noqa: E402

pytest_plugins = ["tests.api_fixtures"]

pytestmark = pytest.mark.django_db

PERIOD_START, _ = month_bounds(timezone.now())
T0 = PERIOD_START + dt.timedelta(days=10, hours=12)  # well inside the period, whatever today is
SECRET = "whsec_c2NhbGluZy1ub3RpY2VzLWFyZS1zaWduZWQtdG9vIQ=="
migration = importlib.import_module("optimization.migrations.0014_tier_default_scaling_policies")


@pytest.fixture
def receiver():
    with Receiver() as running:
        yield running


def agent_at(agent_id: str, *, percent: int, instances: int, tier: str = "PRO") -> Agent:
    """An agent of ``tier`` with ``instances`` and ``percent`` of its AI tokens used this period."""
    agent = agent_create(agent_id=agent_id, tier_code=tier)
    Agent.objects.filter(pk=agent_id).update(instance_count=instances, min_instances=1, max_instances=10)
    quota = quota_open(agent=agent, resource_type_id="AI_TOKENS", at=T0)
    Quota.objects.filter(pk=quota.pk).update(used=quota.base_limit * percent // 100)
    agent.refresh_from_db()
    return agent


def endpoint(url: str, *, agent: Agent | None = None, enabled: bool = True) -> WebhookEndpoint:
    return WebhookEndpoint.objects.create(agent=agent, url=url, secret=SECRET, enabled=enabled)


def verified(receiver: Receiver, path: str = "/hooks") -> list[dict]:
    """The bodies POSTed to ``path``, each checked against its Standard Webhooks signature (the library
    raises on a bad one)."""
    return [
        Webhook(SECRET).verify(request["body"], request["headers"])
        for request in receiver.requests
        if request["path"] == path
    ]


def notice_of(event: ScalingEvent) -> dict:
    """The documented payload of ``event``'s scaling message (README, Webhooks: "Scaling events")."""
    alert = Alert.objects.get(dedup_key=f"scaling:{event.pk}")
    return {
        "id": alert.pk,
        "agent_id": event.agent_id,
        "scope": "agent",
        "scope_id": event.agent_id,
        "kind": "scaling",
        "severity": "info",
        "title": alert.title,
        "message": alert.message,
        "data": {
            "event_id": event.pk,
            "agent_id": event.agent_id,
            "kind": event.kind,
            "direction": event.direction,
            "trigger": event.trigger,
            "actor": event.actor,
            "resource_type": event.resource_type_id,
            "before": event.before,
            "after": event.after,
            "reason": event.reason,
            "at": event.created_at.isoformat(),
        },
        "created_at": event.created_at.isoformat(),
    }


# --- Auto, rule and manual scaling reach the webhooks ---------------------------------------------------


def test_the_sweep_scales_a_pro_agent_by_its_tier_default_and_the_orchestrator_hears_it(
    reference_data, receiver
):
    """No policy of its own: the PRO tier's default (on, up past 80 %) scales it; an ENTERPRISE agent at
    its maximum gets its tier's vertical step. Each change is one signed message with the payload."""
    agent_at("pro-busy", percent=90, instances=2)
    agent_at("ent-full", percent=95, instances=10, tier="ENTERPRISE")
    agent_at("free-busy", percent=95, instances=1, tier="FREE")  # FREE's default is off
    assert not ScalingPolicy.objects.filter(agent__isnull=False).exists()
    endpoint(receiver.url())

    summary = scaling_evaluate(now=T0)

    assert (summary["evaluated"], summary["scaled_up"], summary["vertical"]) == (2, 1, 1)
    assert dict(Agent.objects.values_list("pk", "instance_count")) == {
        "pro-busy": 3,
        "ent-full": 10,
        "free-busy": 1,
    }
    horizontal = ScalingEvent.objects.get(agent_id="pro-busy")
    vertical = ScalingEvent.objects.get(agent_id="ent-full")
    assert (horizontal.before, horizontal.after, horizontal.resource_type_id) == (2, 3, None)
    assert (vertical.kind, vertical.before, vertical.after) == ("vertical", 10_000_000, 11_000_000)

    assert alerts_deliver(now=T0).delivered == 2
    payloads = sorted(verified(receiver), key=lambda payload: payload["agent_id"])
    assert payloads == [notice_of(vertical), notice_of(horizontal)]
    assert payloads[1]["data"] == {
        "event_id": horizontal.pk,
        "agent_id": "pro-busy",
        "kind": "horizontal",
        "direction": "up",
        "trigger": "auto",
        "actor": "auto-scaler",
        "resource_type": None,
        "before": 2,
        "after": 3,
        "reason": "resource_utilization_percent 90.00 > 80 (AI_TOKENS)",
        "at": T0.isoformat(),
    }
    assert payloads[1]["title"] == "Scaled up: 2 -> 3 instances"
    assert payloads[0]["title"] == "Scaled up: AI_TOKENS limit 10000000 -> 11000000"
    assert payloads[0]["data"]["resource_type"] == "AI_TOKENS"
    # A notice reports something done: recorded acknowledged, never an open alert.
    assert not Alert.objects.filter(kind="scaling", acknowledged_at=None).exists()


def test_a_rule_scale_action_reaches_the_agents_webhook(reference_data, receiver):
    OptimizationRule.objects.all().delete()
    OptimizationRule.objects.create(
        name="scale-up",
        metric="resource_utilization_percent",
        operator=">",
        threshold=80,
        duration_seconds=0,
        cooldown_seconds=3600,
        action="scale_up",
    )
    agent = agent_at("ruled", percent=90, instances=1)
    other = agent_at("bystander", percent=10, instances=1)
    endpoint(receiver.url("/ruled"), agent=agent)
    endpoint(receiver.url("/bystander"), agent=other)  # hears nothing: the notice is the other agent's

    assert rules_evaluate(now=T0)["scaled"] == 1
    alerts_deliver(now=timezone.now())

    event = ScalingEvent.objects.get()
    assert (event.trigger, event.before, event.after) == ("rule", 1, 2)
    notices = [payload for payload in verified(receiver, "/ruled") if payload["kind"] == "scaling"]
    assert notices == [notice_of(event)]
    assert notices[0]["data"]["reason"].startswith("rule scale-up: resource_utilization_percent on AI_TOKENS")
    assert not [payload for payload in verified(receiver, "/bystander") if payload["kind"] == "scaling"]


def test_manual_scaling_through_the_api_and_the_admin_reaches_the_webhooks(
    reference_data, receiver, operator_client, admin_client_logged_in
):
    agent = agent_at("manual", percent=50, instances=2)
    endpoint(receiver.url())

    response = operator_client.post(
        reverse("optimization:scaling", args=["manual"]), {"direction": "up", "step": 2}, format="json"
    )
    assert response.status_code == 201, response.content
    own = ScalingPolicy.objects.create(agent=agent, max_instances=10)
    admin = admin_client_logged_in.post(
        reverse("admin:optimization_scalingpolicy_changelist"),
        {"action": "scale_down_now", "_selected_action": [own.pk]},
        follow=True,
    )
    assert admin.status_code == 200

    assert alerts_deliver(now=timezone.now()).delivered == 2
    api_event, admin_event = ScalingEvent.objects.order_by("id")
    assert (api_event.before, api_event.after, api_event.actor) == (2, 4, "operator:ops")
    assert (admin_event.before, admin_event.after, admin_event.actor) == (4, 3, "operator")
    payloads = verified(receiver)
    assert sorted(payloads, key=lambda payload: payload["data"]["event_id"]) == [
        notice_of(api_event),
        notice_of(admin_event),
    ]
    assert {payload["data"]["trigger"] for payload in payloads} == {"manual"}


def test_a_failed_notice_is_retried_with_its_webhook_id_and_delivered_once(reference_data, receiver):
    receiver.statuses = [503]
    agent_at("retried", percent=90, instances=2)
    endpoint(receiver.url())
    scaling_evaluate(now=T0)
    delivery = AlertDelivery.objects.get()

    assert alerts_deliver(now=T0).delivered == 0
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts, delivery.last_status_code) == ("pending", 1, 503)
    assert delivery.next_attempt_at == T0 + dt.timedelta(seconds=30)
    assert alerts_deliver(now=T0 + dt.timedelta(seconds=29)).delivered == 0  # not due yet

    assert alerts_deliver(now=T0 + dt.timedelta(seconds=30)).delivered == 1
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts) == ("delivered", 2)
    assert alerts_deliver(now=T0 + dt.timedelta(hours=2)).delivered == 0  # once delivered, never again

    first, second = receiver.requests
    assert (
        first["headers"]["webhook-id"] == second["headers"]["webhook-id"] == delivery_message_id(delivery.pk)
    )
    assert first["body"] == second["body"]
    assert verified(receiver)[1] == notice_of(ScalingEvent.objects.get())


def test_notices_go_to_each_enabled_url_once_and_to_no_email(reference_data, receiver, settings):
    settings.ALERT_EMAILS = "ops@example.com"  # budget alerts email it; scaling notices do not
    agent = agent_at("fanned", percent=90, instances=2)
    endpoint(receiver.url("/global"))
    endpoint(receiver.url("/global"), agent=agent)  # the same URL twice: one delivery
    endpoint(receiver.url("/own"), agent=agent)
    endpoint(receiver.url("/off"), enabled=False)

    scaling_evaluate(now=T0)

    alert = Alert.objects.get(kind="scaling")
    assert alert.delivery_queued_at == T0  # fanned out with the event, not by the delivery task
    assert sorted(AlertDelivery.objects.values_list("channel", "target")) == [
        ("webhook", receiver.url("/global")),
        ("webhook", receiver.url("/own")),
    ]


def test_a_notice_is_written_only_for_an_agent_some_endpoint_listens_to(reference_data, receiver):
    heard = agent_at("heard", percent=90, instances=2)
    agent_at("unheard", percent=90, instances=2)
    endpoint(receiver.url("/off"), enabled=False)
    scaling_evaluate(now=T0)
    assert ScalingEvent.objects.count() == 2 and not Alert.objects.exists()  # nobody listens: no rows

    endpoint(receiver.url("/heard"), agent=heard)
    scaling_evaluate(now=T0 + dt.timedelta(hours=1))  # out of cooldown: both scale again

    assert ScalingEvent.objects.count() == 4
    assert list(Alert.objects.values_list("agent_id", flat=True)) == ["heard"]


# --- Set-based within the sweep's chunks ----------------------------------------------------------------


def test_a_chunks_notices_and_deliveries_cost_no_statement_of_their_own(reference_data, receiver):
    """The chunk's events, notices and deliveries are one statement: with two endpoints listening a chunk
    of 3 or 30 agents still takes the nine statements it took before notices existed."""
    tier_policy()
    endpoint(receiver.url("/a"))
    endpoint(receiver.url("/b"))
    small = _statements_per_chunk(30, chunk_size=3)
    large = _statements_per_chunk(30, chunk_size=30)
    assert [len(chunk) for chunk in small[:-1]] == [9] * 10
    assert len(large[0]) == 9


def test_every_event_of_a_chunked_sweep_has_one_notice_and_one_delivery_per_endpoint(
    reference_data, receiver
):
    tier_policy()
    for index in range(7):
        agent_at(f"fleet-{index}", percent=(90, 10, 50)[index % 3], instances=3)
    endpoint(receiver.url("/a"))
    endpoint(receiver.url("/b"))

    summary = scaling_evaluate(now=T0, chunk_size=2)
    again = scaling_evaluate(now=T0, chunk_size=2)  # in cooldown: no event, so no notice

    assert (summary["scaled_up"], summary["scaled_down"], again["in_cooldown"]) == (3, 2, 5)
    events = set(ScalingEvent.objects.values_list("pk", flat=True))
    notices = dict(Alert.objects.filter(kind="scaling").values_list("pk", "data__event_id"))
    assert sorted(notices.values()) == sorted(events)
    deliveries = sorted(AlertDelivery.objects.values_list("alert_id", "target"))
    assert deliveries == sorted(
        (alert_id, receiver.url(path)) for alert_id in notices for path in ("/a", "/b")
    )


# --- Default policies: inherit, override, go back, experiments -----------------------------------------


def policy_url(agent_id: str) -> str:
    return reverse("optimization:scaling-policy", args=[agent_id])


def test_every_agent_has_a_policy_inherited_from_its_tier_and_overrides_it(reference_data, operator_client):
    agent_create(agent_id="pro-agent", tier_code="PRO")
    agent_create(agent_id="free-agent", tier_code="FREE")

    pro = operator_client.get(policy_url("pro-agent")).json()
    free = operator_client.get(policy_url("free-agent")).json()
    assert (
        pro["source"],
        pro["tier"],
        pro["enabled"],
        pro["scale_up_threshold"],
        pro["scale_down_threshold"],
    ) == (
        "tier",
        "PRO",
        True,
        "80.00",
        "30.00",
    )
    assert (free["source"], free["enabled"]) == ("tier", False)

    override = operator_client.put(policy_url("pro-agent"), {"scale_up_threshold": "70"}, format="json")
    assert override.status_code == 201
    assert (override.json()["source"], override.json()["scale_up_threshold"]) == ("agent", "70.00")
    assert operator_client.get(policy_url("pro-agent")).json()["source"] == "agent"

    dropped = operator_client.delete(policy_url("pro-agent"))
    assert dropped.status_code == 200, dropped.content
    assert (dropped.json()["source"], dropped.json()["scale_up_threshold"]) == ("tier", "80.00")
    assert not ScalingPolicy.objects.filter(agent_id="pro-agent").exists()
    assert operator_client.get(policy_url("pro-agent")).json() == pro
    assert_error(operator_client.delete(policy_url("pro-agent")), 404, "not_found")


def test_the_demo_agents_answer_their_tiers_policy(reference_data, operator_client):
    from ledger.demo import DEMO_AGENTS, demo_data_load

    demo_data_load()
    for agent_id, tier, *_ in DEMO_AGENTS:
        response = operator_client.get(policy_url(agent_id))
        assert response.status_code == 200, (agent_id, response.content)
        body = response.json()
        assert (body["source"], body["tier"], body["enabled"]) == (
            "tier",
            tier,
            tier in {"PRO", "ENTERPRISE"},
        )


def test_an_agent_whose_tier_has_no_policy_answers_auto_scaling_off(reference_data, operator_client):
    agent_create(agent_id="custom-agent", tier_code="CUSTOM", custom_limits={"AI_TOKENS": 10})
    ScalingPolicy.objects.filter(tier_id="CUSTOM").delete()  # an operator removed it
    response = operator_client.get(policy_url("custom-agent"))
    assert response.status_code == 200
    assert (response.json()["source"], response.json()["enabled"], response.json()["id"]) == (
        "none",
        False,
        None,
    )


def _experiment(*agents: Agent, policy: ScalingPolicy | None, ended: bool = False) -> Experiment:
    experiment = Experiment.objects.create(
        name=f"exp-{Experiment.objects.count()}",
        started_at=T0 - dt.timedelta(days=1),
        ended_at=T0 if ended else None,
    )
    arm = ExperimentArm.objects.create(experiment=experiment, name="treatment", scaling_policy=policy)
    for agent in agents:
        ExperimentAssignment.objects.create(experiment=experiment, arm=arm, agent=agent)
    return experiment


def test_the_arm_of_a_running_experiment_beats_the_agents_own_policy(reference_data, operator_client):
    agent = agent_create(agent_id="tested", tier_code="PRO")
    ScalingPolicy.objects.create(agent=agent, enabled=False)
    enterprise = ScalingPolicy.objects.get(tier_id="ENTERPRISE")
    experiment = _experiment(agent, policy=enterprise)

    body = operator_client.get(policy_url("tested")).json()
    assert (body["source"], body["id"], body["max_instances"]) == ("experiment", enterprise.pk, 50)

    Experiment.objects.filter(pk=experiment.pk).update(ended_at=T0)  # over: the agent's own again
    assert operator_client.get(policy_url("tested")).json()["source"] == "agent"


def test_the_sweep_uses_each_agents_effective_policy(reference_data):
    """The arm's policy (up past 40 %) scales agents at 50 % that their tier's (80 %) would leave alone,
    even one whose own policy is off; an arm without a policy, or an ended experiment, changes nothing."""
    eager = ScalingPolicy.objects.get(tier_id="ENTERPRISE")
    ScalingPolicy.objects.filter(pk=eager.pk).update(scale_up_threshold=Decimal("40"))
    in_arm = agent_at("arm-1", percent=50, instances=2)
    own_off = agent_at("arm-2-own-off", percent=50, instances=2)
    ScalingPolicy.objects.create(agent=own_off, enabled=False)
    no_arm_policy = agent_at("arm-3-no-policy", percent=50, instances=2)
    ended = agent_at("arm-4-ended", percent=50, instances=2)
    agent_at("tier-only", percent=50, instances=2)
    _experiment(in_arm, own_off, policy=eager)
    _experiment(no_arm_policy, policy=None)
    _experiment(ended, policy=eager, ended=True)

    summary = scaling_evaluate(now=T0, chunk_size=2)

    assert summary["scaled_up"] == 2
    assert set(ScalingEvent.objects.values_list("agent_id", flat=True)) == {"arm-1", "arm-2-own-off"}


# --- Seeding the tiers' defaults ------------------------------------------------------------------------


def test_reference_data_seed_the_tier_policies_once_and_keep_an_operators_edit(reference_data):
    policies = dict(ScalingPolicy.objects.filter(tier__isnull=False).values_list("tier_id", "enabled"))
    assert policies == {"FREE": False, "PRO": True, "ENTERPRISE": True, "CUSTOM": False}
    assert set(policies) == set(TIER_DEFAULT_POLICIES)
    ScalingPolicy.objects.filter(tier_id="FREE").update(enabled=True, max_instances=3)

    assert reference_data_load()["scaling_policies"] == 0
    assert tier_scaling_policies_ensure() == 0
    free = ScalingPolicy.objects.get(tier_id="FREE")
    assert (free.enabled, free.max_instances) == (True, 3)


def test_the_migration_creates_missing_tier_policies_and_reverses_only_unchanged_ones(reference_data):
    ScalingPolicy.objects.filter(tier_id="PRO").delete()
    ScalingPolicy.objects.filter(tier_id="FREE").update(enabled=True)  # an operator wrote this one

    migration.create_missing(django_apps, None)
    pro = ScalingPolicy.objects.get(tier_id="PRO")
    assert (pro.enabled, pro.scale_up_threshold, pro.max_instances, pro.cooldown_seconds) == (
        True,
        Decimal("80"),
        10,
        600,
    )
    assert ScalingPolicy.objects.get(tier_id="FREE").enabled is True
    # The migration's frozen copy and the service's defaults say the same.
    assert migration.DEFAULTS == TIER_DEFAULT_POLICIES

    migration.delete_unchanged(django_apps, None)
    assert list(ScalingPolicy.objects.filter(tier__isnull=False).values_list("tier_id", flat=True)) == [
        "FREE"
    ]
    migration.create_missing(django_apps, None)
    assert ScalingPolicy.objects.filter(tier__isnull=False).count() == 4


def test_the_readme_documents_the_payload_a_receiver_gets(reference_data, receiver):
    """The README's example message (Webhooks, "Scaling events") has exactly the keys of a real one, and
    its data table names every data key."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("#### Scaling events", 1)[1].split("\n## ", 1)[0]
    example = json.loads(section.split("```json", 1)[1].split("```", 1)[0])
    agent_at("documented", percent=90, instances=2)
    endpoint(receiver.url())
    scaling_evaluate(now=T0)
    alerts_deliver(now=T0)
    (payload,) = verified(receiver)

    assert set(example) == set(payload)
    assert set(example["data"]) == set(payload["data"])
    documented = {
        name.strip("` ")
        for line in section.splitlines()
        if line.startswith("| `")
        for name in line.split("|")[1].split(",")
    }
    assert set(payload["data"]) - {"agent_id"} <= documented
    assert example["message"].startswith("Agent agent-123 scaled up (horizontal, auto by auto-scaler) from 2")
    assert payload["message"] == (
        "Agent documented scaled up (horizontal, auto by auto-scaler) from 2 to 3 instances: "
        "resource_utilization_percent 90.00 > 80 (AI_TOKENS)"
    )

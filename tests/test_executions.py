"""POST /api/v1/agents/{id}/executions: every resource of a run is taken, or none is."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.urls import reverse

from ledger.models import Quota, UsageLog
from optimization.models import Execution

pytest.register_assert_rewrite("tests.api_fixtures")

from tests.api_fixtures import PRO_AI_TOKENS, assert_error, ledger_snapshot  # noqa: E402

pytest_plugins = ["tests.api_fixtures"]

pytestmark = pytest.mark.django_db

PRO_NETWORK_REQS = 10_000


def _url(agent_id: str) -> str:
    return reverse("optimization:executions", args=[agent_id])


def _body(**overrides) -> dict:
    return {
        "superpower": "web-search",
        "resources": {"AI_TOKENS": 1_500, "NETWORK_REQS": 3, "COMPUTE_MS": 250},
        "duration_ms": 812,
        "success": True,
        "task_id": "task-42",
        **overrides,
    }


def _snapshot() -> dict:
    return {**ledger_snapshot(), "executions": Execution.objects.count()}


def test_execution_takes_every_resource_and_writes_one_execution_usage_row_each(agent_a):
    response = agent_a.client.post(_url(agent_a.id), _body(), format="json")

    assert response.status_code == 201, response.content
    body = response.json()
    execution = Execution.objects.get()
    assert body["id"] == execution.pk
    assert body["agent_id"] == agent_a.id
    assert body["resources"] == {"AI_TOKENS": 1_500, "COMPUTE_MS": 250, "NETWORK_REQS": 3}
    assert (body["duration_ms"], body["success"], body["output_units"], body["task_id"]) == (
        812,
        True,
        1,
        "task-42",
    )
    rows = UsageLog.objects.filter(agent=agent_a.agent).order_by("resource_type_id")
    assert [(row.resource_type_id, row.amount, row.kind, row.task_id) for row in rows] == [
        ("AI_TOKENS", 1_500, "execution", "task-42"),
        ("COMPUTE_MS", 250, "execution", "task-42"),
        ("NETWORK_REQS", 3, "execution", "task-42"),
    ]
    assert all(row.metadata["execution_id"] == execution.pk for row in rows)
    assert all(row.metadata["superpower"] == "web-search" for row in rows)
    # 1,500 x 0.000001 + 250 x 0.00001 + 3 x 0.001 = 0.0015 + 0.0025 + 0.003
    assert execution.cost_usd == Decimal("0.007")
    assert Decimal(body["cost_usd"]) == Decimal("0.007")
    assert sum(row.cost_usd for row in rows) == execution.cost_usd
    used = dict(Quota.objects.filter(agent=agent_a.agent).values_list("resource_type_id", "used"))
    assert used == {"AI_TOKENS": 1_500, "COMPUTE_MS": 250, "NETWORK_REQS": 3}
    spent = dict(Quota.objects.filter(agent=agent_a.agent).values_list("resource_type_id", "spent_usd"))
    assert spent["COMPUTE_MS"] == Decimal("0.0025")


def test_failed_execution_is_recorded_with_no_output_by_default(agent_a):
    response = agent_a.client.post(_url(agent_a.id), _body(success=False), format="json")
    assert response.status_code == 201, response.content
    assert response.json()["output_units"] == 0
    assert Execution.objects.get().success is False
    assert UsageLog.objects.filter(kind="execution").count() == 3  # a failed run still spent its resources


def test_output_units_can_be_given(agent_a):
    response = agent_a.client.post(_url(agent_a.id), _body(output_units=7), format="json")
    assert response.json()["output_units"] == 7


@pytest.mark.parametrize(
    ("resources", "refused"),
    [
        # The refused resource comes last in resource-type order: the first two were already taken.
        ({"AI_TOKENS": 10, "COMPUTE_MS": 10, "NETWORK_REQS": PRO_NETWORK_REQS + 1}, "NETWORK_REQS"),
        # ... or first: nothing was taken yet.
        ({"AI_TOKENS": PRO_AI_TOKENS + 1, "NETWORK_REQS": 1}, "AI_TOKENS"),
    ],
    ids=["refused-last", "refused-first"],
)
def test_one_refused_resource_refuses_the_execution_and_takes_nothing(agent_a, resources, refused):
    agent_a.client.post(_url(agent_a.id), _body(resources={"AI_TOKENS": 100}), format="json")
    before = _snapshot()

    response = agent_a.client.post(_url(agent_a.id), _body(resources=resources), format="json")

    details = assert_error(response, 429, "quota_exceeded")
    assert details["resource_type"] == refused
    assert refused in response.json()["error"]["message"]
    assert "nothing was taken" in response.json()["error"]["message"]
    assert _snapshot() == before


def test_execution_refused_when_tracking_is_switched_off(agent_a, settings):
    settings.ENABLE_SUPERPOWERS_TRACKING = False
    before = _snapshot()

    response = agent_a.client.post(_url(agent_a.id), _body(), format="json")

    assert_error(response, 403, "feature_disabled")
    assert _snapshot() == before


def test_an_agent_cannot_record_executions_for_another(agent_a, agent_b):
    before = _snapshot()
    assert_error(agent_a.client.post(_url(agent_b.id), _body(), format="json"), 404, "not_found")
    assert _snapshot() == before


def test_an_operator_can_record_for_any_agent(agent_a, operator_client):
    response = operator_client.post(_url(agent_a.id), _body(), format="json")
    assert response.status_code == 201, response.content
    assert Execution.objects.get().agent_id == agent_a.id


def test_execution_needs_a_key(agent_a):
    from tests.api_fixtures import client_with_key

    assert_error(
        client_with_key(None).post(_url(agent_a.id), _body(), format="json"), 401, "not_authenticated"
    )
    assert not Execution.objects.exists()


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"resources": {}}, "resources"),
        ({"resources": {"GPU_HOURS": 1}}, "resources"),
        ({"resources": {"AI_TOKENS": 0}}, "resources"),
        ({"resources": {"AI_TOKENS": "10"}}, "resources"),
        ({"duration_ms": -1}, "duration_ms"),
        ({"success": "maybe"}, "success"),
        ({"superpower": ""}, "superpower"),
        ({"colour": "blue"}, "colour"),
    ],
    ids=[
        "empty",
        "unknown-type",
        "zero",
        "string-amount",
        "negative-duration",
        "bad-success",
        "no-name",
        "extra",
    ],
)
def test_invalid_execution_is_refused_and_writes_nothing(agent_a, overrides, field):
    before = _snapshot()
    details = assert_error(
        agent_a.client.post(_url(agent_a.id), _body(**overrides), format="json"), 400, "validation_error"
    )
    assert field in details["fields"]
    assert _snapshot() == before


def test_execution_is_recorded_once_per_idempotency_key(agent_a):
    first = agent_a.client.post(_url(agent_a.id), _body(), format="json", HTTP_IDEMPOTENCY_KEY="run-1")
    second = agent_a.client.post(_url(agent_a.id), _body(), format="json", HTTP_IDEMPOTENCY_KEY="run-1")

    assert first.status_code == second.status_code == 201
    assert second.json() == first.json()
    assert second["Idempotent-Replayed"] == "true"
    assert Execution.objects.count() == 1
    assert UsageLog.objects.count() == 3
    assert set(UsageLog.objects.values_list("idempotency_key", flat=True)) == {"run-1"}


def test_a_suspended_agent_cannot_execute(agent_a):
    from ledger.services import agent_set_status

    agent_set_status(agent=agent_a.agent, status="suspended", reason="abuse")
    before = _snapshot()
    assert_error(agent_a.client.post(_url(agent_a.id), _body(), format="json"), 403, "agent_suspended")
    assert _snapshot() == before

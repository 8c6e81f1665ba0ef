"""What schemathesis found (tests/test_schemathesis.py), each pinned as a regular test: bad input is a 4xx
in the one error shape and writes nothing; good input is answered as the schema says."""

from __future__ import annotations

import pytest
from django.urls import reverse

from allocation import services

pytest.register_assert_rewrite("tests.api_fixtures")

from tests.api_fixtures import assert_error, ledger_snapshot  # noqa: E402

pytest_plugins = ["tests.api_fixtures"]

pytestmark = pytest.mark.django_db


def test_analysis_of_a_huge_limit_burned_at_a_trickle_is_not_a_500(agent_a, operator_client):
    # 2^53 units left at 1 unit a day ran out past the year 9999: the projection overflowed (500).
    response = operator_client.patch(
        reverse("api:agent", args=[agent_a.id]), {"custom_limits": {"AI_TOKENS": 2**53}}, format="json"
    )
    assert response.status_code == 200, response.content
    services.allocation_create(agent=agent_a.agent, resource_type_id="AI_TOKENS", amount=1)

    response = agent_a.client.get(f"/api/v1/agents/{agent_a.id}/analysis")

    assert response.status_code == 200, response.content


@pytest.mark.parametrize(
    ("url", "body", "field"),
    [
        ("agents", {"id": 0, "tier": "PRO"}, "id"),
        ("agents", {"id": "agent-new", "tier": "PRO", "name": 12}, "name"),
        ("allocations", {"resource_type": "AI_TOKENS", "amount": 5, "task_id": 12}, "task_id"),
        ("compat", {"action": "check", "agentId": 7, "resourceType": "AI_TOKENS", "amount": 1}, "agentId"),
    ],
)
def test_text_fields_take_json_strings_only(agent_a, operator_client, url, body, field):
    # DRF's CharField turned the number 0 into the agent id "0": the schema says a string.
    path = {
        "agents": reverse("api:agents"),
        "allocations": reverse("api:allocations", args=[agent_a.id]),
        "compat": reverse("api:resources"),
    }[url]
    before = ledger_snapshot()

    response = operator_client.post(path, body, format="json")

    details = assert_error(response, 400, "validation_error")
    assert details["fields"][field] == [{"code": "invalid", "message": "must be a JSON string"}]
    assert ledger_snapshot() == before


def test_a_duplicate_agent_id_is_a_conflict(agent_a, operator_client):
    before = ledger_snapshot()

    response = operator_client.post(reverse("api:agents"), {"id": agent_a.id, "tier": "PRO"}, format="json")

    assert_error(response, 409, "agent_exists")
    assert ledger_snapshot() == before


def test_scaling_events_refuse_a_bad_page_size_as_the_other_lists_do(agent_a):
    url = f"/api/v1/agents/{agent_a.id}/scaling-events"

    assert_error(agent_a.client.get(url, {"page_size": "many"}), 400, "validation_error")
    assert_error(agent_a.client.get(url, {"page_size": 0}), 400, "validation_error")
    assert_error(agent_a.client.get(url, {"colour": "red"}), 400, "validation_error")
    assert agent_a.client.get(url, {"page_size": 10}).status_code == 200

"""Bad input against the write endpoints: a 4xx in the one error shape, never a 500, and nothing written."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
from django.urls import reverse

from allocation import services
from allocation.models import Allocation

pytest.register_assert_rewrite("tests.api_fixtures")  # its assert_error helper, imported just below

from tests.api_fixtures import (  # noqa: E402
    assert_error,
    ledger_snapshot,
)

# The agent_a, agent_b and operator_client fixtures.
pytest_plugins = ["tests.api_fixtures"]

pytestmark = pytest.mark.django_db

JSON = "application/json"
VALID_ALLOCATION = {"resource_type": "AI_TOKENS", "amount": 100}
VALID_SHARE = {"resource_type": "AI_TOKENS", "amount": 100, "target_agent_id": "agent-b"}


@dataclass(frozen=True)
class Bad:
    """One bad request: where it goes, what it sends and the error it must get."""

    target: str
    payload: object = None  # JSON-encoded unless ``raw`` is set
    status: int = 400
    code: str = "validation_error"
    fields: tuple[str, ...] = ()  # names that must appear in details["fields"]
    raw: str | None = None
    content_type: str = JSON
    method: str = "post"
    headers: dict = field(default_factory=dict)
    as_operator: bool = False


def _allocation(**changes) -> dict:
    return {key: value for key, value in {**VALID_ALLOCATION, **changes}.items() if value is not ...}


CASES = {
    # POST /agents/{id}/allocations
    "allocation-unknown-resource-type": Bad(
        "allocations", _allocation(resource_type="GOLD"), fields=("resource_type",)
    ),
    "allocation-resource-type-not-a-string": Bad(
        "allocations", _allocation(resource_type=["AI_TOKENS"]), fields=("resource_type",)
    ),
    "allocation-amount-zero": Bad("allocations", _allocation(amount=0), fields=("amount",)),
    "allocation-amount-negative": Bad("allocations", _allocation(amount=-1), fields=("amount",)),
    "allocation-amount-fraction": Bad("allocations", _allocation(amount=1.5), fields=("amount",)),
    "allocation-amount-whole-float": Bad("allocations", _allocation(amount=10.0), fields=("amount",)),
    "allocation-amount-string": Bad("allocations", _allocation(amount="10"), fields=("amount",)),
    "allocation-amount-true": Bad("allocations", _allocation(amount=True), fields=("amount",)),
    "allocation-amount-null": Bad("allocations", _allocation(amount=None), fields=("amount",)),
    "allocation-amount-over-2^53": Bad("allocations", _allocation(amount=2**53 + 1), fields=("amount",)),
    "allocation-amount-huge": Bad("allocations", _allocation(amount=10**40), fields=("amount",)),
    "allocation-missing-resource-type": Bad(
        "allocations", _allocation(resource_type=...), fields=("resource_type",)
    ),
    "allocation-missing-amount": Bad("allocations", _allocation(amount=...), fields=("amount",)),
    "allocation-unknown-field": Bad("allocations", _allocation(colour="red"), fields=("colour",)),
    "allocation-camel-case-field": Bad(
        "allocations", _allocation(resourceType="AI_TOKENS"), fields=("resourceType",)
    ),
    "allocation-hold-ttl-zero": Bad(
        "allocations", _allocation(hold=True, hold_ttl_seconds=0), fields=("hold_ttl_seconds",)
    ),
    "allocation-hold-ttl-over-a-week": Bad(
        "allocations", _allocation(hold=True, hold_ttl_seconds=7 * 86400 + 1), fields=("hold_ttl_seconds",)
    ),
    "allocation-hold-not-boolean": Bad("allocations", _allocation(hold="perhaps"), fields=("hold",)),
    "allocation-task-id-too-long": Bad("allocations", _allocation(task_id="t" * 201), fields=("task_id",)),
    "allocation-body-list": Bad("allocations", [VALID_ALLOCATION], code="malformed_json"),
    "allocation-body-string": Bad("allocations", "AI_TOKENS", code="malformed_json"),
    "allocation-body-null": Bad("allocations", raw="null", code="malformed_json"),
    "allocation-malformed-json": Bad(
        "allocations", raw='{"resource_type": "AI_TOKENS", "amount": ', code="malformed_json"
    ),
    "allocation-nan": Bad(
        "allocations", raw='{"resource_type": "AI_TOKENS", "amount": NaN}', code="malformed_json"
    ),
    "allocation-text-plain": Bad(
        "allocations",
        raw="resource_type=AI_TOKENS amount=100",
        content_type="text/plain",
        status=415,
        code="unsupported_media_type",
    ),
    "allocation-form-encoded": Bad(
        "allocations",
        raw="resource_type=AI_TOKENS&amount=100",
        content_type="application/x-www-form-urlencoded",
        status=415,
        code="unsupported_media_type",
    ),
    "allocation-empty-body": Bad("allocations", raw="", fields=("resource_type", "amount")),
    # What PostgreSQL cannot store: refused by the JSON parser, before the audit trail tries to.
    "allocation-amount-overflows-to-infinity": Bad(
        "allocations", raw='{"resource_type": "AI_TOKENS", "amount": 1e400}', code="malformed_json"
    ),
    "allocation-lone-surrogate": Bad(
        "allocations",
        raw='{"resource_type": "AI_TOKENS", "amount": 1, "task_id": "\\ud800"}',
        code="malformed_json",
    ),
    "allocation-nul-in-a-key": Bad(
        "allocations", raw='{"resource_type": "AI_TOKENS", "amount": 1, "a\\u0000": 1}', code="malformed_json"
    ),
    "allocation-nested-1000-deep": Bad("allocations", raw="[" * 1000 + "]" * 1000, code="malformed_json"),
    "allocation-nested-33-deep": Bad(
        "allocations",
        raw='{"resource_type": "AI_TOKENS", "amount": 1, "x": ' + "[" * 32 + "]" * 32 + "}",
        code="malformed_json",
    ),
    "allocation-body-over-the-limit": Bad(
        "allocations", raw='{"task_id": "' + "a" * 2_700_000 + '"}', status=413, code="payload_too_large"
    ),
    "settle-amount-overflows-to-infinity": Bad("settle", raw='{"amount": 1e400}', code="malformed_json"),
    "purchase-nul-agent-id": Bad(
        "purchase", raw='{"agent_id": "\\u0000", "amount": 1}', code="malformed_json"
    ),
    "agent-create-nul-in-id": Bad(
        "agents", raw='{"id": "a\\u0000", "tier": "PRO"}', code="malformed_json", as_operator=True
    ),
    "agent-patch-nul-in-metadata": Bad(
        "agent", raw='{"metadata": {"a": "\\u0000"}}', method="patch", code="malformed_json", as_operator=True
    ),
    "quotas-nul-in-the-path": Bad("quotas-nul", method="get", status=404, code="not_found", as_operator=True),
    "allocation-empty-object": Bad("allocations", {}, fields=("resource_type", "amount")),
    "allocation-idempotency-key-too-long": Bad(
        "allocations",
        VALID_ALLOCATION,
        code="invalid_idempotency_key",
        headers={"HTTP_IDEMPOTENCY_KEY": "k" * 300},
    ),
    "allocation-idempotency-key-empty": Bad(
        "allocations", VALID_ALLOCATION, code="invalid_idempotency_key", headers={"HTTP_IDEMPOTENCY_KEY": ""}
    ),
    "allocation-unknown-agent-operator": Bad(
        "allocations-unknown-agent", VALID_ALLOCATION, status=404, code="not_found", as_operator=True
    ),
    "allocation-unknown-agent": Bad(
        "allocations-unknown-agent", VALID_ALLOCATION, status=404, code="not_found"
    ),
    "allocation-get-not-allowed": Bad("allocations", method="get", status=405, code="method_not_allowed"),
    # POST /agents/{id}/quota-checks
    "check-amount-zero": Bad("quota-checks", _allocation(amount=0), fields=("amount",)),
    "check-unknown-resource-type": Bad(
        "quota-checks", _allocation(resource_type="GOLD"), fields=("resource_type",)
    ),
    "check-hold-is-not-a-check-field": Bad("quota-checks", _allocation(hold=True), fields=("hold",)),
    "check-body-list": Bad("quota-checks", [VALID_ALLOCATION], code="malformed_json"),
    "check-malformed-json": Bad("quota-checks", raw="{", code="malformed_json"),
    # POST /agents/{id}/allocations/{uuid}/settle and /release
    "settle-amount-negative": Bad("settle", {"amount": -1}, fields=("amount",)),
    "settle-amount-string": Bad("settle", {"amount": "5"}, fields=("amount",)),
    "settle-amount-fraction": Bad("settle", {"amount": 0.5}, fields=("amount",)),
    "settle-missing-amount": Bad("settle", {}, fields=("amount",)),
    "settle-unknown-field": Bad(
        "settle", {"amount": 5, "resource_type": "AI_TOKENS"}, fields=("resource_type",)
    ),
    "settle-malformed-json": Bad("settle", raw='{"amount": 5', code="malformed_json"),
    "settle-text-plain": Bad(
        "settle", raw="5", content_type="text/plain", status=415, code="unsupported_media_type"
    ),
    "settle-bad-uuid": Bad("settle-bad-uuid", {"amount": 5}, status=404, code="not_found"),
    "settle-unknown-uuid": Bad("settle-unknown-uuid", {"amount": 5}, status=404, code="not_found"),
    "settle-unknown-agent": Bad(
        "settle-unknown-agent", {"amount": 5}, status=404, code="not_found", as_operator=True
    ),
    "release-takes-no-amount": Bad("release", {"amount": 5}, fields=("amount",)),
    "release-bad-uuid": Bad("release-bad-uuid", {}, status=404, code="not_found"),
    "detail-bad-uuid": Bad("detail-bad-uuid", method="get", status=404, code="not_found"),
    # POST /agents/{id}/shares
    "share-missing-target": Bad(
        "shares", {"resource_type": "AI_TOKENS", "amount": 10}, fields=("target_agent_id",)
    ),
    "share-amount-zero": Bad("shares", {**VALID_SHARE, "amount": 0}, fields=("amount",)),
    "share-amount-fraction": Bad("shares", {**VALID_SHARE, "amount": 1.5}, fields=("amount",)),
    "share-unknown-resource-type": Bad(
        "shares", {**VALID_SHARE, "resource_type": "GOLD"}, fields=("resource_type",)
    ),
    "share-with-itself": Bad("shares", {**VALID_SHARE, "target_agent_id": "agent-a"}, code="invalid_target"),
    "share-unknown-target": Bad(
        "shares", {**VALID_SHARE, "target_agent_id": "nobody"}, status=404, code="not_found"
    ),
    "share-body-list": Bad("shares", [VALID_SHARE], code="malformed_json"),
    # POST /agents (operator)
    "agent-create-bad-id": Bad("agents", {"id": "bad id!", "tier": "PRO"}, fields=("id",), as_operator=True),
    "agent-create-id-too-long": Bad(
        "agents", {"id": "a" * 65, "tier": "PRO"}, fields=("id",), as_operator=True
    ),
    "agent-create-unknown-tier": Bad(
        "agents", {"id": "agent-new", "tier": "GOLD"}, fields=("tier",), as_operator=True
    ),
    "agent-create-missing-tier": Bad("agents", {"id": "agent-new"}, fields=("tier",), as_operator=True),
    "agent-create-missing-id": Bad("agents", {"tier": "PRO"}, fields=("id",), as_operator=True),
    "agent-create-unknown-limit-type": Bad(
        "agents",
        {"id": "agent-new", "tier": "CUSTOM", "custom_limits": {"GOLD": 5}},
        fields=("custom_limits",),
        as_operator=True,
    ),
    "agent-create-negative-limit": Bad(
        "agents",
        {"id": "agent-new", "tier": "CUSTOM", "custom_limits": {"AI_TOKENS": -1}},
        fields=("custom_limits",),
        as_operator=True,
    ),
    "agent-create-limit-string": Bad(
        "agents",
        {"id": "agent-new", "tier": "CUSTOM", "custom_limits": {"AI_TOKENS": "5"}},
        fields=("custom_limits",),
        as_operator=True,
    ),
    "agent-create-negative-budget": Bad(
        "agents",
        {"id": "agent-new", "tier": "PRO", "monthly_budget_usd": "-1.00"},
        fields=("monthly_budget_usd",),
        as_operator=True,
    ),
    "agent-create-budget-sub-cent": Bad(
        "agents",
        {"id": "agent-new", "tier": "PRO", "monthly_budget_usd": "1.005"},
        fields=("monthly_budget_usd",),
        as_operator=True,
    ),
    "agent-create-unknown-field": Bad(
        "agents",
        {"id": "agent-new", "tier": "PRO", "api_key": "axg_mine"},
        fields=("api_key",),
        as_operator=True,
    ),
    "agent-create-body-list": Bad(
        "agents", [{"id": "agent-new", "tier": "PRO"}], code="malformed_json", as_operator=True
    ),
    "agent-create-malformed-json": Bad(
        "agents", raw='{"id": "agent-new", ', code="malformed_json", as_operator=True
    ),
    "agent-create-text-plain": Bad(
        "agents",
        raw="agent-new",
        content_type="text/plain",
        status=415,
        code="unsupported_media_type",
        as_operator=True,
    ),
    # PATCH /agents/{id} (operator)
    "agent-patch-unknown-status": Bad(
        "agent", {"status": "sleeping"}, fields=("status",), method="patch", as_operator=True
    ),
    "agent-patch-unknown-tier": Bad(
        "agent", {"tier": "GOLD"}, fields=("tier",), method="patch", as_operator=True
    ),
    "agent-patch-min-over-max": Bad(
        "agent",
        {"min_instances": 20, "max_instances": 5},
        code="invalid_instances",
        method="patch",
        as_operator=True,
    ),
    "agent-patch-read-only-field": Bad(
        "agent", {"id": "agent-renamed"}, fields=("id",), method="patch", as_operator=True
    ),
    # The compatibility endpoint
    "compat-missing-action": Bad(
        "compat", {"agentId": "agent-a", "resourceType": "AI_TOKENS", "amount": 1}, fields=("action",)
    ),
    "compat-unknown-action": Bad("compat", {"action": "steal", "agentId": "agent-a"}, fields=("action",)),
    "compat-allocate-missing-amount": Bad(
        "compat",
        {"action": "allocate", "agentId": "agent-a", "resourceType": "AI_TOKENS"},
        fields=("amount",),
    ),
    "compat-allocate-amount-string": Bad(
        "compat",
        {"action": "allocate", "agentId": "agent-a", "resourceType": "AI_TOKENS", "amount": "10"},
        fields=("amount",),
    ),
    "compat-allocate-unknown-type": Bad(
        "compat",
        {"action": "allocate", "agentId": "agent-a", "resourceType": "GOLD", "amount": 10},
        fields=("resourceType",),
    ),
    "compat-share-missing-target": Bad(
        "compat",
        {"action": "share", "agentId": "agent-a", "resourceType": "AI_TOKENS", "amount": 10},
        fields=("targetAgentId",),
    ),
    "compat-body-list": Bad("compat", [{"action": "allocate"}], code="malformed_json"),
    "compat-text-plain": Bad(
        "compat", raw="action=allocate", content_type="text/plain", status=415, code="unsupported_media_type"
    ),
    "compat-malformed-json": Bad("compat", raw='{"action": "allocate", ', code="malformed_json"),
    "compat-get-missing-agent": Bad("compat", {"action": "quota"}, method="get", fields=("agentId",)),
    "compat-get-unknown-action": Bad(
        "compat", {"action": "steal", "agentId": "agent-a"}, method="get", fields=("action",)
    ),
    # GET /agents/{id}/usage
    "usage-bad-since": Bad("usage", {"since": "yesterday"}, method="get", fields=("since",)),
    "usage-page-size-zero": Bad("usage", {"page_size": 0}, method="get", fields=("page_size",)),
    "usage-unknown-parameter": Bad("usage", {"agent": "agent-b"}, method="get", fields=("agent",)),
    "usage-unknown-resource-type": Bad(
        "usage", {"resource_type": "GOLD"}, method="get", fields=("resource_type",)
    ),
}


@pytest.fixture
def world(agent_a, agent_b, operator_client):
    """Agent A with a commit and an open hold, B's quotas open, and one idempotency record: a ledger in which
    any stray write would show."""
    services.allocation_create(agent=agent_a.agent, resource_type_id="AI_TOKENS", amount=1000)
    hold = services.allocation_create(
        agent=agent_a.agent, resource_type_id="AI_TOKENS", amount=5000, hold=True
    )
    response = agent_a.client.post(
        reverse("api:allocations", args=[agent_a.id]),
        VALID_ALLOCATION,
        format="json",
        HTTP_IDEMPOTENCY_KEY="earlier",
    )
    assert response.status_code == 201
    services.agent_quotas(agent=agent_a.agent)
    services.agent_quotas(agent=agent_b.agent)
    return SimpleNamespace(a=agent_a, b=agent_b, operator=operator_client, hold_id=str(hold.pk))


def _url(target: str, world) -> str:
    a, hold = world.a.id, world.hold_id
    return {
        "allocations": reverse("api:allocations", args=[a]),
        "allocations-unknown-agent": reverse("api:allocations", args=["nobody"]),
        "quota-checks": reverse("api:quota-checks", args=[a]),
        "settle": reverse("api:allocation-settle", args=[a, hold]),
        "settle-bad-uuid": f"/api/v1/agents/{a}/allocations/not-a-uuid/settle",
        "settle-unknown-uuid": reverse("api:allocation-settle", args=[a, uuid.uuid4()]),
        "settle-unknown-agent": reverse("api:allocation-settle", args=["nobody", hold]),
        "release": reverse("api:allocation-release", args=[a, hold]),
        "release-bad-uuid": f"/api/v1/agents/{a}/allocations/{hold[:-1]}/release",
        "detail-bad-uuid": f"/api/v1/agents/{a}/allocations/12345",
        "shares": reverse("api:shares", args=[a]),
        "agents": reverse("api:agents"),
        "agent": reverse("api:agent", args=[a]),
        "compat": reverse("api:resources"),
        "usage": reverse("api:usage", args=[a]),
        "purchase": f"/api/v1/marketplace/deals/{uuid.uuid4()}/purchase",
        "quotas-nul": "/api/v1/agents/x%00/quotas",
    }[target]


def _send(case: Bad, world):
    client = world.operator if case.as_operator else world.a.client
    url = _url(case.target, world)
    if case.method == "get":
        return client.get(url, case.payload or {}, **case.headers)
    body = case.raw if case.raw is not None else json.dumps(case.payload if case.payload is not None else {})
    return client.generic(case.method.upper(), url, body, content_type=case.content_type, **case.headers)


@pytest.mark.parametrize("case", [pytest.param(case, id=name) for name, case in CASES.items()])
def test_bad_input_is_refused_cleanly_and_writes_nothing(world, case):
    before = ledger_snapshot()

    response = _send(case, world)

    assert response.status_code < 500
    details = assert_error(response, case.status, case.code)
    for name in case.fields:
        assert name in details["fields"], details
    assert ledger_snapshot() == before
    hold = Allocation.objects.get(pk=world.hold_id)
    assert (hold.status, hold.amount, hold.settled_amount) == (Allocation.Status.HELD, 5000, None)


def test_a_refused_request_leaves_its_idempotency_key_free(world):
    """A bad body sent with a key does not burn the key: the corrected request then runs."""
    url = reverse("api:allocations", args=[world.a.id])

    refused = world.a.client.post(url, _allocation(amount=0), format="json", HTTP_IDEMPOTENCY_KEY="fresh")
    accepted = world.a.client.post(url, _allocation(amount=7), format="json", HTTP_IDEMPOTENCY_KEY="fresh")

    assert_error(refused, 400, "validation_error")
    assert accepted.status_code == 201, accepted.content
    assert "Idempotent-Replayed" not in accepted

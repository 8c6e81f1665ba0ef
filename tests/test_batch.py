"""Batch allocations: an agent's POST ./allocations/batch and the operators' POST /api/v1/usage/batch."""

from __future__ import annotations

import random
from collections import Counter
from decimal import Decimal

import pytest
from django.db import connection, connections
from django.db.models import Sum
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from rest_framework.test import APIClient

from allocation.api.batch import BatchItemIn, UsageBatchItemIn, _item_fast
from allocation.api.serializers import AllocationOut
from allocation.keys import api_key_issue, operator_key_issue
from allocation.models import Allocation, AuditRecord, IdempotencyRecord
from ledger.budgets import agent_team_set, budget_create, organization_create, team_create
from ledger.models import Agent, Quota, UsageLog
from ledger.services import agent_create, agent_set_status, quota_grant, quota_open, reference_data_load

pytest.register_assert_rewrite("tests.api_fixtures")

from tests.api_fixtures import assert_error, client_with_key, ledger_snapshot  # noqa: E402

pytest_plugins = ["tests.api_fixtures"]

pytestmark = pytest.mark.django_db


def _agent_url(agent_id: str) -> str:
    return reverse("api:allocations-batch", args=[agent_id])


def _usage_url() -> str:
    return reverse("api:usage-batch")


def _post(client, url: str, items, **headers):
    return client.post(url, {"items": items}, format="json", **headers)


def _ok(response) -> dict:
    assert response.status_code == 200, (response.status_code, response.content[:500])
    return response.json()


def _statuses(body: dict) -> list[int]:
    return [result["status"] for result in body["results"]]


def _custom_agent(agent_id: str, **limits: int):
    agent = agent_create(agent_id=agent_id, tier_code="CUSTOM", custom_limits=limits)
    _, raw_key = api_key_issue(agent=agent)
    return agent, client_with_key(raw_key)


def _quota(agent_id: str, resource_type: str = "AI_TOKENS") -> Quota:
    return Quota.objects.get(agent_id=agent_id, resource_type_id=resource_type)


def _assert_ledger_matches(agent_id: str, resource_type: str = "AI_TOKENS") -> Quota:
    """The quota's counters equal the sums of its usage rows and committed allocations."""
    quota = _quota(agent_id, resource_type)
    usage = UsageLog.objects.filter(quota=quota)
    assert (usage.aggregate(total=Sum("amount"))["total"] or 0) == quota.used
    assert (usage.aggregate(total=Sum("cost_usd"))["total"] or Decimal(0)) == quota.spent_usd
    allocations = Allocation.objects.filter(quota=quota, status="committed")
    assert (allocations.aggregate(total=Sum("amount"))["total"] or 0) == quota.used
    return quota


# --- Results, in order, like single allocations -------------------------------------------------------------


def test_batch_answers_each_item_in_order_as_single_allocations_would(reference_data):
    amounts = [4_000, 5_000, 2_000, 1_000, 1, 300]
    batch_agent, batch_client = _custom_agent("batcher", AI_TOKENS=10_000)
    single_agent, single_client = _custom_agent("single", AI_TOKENS=10_000)

    body = _ok(
        _post(
            batch_client,
            _agent_url("batcher"),
            [
                {"resource_type": "AI_TOKENS", "amount": amount, "task_id": f"t-{i}"}
                for i, amount in enumerate(amounts)
            ],
        )
    )
    singles = [
        single_client.post(
            reverse("api:allocations", args=["single"]),
            {"resource_type": "AI_TOKENS", "amount": amount, "task_id": f"t-{i}"},
            format="json",
        )
        for i, amount in enumerate(amounts)
    ]

    assert _statuses(body) == [201, 201, 429, 201, 429, 429]
    assert _statuses(body) == [response.status_code for response in singles]
    assert [result["index"] for result in body["results"]] == list(range(len(amounts)))
    assert body["summary"] == {"accepted": 3, "refused": 3, "replayed": 0}
    for result, single in zip(body["results"], singles, strict=True):
        if result["status"] == 201:
            expected = {**single.json(), "id": result["allocation"]["id"], "agent_id": "batcher"}
            expected["created_at"] = result["allocation"]["created_at"]
            assert result["allocation"] == expected
            stored = Allocation.objects.get(pk=result["allocation"]["id"])
            assert result["allocation"] == AllocationOut(stored).data
        else:
            assert result["error"] == single.json()["error"]
    details = dict(body["results"][2]["error"]["details"])
    assert details.pop("resets_at") == singles[2].json()["error"]["details"]["resets_at"]
    assert details == {"resource_type": "AI_TOKENS", "requested": 2_000, "available": 1_000}

    quota = _assert_ledger_matches("batcher")
    assert (quota.used, quota.limit) == (10_000, 10_000)
    assert quota.spent_usd == _quota("single").spent_usd == Decimal("0.01")
    assert UsageLog.objects.filter(agent=batch_agent).count() == 3
    usage = UsageLog.objects.filter(agent=batch_agent).order_by("amount").first()
    assert usage.kind == "allocation"
    assert usage.metadata["allocation_id"] in {
        r["allocation"]["id"] for r in body["results"] if r["status"] == 201
    }


def test_batch_opens_the_period_from_the_tier_and_takes_several_resource_types(agent_a):
    body = _ok(
        _post(
            agent_a.client,
            _agent_url(agent_a.id),
            [
                {"resource_type": "AI_TOKENS", "amount": 600_000},
                {"resource_type": "NETWORK_REQS", "amount": 10_000},
                {"resource_type": "AI_TOKENS", "amount": 400_001},
                {"resource_type": "NETWORK_REQS", "amount": 1},
                {"resource_type": "AI_TOKENS", "amount": 400_000, "metadata": {"step": "plan"}},
            ],
        )
    )
    assert _statuses(body) == [201, 201, 429, 429, 201]
    assert _assert_ledger_matches(agent_a.id).used == 1_000_000  # PRO's monthly AI_TOKENS
    assert _assert_ledger_matches(agent_a.id, "NETWORK_REQS").used == 10_000
    assert body["results"][1]["allocation"]["cost_usd"] == "10.000000000000"
    usage = UsageLog.objects.get(agent_id=agent_a.id, amount=400_000)
    assert usage.metadata == {"step": "plan", "allocation_id": body["results"][4]["allocation"]["id"]}


def test_operator_batch_answers_per_agent_and_refuses_only_the_items_it_must(reference_data, operator_client):
    _custom_agent("fits", AI_TOKENS=1_000)
    _custom_agent("tight", AI_TOKENS=10)
    throttled, _ = _custom_agent("throttled", AI_TOKENS=1_000)
    suspended, _ = _custom_agent("suspended", AI_TOKENS=1_000)
    agent_set_status(agent=throttled, status=Agent.Status.THROTTLED, reason="budget")
    agent_set_status(agent=suspended, status=Agent.Status.SUSPENDED, reason="abuse")

    items = [
        {"agent_id": "fits", "resource_type": "AI_TOKENS", "amount": 700},
        {"agent_id": "tight", "resource_type": "AI_TOKENS", "amount": 11},
        {"agent_id": "nobody", "resource_type": "AI_TOKENS", "amount": 1},
        {"agent_id": "throttled", "resource_type": "AI_TOKENS", "amount": 1},
        {"agent_id": "suspended", "resource_type": "AI_TOKENS", "amount": 1},
        {"agent_id": "tight", "resource_type": "AI_TOKENS", "amount": 10},
        {"agent_id": "fits", "resource_type": "AI_TOKENS", "amount": 300},
        {"agent_id": "fits", "resource_type": "AI_TOKENS", "amount": 1},
    ]
    body = _ok(_post(operator_client, _usage_url(), items))

    assert _statuses(body) == [201, 429, 404, 429, 403, 201, 201, 429]
    codes = [result.get("error", {}).get("code") for result in body["results"]]
    assert codes == [
        None,
        "quota_exceeded",
        "not_found",
        "agent_throttled",
        "agent_suspended",
        None,
        None,
        "quota_exceeded",
    ]
    assert body["results"][3]["error"]["details"] == {"reason": "budget"}
    assert body["summary"] == {"accepted": 3, "refused": 5, "replayed": 0}
    assert [r["allocation"]["agent_id"] for r in body["results"] if r["status"] == 201] == [
        "fits",
        "tight",
        "fits",
    ]
    assert _assert_ledger_matches("fits").used == 1_000
    assert _assert_ledger_matches("tight").used == 10
    assert not Quota.objects.filter(agent_id__in=["throttled", "suspended"]).exists()
    assert not UsageLog.objects.filter(agent_id__in=["throttled", "suspended"]).exists()


def test_batch_counts_what_holds_reserve(reference_data):
    _, client = _custom_agent("holder", AI_TOKENS=1_000)
    hold = client.post(
        reverse("api:allocations", args=["holder"]),
        {"resource_type": "AI_TOKENS", "amount": 600, "hold": True},
        format="json",
    )
    assert hold.status_code == 201
    body = _ok(
        _post(
            client,
            _agent_url("holder"),
            [{"resource_type": "AI_TOKENS", "amount": 500}, {"resource_type": "AI_TOKENS", "amount": 400}],
        )
    )
    assert _statuses(body) == [429, 201]
    assert body["results"][0]["error"]["details"]["available"] == 400
    quota = _quota("holder")
    assert (quota.used, quota.reserved) == (400, 600)


def test_an_item_without_a_price_in_effect_is_refused_like_a_single_allocation(agent_a):
    from ledger.models import ResourceType
    from ledger.reference_cache import reference_cache_clear

    ResourceType.objects.create(code="GPU_MS", name="GPU", unit="milliseconds")
    reference_cache_clear()
    body = _ok(
        _post(
            agent_a.client,
            _agent_url(agent_a.id),
            [{"resource_type": "GPU_MS", "amount": 5}, {"resource_type": "AI_TOKENS", "amount": 5}],
        )
    )
    single = agent_a.client.post(
        reverse("api:allocations", args=[agent_a.id]), {"resource_type": "GPU_MS", "amount": 5}, format="json"
    )
    assert _statuses(body) == [409, 201]
    assert body["results"][0]["error"] == single.json()["error"]
    assert body["results"][0]["error"]["code"] == "no_price"


def test_operator_may_use_an_agents_batch_route(agent_a, operator_client):
    body = _ok(_post(operator_client, _agent_url(agent_a.id), [{"resource_type": "AI_TOKENS", "amount": 5}]))
    assert body["results"][0]["allocation"]["agent_id"] == agent_a.id
    assert _quota(agent_a.id).used == 5


# --- Isolation --------------------------------------------------------------------------------------------


def test_agent_key_on_another_agents_batch_route_is_not_found_and_writes_nothing(agent_a, agent_b):
    before = ledger_snapshot()
    response = _post(agent_a.client, _agent_url(agent_b.id), [{"resource_type": "AI_TOKENS", "amount": 5}])
    assert_error(response, 404, "not_found")
    assert ledger_snapshot() == before
    audit = AuditRecord.objects.get(action="allocation.batch")
    assert (audit.agent_id, audit.status_code, audit.outcome) == (agent_b.id, 404, "not_found")


def test_agent_key_cannot_use_the_operator_batch(agent_a):
    before = ledger_snapshot()
    response = _post(
        agent_a.client, _usage_url(), [{"agent_id": agent_a.id, "resource_type": "AI_TOKENS", "amount": 5}]
    )
    assert_error(response, 403, "forbidden")
    assert ledger_snapshot() == before


def test_batch_needs_an_api_key(agent_a):
    response = _post(APIClient(), _agent_url(agent_a.id), [{"resource_type": "AI_TOKENS", "amount": 5}])
    assert response.status_code == 401
    response = _post(
        APIClient(), _usage_url(), [{"agent_id": agent_a.id, "resource_type": "AI_TOKENS", "amount": 5}]
    )
    assert response.status_code == 401


# --- Idempotency ------------------------------------------------------------------------------------------


def test_item_keys_replay_the_stored_result_and_charge_once(agent_a):
    url = _agent_url(agent_a.id)
    items = [
        {"resource_type": "AI_TOKENS", "amount": 100, "idempotency_key": "k-1"},
        {"resource_type": "AI_TOKENS", "amount": 200, "idempotency_key": "k-2", "task_id": "t"},
        {"resource_type": "AI_TOKENS", "amount": 300},
    ]
    first = _ok(_post(agent_a.client, url, items))
    assert _statuses(first) == [201, 201, 201]

    again = _ok(_post(agent_a.client, url, items))
    assert _statuses(again) == [201, 201, 201]
    assert [result.get("replayed", False) for result in again["results"]] == [True, True, False]
    for index in (0, 1):
        assert again["results"][index] == {**first["results"][index], "replayed": True}
    assert again["summary"] == {"accepted": 1, "refused": 0, "replayed": 2}
    assert _assert_ledger_matches(agent_a.id).used == 100 + 200 + 300 + 300
    assert UsageLog.objects.filter(agent_id=agent_a.id, idempotency_key="k-1").count() == 1

    record = IdempotencyRecord.objects.get(key="item:k-1")
    assert (record.principal, record.method, record.path) == (f"agent:{agent_a.id}", "POST", url)
    assert record.response_status == 201


def test_item_key_reused_with_another_item_is_refused_alone(agent_a):
    url = _agent_url(agent_a.id)
    _ok(_post(agent_a.client, url, [{"resource_type": "AI_TOKENS", "amount": 100, "idempotency_key": "k-1"}]))
    before = _quota(agent_a.id).used

    body = _ok(
        _post(
            agent_a.client,
            url,
            [
                {"resource_type": "AI_TOKENS", "amount": 101, "idempotency_key": "k-1"},
                {"resource_type": "AI_TOKENS", "amount": "not a number", "idempotency_key": "k-1"},
                {"resource_type": "AI_TOKENS", "amount": 5},
            ],
        )
    )
    assert _statuses(body) == [422, 422, 201]
    assert body["results"][0]["error"]["code"] == "idempotency_key_reused"
    assert _quota(agent_a.id).used == before + 5


def test_same_key_twice_in_one_batch_behaves_as_two_requests_in_a_row(agent_a):
    body = _ok(
        _post(
            agent_a.client,
            _agent_url(agent_a.id),
            [
                {"resource_type": "AI_TOKENS", "amount": 10, "idempotency_key": "dup"},
                {"resource_type": "AI_TOKENS", "amount": 10, "idempotency_key": "dup"},
                {"resource_type": "AI_TOKENS", "amount": 20, "idempotency_key": "dup"},
            ],
        )
    )
    assert _statuses(body) == [201, 201, 422]
    assert body["results"][1] == {**body["results"][0], "index": 1, "replayed": True}
    assert _quota(agent_a.id).used == 10
    assert IdempotencyRecord.objects.filter(key="item:dup").count() == 1


def test_a_refused_item_leaves_its_key_free_for_a_retry(reference_data):
    agent, client = _custom_agent("small", AI_TOKENS=100)
    url = _agent_url("small")
    item = {"resource_type": "AI_TOKENS", "amount": 150, "idempotency_key": "retry-me"}
    refused = _ok(_post(client, url, [item]))
    assert _statuses(refused) == [429]
    assert not IdempotencyRecord.objects.filter(key="item:retry-me").exists()

    quota_grant(agent=agent, resource_type_id="AI_TOKENS", amount=100, reason="manual", actor="test")
    accepted = _ok(_post(client, url, [item]))
    assert _statuses(accepted) == [201]
    assert "replayed" not in accepted["results"][0]
    assert _quota("small").used == 150


def test_item_keys_are_per_principal_and_do_not_meet_request_keys(agent_a, agent_b):
    item = {"resource_type": "AI_TOKENS", "amount": 10, "idempotency_key": "shared"}
    assert _statuses(_ok(_post(agent_a.client, _agent_url(agent_a.id), [item]))) == [201]
    assert _statuses(_ok(_post(agent_b.client, _agent_url(agent_b.id), [item]))) == [201]
    single = agent_b.client.post(
        reverse("api:allocations", args=[agent_b.id]),
        {"resource_type": "AI_TOKENS", "amount": 10},
        format="json",
        HTTP_IDEMPOTENCY_KEY="shared",
    )
    assert single.status_code == 201
    assert _quota(agent_a.id).used == 10
    assert _quota(agent_b.id).used == 20


def test_a_request_level_idempotency_key_replays_the_whole_batch(agent_a):
    url = _agent_url(agent_a.id)
    items = [{"resource_type": "AI_TOKENS", "amount": 10}, {"resource_type": "AI_TOKENS", "amount": 20}]
    first = _post(agent_a.client, url, items, HTTP_IDEMPOTENCY_KEY="whole-batch")
    again = _post(agent_a.client, url, items, HTTP_IDEMPOTENCY_KEY="whole-batch")
    assert again.status_code == 200
    assert again["Idempotent-Replayed"] == "true"
    assert again.json() == _ok(first)
    assert _quota(agent_a.id).used == 30
    other = _post(agent_a.client, url, items[:1], HTTP_IDEMPOTENCY_KEY="whole-batch")
    assert_error(other, 422, "idempotency_key_reused")


# --- Invalid items and bodies ------------------------------------------------------------------------------

GOOD = {"resource_type": "AI_TOKENS", "amount": 7}

BAD_ITEMS = [
    ("amount-string", {"resource_type": "AI_TOKENS", "amount": "5"}, "amount"),
    ("amount-float", {"resource_type": "AI_TOKENS", "amount": 1.5}, "amount"),
    ("amount-bool", {"resource_type": "AI_TOKENS", "amount": True}, "amount"),
    ("amount-zero", {"resource_type": "AI_TOKENS", "amount": 0}, "amount"),
    ("amount-negative", {"resource_type": "AI_TOKENS", "amount": -3}, "amount"),
    ("amount-too-big", {"resource_type": "AI_TOKENS", "amount": 2**53 + 1}, "amount"),
    ("amount-null", {"resource_type": "AI_TOKENS", "amount": None}, "amount"),
    ("amount-missing", {"resource_type": "AI_TOKENS"}, "amount"),
    ("resource-missing", {"amount": 5}, "resource_type"),
    ("resource-unknown", {"resource_type": "GOLD", "amount": 5}, "resource_type"),
    ("resource-number", {"resource_type": 7, "amount": 5}, "resource_type"),
    ("unknown-field", {**GOOD, "colour": "red"}, "colour"),
    ("hold", {**GOOD, "hold": True}, "hold"),
    ("hold-ttl", {**GOOD, "hold_ttl_seconds": 60}, "hold"),
    ("task-too-long", {**GOOD, "task_id": "t" * 201}, "task_id"),
    ("key-empty", {**GOOD, "idempotency_key": ""}, "idempotency_key"),
    ("key-too-long", {**GOOD, "idempotency_key": "k" * 251}, "idempotency_key"),
    ("key-newline", {**GOOD, "idempotency_key": "a\nb"}, "idempotency_key"),
    ("key-null", {**GOOD, "idempotency_key": None}, "idempotency_key"),
    ("metadata-list", {**GOOD, "metadata": [1, 2]}, "metadata"),
    ("metadata-huge", {**GOOD, "metadata": {"blob": "x" * 5000}}, "metadata"),
    ("item-list", [GOOD], "non_field_errors"),
    ("item-string", "AI_TOKENS", "non_field_errors"),
    ("item-null", None, "non_field_errors"),
    ("item-number", 5, "non_field_errors"),
]


@pytest.mark.parametrize(("case", "bad", "field"), BAD_ITEMS, ids=[case[0] for case in BAD_ITEMS])
def test_an_invalid_item_is_refused_alone_with_its_field(agent_a, case, bad, field):
    body = _ok(_post(agent_a.client, _agent_url(agent_a.id), [GOOD, bad, GOOD]))
    assert _statuses(body) == [201, 400, 201]
    error = body["results"][1]["error"]
    assert error["code"] == "validation_error"
    assert field in error["details"]["fields"], error
    assert body["summary"] == {"accepted": 2, "refused": 1, "replayed": 0}
    assert _quota(agent_a.id).used == 14


def test_operator_items_need_an_agent_id(reference_data, operator_client):
    _custom_agent("someone", AI_TOKENS=100)
    body = _ok(
        _post(
            operator_client,
            _usage_url(),
            [
                {"resource_type": "AI_TOKENS", "amount": 5},
                {"agent_id": "", "resource_type": "AI_TOKENS", "amount": 5},
                {"agent_id": "x" * 65, "resource_type": "AI_TOKENS", "amount": 5},
                {"agent_id": "someone", "resource_type": "AI_TOKENS", "amount": 5},
            ],
        )
    )
    assert _statuses(body) == [400, 400, 400, 201]
    assert all("agent_id" in r["error"]["details"]["fields"] for r in body["results"][:3])


@pytest.mark.parametrize(
    ("case", "body", "code"),
    [
        ("no-items", {"items": []}, "validation_error"),
        ("too-many", {"items": [GOOD] * 1001}, "validation_error"),
        ("items-missing", {}, "validation_error"),
        ("items-object", {"items": {"0": GOOD}}, "validation_error"),
        ("items-string", {"items": "GOOD"}, "validation_error"),
        ("extra-field", {"items": [GOOD], "atomic": True}, "validation_error"),
        ("body-list", [GOOD], "malformed_json"),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_a_malformed_batch_is_refused_whole_and_writes_nothing(agent_a, case, body, code):
    before = ledger_snapshot()
    response = agent_a.client.post(_agent_url(agent_a.id), body, format="json")
    assert_error(response, 400, code)
    assert ledger_snapshot() == before
    audit = AuditRecord.objects.get(action="allocation.batch")
    assert (audit.status_code, audit.outcome) == (400, code)


def test_malformed_json_is_refused_whole(agent_a):
    response = agent_a.client.post(_agent_url(agent_a.id), b"{not json", content_type="application/json")
    assert_error(response, 400, "malformed_json")
    assert not UsageLog.objects.exists()


def test_a_full_batch_of_1000_items_is_accepted(agent_a):
    body = _ok(
        _post(agent_a.client, _agent_url(agent_a.id), [{"resource_type": "AI_TOKENS", "amount": 1}] * 1000)
    )
    assert body["summary"] == {"accepted": 1000, "refused": 0, "replayed": 0}
    assert _assert_ledger_matches(agent_a.id).used == 1000


# --- Audit ------------------------------------------------------------------------------------------------


def test_one_audit_record_per_batch_with_counts_instead_of_the_items(reference_data, operator_client):
    _custom_agent("audited", AI_TOKENS=10)
    items = [{"agent_id": "audited", "resource_type": "AI_TOKENS", "amount": 6}] * 3
    _ok(_post(operator_client, _usage_url(), items))
    audit = AuditRecord.objects.get()
    assert (audit.action, audit.actor, audit.agent_id, audit.status_code, audit.outcome) == (
        "usage.batch",
        "operator:ops",
        "",
        200,
        "ok",
    )
    assert audit.request_body == {
        "items": 3,
        "accepted": 1,
        "refused": 2,
        "replayed": 0,
        "agent_ids": ["audited"],
    }


def test_openapi_schema_describes_the_batch_routes(client):
    schema = client.get(reverse("schema"), {"format": "json"}).json()
    for path, body in (
        ("/api/v1/agents/{agent_id}/allocations/batch", "AllocationBatchIn"),
        ("/api/v1/usage/batch", "UsageBatchIn"),
    ):
        operation = schema["paths"][path]["post"]
        assert operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(body)
        assert operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
            "BatchOut"
        )


# --- The fast path of item validation ---------------------------------------------------------------------

FAST_PATH_ITEMS = [
    {"resource_type": "AI_TOKENS", "amount": 1},
    {"resource_type": "AI_TOKENS", "amount": 2**53, "task_id": "", "metadata": {}},
    {
        "resource_type": "COMPUTE_MS",
        "amount": 5,
        "task_id": "job 7",
        "idempotency_key": "k 1",
        "metadata": {"a": [1]},
    },
    {"resource_type": " AI_TOKENS ", "amount": 5},
    {"resource_type": "AI_TOKENS", "amount": 5, "task_id": " padded "},
    {"resource_type": "AI_TOKENS", "amount": 5, "task_id": "tab\there"},
    {"resource_type": "AI_TOKENS", "amount": 5, "task_id": 12},
    {"resource_type": "AI_TOKENS", "amount": 5, "idempotency_key": " spaced "},
    {"resource_type": "AI_TOKENS", "amount": 5, "idempotency_key": 42},
    {"resource_type": "AI_TOKENS", "amount": 5, "metadata": {"x": None}},
    {"resource_type": "AI_TOKENS", "amount": 5, "task_id": "é" * 200},
    {"resource_type": "AI_TOKENS", "amount": 5, "task_id": "é" * 201},
    {"resource_type": "AI_TOKENS", "amount": 5, "idempotency_key": "k" * 250},
    {"resource_type": "AI_TOKENS", "amount": 5, "run_id": "loop 1"},
    {"resource_type": "AI_TOKENS", "amount": 5, "run_id": " padded "},
    {"resource_type": "AI_TOKENS", "amount": 5, "run_id": "r" * 201},
    {"resource_type": "AI_TOKENS", "amount": 5, "run_id": 7},
    *[item for _, item, _ in BAD_ITEMS],
]


@pytest.mark.parametrize("raw", FAST_PATH_ITEMS)
@pytest.mark.parametrize("with_agent", [False, True])
def test_the_fast_path_accepts_only_what_the_serializer_accepts_and_alike(reference_data, raw, with_agent):
    from rest_framework.exceptions import ValidationError

    if with_agent and isinstance(raw, dict):
        raw = {**raw, "agent_id": "agent-1"}
    serializer = UsageBatchItemIn() if with_agent else BatchItemIn()
    try:
        expected = serializer.run_validation(raw)
    except ValidationError:
        expected = None
    fast = _item_fast(raw, with_agent=with_agent)
    if fast is not None:
        assert dict(fast) == dict(expected)


# --- Concurrency and cost, on PostgreSQL ------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_racing_batches_take_exactly_what_fits_without_deadlocks():
    from tests.concurrency import race

    reference_data_load()
    # Each quota fits exactly K items of 1,000: 3 agents x 2 resource types, 6 rows locked per batch.
    fits = {("racer-0", "AI_TOKENS"): 37, ("racer-1", "AI_TOKENS"): 20, ("racer-2", "AI_TOKENS"): 55}
    fits.update({("racer-0", "COMPUTE_MS"): 12, ("racer-1", "COMPUTE_MS"): 80, ("racer-2", "COMPUTE_MS"): 3})
    for agent_id in ("racer-0", "racer-1", "racer-2"):
        agent_create(
            agent_id=agent_id,
            tier_code="CUSTOM",
            custom_limits={code: k * 1_000 for (owner, code), k in fits.items() if owner == agent_id},
        )
    _, raw_key = operator_key_issue(username="ops")
    pairs = list(fits)

    def post(i):
        rng = random.Random(i)
        items = [
            {"agent_id": agent_id, "resource_type": code, "amount": 1_000, "task_id": f"{i}-{n}"}
            for n, (agent_id, code) in enumerate(rng.choice(pairs) for _ in range(100))
        ]
        response = client_with_key(raw_key).post(_usage_url(), {"items": items}, format="json")
        return response.status_code, response.json(), items

    outcomes = race(8, post)
    assert [status for status, _, _ in outcomes] == [200] * 8
    accepted = Counter()
    for _, body, items in outcomes:
        for result, item in zip(body["results"], items, strict=True):
            assert result["status"] in (201, 429), result
            if result["status"] == 201:
                accepted[(item["agent_id"], item["resource_type"])] += 1
    assert accepted == fits
    for (agent_id, code), k in fits.items():
        quota = _assert_ledger_matches(agent_id, code)
        assert quota.used == quota.limit == k * 1_000
    assert Allocation.objects.count() == UsageLog.objects.count() == sum(fits.values())


@pytest.mark.django_db(transaction=True)
def test_racing_batches_with_the_same_item_keys_charge_each_key_once():
    """Batches for two agents share one operator's keys: those for the same agent queue on its quota row,
    the others run side by side and meet on the keys themselves (stored after deciding: decided again)."""
    from tests.concurrency import race

    reference_data_load()
    for agent_id in ("left", "right"):
        agent_create(agent_id=agent_id, tier_code="CUSTOM", custom_limits={"AI_TOKENS": 1_000_000})
    _, raw_key = operator_key_issue(username="ops")
    keys = [f"key-{n}" for n in range(60)]

    def post(i):
        agent_id = ("left", "right")[i % 2]
        chosen = random.Random(i).sample(keys, 40)  # overlapping subsets, in different orders
        items = [
            {"agent_id": agent_id, "resource_type": "AI_TOKENS", "amount": 10, "idempotency_key": key}
            for key in chosen
        ]
        response = client_with_key(raw_key).post(_usage_url(), {"items": items}, format="json")
        return response.status_code, response.json(), agent_id, chosen

    outcomes = race(8, post)
    assert [status for status, *_ in outcomes] == [200] * 8
    charged: dict[str, list] = {}
    answers: dict[str, list] = {}
    for _, body, agent_id, chosen in outcomes:
        for result, key in zip(body["results"], chosen, strict=True):
            answers.setdefault(key, []).append((agent_id, result))
            if result["status"] == 201 and not result.get("replayed"):
                charged.setdefault(key, []).append(result["allocation"])
    assert all(len(allocations) == 1 for allocations in charged.values())  # each key charged once
    assert set(charged) == set(answers)
    for key, [allocation] in charged.items():
        for agent_id, result in answers[key]:
            if agent_id == allocation["agent_id"]:  # the same item again: its stored result
                assert result["status"] == 201 and result["allocation"] == allocation, result
            else:  # another item under the same key
                assert (result["status"], result["error"]["code"]) == (422, "idempotency_key_reused")
    used = {agent_id: _assert_ledger_matches(agent_id).used for agent_id in ("left", "right")}
    by_agent = Counter(allocation["agent_id"] for [allocation] in charged.values())
    assert used == {agent_id: 10 * by_agent[agent_id] for agent_id in ("left", "right")}
    assert IdempotencyRecord.objects.count() == len(charged)


def test_a_batch_that_locks_before_deciding_decides_the_same(reference_data, operator_client, monkeypatch):
    """The last attempts lock the quota rows at their read (in QUOTA_LOCK_ORDER) and decide under the lock:
    every attempt decides like that here, and the results are those of the optimistic path."""
    from allocation import batch

    monkeypatch.setattr(batch, "OPTIMISTIC_ATTEMPTS", 0)
    for agent_id in ("z-locked", "a-locked"):
        agent_create(agent_id=agent_id, tier_code="CUSTOM", custom_limits={"AI_TOKENS": 1_000})
    items = [
        {"agent_id": agent_id, "resource_type": "AI_TOKENS", "amount": 400}
        for _ in range(3)
        for agent_id in ("z-locked", "a-locked")
    ]
    with CaptureQueriesContext(connection) as queries:
        body = _ok(_post(operator_client, _usage_url(), items))

    assert _statuses(body) == [201, 201, 201, 201, 429, 429]
    locks = [q["sql"] for q in queries.captured_queries if "FOR NO KEY UPDATE OF q" in q["sql"]]
    assert len(locks) == 1 and "JOIN quotas AS q" in locks[0], locks  # read and locked at once, no confirm
    for agent_id in ("z-locked", "a-locked"):
        assert _assert_ledger_matches(agent_id).used == 800


def test_a_batch_costs_the_same_queries_for_10_and_1000_items(reference_data, operator_client):
    agent_ids = [f"counted-{n}" for n in range(5)]
    team = team_create(id="counted", organization_id=organization_create(id="counted-org").pk)
    for agent_id in agent_ids:
        agent = agent_create(
            agent_id=agent_id, tier_code="CUSTOM", custom_limits={"AI_TOKENS": 10**9, "COMPUTE_MS": 10**9}
        )
        agent_team_set(agent=agent, team_id=team.pk)
        budget_create(scope="agent", scope_id=agent_id, window="day", limit_usd="1000")
    # Budgets at every level, so that reading, locking and charging them is counted too.
    budget_create(scope="team", scope_id="counted", window="month", limit_usd="1000")
    budget_create(scope="organization", scope_id="counted-org", window="week", limit_usd="1000")

    def items(size: int, run: str) -> list[dict]:
        return [
            {
                "agent_id": agent_ids[n % 5],
                "resource_type": "AI_TOKENS" if n % 2 else "COMPUTE_MS",
                "amount": 1 + n,
                "idempotency_key": f"{run}-{n}",
            }
            for n in range(size)
        ]

    _ok(_post(operator_client, _usage_url(), items(10, "warm")))  # opens the periods, records the key's use
    counts = {}
    for size in (10, 1000):
        with CaptureQueriesContext(connection) as queries:
            body = _ok(_post(operator_client, _usage_url(), items(size, f"run-{size}")))
        assert body["summary"]["accepted"] == size
        counts[size] = [query["sql"] or "" for query in queries.captured_queries]
    assert len(counts[10]) == len(counts[1000]), counts
    # After authentication: SAVEPOINT (the request); agents; quota rows; SET CONSTRAINTS (PostgreSQL);
    # SAVEPOINT (the attempt); read the budgets, the quotas; stored keys; INSERT allocations, usage rows;
    # lock the budgets charged, UPDATE them; lock the quotas taken from; UPDATE quotas; INSERT keys;
    # RELEASE; audit; RELEASE
    frame = next(i for i, sql in enumerate(counts[1000]) if sql.startswith("SAVEPOINT"))
    assert len(counts[1000][frame:]) <= 18, counts[1000]
    # Quota rows are locked in the order every writer locks several in: by agent, then id.
    locks = [sql for sql in counts[1000] if "FOR NO KEY UPDATE OF q" in sql]
    assert locks and all("ORDER BY q.agent_id, q.id FOR NO KEY UPDATE" in sql for sql in locks)


@pytest.mark.django_db(transaction=True)
def test_a_batch_whose_quota_moved_after_its_read_decides_again_and_never_overspends():
    """Another allocation takes most of the quota between the batch's unlocked read and its confirmation:
    the batch finds that out under the lock, rolls its attempt back and decides again on what is left."""
    import threading

    from allocation.services import allocation_create

    reference_data_load()
    agent = agent_create(agent_id="moved", tier_code="CUSTOM", custom_limits={"AI_TOKENS": 10_000})
    quota_open(agent=agent, resource_type_id="AI_TOKENS")  # not by the batch: the rival would wait for it
    _, raw_key = operator_key_issue(username="ops")
    statements: list[str] = []

    def take_most_of_the_quota():
        try:
            allocation_create(agent=Agent.objects.get(pk="moved"), resource_type_id="AI_TOKENS", amount=9_000)
        finally:
            connections.close_all()

    def wrapper(execute, sql, params, many, context):
        statements.append(sql)
        # The first lock of the quotas taken from, after the rows were written: commit a rival first.
        if "FOR NO KEY UPDATE" in sql and not any("FOR NO KEY UPDATE" in s for s in statements[:-1]):
            rival = threading.Thread(target=take_most_of_the_quota)
            rival.start()
            rival.join(timeout=30)
        return execute(sql, params, many, context)

    items = [{"agent_id": "moved", "resource_type": "AI_TOKENS", "amount": 400} for _ in range(5)]
    with connection.execute_wrapper(wrapper):
        body = _ok(_post(client_with_key(raw_key), _usage_url(), items))

    # Read alone the batch would have taken all five (2,000 of 10,000); after the rival, 1,000 are left.
    assert _statuses(body) == [201, 201, 429, 429, 429]
    assert body["results"][2]["error"]["details"]["available"] == 200
    assert body["summary"] == {"accepted": 2, "refused": 3, "replayed": 0}
    inserts = [s for s in statements if s.startswith('INSERT INTO "allocation_allocation"')]
    assert len(inserts) == 2  # the first attempt's rows were rolled back, then written again
    quota = _assert_ledger_matches(agent.pk)
    assert quota.used == 9_800 and quota.limit == 10_000
    assert Allocation.objects.filter(agent_id="moved").count() == 3


def _rows_read_from(table: str) -> int:
    """Rows this transaction has read from ``table`` so far, by sequential and index scans."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0) FROM pg_stat_xact_user_tables "
            "WHERE relname = %s",
            [table],
        )
        row = cursor.fetchone()
    return row[0] if row else 0


def test_reading_the_stored_item_keys_reads_only_the_batchs_own_keys(operator_client):
    """An operator's keys pile up all day: the batch must probe the (principal, key) index for its own keys,
    not read every record of the principal. Without statistics on the table (as before its first ANALYZE),
    the keys joined as a set-returning function got a hash join over all of them."""
    from allocation.batch import ITEM_KEY_PREFIX, _results_read

    principal = "operator:piled-up"
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO allocation_idempotencyrecord "
            "(principal, key, method, path, request_hash, response_status, response_body, created_at) "
            "SELECT %s, %s || 'old-' || n, 'POST', '/api/v1/usage/batch', 'h' || n, 201, "
            "jsonb_build_object('error', 'x'), now() FROM generate_series(1, 50000) AS n",
            [principal, ITEM_KEY_PREFIX],
        )
    table = IdempotencyRecord._meta.db_table
    before = _rows_read_from(table)
    keys = [f"old-{n}" for n in range(1, 4)] + [f"new-{n}" for n in range(997)]
    stored = _results_read(keys, principal=principal)
    assert sorted(stored) == ["old-1", "old-2", "old-3"]
    assert stored["old-2"].fingerprint == "h2"
    assert _rows_read_from(table) - before <= 10


# --- Units set aside for sale -------------------------------------------------------------------------------


def test_a_batch_cannot_take_units_listed_for_sale(reference_data):
    """The batch twin of test_listing_sets_the_units_aside_until_sold_or_expired."""
    from optimization.services.marketplace import deal_list

    agent, client = _custom_agent("lister", AI_TOKENS=1_000)
    deal_list(agent=agent, resource_type_id="AI_TOKENS", amount=300, unit_price_usd=Decimal("0.0000005"))

    body = _ok(_post(client, _agent_url("lister"), [{"resource_type": "AI_TOKENS", "amount": 1}] * 1_000))

    assert _statuses(body).count(201) == 700
    assert set(_statuses(body)[700:]) == {429}
    quota = _assert_ledger_matches("lister")
    assert (quota.used, quota.listed, quota.limit) == (700, 300, 1_000)
    assert quota.used + quota.reserved + quota.listed <= quota.limit

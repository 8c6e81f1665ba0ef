"""The batch routes' fast ingestion path: msgspec reads the body, rows are written set-based, orjson writes
the answer. What it must keep: every item exact under concurrency, idempotent, and on the ledger's record
(an allocation and a usage row per accepted item, its stored result under its key, the batch's audit
record); and the same answers as the serializers for every item it takes."""

from __future__ import annotations

import io
import json
from collections import Counter
from decimal import Decimal

import pytest
from django.db import connection
from django.db.models import Sum
from django.test import RequestFactory
from django.urls import reverse
from rest_framework.exceptions import ParseError, ValidationError

from allocation.api.batch import (
    BatchItemIn,
    BatchJSONParser,
    ParsedBatch,
    UsageBatchItemIn,
    _item_fast,
    _items_fast,
)
from allocation.api.shared.idempotency import request_fingerprint
from allocation.api.shared.parsers import GridJSONParser
from allocation.keys import operator_key_issue
from allocation.models import Allocation, AuditRecord, IdempotencyRecord
from allocation.sql import int_array, text_array
from ledger.models import Quota, UsageLog
from ledger.services import agent_create, reference_data_load

pytest.register_assert_rewrite("tests.api_fixtures")

from tests.api_fixtures import client_with_key  # noqa: E402

pytest_plugins = ["tests.api_fixtures"]

pytestmark = pytest.mark.django_db

USAGE_PATH = "/api/v1/usage/batch"


def _usage_url() -> str:
    return reverse("api:usage-batch")


def _ok(response) -> dict:
    assert response.status_code == 200, (response.status_code, response.content[:500])
    return response.json()


def _ledger_matches(agent_id: str, resource_type: str = "AI_TOKENS") -> Quota:
    """The quota's counters equal the sums of its usage rows and of its committed allocations."""
    quota = Quota.objects.get(agent_id=agent_id, resource_type_id=resource_type)
    usage = UsageLog.objects.filter(quota=quota)
    assert (usage.aggregate(total=Sum("amount"))["total"] or 0) == quota.used
    assert (usage.aggregate(total=Sum("cost_usd"))["total"] or Decimal(0)) == quota.spent_usd
    allocations = Allocation.objects.filter(quota=quota, status="committed")
    assert (allocations.aggregate(total=Sum("amount"))["total"] or 0) == quota.used
    return quota


class _View:
    items_name_agents = True


def _parse(raw: bytes, *, with_agent: bool = True):
    view = _View()
    view.items_name_agents = with_agent
    return BatchJSONParser().parse(io.BytesIO(raw), parser_context={"view": view})


# --- Parsing: what the project's parser refuses, the fast parser refuses alike ---

REFUSED_BODIES = [
    b'{"items": [{"agent_id": "a", "resource_type": "AI_TOKENS", "amount": 1, "task_id": "\\u0000"}]}',
    b'{"items": [{"agent_id": "a", "resource_type": "AI_TOKENS", "amount": 1, "task_id": "\\ud800"}]}',
    b'{"items": [{"agent_id": "a", "resource_type": "AI_TOKENS", "amount": 1, "metadata": {"x": 1e400}}]}',
    b'{"items": [{"agent_id": "a", "resource_type": "AI_TOKENS", "amount": 1, "metadata": {"x": NaN}}]}',
    b'{"items": [{"agent_id": "a", "resource_type": "AI_TOKENS", "amount": 1, "metadata": '
    + b'{"x": ' * 40
    + b"1"
    + b"}" * 41
    + b"]}",
    b'{"items": [',
]


@pytest.mark.parametrize("raw", REFUSED_BODIES)
def test_the_batch_parser_refuses_what_the_projects_parser_refuses_with_its_message(raw):
    with pytest.raises(ParseError) as expected:
        GridJSONParser().parse(io.BytesIO(raw))
    with pytest.raises(ParseError) as fast:
        _parse(raw)
    assert str(fast.value.detail) == str(expected.value.detail)


def test_the_batch_parser_reads_the_same_values_as_the_projects_parser():
    raw = json.dumps(
        {
            "items": [
                {"agent_id": "a", "resource_type": "AI_TOKENS", "amount": 2**53, "metadata": {"n": 2**70}},
                {
                    "agent_id": "b",
                    "resource_type": "AI_TOKENS",
                    "amount": 1,
                    "metadata": {"f": 0.1, "é": "ü"},
                },
            ]
        }
    ).encode()
    body = _parse(raw)
    assert isinstance(body, ParsedBatch) and body.typed is not None
    assert body == GridJSONParser().parse(io.BytesIO(raw))


# --- The fast path takes only what the serializers take, with the same data and fingerprint ---

ITEMS = [
    {"resource_type": "AI_TOKENS", "amount": 1},
    {"resource_type": "AI_TOKENS", "amount": 2**53, "task_id": "", "metadata": {}},
    {
        "resource_type": "COMPUTE_MS",
        "amount": 5,
        "task_id": "job 7",
        "idempotency_key": "k 1",
        "metadata": {"a": [1]},
    },
    {"resource_type": "AI_TOKENS", "amount": 5, "idempotency_key": 'quote " and \\ backslash'},
    {"resource_type": "AI_TOKENS", "amount": 5, "idempotency_key": "ключ"},
    {"resource_type": "AI_TOKENS", "amount": 5, "idempotency_key": "k", "metadata": {"f": 1e16, "s": "é"}},
    {"resource_type": " AI_TOKENS ", "amount": 5},
    {"resource_type": "AI_TOKENS", "amount": 5, "task_id": " padded"},
    {"resource_type": "AI_TOKENS", "amount": 5, "task_id": "padded "},
    {"resource_type": "AI_TOKENS", "amount": 5, "task_id": "tab\there"},
    {"resource_type": "AI_TOKENS", "amount": 5, "task_id": "del\x7f"},
    {"resource_type": "AI_TOKENS", "amount": 5, "task_id": 12},
    {"resource_type": "AI_TOKENS", "amount": 5, "idempotency_key": " spaced"},
    {"resource_type": "AI_TOKENS", "amount": 5, "idempotency_key": ""},
    {"resource_type": "AI_TOKENS", "amount": 5, "idempotency_key": "k" * 250},
    {"resource_type": "AI_TOKENS", "amount": 5, "idempotency_key": "k" * 251},
    {"resource_type": "AI_TOKENS", "amount": 5, "task_id": "é" * 200},
    {"resource_type": "AI_TOKENS", "amount": 5, "task_id": "é" * 201},
    {"resource_type": "AI_TOKENS", "amount": 5, "run_id": "r" * 201},
    {"resource_type": "AI_TOKENS", "amount": True},
    {"resource_type": "AI_TOKENS", "amount": 1.0},
    {"resource_type": "AI_TOKENS", "amount": "1"},
    {"resource_type": "AI_TOKENS", "amount": 0},
    {"resource_type": "AI_TOKENS", "amount": 2**53 + 1},
    {"resource_type": "GOLD", "amount": 1},
    {"resource_type": "AI_TOKENS", "amount": 1, "hold": True},
    {"resource_type": "AI_TOKENS", "amount": 1, "metadata": None},
    {"resource_type": "AI_TOKENS", "amount": 1, "metadata": {"blob": "x" * 5000}},
]


def _request(path: str):
    return RequestFactory().post(path)


@pytest.mark.parametrize("raw", ITEMS)
@pytest.mark.parametrize("with_agent", [False, True])
def test_the_fast_path_takes_only_what_the_serializer_takes_and_alike(reference_data, raw, with_agent):
    if with_agent:
        raw = {**raw, "agent_id": "agent-1"}
    serializer = UsageBatchItemIn() if with_agent else BatchItemIn()
    try:
        expected = serializer.run_validation(raw)
    except ValidationError:
        expected = None
    body = _parse(json.dumps({"items": [raw, raw]}).encode(), with_agent=with_agent)
    request = _request(USAGE_PATH)
    items = _items_fast(request, body, None if with_agent else "route-agent")
    if items is None:
        return  # the serializers read it (tests/test_batch.py holds what they answer)
    assert expected is not None, raw
    assert _item_fast(raw, with_agent=with_agent) == dict(expected)
    for item in items:
        assert item.agent_id == (expected["agent_id"] if with_agent else "route-agent")
        assert (item.resource_type_id, item.amount) == (expected["resource_type"], expected["amount"])
        assert (item.task_id, item.run_id, dict(item.metadata)) == (
            expected["task_id"],
            expected["run_id"],
            expected["metadata"],
        )
        assert item.idempotency_key == expected.get("idempotency_key", "")
        fingerprint = (
            request_fingerprint(method="POST", path=USAGE_PATH, body=raw) if "idempotency_key" in raw else ""
        )
        assert item.fingerprint == fingerprint
        assert item.error is None


def test_array_literals_read_back_as_the_values(db):
    values = ["", "plain", 'a "quote"', "back\\slash", "{braces}, commas", "NULL", "ключ", " spaced "]
    with connection.cursor() as cursor:
        cursor.execute("SELECT %s::text[], %s::bigint[]", [text_array(values), int_array([1, -2, 2**53])])
        assert cursor.fetchone() == (values, [1, -2, 2**53])
        cursor.execute("SELECT %s::text[], %s::bigint[]", [text_array([]), int_array([])])
        assert cursor.fetchone() == ([], [])


# --- On the record, idempotent, exact ---


def test_every_accepted_item_is_on_the_record_once(reference_data, operator_client):
    for agent_id in ("rec-0", "rec-1"):
        agent_create(agent_id=agent_id, tier_code="CUSTOM", custom_limits={"AI_TOKENS": 10_000})
    items = [
        {
            "agent_id": f"rec-{n % 2}",
            "resource_type": "AI_TOKENS",
            "amount": 100 + n,
            "task_id": f"t-{n}",
            "idempotency_key": f"rec-key-{n}",
            **({"metadata": {"step": n}} if n % 3 == 0 else {}),
        }
        for n in range(30)
    ]
    body = _ok(operator_client.post(_usage_url(), {"items": items}, format="json"))
    assert body["summary"] == {"accepted": 30, "refused": 0, "replayed": 0}
    for item, result in zip(items, body["results"], strict=True):
        allocation_id = result["allocation"]["id"]
        allocation = Allocation.objects.get(pk=allocation_id)
        assert (allocation.agent_id, allocation.amount, allocation.task_id) == (
            item["agent_id"],
            item["amount"],
            item["task_id"],
        )
        usage = UsageLog.objects.get(idempotency_key=item["idempotency_key"])
        assert (usage.agent_id, usage.amount, usage.cost_usd) == (
            item["agent_id"],
            item["amount"],
            allocation.cost_usd,
        )
        assert usage.metadata == {**item.get("metadata", {}), "allocation_id": allocation_id}
        record = IdempotencyRecord.objects.get(key="item:" + item["idempotency_key"])
        assert record.response_body == {"allocation_id": allocation_id}
        assert record.request_hash == request_fingerprint(method="POST", path=_usage_url(), body=item)
    assert Allocation.objects.count() == UsageLog.objects.count() == IdempotencyRecord.objects.count() == 30
    audit = AuditRecord.objects.get(action="usage.batch")
    assert audit.request_body["accepted"] == 30
    assert sorted(audit.request_body["agent_ids"]) == ["rec-0", "rec-1"]
    for agent_id in ("rec-0", "rec-1"):
        _ledger_matches(agent_id)


def test_replaying_a_whole_batch_by_its_item_keys_answers_the_same_and_charges_nothing(
    reference_data, operator_client
):
    agent_create(agent_id="replayed", tier_code="CUSTOM", custom_limits={"AI_TOKENS": 1_000})
    items = [
        {"agent_id": "replayed", "resource_type": "AI_TOKENS", "amount": 300, "idempotency_key": f"r-{n}"}
        for n in range(5)
    ]
    first = _ok(operator_client.post(_usage_url(), {"items": items}, format="json"))
    assert [r["status"] for r in first["results"]] == [201, 201, 201, 429, 429]
    used = _ledger_matches("replayed").used
    counts = (Allocation.objects.count(), UsageLog.objects.count(), IdempotencyRecord.objects.count())

    again = _ok(operator_client.post(_usage_url(), {"items": items}, format="json"))
    # The accepted ones replay their result; the refused ones left their keys free, and are refused again.
    for before, after in zip(first["results"][:3], again["results"][:3], strict=True):
        assert after == {**before, "replayed": True}
    assert [r["status"] for r in again["results"][3:]] == [429, 429]
    assert again["summary"] == {"accepted": 0, "refused": 2, "replayed": 3}
    assert _ledger_matches("replayed").used == used == 900
    assert (Allocation.objects.count(), UsageLog.objects.count(), IdempotencyRecord.objects.count()) == counts


@pytest.mark.django_db(transaction=True)
def test_overlapping_batches_on_one_agent_never_overspend_and_charge_each_key_once():
    """Threads post batches to one agent whose quota runs out among them; the batches share some keys.
    The quota ends exactly full, every key is charged at most once, and the rows match the answers."""
    from tests.concurrency import race

    reference_data_load()
    limit = 7_777
    agent_create(agent_id="crowded", tier_code="CUSTOM", custom_limits={"AI_TOKENS": limit})
    _, raw_key = operator_key_issue(username="ops")

    def post(i):
        items = [
            {
                "agent_id": "crowded",
                "resource_type": "AI_TOKENS",
                "amount": 7 + (n % 5),
                "idempotency_key": f"shared-{n}" if n % 4 == 0 else f"own-{i}-{n}",
            }
            for n in range(200)
        ]
        response = client_with_key(raw_key).post(_usage_url(), {"items": items}, format="json")
        return response.status_code, response.json(), items

    outcomes = race(6, post)
    assert [status for status, _, _ in outcomes] == [200] * 6
    charged: Counter[str] = Counter()
    taken = 0
    for _, body, items in outcomes:
        for result, item in zip(body["results"], items, strict=True):
            assert result["status"] in (201, 429), result
            if result["status"] == 201 and not result.get("replayed"):
                charged[item["idempotency_key"]] += 1
                taken += item["amount"]
    assert set(charged.values()) == {1}
    quota = _ledger_matches("crowded")
    assert quota.used == taken
    assert limit - 11 < quota.used <= limit  # full: no item of at most 11 units still fits
    assert Allocation.objects.count() == UsageLog.objects.count() == len(charged)
    assert IdempotencyRecord.objects.filter(key__startswith="item:").count() == len(charged)
    assert AuditRecord.objects.filter(action="usage.batch").count() == 6


def test_a_batch_that_all_fits_is_decided_as_item_by_item_would(reference_data, monkeypatch):
    """The whole-batch decision (every item fits its quota and budgets) against the decision item by item,
    on two twin agents: the same answers, counters and budget charges."""
    from allocation.batch import BatchItem, _Decider, allocations_batch_create
    from ledger.budgets import agent_team_set, budget_create, team_create
    from ledger.models import Budget

    for twin in ("fast", "slow"):
        team = team_create(id=f"team-{twin}")
        agent = agent_create(
            agent_id=f"twin-{twin}",
            tier_code="CUSTOM",
            custom_limits={"AI_TOKENS": 10**9, "COMPUTE_MS": 10**9},
        )
        agent_team_set(agent=agent, team_id=team.pk)
        budget_create(scope="agent", scope_id=agent.pk, window="day", limit_usd="1000")
        budget_create(scope="team", scope_id=team.pk, window="month", limit_usd="1000", mode="soft")

    def items(twin: str) -> list[BatchItem]:
        return [
            BatchItem(
                agent_id=f"twin-{twin}",
                resource_type_id="AI_TOKENS" if n % 3 else "COMPUTE_MS",
                amount=1 + n % 7,
                task_id=f"t-{n}",
                metadata={"n": n} if n % 5 == 0 else {},
                idempotency_key=f"{twin}-{n}" if n % 2 else "",
                fingerprint=f"fp-{n}" if n % 2 else "",
            )
            for n in range(60)
        ]

    from django.utils import timezone

    now = timezone.now()
    whole = _Decider._all_fit
    decided_whole = []

    def spy(self, items):
        results = whole(self, items)
        decided_whole.append(results is not None)
        return results

    monkeypatch.setattr(_Decider, "_all_fit", spy)
    fast = allocations_batch_create(items=items("fast"), principal="ops", path="/batch", now=now)
    assert decided_whole == [True]
    monkeypatch.setattr(_Decider, "_all_fit", lambda self, items: None)
    slow = allocations_batch_create(items=items("slow"), principal="ops", path="/batch", now=now)

    def comparable(results: list[dict]) -> list[dict]:
        return [
            {**result, "allocation": {**result["allocation"], "id": "", "agent_id": ""}} for result in results
        ]

    assert comparable(fast.results) == comparable(slow.results)
    assert fast.summary == slow.summary == {"accepted": 60, "refused": 0, "replayed": 0}
    for resource_type in ("AI_TOKENS", "COMPUTE_MS"):
        quotas = [_ledger_matches(f"twin-{twin}", resource_type) for twin in ("fast", "slow")]
        assert quotas[0].used == quotas[1].used > 0
        assert quotas[0].spent_usd == quotas[1].spent_usd
    for scope, scope_id in (("agent", "twin-{}"), ("team", "team-{}")):
        spent = [
            Budget.objects.get(scope=scope, **{f"{scope}_id": scope_id.format(twin)}).spent_usd
            for twin in ("fast", "slow")
        ]
        assert spent[0] == spent[1] > 0
    for twin in ("fast", "slow"):
        assert IdempotencyRecord.objects.filter(key__startswith=f"item:{twin}-").count() == 30
        usage = UsageLog.objects.filter(agent_id=f"twin-{twin}")
        assert usage.count() == 60
        assert usage.get(task_id="t-5").metadata["n"] == 5

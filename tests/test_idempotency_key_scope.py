"""Idempotency records carry their agent: an agent's keys are unique per agent (``agent_id, key``), an
operator's per operator (``principal, key``, ``agent_id`` null), so that the table can be distributed by agent
(docs/scaling.md). Single requests, agents' batches and operators' batches all write and read them so."""

from __future__ import annotations

import importlib

import pytest
from django.db import IntegrityError, connection, transaction
from django.db.migrations.executor import MigrationExecutor
from django.utils import timezone

from allocation.api.shared.idempotency import IDEMPOTENCY_UNIQUE, key_scope, principal_agent_id
from allocation.models import IdempotencyRecord
from ledger.models import Quota

# The agent_a, agent_b and operator_client fixtures.
pytest_plugins = ["tests.api_fixtures"]
pytestmark = pytest.mark.django_db

ALLOCATIONS = "/api/v1/agents/{}/allocations"


def _allocate(keyed, amount: int, key: str):
    return keyed.client.post(
        ALLOCATIONS.format(keyed.id),
        {"resource_type": "AI_TOKENS", "amount": amount},
        format="json",
        HTTP_IDEMPOTENCY_KEY=key,
    )


def _used(agent_id: str) -> int:
    return Quota.objects.get(agent_id=agent_id, resource_type_id="AI_TOKENS").used


def test_principal_agent_id_reads_the_agent_of_an_agents_key_only():
    assert principal_agent_id("agent:agent-a") == "agent-a"
    assert principal_agent_id("agent:ops:x") == "ops:x"
    assert principal_agent_id("operator:ops") is None
    assert key_scope("agent:a").sql() == ("agent_id = %s", ["a"])
    assert key_scope("operator:ops").sql() == ("agent_id IS NULL AND principal = %s", ["operator:ops"])


def test_a_single_requests_record_names_its_agent_and_replays_from_it(agent_a, agent_b):
    assert _allocate(agent_a, 1000, "k-1").status_code == 201
    assert _allocate(agent_b, 2000, "k-1").status_code == 201  # another agent's key space
    replay = _allocate(agent_a, 1000, "k-1")

    assert replay.status_code == 201
    assert replay["Idempotent-Replayed"] == "true"
    assert set(IdempotencyRecord.objects.values_list("agent_id", "principal", "key")) == {
        ("agent-a", "agent:agent-a", "k-1"),
        ("agent-b", "agent:agent-b", "k-1"),
    }
    assert (_used("agent-a"), _used("agent-b")) == (1000, 2000)


def test_batches_store_the_agent_for_an_agents_route_and_none_for_an_operators(agent_a, operator_client):
    item = {"resource_type": "AI_TOKENS", "amount": 5, "idempotency_key": "i-1"}
    own = agent_a.client.post(f"{ALLOCATIONS.format('agent-a')}/batch", {"items": [item]}, format="json")
    ops = operator_client.post(
        "/api/v1/usage/batch", {"items": [{**item, "agent_id": "agent-a"}]}, format="json"
    )
    assert own.status_code == ops.status_code == 200, (own.content, ops.content)
    assert set(IdempotencyRecord.objects.values_list("agent_id", "principal", "key")) == {
        ("agent-a", "agent:agent-a", "item:i-1"),
        (None, "operator:ops", "item:i-1"),
    }
    replayed = operator_client.post(
        "/api/v1/usage/batch", {"items": [{**item, "agent_id": "agent-a"}]}, format="json"
    )
    assert replayed.json()["summary"] == {"accepted": 0, "refused": 0, "replayed": 1}
    assert _used("agent-a") == 10


@pytest.mark.parametrize(
    ("first", "second", "unique"),
    [
        (("agent:a", "a"), ("agent:a", "a"), True),
        ((None, "operator:ops"), (None, "operator:ops"), True),
        (("agent:a", "a"), ("agent:b", "b"), False),
        ((None, "operator:ops"), (None, "operator:other"), False),
    ],
)
def test_each_key_space_has_its_own_unique_index(first, second, unique):
    def record(principal_and_agent):
        principal, agent_id = principal_and_agent if principal_and_agent[0] else principal_and_agent[::-1]
        return IdempotencyRecord(
            principal=principal, agent_id=agent_id, key="k", method="POST", path="/p", request_hash="h",
            response_status=201, created_at=timezone.now(),
        )  # fmt: skip

    record(first).save()
    if not unique:
        record(second).save()
        assert IdempotencyRecord.objects.count() == 2
        return
    with pytest.raises(IntegrityError) as raised, transaction.atomic():
        record(second).save()
    assert raised.value.__cause__.diag.constraint_name in IDEMPOTENCY_UNIQUE


@pytest.mark.django_db(transaction=True)
def test_the_migration_fills_the_agent_of_existing_records_in_chunks(reference_data, monkeypatch):
    migration = importlib.import_module("allocation.migrations.0011_idempotency_agent_key")
    monkeypatch.setattr(migration, "BACKFILL_CHUNK", 2)  # several chunks for five records
    executor = MigrationExecutor(connection)
    executor.migrate([("allocation", "0010_audit_trail_partitioned")])
    try:
        with connection.cursor() as cursor:
            principals = ["agent:a", "operator:ops", "agent:b", "agent:a", "operator:x"]
            for index, principal in enumerate(principals):
                cursor.execute(
                    "INSERT INTO allocation_idempotencyrecord (principal, key, method, path, request_hash, "
                    "created_at) VALUES (%s, %s, 'POST', '/p', 'h', now())",
                    [principal, f"k-{index}"],
                )
    finally:
        executor = MigrationExecutor(connection)
        executor.loader.build_graph()
        executor.migrate(executor.loader.graph.leaf_nodes())

    assert sorted(IdempotencyRecord.objects.values_list("key", "agent_id")) == [
        ("k-0", "a"),
        ("k-1", None),
        ("k-2", "b"),
        ("k-3", "a"),
        ("k-4", None),
    ]

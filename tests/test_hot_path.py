"""The allocation hot path: one statement per allocation, the cached agent key, the reused serializers.

Each shortcut must answer exactly as the general path it replaces: same responses, same refusals, nothing
written by a refused allocation but its audit record, revocations and throttles applying at once.
"""

from __future__ import annotations

import pytest
from django.db import IntegrityError, connection, transaction
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone
from rest_framework import serializers

from allocation import services, sql
from allocation.api.serializers import AllocationIn, AllocationOut, allocation_in, allocation_in_fast
from allocation.api.shared.auth import agent_key_cache
from allocation.api.shared.errors import exception_response
from allocation.keys import api_key_revoke, key_hash
from allocation.models import Allocation, AuditRecord, IdempotencyRecord
from allocation.representation import allocation_body
from allocation.sql import KeyRevoked
from ledger.errors import AgentThrottled, QuotaExceeded
from ledger.models import Agent, Quota, UsageLog
from ledger.services import agent_set_status

pytest.register_assert_rewrite("tests.api_fixtures")

from tests.api_fixtures import PRO_AI_TOKENS, assert_error, ledger_snapshot  # noqa: E402

pytest_plugins = ["tests.api_fixtures"]

pytestmark = pytest.mark.django_db


def _allocate(
    keyed, amount: int, *, agent_id: str | None = None, idempotency_key: str | None = None, **extra
):
    headers = {} if idempotency_key is None else {"HTTP_IDEMPOTENCY_KEY": idempotency_key}
    return keyed.client.post(
        reverse("api:allocations", args=[agent_id or keyed.id]),
        {"resource_type": "AI_TOKENS", "amount": amount, **extra},
        format="json",
        **headers,
    )


def _used(agent_id: str) -> int:
    return sum(
        Quota.objects.filter(agent_id=agent_id, resource_type_id="AI_TOKENS").values_list("used", flat=True)
    )


# --- Reused serializers -----------------------------------------------------------------------------------


FAST_PATH_BODIES = [
    {"resource_type": "AI_TOKENS", "amount": 2**53, "task_id": "", "hold": False},
    {"resource_type": "COMPUTE_MS", "amount": 1, "hold": True, "hold_ttl_seconds": 604800},
    {"resource_type": "AI_TOKENS", "amount": 5, "hold": True, "hold_ttl_seconds": 604801},
    {"resource_type": "AI_TOKENS", "amount": 5, "hold_ttl_seconds": "60"},
    {"resource_type": "AI_TOKENS", "amount": 5, "hold_ttl_seconds": 60.0},
    {"resource_type": "AI_TOKENS", "amount": 5, "hold_ttl_seconds": True},
    {"resource_type": "AI_TOKENS", "amount": 5, "hold_ttl_seconds": None},
    {"resource_type": "AI_TOKENS", "amount": 5, "hold": "true"},
    {"resource_type": "AI_TOKENS", "amount": 5, "hold": 1},
    {"resource_type": "AI_TOKENS", "amount": 5, "hold": None},
    {"resource_type": " AI_TOKENS ", "amount": 5},
    {"resource_type": "", "amount": 5},
    {"resource_type": None, "amount": 5},
    {"resource_type": "AI_TOKENS", "amount": 5.0},
    {"resource_type": "AI_TOKENS", "amount": -1},
    {"resource_type": "AI_TOKENS", "amount": 5, "task_id": " padded "},
    {"resource_type": "AI_TOKENS", "amount": 5, "task_id": "tab\there"},
    {"resource_type": "AI_TOKENS", "amount": 5, "task_id": 12},
    {"resource_type": "AI_TOKENS", "amount": 5, "task_id": None},
    {"resource_type": "AI_TOKENS", "amount": 5, "task_id": "é" * 200},
    {"resource_type": "AI_TOKENS", "amount": 5, "task_id": "é" * 201},
    [{"resource_type": "AI_TOKENS", "amount": 5}],
    "AI_TOKENS",
]


@pytest.mark.parametrize("body", FAST_PATH_BODIES)
def test_the_fast_input_check_accepts_only_what_the_serializer_accepts_and_alike(reference_data, body):
    fresh = AllocationIn(data=body)
    fast = allocation_in_fast(body)
    if fast is not None:
        assert fresh.is_valid(), fresh.errors
        assert fast == dict(fresh.validated_data)


def test_the_fast_input_check_takes_the_plain_bodies(reference_data):
    for body in FAST_PATH_BODIES[:2]:
        assert allocation_in_fast(body) == dict(AllocationIn(data=body).run_validation(body))


@pytest.mark.parametrize(
    "body",
    [
        {"resource_type": "AI_TOKENS", "amount": 5},
        {"resource_type": "AI_TOKENS", "amount": 5, "task_id": "t-1", "hold": True, "hold_ttl_seconds": 60},
        {"resource_type": "AI_TOKENS", "amount": "5"},
        {"resource_type": "AI_TOKENS", "amount": 2**53 + 1},
        {"resource_type": "AI_TOKENS", "amount": 0},
        {"resource_type": "AI_TOKENS", "amount": True},
        {"resource_type": "NOPE", "amount": 5},
        {"amount": 5},
        {"resource_type": "AI_TOKENS", "amount": 5, "colour": "red"},
        {"resource_type": "AI_TOKENS", "amount": 5, "hold_ttl_seconds": 0},
        {},
        *FAST_PATH_BODIES,
    ],
)
def test_reused_input_serializer_answers_like_a_new_one(reference_data, body):
    fresh = AllocationIn(data=body)
    if fresh.is_valid():
        assert allocation_in.validated(body) == fresh.validated_data
        return
    with pytest.raises(serializers.ValidationError) as raised:
        allocation_in.validated(body)
    expected = exception_response(serializers.ValidationError(fresh.errors))
    assert exception_response(raised.value).data == expected.data


def test_the_hot_paths_body_of_an_allocation_is_what_its_serializer_gives(agent_a):
    committed = services.allocation_create(agent=agent_a.agent, resource_type_id="AI_TOKENS", amount=1234)
    held = services.allocation_create(
        agent=agent_a.agent, resource_type_id="AI_TOKENS", amount=500, hold=True, task_id="t"
    )
    open_hold = Allocation.objects.get(pk=held.pk)
    settled = services.hold_settle(agent=agent_a.agent, allocation_id=held.pk, amount=300)
    to_release = services.allocation_create(
        agent=agent_a.agent, resource_type_id="COMPUTE_MS", amount=7, hold=True, task_id="r"
    )
    released = services.hold_release(agent=agent_a.agent, allocation_id=to_release.pk)
    read_back = Allocation.objects.get(pk=committed.pk)

    for allocation in (committed, held, open_hold, settled, released, read_back):
        assert allocation_body(allocation) == AllocationOut(allocation).data


def test_the_usage_listings_rows_are_what_the_serializer_gives(agent_a):
    from allocation.api.serializers import UsageOut
    from allocation.representation import USAGE_COLUMNS, usage_body

    services.allocation_create(agent=agent_a.agent, resource_type_id="AI_TOKENS", amount=1234, task_id="t")
    held = services.allocation_create(
        agent=agent_a.agent, resource_type_id="COMPUTE_MS", amount=500, hold=True, idempotency_key="k"
    )
    services.hold_settle(agent=agent_a.agent, allocation_id=held.pk, amount=3)
    services.allocation_create(
        agent=agent_a.agent, resource_type_id="AI_TOKENS", amount=7, metadata={"model": "x", "n": [1.5]}
    )

    rows = UsageLog.objects.filter(agent_id=agent_a.id).order_by("id")
    values = rows.values(*USAGE_COLUMNS)
    assert len(values) == 3
    for row, instance in zip(values, rows, strict=True):
        assert usage_body(row) == UsageOut(instance).data


def test_allocation_response_is_what_was_written(agent_a):
    created = _allocate(agent_a, 1000, task_id="task-7")

    assert created.status_code == 201
    detail = agent_a.client.get(reverse("api:allocation", args=[agent_a.id, created.json()["id"]]))
    assert detail.json() == created.json()
    usage = UsageLog.objects.get()
    assert usage.metadata == {"allocation_id": created.json()["id"]}
    assert str(usage.cost_usd) == created.json()["cost_usd"]


# --- The cached agent key ---------------------------------------------------------------------------------


def test_revoking_a_cached_key_refuses_its_next_allocation(agent_a):
    assert _allocate(agent_a, 10).status_code == 201
    assert agent_key_cache.get(key_hash(agent_a.raw_key)) is not None
    api_key_revoke(api_key=agent_a.api_key)  # leaves the cache alone, as a revocation in another process does
    before, audited = ledger_snapshot(), AuditRecord.objects.count()

    plain = _allocate(agent_a, 10)
    idempotent = _allocate(agent_a, 10, idempotency_key="after-revoke")

    assert_error(plain, 401, "invalid_api_key")
    assert_error(idempotent, 401, "invalid_api_key")
    assert ledger_snapshot() == before
    assert AuditRecord.objects.count() == audited  # a refused key is not audited, as on every route
    assert agent_key_cache.get(key_hash(agent_a.raw_key)) is None


@pytest.mark.parametrize(
    ("status", "http_status", "code"),
    [(Agent.Status.THROTTLED, 429, "agent_throttled"), (Agent.Status.SUSPENDED, 403, "agent_suspended")],
)
def test_a_status_change_applies_to_the_next_allocation_of_a_cached_key(agent_a, status, http_status, code):
    assert _allocate(agent_a, 10).status_code == 201
    agent_set_status(agent=Agent.objects.get(pk=agent_a.id), status=status, reason="budget")
    before = ledger_snapshot()

    details = assert_error(_allocate(agent_a, 10), http_status, code)

    assert details["reason"] == "budget"
    assert ledger_snapshot() == before
    assert AuditRecord.objects.latest("id").outcome == code
    agent_set_status(agent=Agent.objects.get(pk=agent_a.id), status=Agent.Status.ACTIVE)
    assert _allocate(agent_a, 10).status_code == 201
    assert _used(agent_a.id) == 20


def test_a_cached_key_cannot_allocate_for_another_agent(agent_a, agent_b):
    assert _allocate(agent_a, 10).status_code == 201
    before = ledger_snapshot()

    response = _allocate(agent_a, 10, agent_id=agent_b.id)

    assert_error(response, 404, "not_found")
    assert ledger_snapshot() == before


# --- Idempotency keys answered after the attempt ----------------------------------------------------------


def test_a_key_replays_even_when_the_quota_is_now_used_up(agent_a):
    first = _allocate(agent_a, 1000, idempotency_key="order-1")
    assert _allocate(agent_a, PRO_AI_TOKENS - 1000).status_code == 201

    again = _allocate(agent_a, 1000, idempotency_key="order-1")

    assert again.status_code == 201
    assert again["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()
    assert _used(agent_a.id) == PRO_AI_TOKENS
    assert AuditRecord.objects.count() == 2


def test_a_key_replays_even_when_the_agent_is_now_throttled(agent_a):
    first = _allocate(agent_a, 1000, idempotency_key="order-2")
    agent_set_status(agent=Agent.objects.get(pk=agent_a.id), status=Agent.Status.THROTTLED)

    again = _allocate(agent_a, 1000, idempotency_key="order-2")

    assert (again.status_code, again["Idempotent-Replayed"]) == (201, "true")
    assert again.json() == first.json()


def test_a_used_key_with_another_invalid_body_is_422(agent_a):
    assert _allocate(agent_a, 1000, idempotency_key="order-3").status_code == 201
    before = ledger_snapshot()

    response = agent_a.client.post(
        reverse("api:allocations", args=[agent_a.id]),
        {"resource_type": "AI_TOKENS", "amount": "lots"},
        format="json",
        HTTP_IDEMPOTENCY_KEY="order-3",
    )

    assert_error(response, 422, "idempotency_key_reused")
    assert ledger_snapshot() == before


# --- One statement ----------------------------------------------------------------------------------------


def test_a_refused_first_allocation_of_the_period_leaves_no_quota_row(agent_a):
    details = assert_error(_allocate(agent_a, PRO_AI_TOKENS + 1), 429, "quota_exceeded")

    details.pop("resets_at")
    assert details == {
        "resource_type": "AI_TOKENS",
        "requested": PRO_AI_TOKENS + 1,
        "available": PRO_AI_TOKENS,
    }
    assert not Quota.objects.filter(agent_id=agent_a.id).exists()
    assert AuditRecord.objects.get().outcome == "quota_exceeded"


def _record(agent_id: str, key: str) -> dict:
    """An idempotency record for ``grid_allocate`` to write with the allocation."""
    return {
        "idempotency": {
            "principal": f"agent:{agent_id}",
            "key": key,
            "method": "POST",
            "path": "/p",
            "request_hash": "h",
            "response_status": 201,
            "response_body": {},
            "created_at": timezone.now(),
        }
    }


def _draft(keyed, amount: int = 10, **options):
    return services.allocation_prepare(
        agent=keyed.agent, resource_type_id="AI_TOKENS", amount=amount, **options
    )


def test_a_record_that_fails_undoes_the_allocation(agent_a):
    services.allocation_write(_draft(agent_a), record=_record(agent_a.id, "k"))
    before = ledger_snapshot()

    with pytest.raises(IntegrityError):
        services.allocation_write(_draft(agent_a), record=_record(agent_a.id, "k"))

    assert ledger_snapshot() == before
    # The caller's transaction (here the test's) is still usable.
    services.allocation_create(agent=agent_a.agent, resource_type_id="AI_TOKENS", amount=10)
    assert _used(agent_a.id) == 20


def test_a_revoked_key_refuses_and_writes_nothing(agent_a):
    # The period is open: the refusal is not the first allocation's.
    services.allocation_create(agent=agent_a.agent, resource_type_id="AI_TOKENS", amount=10)
    api_key_revoke(api_key=agent_a.api_key)
    before = ledger_snapshot()

    with pytest.raises(KeyRevoked):
        services.allocation_write(
            _draft(agent_a), api_key_id=agent_a.api_key.pk, record=_record(agent_a.id, "k")
        )

    assert ledger_snapshot() == before
    assert not IdempotencyRecord.objects.exists()


def test_allocations_join_the_callers_transaction(agent_a):
    with transaction.atomic():
        services.allocation_create(agent=agent_a.agent, resource_type_id="AI_TOKENS", amount=100)
        with pytest.raises(QuotaExceeded):
            services.allocation_create(
                agent=agent_a.agent, resource_type_id="AI_TOKENS", amount=PRO_AI_TOKENS
            )
        services.allocation_create(agent=agent_a.agent, resource_type_id="AI_TOKENS", amount=200)
        assert _used(agent_a.id) == 300
        transaction.set_rollback(True)

    assert not Allocation.objects.exists()
    assert not UsageLog.objects.exists()
    assert not Quota.objects.filter(agent_id=agent_a.id).exists()


def test_allocation_takes_the_agent_status_from_the_database(agent_a):
    stale = Agent.objects.get(pk=agent_a.id)
    agent_set_status(agent=Agent.objects.get(pk=agent_a.id), status=Agent.Status.THROTTLED, reason="budget")

    with pytest.raises(AgentThrottled):
        services.allocation_create(agent=stale, resource_type_id="AI_TOKENS", amount=10)

    assert stale.status == Agent.Status.ACTIVE
    assert not Allocation.objects.exists()


@pytest.mark.django_db(transaction=True)  # in autocommit, as a request runs: no savepoint
def test_an_allocation_over_http_is_one_statement(agent_a):
    assert _allocate(agent_a, 1).status_code == 201  # the key is now cached and the period open

    with CaptureQueriesContext(connection) as queries:
        response = _allocate(agent_a, 2, idempotency_key="one-trip")

    assert response.status_code == 201
    assert [query["sql"].split("(")[0] for query in queries.captured_queries] == ["SELECT grid_allocate"]
    assert IdempotencyRecord.objects.get(key="one-trip").response_body == response.json()
    assert AuditRecord.objects.filter(idempotency_key="one-trip", outcome="ok").count() == 1
    assert _used(agent_a.id) == 3


def test_a_hold_reserves_and_writes_no_usage_row(agent_a):
    allocation = services.allocation_write(_draft(agent_a, 40, hold=True, hold_ttl_seconds=60))

    quota = Quota.objects.get(pk=allocation.quota_id)
    assert (quota.used, quota.reserved, quota.spent_usd) == (0, 40, 0)
    assert Allocation.objects.get(pk=allocation.pk).status == Allocation.Status.HELD
    assert not UsageLog.objects.exists()


def test_the_databases_functions_are_the_modules(agent_a):
    """A change to allocation/sql.py needs a migration that runs it: until then this fails."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT proname, oidvectortypes(proargtypes), prosrc FROM pg_proc WHERE proname = ANY(%s)",
            [list(sql.FUNCTION_SIGNATURES)],
        )
        installed = {name: (arguments, text) for name, arguments, text in cursor.fetchall()}
    # Each function once (an old signature left behind would be a second row), with the module's text.
    assert sorted(installed) == sorted(sql.FUNCTION_SIGNATURES)
    bodies = dict(
        zip(
            [part.split("(")[0].split()[-1] for part in sql.FUNCTIONS_SQL.split("$fn$")[0::2][:-1]],
            sql.FUNCTIONS_SQL.split("$fn$")[1::2],
            strict=True,
        )
    )
    for name, (arguments, text) in installed.items():
        assert text == bodies[name], name
        assert arguments.replace("timestamp with time zone", "timestamptz") == sql.FUNCTION_SIGNATURES[name]


def test_the_check_constraint_counts_listed_units(agent_a):
    allocation = services.allocation_create(agent=agent_a.agent, resource_type_id="AI_TOKENS", amount=10)

    with pytest.raises(IntegrityError), transaction.atomic():
        Quota.objects.filter(pk=allocation.quota_id).update(listed=PRO_AI_TOKENS - 9)

    Quota.objects.filter(pk=allocation.quota_id).update(listed=PRO_AI_TOKENS - 10)
    with pytest.raises(QuotaExceeded):
        services.allocation_create(agent=agent_a.agent, resource_type_id="AI_TOKENS", amount=1)


def test_the_allocation_call_is_prepared_on_the_server_after_a_few_uses(agent_a):
    for _ in range(8):
        services.allocation_create(agent=agent_a.agent, resource_type_id="AI_TOKENS", amount=1)

    with connection.cursor() as cursor:
        cursor.execute("SELECT statement FROM pg_prepared_statements")
        statements = [statement for (statement,) in cursor.fetchall()]
    assert any(statement.startswith("SELECT grid_allocate(") for statement in statements), statements
    assert _used(agent_a.id) == 8

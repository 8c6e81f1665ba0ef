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

from allocation import services
from allocation.api.auth import agent_key_cache
from allocation.api.errors import exception_response
from allocation.api.serializers import AllocationIn, AllocationOut, allocation_in, allocation_in_fast
from allocation.keys import api_key_revoke, key_hash
from allocation.models import Allocation, ApiKey, AuditRecord, IdempotencyRecord
from allocation.representation import allocation_body
from ledger.errors import QuotaExceeded
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

    assert details == {
        "resource_type": "AI_TOKENS",
        "requested": PRO_AI_TOKENS + 1,
        "available": PRO_AI_TOKENS,
    }
    assert not Quota.objects.filter(agent_id=agent_a.id).exists()
    assert AuditRecord.objects.get().outcome == "quota_exceeded"


def _stored_response(agent_id: str, key: str) -> services.CompanionRow:
    return services.CompanionRow(
        IdempotencyRecord,
        {
            "principal": f"agent:{agent_id}",
            "key": key,
            "method": "POST",
            "path": "/p",
            "request_hash": "h",
            "response_status": 201,
            "response_body": {},
            "created_at": timezone.now(),
        },
    )


def test_a_companion_that_fails_undoes_the_allocation(agent_a):
    services.allocation_create(
        agent=agent_a.agent,
        resource_type_id="AI_TOKENS",
        amount=10,
        also_write=[_stored_response(agent_a.id, "k")],
    )
    before = ledger_snapshot()

    with pytest.raises(IntegrityError):
        services.allocation_create(
            agent=agent_a.agent,
            resource_type_id="AI_TOKENS",
            amount=10,
            also_write=[_stored_response(agent_a.id, "k")],
        )

    assert ledger_snapshot() == before
    # The caller's transaction (here the test's) is still usable.
    services.allocation_create(agent=agent_a.agent, resource_type_id="AI_TOKENS", amount=10)
    assert _used(agent_a.id) == 20


def test_a_missing_required_row_refuses_and_writes_nothing(agent_a):
    # The period is open: the refusal is not the first allocation's.
    services.allocation_create(agent=agent_a.agent, resource_type_id="AI_TOKENS", amount=10)
    api_key_revoke(api_key=agent_a.api_key)
    before = ledger_snapshot()

    with pytest.raises(services.RequirementNotMet):
        services.allocation_create(
            agent=agent_a.agent,
            resource_type_id="AI_TOKENS",
            amount=10,
            also_write=[_stored_response(agent_a.id, "k")],
            requires=[services.RequiredRow(ApiKey, {"pk": agent_a.api_key.pk, "revoked_at": None})],
        )

    assert ledger_snapshot() == before


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

    with pytest.raises(services.AgentThrottled):
        services.allocation_create(agent=stale, resource_type_id="AI_TOKENS", amount=10)

    assert stale.status == Agent.Status.ACTIVE
    assert not Allocation.objects.exists()


def test_the_allocation_statement_is_prepared_on_the_server(agent_a):
    for _ in range(3):
        services.allocation_create(agent=agent_a.agent, resource_type_id="AI_TOKENS", amount=1)

    with connection.cursor() as cursor:
        cursor.execute("SELECT statement FROM pg_prepared_statements")
        statements = [statement for (statement,) in cursor.fetchall()]
    assert any(statement.startswith("WITH taken AS (") for statement in statements)


def test_a_refusal_keeps_the_statement_prepared(agent_a):
    # psycopg forgets its prepared statements on any rollback: refusals must not need one.
    services.allocation_create(agent=agent_a.agent, resource_type_id="AI_TOKENS", amount=1)
    agent_set_status(agent=Agent.objects.get(pk=agent_a.id), status=Agent.Status.THROTTLED)

    with CaptureQueriesContext(connection) as queries, pytest.raises(services.AgentThrottled):
        services.allocation_create(agent=agent_a.agent, resource_type_id="AI_TOKENS", amount=1)
    agent_set_status(agent=Agent.objects.get(pk=agent_a.id), status=Agent.Status.ACTIVE)
    with CaptureQueriesContext(connection) as more, pytest.raises(QuotaExceeded):
        services.allocation_create(agent=agent_a.agent, resource_type_id="AI_TOKENS", amount=PRO_AI_TOKENS)

    captured = [*queries.captured_queries, *more.captured_queries]
    assert captured[0]["sql"].startswith("WITH taken AS (")  # the query log shows prepared statements too
    kinds = [query["sql"].split()[0].upper() for query in captured]
    assert "SAVEPOINT" not in kinds and "ROLLBACK" not in kinds
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE 'WITH taken AS (%%'")
        assert cursor.fetchone()[0] >= 1


@pytest.mark.django_db(transaction=True)  # it closes the connection: no test transaction around it
def test_the_hot_path_keeps_one_cursor_per_connection(agent_a):
    """The hot path's cursor is made once per psycopg connection (it keeps the dumpers it looked up), is
    still usable after a statement failed, and is made anew after a reconnection."""
    services.allocation_create(agent=agent_a.agent, resource_type_id="AI_TOKENS", amount=1)
    kept = services._kept_cursor(connection)
    with pytest.raises(IntegrityError):
        services.allocation_create(
            agent=agent_a.agent,
            resource_type_id="AI_TOKENS",
            amount=1,
            also_write=[_stored_response(agent_a.id, "k"), _stored_response(agent_a.id, "k")],
        )
    services.allocation_create(agent=agent_a.agent, resource_type_id="AI_TOKENS", amount=2)

    assert services._kept_cursor(connection) is kept and not kept.closed
    assert _used(agent_a.id) == 3
    old_connection = connection.connection
    connection.close()
    connection.ensure_connection()
    fresh = services._kept_cursor(connection)
    assert fresh is not kept and fresh.connection is connection.connection is not old_connection


def test_the_statements_parameters_are_what_the_fields_would_prepare(agent_a):
    """``_columns_and_params`` skips ``get_db_prep_save`` for the fields whose preparation hands the value
    over as it is on PostgreSQL; the parameters must be the same as with it, for every row of the
    statement."""
    from django.test import RequestFactory

    from allocation.audit import audit_values
    from allocation.idempotency import idempotency_values
    from allocation.models import AuditRecord, IdempotencyRecord

    draft = services.allocation_prepare(
        agent=agent_a.agent, resource_type_id="AI_TOKENS", amount=7, task_id="t-1", idempotency_key="k-1"
    )
    hold = services.allocation_prepare(
        agent=agent_a.agent, resource_type_id="AI_TOKENS", amount=7, hold=True, hold_ttl_seconds=60
    )
    request = RequestFactory().post("/x", {"amount": 7}, content_type="application/json")
    rows = [
        (Allocation, services._allocation_values(draft.allocation)),
        (Allocation, services._allocation_values(hold.allocation)),
        (UsageLog, services._usage_values(draft)),
        (
            AuditRecord,
            audit_values(
                request=request,
                actor="agent:a",
                action="allocation.create",
                agent_id=agent_a.id,
                status_code=201,
                outcome="ok",
                body={"amount": 7},
            ),
        ),
        (
            IdempotencyRecord,
            idempotency_values(
                principal="agent:a",
                key="k-1",
                method="POST",
                path="/x",
                fingerprint="f" * 64,
                status=201,
                body={"ok": True},
            ),
        ),
    ]
    for model, values in rows:
        _, params = services._columns_and_params(connection, model, values)
        fields = [model._meta.get_field(name) for name in values]
        pairs = zip(fields, values.values(), strict=True)
        prepared = [field.get_db_prep_save(value, connection) for field, value in pairs]
        assert [repr(p) for p in params] == [repr(p) for p in prepared], model

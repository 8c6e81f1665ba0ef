"""The usage log and the audit trail are append-only in PostgreSQL itself: UPDATE and DELETE are refused
with a clear error, whoever sends them (the ORM, raw SQL, a shell)."""

from __future__ import annotations

import pytest
from django.db import DatabaseError, connection, transaction

from allocation import services
from allocation.api.shared.audit import audit_record
from allocation.models import AuditRecord
from ledger.models import UsageLog

pytest_plugins = ["tests.api_fixtures"]
pytestmark = pytest.mark.django_db


@pytest.fixture
def rows(agent_a, rf):
    services.allocation_create(agent=agent_a.agent, resource_type_id="AI_TOKENS", amount=10)
    request = rf.post("/x")
    audit_record(
        request=request, actor="t", action="a", agent_id=agent_a.id, status_code=201, outcome="ok", body={}
    )
    return UsageLog.objects.get(), AuditRecord.objects.get()


@pytest.mark.parametrize(
    ("table", "statement"),
    [
        ("usage_logs", "UPDATE usage_logs SET amount = amount + 1"),
        ("usage_logs", "DELETE FROM usage_logs"),
        ("allocation_auditrecord", "UPDATE allocation_auditrecord SET outcome = 'rewritten'"),
        ("allocation_auditrecord", "DELETE FROM allocation_auditrecord"),
    ],
)
def test_raw_updates_and_deletes_are_refused(rows, table, statement):
    operation = statement.split()[0]
    refused = pytest.raises(DatabaseError, match=f"{table} is append-only: {operation} is refused")
    with refused, transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(statement)
    usage, audit = rows
    assert UsageLog.objects.get().amount == usage.amount == 10
    assert AuditRecord.objects.get().outcome == audit.outcome == "ok"


def test_the_orm_is_refused_too(rows):
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
        UsageLog.objects.update(task_id="edited")
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
        AuditRecord.objects.all().delete()
    assert UsageLog.objects.filter(task_id="edited").count() == 0
    assert AuditRecord.objects.count() == 1


def test_appending_still_works(rows, agent_a):
    services.allocation_create(agent=agent_a.agent, resource_type_id="AI_TOKENS", amount=5)
    assert UsageLog.objects.count() == 2

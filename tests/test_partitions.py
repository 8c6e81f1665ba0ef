"""Monthly partitions of the append-only tables and retention (ledger/partitions.py), on real PostgreSQL.

Months here are fixed dates relative to a controlled clock, never today's: the services take ``now``.
"""

from __future__ import annotations

import csv
import datetime as dt
import gzip
from decimal import Decimal

import pytest
from django.core.management.color import no_style
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from allocation import services
from allocation.models import Allocation
from ledger import partitions
from ledger.models import Quota, UsageLog
from ledger.partitions import month_add, month_start, partition_create, partition_name, partitions_ahead
from optimization.models import Alert, AlertDelivery, Execution, ScalingEvent
from tests.factories import AgentFactory

pytestmark = pytest.mark.django_db

BY_TIME = ["usage_logs", "allocation_auditrecord", "optimization_execution", "optimization_scalingevent"]
PARTITIONED = [*BY_TIME, "allocation_allocation"]  # allocations by id (tests/test_allocation_partitions.py)
NOV = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
DEC = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)


def _query(sql: str, params=()) -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall()


def _partition_of(table: str, row_id: int) -> str:
    return _query(f"SELECT tableoid::regclass::text FROM {table} WHERE id = %s", [row_id])[0][0]


def _execution(agent, created_at: dt.datetime) -> Execution:
    return Execution.objects.create(
        agent=agent,
        superpower="search",
        duration_ms=5,
        success=True,
        cost_usd=Decimal("0.01"),
        created_at=created_at,
    )


@pytest.fixture
def agent(reference_data):
    return AgentFactory(id="part-agent", tier_id="PRO")


def test_the_ledger_tables_are_partitioned_by_month_and_alerts_are_not():
    found = dict(
        _query(
            "SELECT c.relname, p.partstrat FROM pg_partitioned_table p "
            "JOIN pg_class c ON c.oid = p.partrelid WHERE c.relname = ANY(%s)",
            [[*PARTITIONED, "optimization_alert"]],
        )
    )
    assert found == dict.fromkeys(PARTITIONED, "r")
    for table in BY_TIME:
        key = _query(
            "SELECT pg_get_partkeydef(to_regclass(%s)), pg_get_constraintdef(c.oid) FROM pg_constraint c "
            "WHERE c.conrelid = to_regclass(%s) AND c.contype = 'p'",
            [table, table],
        )
        assert key == [("RANGE (created_at)", "PRIMARY KEY (id, created_at)")]
        assert partitions.default_partition_name(table) in partitions.attached_partitions(table)
        # Ids come from a sequence owned by the column, as Django's flush and sequence reset expect.
        assert _query("SELECT pg_get_serial_sequence(%s, 'id')", [table]) == [(f"public.{table}_id_seq",)]


def test_the_foreign_keys_and_checks_still_hold_on_every_partition(agent):
    foreign_keys = dict(
        _query(
            "SELECT conrelid::regclass::text, count(*) FROM pg_constraint WHERE contype = 'f' "
            "AND conrelid = ANY(%s::regclass[]) GROUP BY 1",
            [PARTITIONED],
        )
    )
    assert foreign_keys == {
        "usage_logs": 1,
        "optimization_execution": 1,
        "optimization_scalingevent": 2,
        "allocation_allocation": 1,
    }
    for row in (
        {"agent_id": "nobody", "created_at": DEC},
        {"agent_id": "nobody", "created_at": dt.datetime(2001, 1, 1, tzinfo=dt.UTC)},  # the default partition
    ):
        with pytest.raises(IntegrityError), transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
            Execution.objects.create(
                superpower="s", duration_ms=1, success=True, cost_usd=Decimal("0"), **row
            )
    with pytest.raises(IntegrityError), transaction.atomic():
        Execution.objects.create(
            agent=agent, superpower="s", duration_ms=-1, success=True, cost_usd=Decimal("0"), created_at=DEC
        )


def test_the_migration_copies_the_rows_into_the_months_they_belong_to_and_can_be_undone(agent):
    now = timezone.now()
    events = [
        ScalingEvent.objects.create(
            agent=agent, direction="up", kind="horizontal", trigger="manual", before=1, after=2, reason="r",
            created_at=at,
        )
        for at in (dt.datetime(2001, 3, 4, tzinfo=dt.UTC), NOV, now)
    ]  # fmt: skip
    with connection.cursor() as cursor:
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")  # a table with checks pending cannot be rebuilt
        partitions.table_unpartition(cursor, "optimization_scalingevent")
        assert not partitions.is_partitioned("optimization_scalingevent", cursor=cursor)
        assert _query("SELECT pg_get_serial_sequence('optimization_scalingevent', 'id')") != [(None,)]
        partitions.table_partition(cursor, "optimization_scalingevent", now=now)

    # A partition for each month with rows, none for the months between, and the months ahead.
    attached = partitions.attached_partitions("optimization_scalingevent")
    assert {"optimization_scalingevent_p200103", "optimization_scalingevent_p202611"} <= set(attached)
    assert "optimization_scalingevent_p200104" not in attached
    assert partition_name("optimization_scalingevent", month_add(month_start(now), 3)) in attached
    assert _partition_of("optimization_scalingevent", events[0].pk) == "optimization_scalingevent_p200103"
    assert set(ScalingEvent.objects.values_list("pk", "created_at")) == {(e.pk, e.created_at) for e in events}
    later = ScalingEvent.objects.create(
        agent=agent, direction="down", kind="horizontal", trigger="manual", before=2, after=1, reason="r",
        created_at=now,
    )  # fmt: skip
    assert later.pk > max(event.pk for event in events)  # the ids go on after the old table's


def test_the_migration_made_this_month_and_the_three_after():
    current = month_start(timezone.now())
    for table in PARTITIONED:
        attached = partitions.attached_partitions(table)
        for offset in range(4):
            assert partition_name(table, month_add(current, offset)) in attached


def test_rows_go_to_the_partition_of_their_month_or_the_default_one(agent):
    partition_create(table="optimization_execution", month=NOV)
    late_november = _execution(agent, NOV + dt.timedelta(days=29, hours=23, minutes=59, seconds=59))
    first_of_december = _execution(agent, DEC)
    long_ago = _execution(agent, dt.datetime(2001, 5, 5, tzinfo=dt.UTC))

    assert _partition_of("optimization_execution", late_november.pk) == "optimization_execution_p202611"
    assert _partition_of("optimization_execution", first_of_december.pk) == "optimization_execution_p202612"
    assert _partition_of("optimization_execution", long_ago.pk) == "optimization_execution_default"
    assert Execution.objects.get(pk=long_ago.pk).created_at.year == 2001  # read back through the parent
    assert late_november.pk < first_of_december.pk < long_ago.pk  # one sequence for every partition


def test_creating_partitions_ahead_is_idempotent_and_moves_the_default_partitions_rows(agent):
    now = dt.datetime(2031, 1, 15, tzinfo=dt.UTC)
    # Rows of months that have no partition yet, usage rows among them (their table refuses DELETE).
    usage = services.allocation_create(agent=agent, resource_type_id="AI_TOKENS", amount=10, now=now)
    usage_row = UsageLog.objects.get(agent=agent, created_at=now)
    assert _partition_of("usage_logs", usage_row.pk) == "usage_logs_default"
    later = ScalingEvent.objects.create(
        agent=agent, direction="up", kind="horizontal", trigger="manual", before=1, after=2, reason="test",
        created_at=dt.datetime(2031, 3, 31, 23, 59, tzinfo=dt.UTC),
    )  # fmt: skip
    beyond = ScalingEvent.objects.create(
        agent=agent, direction="up", kind="horizontal", trigger="manual", before=2, after=3, reason="test",
        created_at=dt.datetime(2031, 9, 1, tzinfo=dt.UTC),
    )  # fmt: skip

    created = partitions_ahead(now=now, ahead=2)

    months = ["203101", "203102", "203103"]
    assert sorted(created) == sorted(f"{table}_p{month}" for table in PARTITIONED for month in months)
    assert _partition_of("usage_logs", usage_row.pk) == "usage_logs_p203101"
    assert _partition_of("optimization_scalingevent", later.pk) == "optimization_scalingevent_p203103"
    assert _partition_of("optimization_scalingevent", beyond.pk) == "optimization_scalingevent_default"
    # Moved, not copied: every row once, the ledger's counters still its sum.
    assert UsageLog.objects.filter(agent=agent, created_at=now).count() == 1
    assert ScalingEvent.objects.filter(agent=agent).count() == 2
    quota = Quota.objects.get(agent=agent, resource_type_id="AI_TOKENS", period_start=month_start(now))
    assert quota.used == 10 and usage.status == Allocation.Status.COMMITTED

    assert partitions_ahead(now=now, ahead=2) == []
    assert _partition_of("usage_logs", usage_row.pk) == "usage_logs_p203101"
    # The parent's append-only trigger still refuses deletes through the parent.
    with pytest.raises(Exception, match="append-only"), connection.cursor() as cursor, transaction.atomic():
        cursor.execute("DELETE FROM usage_logs WHERE id = %s", [usage_row.pk])


def test_retention_detaches_dumps_and_drops_only_partitions_past_it(agent, settings, tmp_path):
    now = dt.datetime(2027, 2, 10, tzinfo=dt.UTC)
    settings.GRID_RETENTION = {**settings.GRID_RETENTION, "executions": 2, "usage_logs": None}
    settings.GRID_RETENTION_DUMP_DIR = str(tmp_path / "dumps")
    months = [dt.datetime(2026, 10, 1, tzinfo=dt.UTC), dt.datetime(2026, 11, 1, tzinfo=dt.UTC), DEC]
    for month in months:
        partition_create(table="optimization_execution", month=month)
        partition_create(table="usage_logs", month=month)
    october = _execution(agent, dt.datetime(2026, 10, 31, 23, 0, tzinfo=dt.UTC))
    _execution(agent, dt.datetime(2026, 11, 30, 23, 59, tzinfo=dt.UTC))
    far_ahead = dt.datetime(2040, 1, 1, tzinfo=dt.UTC)  # in the default partition, after the cutoff
    kept = [_execution(agent, DEC), _execution(agent, now), _execution(agent, far_ahead)]
    ancient = _execution(agent, dt.datetime(2001, 1, 1, tzinfo=dt.UTC))  # in the default partition

    # The rows' deferred foreign-key checks are due now: a table with checks pending cannot be dropped, and
    # in production the rows of a month past retention were committed long ago.
    with connection.cursor() as cursor:
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
    result = partitions.partitions_maintain(now=now)

    # Two months kept before February: December and January. October and November go.
    assert sorted(result["dropped"]) == ["optimization_execution_p202610", "optimization_execution_p202611"]
    attached = partitions.attached_partitions("optimization_execution")
    assert "optimization_execution_p202610" not in attached and "optimization_execution_p202612" in attached
    assert _query("SELECT to_regclass('optimization_execution_p202610')") == [(None,)]
    # The default partition stays, without its rows from before the cutoff.
    assert set(Execution.objects.values_list("pk", flat=True)) == {row.pk for row in kept}
    assert "optimization_execution_default" in attached
    # The usage log keeps every month: its retention is None.
    assert {"usage_logs_p202610", "usage_logs_p202611"} <= set(partitions.attached_partitions("usage_logs"))

    with gzip.open(tmp_path / "dumps" / "optimization_execution_p202610.csv.gz", "rt", newline="") as dump:
        rows = list(csv.DictReader(dump))
    assert [(int(row["id"]), row["agent_id"], row["superpower"]) for row in rows] == [
        (october.pk, agent.pk, "search")
    ]
    with gzip.open(tmp_path / "dumps" / "optimization_execution_default_before_202612.csv.gz", "rt") as dump:
        assert [int(row["id"]) for row in csv.DictReader(dump)] == [ancient.pk]
    assert sorted(path.name for path in (tmp_path / "dumps").iterdir()) == [
        "optimization_execution_default_before_202612.csv.gz",
        "optimization_execution_p202610.csv.gz",
        "optimization_execution_p202611.csv.gz",
    ]
    # A second run finds nothing more to do.
    assert partitions.partitions_maintain(now=now)["dropped"] == []


def test_retention_finishes_a_partition_detached_by_an_interrupted_run(agent, settings):
    settings.GRID_RETENTION = {**settings.GRID_RETENTION, "scaling_events": 1}
    settings.GRID_RETENTION_DUMP_DIR = ""
    old = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
    partition_create(table="optimization_scalingevent", month=old)
    with connection.cursor() as cursor:
        cursor.execute(
            "ALTER TABLE optimization_scalingevent DETACH PARTITION optimization_scalingevent_p202606"
        )

    dropped = partitions.partitions_expire(table="optimization_scalingevent", months=1, now=DEC)

    assert dropped == ["optimization_scalingevent_p202606"]
    assert _query("SELECT to_regclass('optimization_scalingevent_p202606')") == [(None,)]


def test_a_query_bounded_by_time_reads_one_partition(agent):
    partition_create(table="usage_logs", month=NOV)
    plan = "\n".join(
        row[0]
        for row in _query(
            "EXPLAIN SELECT sum(cost_usd) FROM usage_logs WHERE created_at >= %s AND created_at < %s",
            [DEC, month_add(DEC, 1)],
        )
    )
    assert "usage_logs_p202612" in plan
    assert "usage_logs_p202611" not in plan and "usage_logs_default" not in plan
    # The ORM's queries bounded by a period (the readers of executions) are pruned the same way.
    executions = Execution.objects.filter(agent=agent, created_at__gte=DEC, created_at__lt=month_add(DEC, 1))
    plan = executions.explain()
    assert "optimization_execution_p202612" in plan and "optimization_execution_default" not in plan
    assert "_p202701" not in plan


def test_the_allocation_hot_path_works_across_a_month_boundary(agent):
    partition_create(table="usage_logs", month=NOV)
    before, after = DEC - dt.timedelta(seconds=5), DEC + dt.timedelta(seconds=5)
    hold = services.allocation_create(
        agent=agent, resource_type_id="AI_TOKENS", amount=4_000, hold=True, now=before
    )
    services.allocation_create(agent=agent, resource_type_id="AI_TOKENS", amount=1_000, now=before)
    services.hold_settle(agent=agent, allocation_id=hold.pk, amount=3_000, now=after)
    services.allocation_create(agent=agent, resource_type_id="AI_TOKENS", amount=2_000, now=after)

    placed = dict(
        _query(
            "SELECT kind || ':' || amount, tableoid::regclass::text FROM usage_logs WHERE agent_id = %s",
            [agent.pk],
        )
    )
    assert placed == {
        "allocation:1000": "usage_logs_p202611",
        "settlement:3000": "usage_logs_p202612",
        "allocation:2000": "usage_logs_p202612",
    }
    assert Allocation.objects.get(pk=hold.pk).status == Allocation.Status.SETTLED
    november = Quota.objects.get(agent=agent, resource_type_id="AI_TOKENS", period_start=NOV)
    december = Quota.objects.get(agent=agent, resource_type_id="AI_TOKENS", period_start=DEC)
    assert (november.used, november.reserved, december.used) == (4_000, 0, 2_000)


def test_alert_retention_deletes_old_rows_in_chunks(agent):
    now = dt.datetime(2027, 6, 10, tzinfo=dt.UTC)
    old = dt.datetime(2027, 1, 10, tzinfo=dt.UTC)

    def alert(key: str, created_at: dt.datetime, notified_at=None) -> Alert:
        row = Alert.objects.create(
            agent=agent, kind="rule", severity="info", title=key, message="m", dedup_key=key
        )
        Alert.objects.filter(pk=row.pk).update(created_at=created_at, notified_at=notified_at)
        return row

    gone = [alert("old", old), alert("old-too", old)]
    AlertDelivery.objects.create(alert=gone[0], channel="email", target="ops@example.com")
    still_sent = alert("old-but-still-notified", old, notified_at=dt.datetime(2027, 6, 1, tzinfo=dt.UTC))
    fresh = alert("fresh", dt.datetime(2027, 6, 1, tzinfo=dt.UTC))

    assert partitions.alerts_expire(months=3, now=now, chunk=1) == 2

    assert set(Alert.objects.values_list("pk", flat=True)) == {still_sent.pk, fresh.pk}
    assert not AlertDelivery.objects.filter(alert_id=gone[0].pk).exists()


@pytest.mark.django_db(transaction=True, reset_sequences=True)
def test_flush_and_sequence_reset_work_on_partitioned_tables(reference_data):
    agent = AgentFactory(id="flush-agent", tier_id="PRO")
    first = _execution(agent, timezone.now())
    _execution(agent, dt.datetime(2001, 1, 1, tzinfo=dt.UTC))
    tables = ["optimization_execution", "optimization_scalingevent", "usage_logs", "allocation_auditrecord"]
    with connection.cursor() as cursor:
        for statement in connection.ops.sql_flush(
            no_style(), tables, reset_sequences=True, allow_cascade=True
        ):
            cursor.execute(statement)
    assert Execution.objects.count() == 0
    assert _execution(agent, timezone.now()).pk == 1 <= first.pk


def test_the_periodic_task_is_scheduled_and_runs(settings):
    from ledger.schedules import SCHEDULES
    from ledger.tasks import partitions_maintain_task

    assert [task for _, task, _, _ in SCHEDULES] == ["ledger.partitions_maintain"]
    settings.GRID_PARTITIONS_AHEAD_MONTHS = 5
    result = partitions_maintain_task.apply().get()
    current = month_start(timezone.now())
    assert partition_name("usage_logs", month_add(current, 5)) in result["created"]
    assert partition_name("usage_logs", month_add(current, 5)) in partitions.attached_partitions("usage_logs")

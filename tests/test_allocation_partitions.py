"""Allocations partitioned by month on their version 7 UUID ids (ledger/partitions.py), on real PostgreSQL.

Months here are fixed dates: the partitions of long ago that the tests make never meet those the migration
made for the wall clock's month and the months after it.
"""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import uuid
from decimal import Decimal

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.utils import timezone

from allocation import services
from allocation.models import Allocation
from ledger import partitions
from ledger.models import Quota
from ledger.partitions import month_start, partition_create, partition_name, partitions_ahead
from tests.factories import AgentFactory

pytestmark = pytest.mark.django_db

TABLE = "allocation_allocation"
DEFAULT = "allocation_allocation_default"
# A version 4 id above every month's range: it belongs to no month.
NOT_UUID7 = uuid.UUID("f0000000-0000-4000-8000-000000000001")


def _query(sql: str, params=()) -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall()


def _partition_of(allocation_id) -> str:
    return _query(f"SELECT tableoid::regclass::text FROM {TABLE} WHERE id = %s", [allocation_id])[0][0]


def _uuid7_at(moment: dt.datetime) -> uuid.UUID:
    milliseconds = int(moment.timestamp() * 1000)
    value = milliseconds << 80 | (0x7 << 76) | (0x2 << 62) | uuid.uuid4().int & ((1 << 62) - 1)
    return uuid.UUID(int=value)


def _allocation(quota: Quota, created_at: dt.datetime, status: str = "committed", allocation_id=None):
    row = Allocation.objects.create(
        id=allocation_id or _uuid7_at(created_at), agent_id=quota.agent_id,
        resource_type_id=quota.resource_type_id, quota=quota, amount=1, unit_price_usd=Decimal("0.1"),
        status=status, created_at=created_at,
        expires_at=created_at + dt.timedelta(days=7) if status == "held" else None,
    )  # fmt: skip
    Allocation.objects.filter(pk=row.pk).update(created_at=created_at)  # auto_now_add set it at save
    row.created_at = created_at
    return row


@pytest.fixture
def agent(reference_data):
    return AgentFactory(id="alloc-part-agent", tier_id="PRO")


@pytest.fixture
def quota(agent) -> Quota:
    services.allocation_create(agent=agent, resource_type_id="AI_TOKENS", amount=1)
    return Quota.objects.get(agent=agent, period_start=month_start(timezone.now()))


def test_allocations_are_partitioned_by_range_on_their_id_with_a_default_partition():
    assert _query(
        "SELECT pg_get_partkeydef(to_regclass(%s)), pg_get_constraintdef(c.oid) FROM pg_constraint c "
        "WHERE c.conrelid = to_regclass(%s) AND c.contype = 'p'",
        [TABLE, TABLE],
    ) == [("RANGE (id)", "PRIMARY KEY (id)")]
    assert DEFAULT in partitions.attached_partitions(TABLE)
    assert _query("SELECT pg_get_serial_sequence(%s, 'id')", [TABLE]) == [(None,)]  # ids come from Python
    indexes = _query("SELECT relname, relkind FROM pg_class WHERE relname LIKE 'allocation\\_%%idx'")
    assert {"allocation_agent_time_idx", "allocation_open_hold_order_idx"} <= {name for name, _ in indexes}
    assert _query(
        "SELECT conname, condeferrable, condeferred FROM pg_constraint WHERE conrelid = to_regclass(%s) "
        "AND contype IN ('f', 'c') ORDER BY 1",
        [TABLE],
    ) == [
        ("allocation_allocation_quota_identity_fk", True, True),
        ("allocation_amount_positive", False, False),
        ("allocation_hold_expires", False, False),
    ]
    # Nothing references allocations by a foreign key, which a table partitioned on its key allows anyway.
    assert _query("SELECT conname FROM pg_constraint WHERE confrelid = to_regclass(%s)", [TABLE]) == []


def test_an_allocation_made_now_lands_in_this_months_partition_and_an_old_id_in_the_default(agent, quota):
    this_month = partition_name(TABLE, month_start(timezone.now()))
    committed = services.allocation_create(agent=agent, resource_type_id="AI_TOKENS", amount=5)
    hold = services.allocation_create(agent=agent, resource_type_id="AI_TOKENS", amount=7, hold=True)
    settled = services.hold_settle(agent=agent, allocation_id=hold.pk, amount=6)
    version_4 = _allocation(quota, timezone.now(), allocation_id=NOT_UUID7)

    assert _partition_of(committed.pk) == this_month
    assert _partition_of(hold.pk) == this_month
    assert settled.status == Allocation.Status.SETTLED
    assert _partition_of(version_4.pk) == DEFAULT
    assert Allocation.objects.get(pk=NOT_UUID7).amount == 1  # read back through the parent


def _scanned(plan: str) -> set[str]:
    """The partitions a plan reads, by themselves or by their primary-key index."""
    words = set(plan.replace("(", " ").split())
    return {name for name in partitions.attached_partitions(TABLE) if {name, f"{name}_pkey"} & words}


def test_a_lookup_by_id_reads_one_partition(agent, quota):
    allocation = services.allocation_create(agent=agent, resource_type_id="AI_TOKENS", amount=5)
    this_month = partition_name(TABLE, month_start(timezone.now()))
    for statement in (
        f"EXPLAIN SELECT * FROM {TABLE} WHERE id = %s",
        f"EXPLAIN UPDATE {TABLE} SET status = 'settled' WHERE id = %s AND status = 'held'",
    ):
        plan = "\n".join(row[0] for row in _query(statement, [allocation.pk]))
        assert _scanned(plan) == {this_month}
    plan = Allocation.objects.filter(pk=allocation.pk, agent_id=agent.pk).explain()
    assert _scanned(plan) == {this_month}
    # A version 4 id is looked up in the default partition only.
    plan = Allocation.objects.filter(pk=NOT_UUID7).explain()
    assert _scanned(plan) == {DEFAULT}


def test_maintenance_creates_the_months_ahead_and_moves_the_default_partitions_rows(quota):
    now = dt.datetime(2031, 1, 15, tzinfo=dt.UTC)
    february = _allocation(quota, dt.datetime(2031, 2, 28, 23, 59, 59, 999_000, tzinfo=dt.UTC), "held")
    beyond = _allocation(quota, dt.datetime(2031, 9, 1, tzinfo=dt.UTC))
    version_4 = _allocation(quota, dt.datetime(2031, 2, 1, tzinfo=dt.UTC), allocation_id=NOT_UUID7)
    assert {_partition_of(row.pk) for row in (february, beyond, version_4)} == {DEFAULT}

    created = partitions_ahead(now=now, ahead=2)

    assert {name for name in created if name.startswith(TABLE)} == {
        f"{TABLE}_p203101",
        f"{TABLE}_p203102",
        f"{TABLE}_p203103",
    }
    assert _partition_of(february.pk) == f"{TABLE}_p203102"
    assert _partition_of(beyond.pk) == DEFAULT
    assert _partition_of(version_4.pk) == DEFAULT
    # Moved, not copied, and still found by id.
    assert Allocation.objects.filter(pk=february.pk).count() == 1
    assert Allocation.objects.get(pk=february.pk).status == Allocation.Status.HELD
    assert partitions_ahead(now=now, ahead=2) == []
    bounds = dict(
        _query(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
            "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = to_regclass(%s)",
            [TABLE],
        )
    )
    # 2031-02-01 and 2031-03-01 at 00:00 UTC, in Unix milliseconds: 1927670400000 and 1930089600000.
    february_start, march_start = (uuid.UUID(int=ms << 80) for ms in (1927670400000, 1930089600000))
    assert bounds[f"{TABLE}_p203102"] == f"FOR VALUES FROM ('{february_start}') TO ('{march_start}')"


def test_retention_drops_and_dumps_an_old_month_but_keeps_one_with_an_open_hold(quota, settings, tmp_path):
    now = dt.datetime(2020, 6, 10, tzinfo=dt.UTC)  # three months kept before June: March to May
    settings.GRID_RETENTION = {**settings.GRID_RETENTION, "allocations": 3}
    settings.GRID_RETENTION_DUMP_DIR = str(tmp_path / "dumps")
    for month in (1, 2, 3):
        partition_create(table=TABLE, month=dt.datetime(2020, month, 1, tzinfo=dt.UTC))
    january = [_allocation(quota, dt.datetime(2020, 1, 10 + day, tzinfo=dt.UTC)) for day in range(2)]
    february_done = _allocation(quota, dt.datetime(2020, 2, 10, tzinfo=dt.UTC), "settled")
    february_open = _allocation(quota, dt.datetime(2020, 2, 28, tzinfo=dt.UTC), "held")
    march = _allocation(quota, dt.datetime(2020, 3, 1, tzinfo=dt.UTC))
    # Version 4 ids in the default partition: retention goes by their time of making, and keeps open holds.
    old_done = _allocation(quota, dt.datetime(2020, 1, 5, tzinfo=dt.UTC), allocation_id=NOT_UUID7)
    also_not_uuid7 = [uuid.UUID(f"f0000000-0000-4000-8000-00000000000{n}") for n in (2, 3)]
    old_open = _allocation(quota, dt.datetime(2020, 1, 5, tzinfo=dt.UTC), "held", also_not_uuid7[0])
    recent = _allocation(quota, now, allocation_id=also_not_uuid7[1])
    rows = [*january, february_done, february_open, march, old_done, old_open, recent]
    # The rows' deferred foreign-key checks are due now: a table with checks pending cannot be dropped.
    with connection.cursor() as cursor:
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")

    result = partitions.partitions_maintain(now=now)

    assert [name for name in result["dropped"] if name.startswith(TABLE)] == [f"{TABLE}_p202001"]
    assert result["kept"] == [f"{TABLE}_p202002"]
    attached = partitions.attached_partitions(TABLE)
    assert f"{TABLE}_p202001" not in attached and {f"{TABLE}_p202002", f"{TABLE}_p202003"} <= set(attached)
    assert _query(f"SELECT to_regclass('{TABLE}_p202001')") == [(None,)]
    kept = {february_done, february_open, march, old_open, recent}
    assert set(Allocation.objects.filter(pk__in=[row.pk for row in rows]).values_list("pk", flat=True)) == {
        row.pk for row in kept
    }
    assert _partition_of(february_open.pk) == f"{TABLE}_p202002"
    with gzip.open(tmp_path / "dumps" / f"{TABLE}_p202001.csv.gz", "rt", newline="") as dump:
        assert sorted(row["id"] for row in csv.DictReader(dump)) == sorted(str(row.pk) for row in january)
    with gzip.open(tmp_path / "dumps" / f"{DEFAULT}_before_202003.csv.gz", "rt", newline="") as dump:
        assert [row["id"] for row in csv.DictReader(dump)] == [str(old_done.pk)]

    # Once the hold has ended, the next run drops its month.
    Allocation.objects.filter(pk=february_open.pk).update(status="expired", finished_at=now)
    result = partitions.partitions_maintain(now=now)
    assert result["dropped"] == [f"{TABLE}_p202002"] and result["kept"] == []
    assert not Allocation.objects.filter(pk__in=[february_done.pk, february_open.pk]).exists()
    assert Allocation.objects.filter(pk__in=[march.pk, old_open.pk, recent.pk]).count() == 3


def test_allocations_are_kept_forever_by_default(quota, settings):
    assert settings.GRID_RETENTION["allocations"] is None
    partition_create(table=TABLE, month=dt.datetime(2001, 1, 1, tzinfo=dt.UTC))
    ancient = _allocation(quota, dt.datetime(2001, 1, 1, tzinfo=dt.UTC))
    with connection.cursor() as cursor:
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")

    partitions.partitions_maintain(now=dt.datetime(2031, 1, 1, tzinfo=dt.UTC))

    assert _partition_of(ancient.pk) == f"{TABLE}_p200101"


def _schema() -> dict:
    """The allocations' indexes, constraints and column defaults, as PostgreSQL prints them."""
    return {
        "indexes": sorted(
            definition.replace(" ON ONLY ", " ON ")
            for (definition,) in _query(
                "SELECT pg_get_indexdef(indexrelid) FROM pg_index WHERE indrelid = to_regclass(%s)", [TABLE]
            )
        ),
        "constraints": _query(
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = to_regclass(%s) "
            "ORDER BY 1",
            [TABLE],
        ),
        "defaults": _query(
            "SELECT column_name, column_default, is_nullable FROM information_schema.columns "
            "WHERE table_name = %s ORDER BY ordinal_position",
            [TABLE],
        ),
    }


@pytest.mark.django_db(transaction=True)
def test_the_migration_copies_the_rows_into_their_months_and_can_be_undone(reference_data):
    agent = AgentFactory(id="alloc-migrate-agent", tier_id="PRO")
    made_now = services.allocation_create(agent=agent, resource_type_id="AI_TOKENS", amount=3)
    quota = Quota.objects.get(pk=made_now.quota_id)
    partitioned = _schema()
    executor = MigrationExecutor(connection)
    executor.migrate([("allocation", "0011_idempotency_agent_key")])
    try:
        assert not partitions.is_partitioned(TABLE)
        plain = _schema()
        old_month = _allocation(quota, dt.datetime(2025, 3, 31, 23, 0, tzinfo=dt.UTC), "held")
        version_4 = _allocation(quota, dt.datetime(2025, 3, 1, tzinfo=dt.UTC), allocation_id=NOT_UUID7)
    finally:
        executor = MigrationExecutor(connection)
        executor.loader.build_graph()
        executor.migrate(executor.loader.graph.leaf_nodes())

    assert partitions.is_partitioned(TABLE)
    assert _schema() == partitioned
    attached = partitions.attached_partitions(TABLE)
    # A partition for each month with rows, none for the months between, and the months ahead.
    assert f"{TABLE}_p202503" in attached and f"{TABLE}_p202504" not in attached
    assert _partition_of(old_month.pk) == f"{TABLE}_p202503"
    assert _partition_of(version_4.pk) == DEFAULT
    assert _partition_of(made_now.pk) == partition_name(TABLE, month_start(timezone.now()))
    rows = {(row.pk, row.status, row.amount) for row in (made_now, old_month, version_4)}
    assert set(Allocation.objects.values_list("pk", "status", "amount")) == rows

    executor = MigrationExecutor(connection)
    executor.migrate([("allocation", "0011_idempotency_agent_key")])
    try:
        assert not partitions.is_partitioned(TABLE)
        assert _schema() == plain
        assert set(Allocation.objects.values_list("pk", "status", "amount")) == rows
    finally:
        executor = MigrationExecutor(connection)
        executor.loader.build_graph()
        executor.migrate(executor.loader.graph.leaf_nodes())
    assert partitions.is_partitioned(TABLE)

"""Hold expiry, idempotency cleanup and their beat schedules."""

from __future__ import annotations

import datetime as dt
import re

import pytest
from django.core.management import call_command
from django.db import connection, transaction
from django.db.models.expressions import RawSQL
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from allocation import services
from allocation.models import Allocation, IdempotencyRecord
from allocation.tasks import holds_expire_task, idempotency_cleanup_task
from ledger.bulk import bulk_update_columns, plan_by_key
from ledger.models import Quota
from ledger.services import agent_create
from tests.factories import fleet_create

pytestmark = pytest.mark.django_db


def _holds(count: int, *, agents: int = 1, ttl: int = 60, prefix: str = "holder"):
    made = []
    for a in range(agents):
        agent = agent_create(agent_id=f"{prefix}-{a}", tier_code="PRO")
        made += [
            services.allocation_create(
                agent=agent, resource_type_id="COMPUTE_MS", amount=100, hold=True, hold_ttl_seconds=ttl
            )
            for _ in range(count)
        ]
    return made


def test_expired_holds_are_released_and_live_ones_kept(reference_data):
    expired = _holds(3, ttl=60)
    agent = expired[0].agent
    live = services.allocation_create(
        agent=agent, resource_type_id="COMPUTE_MS", amount=50, hold=True, hold_ttl_seconds=3600
    )
    later = timezone.now() + dt.timedelta(minutes=5)
    assert services.holds_expire(now=later) == 3
    assert services.holds_expire(now=later) == 0  # running again releases nothing twice
    quota = Quota.objects.get(agent=agent, resource_type_id="COMPUTE_MS")
    assert (quota.used, quota.reserved) == (0, 50)
    assert set(
        Allocation.objects.filter(pk__in=[h.pk for h in expired]).values_list("status", flat=True)
    ) == {"expired"}
    assert Allocation.objects.get(pk=live.pk).status == "held"


def _expired_holds_fleet(agents: int, *, now) -> None:
    """``agents`` agents with two open holds of 100 COMPUTE_MS each, both past their expiry: written in
    bulk, as the sweep is what is tested."""
    ids = fleet_create(f"fleet{agents}", agents, at=now, resource_type="COMPUTE_MS")
    quotas = dict(Quota.objects.filter(agent_id__in=ids).values_list("agent_id", "pk"))
    Quota.objects.filter(agent_id__in=ids).update(reserved=200)
    Allocation.objects.bulk_create(
        Allocation(
            agent_id=agent_id,
            resource_type_id="COMPUTE_MS",
            quota_id=quotas[agent_id],
            amount=100,
            unit_price_usd=0,
            status=Allocation.Status.HELD,
            expires_at=now - dt.timedelta(minutes=1),
        )
        for agent_id in ids
        for _ in range(2)
    )


def test_expiry_sweep_query_count_does_not_grow_with_agents(reference_data):
    now = timezone.now()
    counts = []
    for agents in (10, 1000):
        _expired_holds_fleet(agents, now=now)
        with CaptureQueriesContext(connection) as ctx:
            assert services.holds_expire(now=now) == 2 * agents
        counts.append(len(ctx.captured_queries))
    assert counts[0] == counts[1]
    assert not Quota.objects.filter(reserved__gt=0).exists()
    assert not Allocation.objects.filter(status=Allocation.Status.HELD).exists()


def _allocation_scans() -> tuple[int, int]:
    """Sequential and index scans of the allocations' tables (every partition) in this test's transaction."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT coalesce(sum(seq_scan), 0), coalesce(sum(idx_scan), 0) FROM pg_stat_xact_user_tables "
            "WHERE relname LIKE 'allocation\\_allocation%%'"
        )
        return tuple(int(value) for value in cursor.fetchone())


def test_each_batch_of_the_expiry_sweep_finds_its_holds_by_key(reference_data):
    """The batch is most of the table here, where a planner left alone reads every allocation for each
    batch: the sweep's statements go through the indexes, batch after batch."""
    now = timezone.now()
    _expired_holds_fleet(150, now=now)
    seq_before, index_before = _allocation_scans()
    assert services.holds_expire(now=now, batch_size=100) == 300
    seq_after, index_after = _allocation_scans()
    assert seq_after == seq_before
    assert index_after > index_before
    assert not Allocation.objects.filter(status=Allocation.Status.HELD).exists()
    assert not Quota.objects.filter(reserved__gt=0).exists()


_SORT_NODE = re.compile(r"(^|->)\s*(Incremental )?Sort\s+\(", re.M)


def test_the_expiry_sweep_reads_holds_in_index_order_even_with_stale_statistics(reference_data):
    """Statistics taken when no hold was open: a planner left alone sorts every expired hold of every
    partition for each batch. Planned by key (``plan_by_key``), the batch read merges the partitions'
    open-hold indexes instead, and stops at the batch's size."""
    now = timezone.now()
    _expired_holds_fleet(150, now=now)
    Allocation.objects.update(status=Allocation.Status.EXPIRED)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE allocation_allocation")
    Allocation.objects.update(status=Allocation.Status.HELD)
    plans: list[str] = []

    def explain(execute, sql, params, many, context):
        if sql.startswith('SELECT "allocation_allocation"') and "FOR UPDATE" in sql:
            with connection.connection.cursor() as raw:  # psycopg's own: not through this wrapper again
                raw.execute("EXPLAIN " + sql, params)
                plans.append("\n".join(row[0] for row in raw.fetchall()))
        return execute(sql, params, many, context)

    with connection.execute_wrapper(explain):
        assert services.holds_expire(now=now, batch_size=100) == 300
    assert len(plans) == 4  # three batches of 100, and the read that finds none left
    for plan in plans:
        assert "Index Scan using" in plan and not _SORT_NODE.search(plan), plan


def test_rows_locked_in_the_transaction_are_updated_by_their_tuple_ids(reference_data):
    now = timezone.now()
    ids = fleet_create("tid", 3, at=now, resource_type="COMPUTE_MS")
    with transaction.atomic():
        rows = list(
            Quota.objects.filter(agent_id__in=ids)
            .locked()
            .annotate(tid=RawSQL("ctid::text", ()))
            .values_list("pk", "tid")
        )
        pks, tids = [pk for pk, _ in rows], [tid for _, tid in rows]
        assert bulk_update_columns(model=Quota, pks=pks, columns={"reserved": [5] * 3}, tids=tids) == 3
        # A tuple id that is not the row's (here: the next row's) updates nothing, even with the right key.
        shifted = tids[1:] + tids[:1]
        assert bulk_update_columns(model=Quota, pks=pks, columns={"reserved": [7] * 3}, tids=shifted) == 0
    assert sorted(Quota.objects.filter(agent_id__in=ids).values_list("reserved", flat=True)) == [5, 5, 5]


@pytest.mark.django_db(transaction=True)
def test_keyed_planning_ends_with_its_transaction():
    def setting() -> str:
        with connection.cursor() as cursor:
            cursor.execute("SELECT current_setting('enable_seqscan'), current_setting('enable_hashjoin')")
            return cursor.fetchone()

    with transaction.atomic():
        plan_by_key()
        assert setting() == ("off", "off")
    assert setting() == ("on", "on")


def test_idempotency_cleanup_keeps_the_last_24_hours(reference_data):
    now = timezone.now()
    for key, age in (("old", 25), ("fresh", 23)):
        IdempotencyRecord.objects.create(
            principal="agent:x",
            key=key,
            method="POST",
            path="/",
            request_hash="h",
            response_status=201,
            response_body={},
            created_at=now - dt.timedelta(hours=age),
        )
    assert idempotency_cleanup_task.apply().get() == 1
    assert list(IdempotencyRecord.objects.values_list("key", flat=True)) == ["fresh"]


def test_hold_expiry_task_body_runs_the_sweep(reference_data):
    hold = _holds(1, ttl=1)[0]
    Allocation.objects.filter(pk=hold.pk).update(expires_at=timezone.now() - dt.timedelta(seconds=1))
    assert holds_expire_task.apply().get() == 1
    assert Allocation.objects.get(pk=hold.pk).status == "expired"


def test_periodic_tasks_are_set_up_idempotently_and_keep_admin_edits(db):
    call_command("setup_periodic_tasks")
    tasks = dict(PeriodicTask.objects.values_list("name", "task"))
    assert tasks["Expire holds"] == "allocation.holds_expire"
    assert tasks["Clean idempotency keys"] == "allocation.idempotency_cleanup"
    assert PeriodicTask.objects.get(name="Expire holds").interval.every == 60
    PeriodicTask.objects.filter(name="Expire holds").update(enabled=False)
    count = PeriodicTask.objects.count()
    call_command("setup_periodic_tasks")
    assert PeriodicTask.objects.count() == count
    assert PeriodicTask.objects.get(name="Expire holds").enabled is False
    call_command("setup_periodic_tasks", "--reset")
    assert PeriodicTask.objects.get(name="Expire holds").enabled is True


def test_every_schedule_expires_its_messages_within_its_interval_and_keeps_shorter_edits(db):
    from django_celery_beat.schedulers import ModelEntry

    from axiom_grid.celery import app

    call_command("setup_periodic_tasks")
    for periodic in PeriodicTask.objects.select_related("interval"):
        assert periodic.expire_seconds == periodic.interval.every, periodic.name
        # What beat puts on each message it sends: a relative expiry, not an end date for the schedule.
        assert ModelEntry(periodic, app=app).options["expires"] == periodic.interval.every

    # A row from before expiries, a shorter interval and a shorter expiry, each edited in the admin.
    quicker = IntervalSchedule.objects.create(every=20, period=IntervalSchedule.SECONDS)
    PeriodicTask.objects.filter(name="Expire holds").update(expire_seconds=None)
    PeriodicTask.objects.filter(name="Budget alert sweep").update(interval=quicker)
    PeriodicTask.objects.filter(name="Rule evaluation").update(expire_seconds=30)
    ends = timezone.now() + dt.timedelta(days=30)
    PeriodicTask.objects.filter(name="Alert delivery").update(expire_seconds=None, expires=ends)
    call_command("setup_periodic_tasks")
    expiries = dict(PeriodicTask.objects.values_list("name", "expire_seconds"))
    edited = ("Expire holds", "Budget alert sweep", "Rule evaluation")
    assert [expiries[name] for name in edited] == [60, 20, 30]
    assert expiries["Alert delivery"] is None  # an end date excludes expire_seconds; it is the operator's
    assert PeriodicTask.objects.get(name="Budget alert sweep").interval.every == 20

    call_command("setup_periodic_tasks", "--reset")
    rows = {row.name: row for row in PeriodicTask.objects.select_related("interval")}
    assert all(row.expire_seconds == row.interval.every and row.expires is None for row in rows.values())
    assert (rows["Budget alert sweep"].interval.every, rows["Rule evaluation"].expire_seconds) == (60, 60)


def test_every_schedule_names_a_registered_task_with_its_interval(db):
    from axiom_grid.celery import app

    call_command("setup_periodic_tasks")
    app.loader.import_default_modules()
    schedules = {task.name: (task.task, task.interval.every) for task in PeriodicTask.objects.all()}
    assert schedules == {
        "Expire holds": ("allocation.holds_expire", 60),
        "Clean idempotency keys": ("allocation.idempotency_cleanup", 3600),
        "Budget alert sweep": ("optimization.budget_sweep", 60),
        "Rule evaluation": ("optimization.rules_evaluate", 60),
        "Cost spike detection": ("optimization.cost_spike_sweep", 300),
        "Alert delivery": ("optimization.alerts_deliver", 60),
        "Auto-scaling evaluation": ("optimization.scaling_evaluate", 300),
        "Marketplace refresh": ("optimization.marketplace_refresh", 900),
        "Fleet utilization metrics": ("optimization.fleet_utilization", 300),
        "Usage rollups": ("optimization.usage_rollups_update", 300),
        "Partitions and retention": ("ledger.partitions_maintain", 3600),
    }
    for task_name, _ in schedules.values():
        task = app.tasks[task_name]
        assert task.acks_late and task.reject_on_worker_lost and task.time_limit

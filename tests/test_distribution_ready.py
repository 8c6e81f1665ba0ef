"""What keeps the schema ready to be distributed by agent (docs/scaling.md): every grant carries its quota's
agent, checked by a composite key to the quota, and quota rows locked together are locked by (agent, id)."""

from __future__ import annotations

import datetime as dt
import importlib
import re
import threading
import time
from decimal import Decimal

import pytest
from django.db import IntegrityError, connection, connections, transaction
from django.db.migrations.executor import MigrationExecutor
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from allocation.services import allocation_create, quota_share
from ledger.models import QUOTA_LOCK_ORDER, Agent, Grant, Quota, Tier
from ledger.periods import month_bounds
from ledger.services import agent_change_tier, agent_create, agent_update, quota_grant, quota_open
from optimization.models import ScalingPolicy
from optimization.services.executions import execution_record
from optimization.services.marketplace import deal_list, deal_purchase
from optimization.services.scaling import scaling_evaluate

pytestmark = pytest.mark.django_db

PERIOD_START, _ = month_bounds(timezone.now())
T0 = PERIOD_START + dt.timedelta(days=10, hours=12)
PRICE = Decimal("0.0000008")
# How every writer's lock on several quota rows reads in SQL.
LOCK_ORDER_SQL = 'ORDER BY "quotas"."agent_id" ASC, "quotas"."id" ASC'


def _agent(agent_id: str, tier: str = "PRO", **kwargs) -> Agent:
    return agent_create(agent_id=agent_id, tier_code=tier, **kwargs)


def _quota(agent_id: str, resource_type: str = "AI_TOKENS") -> Quota:
    return Quota.objects.get(agent_id=agent_id, resource_type_id=resource_type, period_start=PERIOD_START)


def _agents_in_reverse_id_order() -> tuple[Agent, Agent]:
    """Two agents whose AI_TOKENS quota rows are in one order by id and in the other by agent."""
    first, last = _agent("a-first"), _agent("z-last")
    quota_open(agent=last, resource_type_id="AI_TOKENS", at=T0)
    quota_open(agent=first, resource_type_id="AI_TOKENS", at=T0)
    assert _quota("z-last").pk < _quota("a-first").pk
    return first, last


def _lock_statements(queries) -> list[str]:
    return [q["sql"] for q in queries if "FOR NO KEY UPDATE" in q["sql"] and '"quotas"' in q["sql"]]


# --- Every writer fills the grant's agent ---------------------------------------------------------------


def test_every_writer_of_grants_names_the_quota_agent_and_resource_type(reference_data):
    first, last = _agent("a-first"), _agent("z-last")
    quota_grant(agent=first, resource_type_id="AI_TOKENS", amount=5_000, reason="manual", actor="ops", at=T0)
    quota_share(
        source=first, target_id=last.pk, resource_type_id="AI_TOKENS", amount=1_000, actor="a", now=T0
    )
    deal = deal_list(agent=last, resource_type_id="AI_TOKENS", amount=2_000, unit_price_usd=PRICE, now=T0)
    deal_purchase(deal_id=deal.pk, buyer=first, amount=500, actor="a-first", now=T0)
    # Vertical scaling: at its maximum instance count and above the threshold, the agent gets quota.
    scaled = _agent("m-scaled")
    Agent.objects.filter(pk=scaled.pk).update(instance_count=2, min_instances=1, max_instances=2)
    ScalingPolicy.objects.create(
        agent=scaled,
        scale_up_threshold=Decimal("80"),
        scale_down_threshold=Decimal("30"),
        step=1,
        min_instances=1,
        max_instances=2,
        cooldown_seconds=600,
        quota_step_percent=10,
    )
    allocation_create(agent=scaled, resource_type_id="AI_TOKENS", amount=900_000, now=T0)
    assert scaling_evaluate(now=T0)["vertical"] == 1
    # A tier change and a custom-limit change below what is used keep the limit with a grant.
    moved = _agent("t-moved")
    allocation_create(agent=moved, resource_type_id="AI_TOKENS", amount=200_000)
    agent_change_tier(agent=moved, tier=Tier.objects.get(code="FREE"), actor="ops")
    custom = _agent("c-custom", tier="CUSTOM", custom_limits={"AI_TOKENS": 1_000})
    allocation_create(agent=custom, resource_type_id="AI_TOKENS", amount=900)
    agent_update(agent=custom, actor="ops", custom_limits={"AI_TOKENS": 100})

    grants = list(Grant.objects.select_related("quota"))
    assert {grant.reason for grant in grants} == set(Grant.Reason.values)
    for grant in grants:
        assert (grant.agent_id, grant.resource_type_id) == (
            grant.quota.agent_id,
            grant.quota.resource_type_id,
        ), grant.reason
    by_reason = {grant.reason: grant.agent_id for grant in grants}
    assert by_reason == {
        "manual": "a-first",
        "share_out": "a-first",
        "share_in": "z-last",
        "marketplace_purchase": "a-first",
        "marketplace_sale": "z-last",
        "scaling": "m-scaled",
        "tier_change": "t-moved",
        "limit_change": "c-custom",
    }


# --- The composite key -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "wrong", [{"agent_id": "z-last"}, {"resource_type_id": "COMPUTE_MS"}], ids=["agent", "resource_type"]
)
def test_the_database_refuses_a_grant_that_names_another_agent_or_type_than_its_quota(reference_data, wrong):
    first, _ = _agent("a-first"), _agent("z-last")
    quota = quota_open(agent=first, resource_type_id="AI_TOKENS", at=T0)
    fields = {"agent_id": "a-first", "resource_type_id": "AI_TOKENS", **wrong}
    with connection.cursor() as cursor:  # checked at each INSERT, not at a COMMIT this test never reaches
        cursor.execute("SET CONSTRAINTS ledger_grant_quota_identity_fk IMMEDIATE")

    with pytest.raises(IntegrityError, match="ledger_grant_quota_identity_fk"), transaction.atomic():
        Grant.objects.create(quota=quota, amount=1, reason="manual", actor="ops", **fields)

    assert not Grant.objects.exists()
    Grant.objects.create(quota=quota, amount=1, reason="manual", actor="ops", agent_id="a-first",
                         resource_type_id="AI_TOKENS")  # fmt: skip
    assert Grant.objects.count() == 1


# --- The migration -----------------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_the_migration_fills_existing_grants_from_their_quota_in_chunks_and_reverses(
    reference_data, monkeypatch
):
    first, last = _agent("a-first"), _agent("z-last")
    quotas = [
        quota_open(agent=agent, resource_type_id=code, at=T0)
        for agent in (first, last)
        for code in ("AI_TOKENS", "COMPUTE_MS")
    ]
    migration = importlib.import_module("ledger.migrations.0016_grant_agent")
    monkeypatch.setattr(migration, "BACKFILL_CHUNK", 3)  # several chunks for seven grants
    executor = MigrationExecutor(connection)
    executor.migrate([("ledger", "0015_usage_logs_partitioned")])
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM information_schema.columns "
                "WHERE table_name = 'ledger_grant' AND column_name IN ('agent_id', 'resource_type_id')"
            )
            assert cursor.fetchone()[0] == 0
            for i in range(7):
                cursor.execute(
                    "INSERT INTO ledger_grant (quota_id, amount, reason, actor, note, created_at) "
                    "VALUES (%s, %s, 'manual', 'ops', '', now())",
                    [quotas[i % 4].pk, i + 1],
                )
    finally:
        executor = MigrationExecutor(connection)
        executor.loader.build_graph()
        executor.migrate([("ledger", "0016_grant_agent")])

    grants = Grant.objects.order_by("amount").values_list(
        "amount", "quota_id", "agent_id", "resource_type_id"
    )
    assert list(grants) == [
        (i + 1, quotas[i % 4].pk, quotas[i % 4].agent_id, quotas[i % 4].resource_type_id) for i in range(7)
    ]
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT attname, attnotnull FROM pg_attribute WHERE attrelid = 'ledger_grant'::regclass "
            "AND attname IN ('agent_id', 'resource_type_id')"
        )
        assert dict(cursor.fetchall()) == {"agent_id": True, "resource_type_id": True}
        cursor.execute(
            "SELECT conname, convalidated FROM pg_constraint WHERE conrelid = 'ledger_grant'::regclass "
            "AND contype = 'f' AND conname LIKE '%%quota%%'"
        )
        assert cursor.fetchall() == [("ledger_grant_quota_identity_fk", True)]


# --- Lock order --------------------------------------------------------------------------------------------


def test_quota_rows_are_locked_by_agent_then_id(reference_data):
    assert QUOTA_LOCK_ORDER == ("agent_id", "id")
    first, last = _agents_in_reverse_id_order()
    deal = deal_list(agent=last, resource_type_id="AI_TOKENS", amount=2_000, unit_price_usd=PRICE, now=T0)

    with CaptureQueriesContext(connection) as share:
        quota_share(
            source=first, target_id=last.pk, resource_type_id="AI_TOKENS", amount=10, actor="a", now=T0
        )
    with CaptureQueriesContext(connection) as purchase:
        deal_purchase(deal_id=deal.pk, buyer=first, amount=10, actor="a-first", now=T0)
    with CaptureQueriesContext(connection) as execution:
        execution_record(
            agent=first,
            superpower="search",
            resources={"AI_TOKENS": 5, "COMPUTE_MS": 5},
            duration_ms=1,
            success=True,
            now=T0,
        )

    for captured in (share, purchase, execution):
        (statement,) = _lock_statements(captured.captured_queries)
        assert LOCK_ORDER_SQL in statement
    # The execution locks both of its rows up front, before its first allocation takes anything.
    sqls = [q["sql"] for q in execution.captured_queries]
    lock_at = next(i for i, sql in enumerate(sqls) if sql in _lock_statements(execution.captured_queries))
    assert lock_at < next(i for i, sql in enumerate(sqls) if "grid_allocate" in sql)


def _waiting(pids: list[int]) -> int:
    with connections["default"].cursor() as cursor:
        cursor.execute("SELECT count(DISTINCT pid) FROM pg_locks WHERE NOT granted AND pid = ANY(%s)", [pids])
        return cursor.fetchone()[0]


def _wait_for(condition, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.django_db(transaction=True)
def test_a_share_and_a_purchase_of_the_same_two_quota_rows_wait_for_each_other_instead_of_deadlocking(
    reference_data,
):
    """The two rows are in one order by id and in the other by agent. While a third transaction holds the
    row that is first by id (last by agent), a purchase and then a share queue for the pair; had either
    locked by id while the other locked by agent, each would hold the row the other waits for."""
    first, last = _agents_in_reverse_id_order()
    deal = deal_list(agent=last, resource_type_id="AI_TOKENS", amount=2_000, unit_price_usd=PRICE, now=T0)
    low_id_quota = _quota("z-last")
    pids: dict[str, int] = {}
    errors: dict[str, BaseException] = {}
    started = {name: threading.Event() for name in ("purchase", "share")}

    def run(name: str, work) -> None:
        try:
            with connections["default"].cursor() as cursor:
                cursor.execute("SELECT pg_backend_pid()")
                pids[name] = cursor.fetchone()[0]
            started[name].set()
            work()
        except BaseException as exc:  # noqa: BLE001  (reported by the assertion below)
            errors[name] = exc
        finally:
            started[name].set()
            connections.close_all()

    purchase = threading.Thread(
        target=run,
        args=("purchase", lambda: deal_purchase(deal_id=deal.pk, buyer=first, amount=700, actor="a", now=T0)),
    )
    share = threading.Thread(
        target=run,
        args=(
            "share",
            lambda: quota_share(
                source=first, target_id=last.pk, resource_type_id="AI_TOKENS", amount=300, actor="a", now=T0
            ),
        ),
    )
    with transaction.atomic():
        list(Quota.objects.select_for_update(no_key=True).filter(pk=low_id_quota.pk))
        purchase.start()
        started["purchase"].wait(10)
        _wait_for(lambda: "purchase" in errors or _waiting([pids["purchase"]]) == 1)
        share.start()
        started["share"].wait(10)
        _wait_for(lambda: errors or _waiting([pids["purchase"], pids["share"]]) == 2)
    purchase.join(30)
    share.join(30)

    assert errors == {}
    assert (_quota("a-first").limit, _quota("z-last").limit) == (1_000_000 + 700 - 300, 1_000_000 - 700 + 300)
    assert Grant.objects.count() == 4


# --- Lookups by id name the agent ------------------------------------------------------------------------


@pytest.mark.parametrize("end", ["settle", "release"])
def test_ending_a_hold_reads_and_writes_its_allocation_and_quota_rows_by_id_and_agent(reference_data, end):
    from allocation.services import hold_release, hold_settle

    agent = _agent("a-holder")
    hold = allocation_create(agent=agent, resource_type_id="AI_TOKENS", amount=1_000, hold=True)
    with CaptureQueriesContext(connection) as queries:
        if end == "settle":
            hold_settle(agent=agent, allocation_id=hold.pk, amount=400)
        else:
            hold_release(agent=agent, allocation_id=hold.pk)

    by_id = [
        q["sql"]
        for q in queries
        if q["sql"].startswith(("SELECT", "UPDATE"))
        and re.search(
            r'FROM "(allocation_allocation|quotas)"|UPDATE "(allocation_allocation|quotas)"', q["sql"]
        )
        and re.search(r'"(allocation_allocation|quotas)"\."id" = ', q["sql"])
    ]
    assert len(by_id) >= 3, by_id  # the hold read, its claim, its quota
    assert all('"agent_id" = ' in sql for sql in by_id), by_id
    assert _quota("a-holder").reserved == 0


def test_the_allocation_statement_writes_its_quota_row_by_id_and_agent(reference_data):
    with connection.cursor() as cursor:
        cursor.execute("SELECT prosrc FROM pg_proc WHERE proname = 'grid_allocate'")
        (source,) = cursor.fetchone()
    updates = re.findall(r"UPDATE quotas.*?;", source, flags=re.S)
    assert updates and all("WHERE id = v_quota AND agent_id = p_agent_id" in sql for sql in updates)

"""The holds-expiry sweep streams: batches of expired holds, each in its own short transaction.

Batches of two end what one batch ends; a batch costs the same statements for 3 leases on 3 budgets as for
30 on 30; no lock outlives its batch; a crash loses only the batch in flight and the next run ends every
hold exactly once.
"""

from __future__ import annotations

import datetime as dt
import re
import threading
from decimal import Decimal

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from allocation import services
from allocation.models import Allocation
from allocation.services import allocation_create, holds_expire, lease_open
from ledger.budgets import agent_team_set, budget_create, team_create
from ledger.models import Agent, Budget, Quota, UsageLog
from ledger.periods import month_bounds
from ledger.services import agent_create

PERIOD_START, _ = month_bounds(timezone.now())
T0 = PERIOD_START + dt.timedelta(days=10, hours=12)  # well inside the period, whatever today is
EXPIRED = T0 + dt.timedelta(days=1)  # every hold has expired, and the day budgets' windows have ended
TTL = 60


def fleet(size: int = 7, *, team: bool = True) -> None:
    """``size`` PRO agents, each with a day budget (and, with ``team``, a month budget of their team shared
    by all), a lease of 1,000 AI tokens and a plain hold of 400, all taken at T0 for a minute."""
    if team:
        team_create(id="team-x")
        budget_create(scope="team", scope_id="team-x", window="month", limit_usd="100", now=T0)
    for index in range(size):
        agent = agent_create(agent_id=f"hold-{index:03d}", tier_code="PRO")
        if team:
            agent = agent_team_set(agent=agent, team_id="team-x")
        budget_create(scope="agent", scope_id=agent.pk, window="day", limit_usd="1", now=T0)
        lease_open(agent=agent, resource_type_id="AI_TOKENS", amount=1_000, ttl_seconds=TTL, now=T0)
        allocation_create(
            agent=agent, resource_type_id="AI_TOKENS", amount=400, hold=True, hold_ttl_seconds=TTL, now=T0
        )


def outcome() -> tuple:
    allocations = sorted(
        Allocation.objects.values_list("pk", "status", "settled_amount", "cost_usd", "finished_at")
    )
    quotas = sorted(
        Quota.objects.values_list("agent_id", "resource_type_id", "used", "reserved", "spent_usd")
    )
    budgets = sorted(
        Budget.objects.values_list(
            "pk", "spent_usd", "reserved_usd", "rollover_usd", "window_start", "window_end", "updated_at"
        )
    )
    usage = sorted(
        (agent, kind, amount, cost, str(metadata))
        for agent, kind, amount, cost, metadata in UsageLog.objects.values_list(
            "agent_id", "kind", "amount", "cost_usd", "metadata"
        )
    )
    return allocations, quotas, budgets, usage


# --- Batches end what one batch ends --------------------------------------------------------------------


@pytest.mark.django_db
def test_batches_of_two_end_what_one_batch_ends(reference_data):
    fleet()
    savepoint = transaction.savepoint()
    assert holds_expire(now=EXPIRED, batch_size=1000) == 14
    expected = outcome()
    transaction.savepoint_rollback(savepoint)
    assert Allocation.objects.filter(status="held").count() == 14

    assert holds_expire(now=EXPIRED, batch_size=2) == 14
    assert outcome() == expected

    allocations, quotas, budgets, _ = expected
    assert {status for _, status, *_ in allocations} == {"expired"}
    assert {(used, reserved) for _, _, used, reserved, _ in quotas if used or reserved} == {(1_000, 0)}
    team_budget = Budget.objects.get(scope="team")
    assert (team_budget.spent_usd, team_budget.reserved_usd) == (7 * 1_000 * Decimal("0.000001"), 0)
    assert holds_expire(now=EXPIRED, batch_size=2) == 0  # and a second run ends nothing


@pytest.mark.django_db
def test_a_hold_not_yet_expired_is_left_and_a_later_batch_goes_on_after_the_last_one(reference_data):
    fleet(3, team=False)
    agent = Agent.objects.get(pk="hold-000")
    late = allocation_create(
        agent=agent, resource_type_id="AI_TOKENS", amount=7, hold=True, hold_ttl_seconds=3600, now=T0
    )
    assert holds_expire(now=T0 + dt.timedelta(seconds=TTL), batch_size=4) == 6
    assert Allocation.objects.get(pk=late.pk).status == "held"
    assert holds_expire(now=T0 + dt.timedelta(hours=2), batch_size=4) == 1


# --- A fixed number of statements per batch -------------------------------------------------------------


def _statements(size: int) -> int:
    savepoint = transaction.savepoint()
    fleet(size, team=False)
    with CaptureQueriesContext(connection) as captured:
        assert holds_expire(now=EXPIRED, batch_size=1000) == 2 * size
    transaction.savepoint_rollback(savepoint)
    return len(captured)


@pytest.mark.django_db
def test_a_batch_costs_the_same_statements_for_3_or_30_leases_on_as_many_budgets(reference_data):
    """Each lease is charged to its own budget, whose window has ended: still one statement for the rolls
    and one for the charges, whatever the number of budgets."""
    assert _statements(3) == _statements(30)


# --- No lock across batches; a crash loses only the batch in flight ------------------------------------


@pytest.mark.django_db(transaction=True)
def test_an_allocation_on_a_quota_of_a_batch_done_completes_while_the_next_batch_runs(
    reference_data, monkeypatch
):
    """hold-000's two holds are the first batch. While the second batch is in its transaction, an
    allocation by hold-000, in another thread and connection that gives up on a lock after two seconds,
    goes through."""
    fleet(3, team=False)
    holds_end = services._holds_end
    seen: dict[str, object] = {}

    def allocate_for_the_first_agent() -> None:
        try:
            with connection.cursor() as cursor:
                cursor.execute("SET lock_timeout = '2s'")
            agent = Agent.objects.get(pk="hold-000")
            seen["status"] = allocation_create(agent=agent, resource_type_id="AI_TOKENS", amount=5).status
        except Exception as exc:  # reported by the assertions below
            seen["error"] = exc
        finally:
            connection.close()

    calls: list[int] = []

    def second_batch_waits(holds, *, now):
        calls.append(1)
        holds_end(holds, now=now)
        if len(calls) == 2:
            allocator = threading.Thread(target=allocate_for_the_first_agent)
            allocator.start()
            allocator.join(timeout=30)

    monkeypatch.setattr(services, "_holds_end", second_batch_waits)
    assert holds_expire(now=EXPIRED, batch_size=2) == 6
    assert "error" not in seen, seen.get("error")
    assert seen["status"] == "committed"
    assert Quota.objects.get(agent_id="hold-000", resource_type_id="AI_TOKENS").used == 1_000 + 5


@pytest.mark.django_db
def test_a_crash_loses_only_the_batch_in_flight_and_the_next_run_ends_every_hold_once(
    reference_data, monkeypatch
):
    fleet()
    savepoint = transaction.savepoint()
    holds_expire(now=EXPIRED, batch_size=1000)
    expected = outcome()
    transaction.savepoint_rollback(savepoint)

    holds_end = services._holds_end
    calls: list[int] = []

    def crash_in_the_third(holds, *, now):
        calls.append(1)
        holds_end(holds, now=now)
        if len(calls) == 3:
            raise RuntimeError("worker lost")

    monkeypatch.setattr(services, "_holds_end", crash_in_the_third)
    with pytest.raises(RuntimeError):
        holds_expire(now=EXPIRED, batch_size=2)
    assert Allocation.objects.filter(status="expired").count() == 4  # two batches committed

    monkeypatch.undo()
    assert holds_expire(now=EXPIRED, batch_size=2) == 10
    assert outcome() == expected
    assert UsageLog.objects.filter(metadata__lease_expired=True).count() == 7


@pytest.mark.django_db
def test_a_batch_reads_its_holds_in_the_index_order_without_sorting_every_expired_hold(reference_data):
    """The open-hold index gives the sweep's whole order (expiry, id): each partition's scan stops at the
    batch's size, where an index on the expiry alone had every expired hold read and sorted for each batch."""
    fleet(7)
    with CaptureQueriesContext(connection) as queries:
        holds_expire(now=EXPIRED, batch_size=2)
    read = next(
        q["sql"] for q in queries.captured_queries if "FOR UPDATE" in q["sql"] and "LIMIT 2" in q["sql"]
    )
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")  # the plan a large table gets, on a few rows
        cursor.execute("SET LOCAL enable_bitmapscan = off")
        cursor.execute(f"EXPLAIN {read}")
        plan = "\n".join(row[0] for row in cursor.fetchall())
    assert "allocation_open_hold_order_idx" in plan or "expires_at_id_idx" in plan, plan
    assert not re.search(r"(^|->\s+)(Incremental )?Sort\s+\(cost", plan, flags=re.M), plan

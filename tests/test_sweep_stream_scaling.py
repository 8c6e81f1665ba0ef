"""The auto-scaling evaluation streams through the fleet: chunks of agents by id, each in its own transaction.

Chunked or not it decides the same; no lock (a vertical grant's quota row included) outlives its chunk; a
crash loses only the chunk in flight and the next run scales every agent exactly once; and a chunk costs
the same statements for 3 agents as for 30.
"""

from __future__ import annotations

import datetime as dt
import threading
from decimal import Decimal

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from allocation.services import allocation_create
from ledger.models import Agent, Grant, Quota
from ledger.periods import month_bounds
from ledger.services import agent_create, quota_open
from optimization.models import ScalingEvent, ScalingPolicy
from optimization.services import scaling
from optimization.services.scaling import scaling_evaluate

PERIOD_START, _ = month_bounds(timezone.now())
T0 = PERIOD_START + dt.timedelta(days=10, hours=12)  # well inside the period, whatever today is
MINUTE = dt.timedelta(minutes=1)
COOLDOWN = 600


def agent_at(agent_id: str, *, percent: int | None, instances: int, **fields) -> Agent:
    """A PRO agent with ``instances`` (1..10) and ``percent`` of its 1,000,000 AI tokens used this period
    (None: no quota opened, nothing to measure)."""
    agent = agent_create(agent_id=agent_id, tier_code="PRO")
    Agent.objects.filter(pk=agent_id).update(instance_count=instances, min_instances=1, max_instances=10)
    if percent is not None:
        quota = quota_open(agent=agent, resource_type_id="AI_TOKENS", at=T0)
        Quota.objects.filter(pk=quota.pk).update(used=percent * 10_000, **fields)
    agent.refresh_from_db()
    return agent


def tier_policy(**fields) -> ScalingPolicy:
    values = {
        "scale_up_threshold": Decimal("80"),
        "scale_down_threshold": Decimal("30"),
        "max_instances": 5,
        "quota_step_percent": 10,
        "cooldown_seconds": COOLDOWN,
        **fields,
    }
    # The PRO tier's default policy (reference data), rewritten.
    return ScalingPolicy.objects.update_or_create(tier_id="PRO", defaults=values)[0]


def fleet(**policy) -> None:
    """Seven agents, ids in the same order in any collation, each a different case:
    a up (2 -> 3), b down (3 -> 2), c vertical (at 5 of 5), d nothing (50 %), e no metric, f its own policy
    off, g its own budget policy up (95 % of its budget spent)."""
    tier_policy(**policy)
    agent_at("agent-a", percent=90, instances=2)
    agent_at("agent-b", percent=10, instances=3)
    agent_at("agent-c", percent=90, instances=5)
    agent_at("agent-d", percent=50, instances=2)
    agent_at("agent-e", percent=None, instances=2)
    f = agent_at("agent-f", percent=90, instances=2)
    ScalingPolicy.objects.create(agent=f, enabled=False)
    g = agent_at("agent-g", percent=10, instances=2, spent_usd=Decimal("95"))
    Agent.objects.filter(pk=g.pk).update(monthly_budget_usd=Decimal("100"))
    ScalingPolicy.objects.create(
        agent=g,
        metric="budget_utilization_percent",
        scale_up_threshold=Decimal("90"),
        scale_down_threshold=Decimal("20"),
        max_instances=5,
        cooldown_seconds=policy.get("cooldown_seconds", COOLDOWN),
    )


EXPECTED_INSTANCES = {
    "agent-a": 3,
    "agent-b": 2,
    "agent-c": 5,
    "agent-d": 2,
    "agent-e": 2,
    "agent-f": 2,
    "agent-g": 3,
}


def outcome() -> tuple:
    instances = dict(Agent.objects.values_list("pk", "instance_count"))
    limits = sorted(Quota.objects.values_list("agent_id", "limit"))
    grants = sorted(Grant.objects.values_list("quota__agent_id", "amount", "reason", "actor", "note"))
    events = sorted(
        ScalingEvent.objects.values_list(
            "agent_id", "direction", "kind", "trigger", "before", "after", "reason", "resource_type_id"
        )
    )
    return instances, limits, grants, events


def without_chunks(summary: dict) -> dict:
    return {key: value for key, value in summary.items() if key != "chunks"}


# --- (a) Chunks decide what one chunk decides ----------------------------------------------------------


@pytest.mark.django_db
def test_chunks_of_two_decide_what_one_chunk_decides(reference_data):
    fleet()
    savepoint = transaction.savepoint()
    whole = scaling_evaluate(now=T0, chunk_size=1000)
    expected = outcome()
    transaction.savepoint_rollback(savepoint)
    assert not ScalingEvent.objects.exists()

    chunked = scaling_evaluate(now=T0, chunk_size=2)

    assert (whole["chunks"], chunked["chunks"]) == (1, 4)  # 2 + 2 + 2 + 1
    assert without_chunks(chunked) == without_chunks(whole)
    assert without_chunks(whole) == {
        "evaluated": 6,
        "scaled_up": 2,
        "scaled_down": 1,
        "vertical": 1,
        "in_cooldown": 0,
        "held_against_flapping": 0,
        "at_bound": 0,
        "no_metric": 1,
    }
    assert outcome() == expected
    instances, limits, grants, events = expected
    assert instances == EXPECTED_INSTANCES
    assert ("agent-c", 1_100_000) in limits
    assert [grant[:3] for grant in grants] == [("agent-c", 100_000, "scaling")]
    assert [event[:3] for event in events] == [
        ("agent-a", "up", "horizontal"),
        ("agent-b", "down", "horizontal"),
        ("agent-c", "up", "vertical"),
        ("agent-g", "up", "horizontal"),
    ]


@pytest.mark.django_db
def test_an_agent_policy_governs_its_agent_in_whichever_chunk_it_falls(reference_data):
    """With every tier's policy off, only agents with their own policy are read, chunk by chunk."""
    ScalingPolicy.objects.filter(tier__isnull=False).update(enabled=False)
    for index in range(5):
        agent = agent_at(f"own-{index}", percent=90, instances=1)
        if index % 2 == 0:
            ScalingPolicy.objects.create(agent=agent, max_instances=5, cooldown_seconds=COOLDOWN)
    summary = scaling_evaluate(now=T0, chunk_size=2)
    assert (summary["chunks"], summary["evaluated"], summary["scaled_up"]) == (3, 3, 3)
    assert set(Agent.objects.filter(instance_count=2).values_list("pk", flat=True)) == {
        "own-0",
        "own-2",
        "own-4",
    }


@pytest.mark.django_db
def test_no_enabled_policy_at_all_reads_no_chunk(reference_data):
    ScalingPolicy.objects.filter(tier__isnull=False).update(enabled=False)
    agent_at("agent-a", percent=90, instances=2)
    assert scaling_evaluate(now=T0, chunk_size=2)["chunks"] == 0
    assert not ScalingEvent.objects.exists()


# --- (b) No lock across chunks --------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_an_allocation_on_a_granted_quota_completes_while_the_evaluation_is_between_chunks(
    reference_data, monkeypatch
):
    """agent-c's vertical grant locks its quota row in the first chunk (agent-a .. agent-c). While the
    evaluation waits before its second chunk, an allocation by agent-c on that row, in another thread and
    connection that gives up on a lock after two seconds, goes through and sees the grant."""
    fleet()
    between = threading.Event()
    allocated = threading.Event()
    seen: dict[str, object] = {}

    def allocate_for_agent_c() -> None:
        try:
            between.wait(timeout=30)
            with connection.cursor() as cursor:
                cursor.execute("SET lock_timeout = '2s'")
            agent = Agent.objects.get(pk="agent-c")
            allocation = allocation_create(agent=agent, resource_type_id="AI_TOKENS", amount=1_000, now=T0)
            seen["status"] = allocation.status
            seen["limit"] = Quota.objects.get(pk=allocation.quota_id).limit
        except Exception as exc:  # reported by the assertions below
            seen["error"] = exc
        finally:
            connection.close()
            allocated.set()

    chunks = scaling._chunks
    done: list[int] = []

    def paused_chunks(size: int):
        for agents in chunks(size):
            if done == [1]:  # the first chunk's transaction has committed; the second is not open yet
                between.set()
                seen["waited"] = allocated.wait(timeout=30)
            yield agents
            done.append(1)

    monkeypatch.setattr(scaling, "_chunks", paused_chunks)
    allocator = threading.Thread(target=allocate_for_agent_c)
    allocator.start()
    summary = scaling_evaluate(now=T0, chunk_size=3)
    allocator.join(timeout=30)

    assert seen.get("waited") is True
    assert "error" not in seen, seen.get("error")
    assert (seen["status"], seen["limit"]) == ("committed", 1_100_000)
    assert (summary["chunks"], summary["vertical"], summary["scaled_up"]) == (3, 1, 2)
    assert Quota.objects.get(agent_id="agent-c").used == 90 * 10_000 + 1_000


# --- (c) A crash loses only the chunk in flight ---------------------------------------------------------


def _crash_on_the_third_chunk(monkeypatch) -> None:
    chunk_evaluate = scaling._chunk_evaluate
    calls = []

    def crash_on_the_third(**kwargs):
        calls.append(1)
        chunk_evaluate(**kwargs)
        if len(calls) == 3:
            raise RuntimeError("worker lost")

    monkeypatch.setattr(scaling, "_chunk_evaluate", crash_on_the_third)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("cooldown", "rerun_at"),
    [(COOLDOWN, T0 + MINUTE), (0, T0)],
    ids=["a later run inside the cooldown", "the same evaluation again without a cooldown"],
)
def test_a_crash_loses_only_the_chunk_in_flight_and_the_next_run_scales_each_agent_once(
    reference_data, monkeypatch, cooldown, rerun_at
):
    fleet(cooldown_seconds=cooldown)
    _crash_on_the_third_chunk(monkeypatch)
    with pytest.raises(RuntimeError):
        scaling_evaluate(now=T0, chunk_size=2)
    # Chunks 1 and 2 (agent-a .. agent-d) committed; the third (agent-e, agent-f) rolled back; agent-g's
    # chunk was never reached.
    assert sorted(ScalingEvent.objects.values_list("agent_id", flat=True)) == [
        "agent-a",
        "agent-b",
        "agent-c",
    ]
    assert Agent.objects.get(pk="agent-g").instance_count == 2

    monkeypatch.undo()
    again = scaling_evaluate(now=rerun_at, chunk_size=2)
    assert (again["in_cooldown"], again["scaled_up"], again["vertical"]) == (3, 1, 0)

    instances, limits, grants, events = outcome()
    assert instances == EXPECTED_INSTANCES
    assert ("agent-c", 1_100_000) in limits
    assert [grant[:2] for grant in grants] == [("agent-c", 100_000)]
    assert [event[:3] for event in events] == [
        ("agent-a", "up", "horizontal"),
        ("agent-b", "down", "horizontal"),
        ("agent-c", "up", "vertical"),
        ("agent-g", "up", "horizontal"),
    ]


# --- (d) A fixed number of statements per chunk ---------------------------------------------------------


def _uniform_fleet(size: int) -> None:
    """``size`` agents by threes: up (1 -> 2), down (3 -> 2), vertical (5 of 5)."""
    for index in range(size):
        percent, instances = [(90, 1), (10, 3), (90, 5)][index % 3]
        agent_at(f"fleet-{index:03d}", percent=percent, instances=instances)


def _statements_per_chunk(size: int, chunk_size: int) -> list[list[str]]:
    """Each chunk's statements in an evaluation of a uniform fleet of ``size``."""
    savepoint = transaction.savepoint()
    _uniform_fleet(size)
    chunk_evaluate = scaling._chunk_evaluate
    marks: list[tuple[int, int]] = []

    def measured(**kwargs):
        start = len(captured.captured_queries)
        chunk_evaluate(**kwargs)
        marks.append((start, len(captured.captured_queries)))

    scaling._chunk_evaluate = measured
    try:
        with CaptureQueriesContext(connection) as captured:
            summary = scaling_evaluate(now=T0, chunk_size=chunk_size)
    finally:
        scaling._chunk_evaluate = chunk_evaluate
    assert summary["scaled_up"] + summary["scaled_down"] + summary["vertical"] == size
    queries = captured.captured_queries
    transaction.savepoint_rollback(savepoint)
    return [[query["sql"] or "" for query in queries[start:end]] for start, end in marks]


@pytest.mark.django_db
def test_a_chunk_of_30_agents_costs_the_statements_of_a_chunk_of_3(reference_data):
    tier_policy()
    small = _statements_per_chunk(30, chunk_size=3)
    large = _statements_per_chunk(30, chunk_size=30)
    assert len(small) == 11 and len(large) == 2  # full chunks, then the empty one that ends the fleet
    # Lock the agents, their own policies, the metric, the recent events; the instance counts, lock the
    # quotas, their limits, the grants, the events: one statement each, for 3 agents as for 30. (Compared
    # by number: a statement psycopg has prepared is logged without its text.)
    assert [len(chunk) for chunk in small[:-1]] == [9] * 10
    assert len(large[0]) == 9
    assert len(small[-1]) == len(large[-1]) == 1  # the empty chunk that ends the fleet: its lock only


@pytest.mark.django_db
def test_an_evaluation_costs_the_same_statements_for_3_or_30_agents_in_one_chunk(reference_data):
    tier_policy()
    (three,) = _statements_per_chunk(3, chunk_size=100)
    (thirty,) = _statements_per_chunk(30, chunk_size=100)
    assert len(three) == len(thirty) == 9

"""The client's leases against a live grid (gunicorn on the suite's database): local takes that never
exceed the hold, renewals, closing, and what an expired lease costs."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest
from axiom_grid_client import AsyncGrid, Grid, LeaseExpired
from django.utils import timezone

from allocation import services
from ledger.models import Quota, UsageLog

pytestmark = pytest.mark.django_db(transaction=True)


def _ledger(agent_id: str, resource_type: str = "AI_TOKENS") -> tuple[int, int]:
    quota = Quota.objects.get(agent_id=agent_id, resource_type_id=resource_type)
    return quota.used, quota.reserved


@pytest.fixture
def grid_agent(grid_server, agent_with_key):
    agent = agent_with_key("PRO")
    with Grid(grid_server, agent.api_key) as grid:
        yield grid, agent.id


def test_takes_answer_locally_until_the_hold_is_used_up_and_close_settles_them(grid_agent):
    grid, agent_id = grid_agent
    with grid.lease(agent_id, "AI_TOKENS", 1000, ttl=120) as lease:
        assert lease.allocation.lease is True and lease.allocation.status == "held"
        assert _ledger(agent_id) == (0, 1000)
        assert all(lease.take() for _ in range(990))
        assert lease.take(10) is True
        assert lease.take(1) is False  # never past the hold
        assert (lease.taken, lease.remaining) == (1000, 0)
    assert lease.closed and lease.take(1) is False
    assert _ledger(agent_id) == (1000, 0)
    assert lease.close().status == "settled"  # closing again answers the same settlement


def test_close_gives_back_what_was_not_taken(grid_agent):
    grid, agent_id = grid_agent
    lease = grid.lease(agent_id, "AI_TOKENS", 5000)
    assert lease.take(1234) and not lease.take(4000)
    settled = lease.close()
    assert (settled.status, settled.allocated_amount) == ("settled", 1234)
    assert _ledger(agent_id) == (1234, 0)

    untouched = grid.lease(agent_id, "AI_TOKENS", 100)
    assert untouched.close().status == "released"
    assert _ledger(agent_id) == (1234, 0)


def test_eight_threads_never_take_more_than_the_hold_and_the_ledger_gets_exactly_their_sum(grid_agent):
    grid, agent_id = grid_agent
    lease = grid.lease(agent_id, "AI_TOKENS", 200_000)
    taken = [0] * 8
    start = threading.Barrier(8)

    def worker(index: int) -> None:
        rng = random.Random(index)
        start.wait()
        misses = 0
        while misses < 50:  # ends once the hold is nearly used up
            n = rng.randint(1, 7)
            if lease.take(n):
                taken[index] += n
            else:
                misses += 1

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sum(taken) == lease.taken
    assert 200_000 - 7 < sum(taken) <= 200_000
    lease.close()
    assert _ledger(agent_id) == (sum(taken), 0)


def test_renew_settles_the_old_hold_and_counts_against_a_fresh_one(grid_agent):
    grid, agent_id = grid_agent
    with grid.lease(agent_id, "AI_TOKENS", 50, ttl=60, task_id="crawl") as lease:
        first = lease.allocation.id
        assert lease.take(30)
        lease.renew()
        assert lease.allocation.id != first and lease.remaining == 50
        assert lease.take(50) and not lease.take(1)
        assert _ledger(agent_id) == (30, 50)
        lease.renew(amount=10)
        assert lease.remaining == 10 and lease.take(4)
    assert lease.taken == 84
    assert _ledger(agent_id) == (84, 0)
    settlements = sorted(UsageLog.objects.filter(agent_id=agent_id).values_list("amount", "task_id"))
    assert settlements == [(4, "crawl"), (30, "crawl"), (50, "crawl")]


def test_a_lease_the_quota_cannot_hold_is_refused_and_nothing_is_held(grid_agent):
    from axiom_grid_client import QuotaExceeded

    grid, agent_id = grid_agent
    with pytest.raises(QuotaExceeded) as refused:
        grid.lease(agent_id, "AI_TOKENS", 2_000_000)
    assert refused.value.details["available"] == 1_000_000
    lease = grid.lease(agent_id, "AI_TOKENS", 999_990)
    with pytest.raises(QuotaExceeded):
        lease.renew()  # a refused renewal leaves the lease as it was
    assert lease.take(999_990) and lease.close().allocated_amount == 999_990


def test_an_abandoned_lease_is_charged_in_full_and_its_late_client_is_told(grid_agent):
    grid, agent_id = grid_agent
    lease = grid.lease(agent_id, "AI_TOKENS", 700, ttl=1)
    assert lease.take(5)
    time.sleep(1.2)
    with pytest.raises(LeaseExpired) as expired:
        lease.close()
    assert expired.value.details["taken"] == 5
    assert services.holds_expire(now=timezone.now()) == 1
    assert _ledger(agent_id) == (700, 0)


def test_take_needs_a_positive_amount(grid_agent):
    grid, agent_id = grid_agent
    with grid.lease(agent_id, "AI_TOKENS", 10) as lease:
        with pytest.raises(ValueError):
            lease.take(0)
        assert lease.taken == 0


def test_the_async_lease_takes_locally_and_settles_on_exit(grid_server, agent_with_key):
    agent = agent_with_key("PRO")

    async def main() -> int:
        async with AsyncGrid(grid_server, agent.api_key) as grid:
            async with await grid.lease(agent.id, "COMPUTE_MS", 300, ttl=60) as lease:
                count = sum(1 for _ in range(400) if lease.take(1))
                await lease.renew(amount=20)
                count += sum(1 for _ in range(30) if lease.take(1))
            return count

    assert asyncio.run(main()) == 320
    assert _ledger(agent.id, "COMPUTE_MS") == (320, 0)

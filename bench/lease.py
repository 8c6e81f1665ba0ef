"""Scenario 8: the Python client's lease (``Grid.lease``) against the bench's grid.

``take(1)`` answers on the client, so its rate is the client's own: it is measured in one thread beside a
floor, a bare counter under a ``threading.Lock`` timed in the same run (the least any thread-safe count
costs in Python). Then 8 threads take from one lease until it is used up, the lease is closed, and the
ledger's ``used`` must equal the sum of their takes.
"""

from __future__ import annotations

import threading
import time

from bench.report import Report, log, per_second
from bench.server import HOST, GunicornServer

TAKES_TARGET = 1_000_000  # take(1) per second, one thread
THREADS = 8
SCENARIO = "8 SDK lease"


class _BareCounter:
    """The floor: what ``take`` does, with nothing else."""

    def __init__(self, limit: int) -> None:
        self.lock = threading.Lock()
        self.limit = limit
        self.taken = 0

    def take(self, n: int = 1) -> bool:
        with self.lock:
            if self.taken + n > self.limit:
                return False
            self.taken += n
            return True


def _rate(take, count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        take(1)
    return count / (time.perf_counter() - started)


def _used(agent_id: str) -> int:
    from bench.scenarios import scalar

    return scalar(
        "SELECT COALESCE(SUM(used), 0) FROM quotas WHERE agent_id = %s AND resource_type_id = 'AI_TOKENS'",
        [agent_id],
    )


def lease(report: Report, profile, fixtures, server: GunicornServer) -> None:
    from axiom_grid_client import Grid

    count = 3_000_000 if profile.name == "full" else 500_000
    agent_id, key = fixtures.hot_agent
    log(f"scenario 8: {count:,} take(1) in one thread, then {THREADS} threads on one lease")
    with Grid(f"http://{HOST}:{server.port}", key) as grid:
        one = grid.lease(agent_id, "AI_TOKENS", count, ttl=600)
        floor = max(_rate(_BareCounter(count).take, count) for _ in range(2))
        rate = _rate(one.take, count)
        one.close()
        report.check(
            SCENARIO,
            f"take(1) per second, one thread ({count:,})",
            f"{per_second(rate)} ({rate / floor:.0%} of a bare locked counter, {per_second(floor)})",
            f">= {TAKES_TARGET:,}/s",
            rate >= TAKES_TARGET,
        )

        before = _used(agent_id)
        shared = grid.lease(agent_id, "AI_TOKENS", count, ttl=600)
        sums = [0] * THREADS

        def worker(index: int) -> None:
            n = index % 3 + 1
            while shared.take(n):
                sums[index] += n

        threads = [threading.Thread(target=worker, args=(index,)) for index in range(THREADS)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds = time.perf_counter() - started
        shared.close()
        used = _used(agent_id) - before
    total = sum(sums)
    ok = used == total and total <= count
    report.add(
        SCENARIO,
        f"{THREADS} threads on one lease of {count:,}: units taken per second",
        per_second(total / seconds),
    )
    report.add(SCENARIO, "ledger used = sum of the takes, after close", f"{used:,} = {total:,}", "equal",
               "pass" if ok else "ERROR")  # fmt: skip
    if not ok:
        report.invariant_errors.append(f"lease: used {used} for takes summing to {total}")

"""One measurement in a fresh process, like a Celery worker or a web worker would run it.

``python -m bench.worker sweep budget_sweep|rules_evaluate|rules_evaluate_firing|scaling_evaluate`` times one
sweep (``rules_evaluate_firing``: the evaluation, after the states exist, in which every rule fires), counts
its queries (CaptureQueriesContext) and reads the process's peak RSS (VmHWM).
``python -m bench.worker allocate AGENT --count N --seconds S`` calls ``allocation_create`` in a loop.
Each prints one line ``BENCH_JSON {...}``.
Run by bench/run.py with the bench's environment (settings, database, Redis database 14).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path


def _setup() -> None:
    os.environ["DJANGO_SETTINGS_MODULE"] = "bench.settings"
    import django

    django.setup()
    from django.db import connection

    connection.ensure_connection()  # a worker is connected before its task arrives


def _peak_rss_mb() -> float:
    """This process's peak resident set: VmHWM, which starts afresh at exec. ``ru_maxrss`` does not: Linux
    carries the parent's high-water mark over fork and exec, so a worker started by a big parent would
    report the parent's peak. ``ru_maxrss`` only where /proc is not there."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def _sweep(name: str) -> dict:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from optimization.services.alerts import budget_sweep
    from optimization.services.rules import rules_evaluate
    from optimization.services.scaling import scaling_evaluate

    sweep = {
        "budget_sweep": budget_sweep,
        "rules_evaluate": rules_evaluate,
        "rules_evaluate_firing": _rules_evaluate_firing,
        "scaling_evaluate": scaling_evaluate,
    }[name]
    rss_before = _peak_rss_mb()
    with CaptureQueriesContext(connection) as queries:
        started = time.perf_counter()
        outcome = sweep()
        seconds = time.perf_counter() - started
    return {
        "sweep": name,
        "seconds": seconds,
        "queries": len(queries.captured_queries),
        "rss_before_mb": rss_before,
        "peak_rss_mb": _peak_rss_mb(),
        "outcome": outcome,
    }


def _rules_evaluate_firing() -> dict:
    """The evaluation after ``rules_evaluate`` created the states, once the longest rule duration has
    passed: every condition that still holds fires, and each firing writes an alert."""
    import datetime as dt

    from django.db.models import Max
    from django.utils import timezone

    from ledger.models import OptimizationRule
    from optimization.services.rules import rules_evaluate

    longest = OptimizationRule.objects.filter(enabled=True).aggregate(m=Max("duration_seconds"))["m"] or 0
    return rules_evaluate(now=timezone.now() + dt.timedelta(seconds=longest + 60))


def _allocate(agent_id: str, count: int, seconds: float, warmup: int) -> dict:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from allocation.services import allocation_create
    from bench.report import statements_seen
    from ledger.models import Agent

    agent = Agent.objects.select_related("tier").get(pk=agent_id)
    for _ in range(warmup):
        allocation_create(agent=agent, resource_type_id="AI_TOKENS", amount=1)
    with CaptureQueriesContext(connection) as queries, statements_seen(connection) as kinds:
        allocation_create(agent=agent, resource_type_id="AI_TOKENS", amount=1)
    done = 0
    started = time.perf_counter()
    deadline = started + seconds
    while done < count and time.perf_counter() < deadline:
        allocation_create(agent=agent, resource_type_id="AI_TOKENS", amount=1)
        done += 1
    elapsed = time.perf_counter() - started
    return {
        "allocations": done,
        "seconds": elapsed,
        "per_second": done / elapsed if elapsed else 0.0,
        "queries_per_allocation": len(queries.captured_queries),
        "query_kinds": kinds,
        "total_taken": warmup + 1 + done,
        "peak_rss_mb": _peak_rss_mb(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    sweep = commands.add_parser("sweep")
    sweep.add_argument(
        "name", choices=["budget_sweep", "rules_evaluate", "rules_evaluate_firing", "scaling_evaluate"]
    )
    allocate = commands.add_parser("allocate")
    allocate.add_argument("agent")
    allocate.add_argument("--count", type=int, required=True)
    allocate.add_argument("--seconds", type=float, required=True)
    allocate.add_argument("--warmup", type=int, default=50)
    args = parser.parse_args()
    _setup()
    if args.command == "sweep":
        result = _sweep(args.name)
    else:
        result = _allocate(args.agent, args.count, args.seconds, args.warmup)
    print("BENCH_JSON " + json.dumps(result, default=str), flush=True)


if __name__ == "__main__":
    main()

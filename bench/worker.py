"""One measurement in a fresh process, like a Celery worker or a web worker would run it.

``python -m bench.worker sweep NAME`` (one of ``SWEEPS``) times one sweep through its public service function
(``rules_evaluate_firing``: the evaluation, after the states exist, in which every rule fires), counts its
statements and reads the process's peak RSS (VmHWM): the memory of the process that ran the sweep.
``python -m bench.worker allocate AGENT[,AGENT...] --count N --seconds S`` calls ``allocation_create`` in a
loop, one thread per agent, then runs the same statement from bare psycopg for comparison.
Each prints one line ``BENCH_JSON {...}``.
Run by bench/run.py with the bench's environment (settings, database, Redis key prefix).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import resource
import sys
import time
from pathlib import Path


def _setup() -> None:
    os.environ["DJANGO_SETTINGS_MODULE"] = "bench.settings"
    import django

    django.setup()
    from django.db import connection

    from axiom_grid.startup import collector_tune

    collector_tune()  # as in a Celery pool process, where the sweeps run (axiom_grid.celery)

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


SWEEPS = ("budget_sweep", "rules_evaluate", "rules_evaluate_firing", "scaling_evaluate", "holds_expire")


def _sweep(name: str) -> dict:
    from django.db import connection

    from allocation.services import holds_expire
    from optimization.services.alerts import budget_sweep
    from optimization.services.rules import rules_evaluate
    from optimization.services.scaling import scaling_evaluate

    sweep = {
        "budget_sweep": budget_sweep,
        "rules_evaluate": rules_evaluate,
        "rules_evaluate_firing": _rules_evaluate_firing,
        "scaling_evaluate": scaling_evaluate,
        "holds_expire": holds_expire,
    }[name]
    statements = 0

    # Counted, not captured: CaptureQueriesContext keeps the text of every statement, and a sweep over a
    # million agents sends enough of it to make the memory this process measures its own.
    def count(execute, sql, params, many, context):
        nonlocal statements
        statements += 1
        return execute(sql, params, many, context)

    rss_before = _peak_rss_mb()
    with connection.execute_wrapper(count):
        started = time.perf_counter()
        outcome = sweep()
        seconds = time.perf_counter() - started
    return {
        "sweep": name,
        "seconds": seconds,
        "queries": statements,
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


def _allocate(agent_ids: list[str], count: int, seconds: float, warmup: int) -> dict:
    """``allocation_create`` in a loop, one thread per agent (each with its own connection, as Django
    gives every thread), all in this one process; then the same statement, from bare psycopg in the same
    threads, for the floor this machine and PostgreSQL set."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from allocation.services import allocation_create
    from bench.report import statements_seen
    from ledger.models import Agent

    agent = Agent.objects.get(pk=agent_ids[0])
    allocation_create(agent=agent, resource_type_id="AI_TOKENS", amount=1)
    with CaptureQueriesContext(connection) as queries, statements_seen(connection) as kinds:
        allocation_create(agent=agent, resource_type_id="AI_TOKENS", amount=1)

    def service(agent_id: str):
        agent = Agent.objects.get(pk=agent_id)
        for _ in range(warmup):
            allocation_create(agent=agent, resource_type_id="AI_TOKENS", amount=1)
        yield
        while True:
            allocation_create(agent=agent, resource_type_id="AI_TOKENS", amount=1)
            yield

    measured = _threads_run(service, agent_ids, count, seconds)
    floor = _threads_run(functools.partial(_bare_statement, warmup=warmup), agent_ids, count, seconds)
    return {
        **measured,
        "threads": len(agent_ids),
        "floor_per_second": floor["per_second"],
        "queries_per_allocation": len(queries.captured_queries),
        "query_kinds": kinds,
        # the warm-up, the two allocations above and the measured loop (the floor writes its own rows)
        "total_taken": 2 + len(agent_ids) * warmup + measured["allocations"],
        "floor_taken": len(agent_ids) * (warmup + 1) + floor["allocations"],
        "peak_rss_mb": _peak_rss_mb(),
    }


def _threads_run(loop, agent_ids: list[str], count: int, seconds: float) -> dict:
    """Run ``loop(agent_id)`` (a generator: it yields once when warmed up, then once per allocation) in one
    thread per agent, started together; stop at ``count`` allocations in all or after ``seconds``."""
    import threading

    from django.db import connection

    clock: dict[str, float] = {}

    def start_clock() -> None:  # run by the barrier once every thread is warm, before it lets them go
        clock["started"] = time.perf_counter()
        clock["deadline"] = clock["started"] + seconds

    ready = threading.Barrier(len(agent_ids) + 1, action=start_clock)
    done = [0] * len(agent_ids)
    per_thread = max(1, count // len(agent_ids))
    errors: list[BaseException] = []

    def run(index: int, agent_id: str) -> None:
        steps = loop(agent_id)
        try:
            next(steps)  # warmed up
            ready.wait()
            while done[index] < per_thread and time.perf_counter() < clock["deadline"]:
                next(steps)
                done[index] += 1
        except BaseException as error:  # noqa: BLE001 - reported by the caller
            errors.append(error)
            ready.abort()
        finally:
            steps.close()
            connection.close()

    threads = [threading.Thread(target=run, args=pair) for pair in enumerate(agent_ids)]
    for thread in threads:
        thread.start()
    with contextlib.suppress(threading.BrokenBarrierError):  # a thread failed: its error is raised below
        ready.wait(timeout=120)
    for thread in threads:
        thread.join(timeout=seconds + 120)
    if errors or "started" not in clock:
        raise RuntimeError(f"allocation loop failed: {errors[0] if errors else 'no start'!r}")
    elapsed = time.perf_counter() - clock["started"]
    allocations = sum(done)
    return {"allocations": allocations, "seconds": elapsed, "per_second": allocations / elapsed}


def _bare_statement(agent_id: str, warmup: int):
    """The service's own statement, as the service sends it (seen once through Django's public
    ``execute_wrapper``, so the floor follows the service whatever it sends), then run from a plain psycopg
    connection with the same cursor class and only the allocation id changed: what PostgreSQL and the
    driver cost without the service. The ids are time-ordered (UUID version 7), as the service's are:
    random ones would land on random pages of the primary key index and cost PostgreSQL more than the
    service pays. Takes ``warmup + 1`` allocations before it yields the first time."""
    import psycopg
    from django.db import connection

    from allocation.services import allocation_create
    from ledger.ids import uuid7
    from ledger.models import Agent

    sent: list[tuple[str, list]] = []

    def capture(execute, sql, params, many, context):
        sent.append((sql, list(params or ())))
        return execute(sql, params, many, context)

    agent = Agent.objects.get(pk=agent_id)
    with connection.execute_wrapper(capture):
        allocation = allocation_create(agent=agent, resource_type_id="AI_TOKENS", amount=1)
    # The last statement that carried the new allocation's id is the one that wrote it.
    sql, params = next((sql, params) for sql, params in reversed(sent) if allocation.id in params)
    id_at = params.index(allocation.id)
    # Django's connection parameters carry its cursor class: the statement is bound as the service binds it.
    with (
        psycopg.connect(**connection.get_connection_params(), autocommit=True) as bare,
        bare.cursor() as cursor,
    ):
        for _ in range(warmup):
            params[id_at] = uuid7()
            cursor.execute(sql, params)
            cursor.fetchone()
        yield
        while True:
            params[id_at] = uuid7()
            cursor.execute(sql, params)
            cursor.fetchone()
            yield


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    sweep = commands.add_parser("sweep")
    sweep.add_argument("name", choices=SWEEPS)
    sweep.add_argument("--wait", action="store_true", help="after BENCH_READY, start on a line on stdin")
    allocate = commands.add_parser("allocate")
    allocate.add_argument("agents", help="agent ids, comma-separated: one thread each")
    allocate.add_argument("--count", type=int, required=True)
    allocate.add_argument("--seconds", type=float, required=True)
    allocate.add_argument("--warmup", type=int, default=50)
    args = parser.parse_args()
    _setup()
    if args.command == "sweep":
        print("BENCH_READY", flush=True)  # set up and connected: the sweep starts now
        if args.wait:
            sys.stdin.readline()  # ...or once told to (SweepProcess.go), when something must start first
        result = _sweep(args.name)
    else:
        result = _allocate(args.agents.split(","), args.count, args.seconds, args.warmup)
    print("BENCH_JSON " + json.dumps(result, default=str), flush=True)


if __name__ == "__main__":
    main()

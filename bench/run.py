"""Run every benchmark scenario and print one table: ``python -m bench.run [--quick]``.

Scenarios (docs/benchmarks.md says what each measures and why):

1. Many agents: one allocation over HTTP (API key, unique Idempotency-Key, audit, usage row) spread over 64
   agents, against the bare baseline (a DRF view with no middleware and no authentication, served by its
   own gunicorn) over 64 rows; 32 connections, rounds alternating between the two; ratios judged.
2. Batch ingestion: 1000-item batches, items per second (skipped when the batch routes do not exist).
3. Hot agent: the same, all 32 connections on one agent and one resource, against the bare baseline on one
   row; ratios judged; exact final counts; pgbench's hot-row figure beside it as context.
4. Sweeps (budget, rules and their firing evaluation, scaling, hold expiry) at 100,000 agents and at the fleet
   size (``--agents``, a million by default), each in a fresh process: seconds, statements, peak RSS, ratio.
5. Reading at scale: p95 of the metrics, cost and usage endpoints of one agent over a large usage log.
6. The allocation service alone, in one process.
7. Budgets: scenario 1's allocation by agents each under a hard agent, team and organization budget, against
   the bare baseline; spread (each agent its own team and organization) judged as a ratio, one hot team (every
   agent in one team) reported beside it; every budget must equal its usage log afterwards.
8. The client's lease (bench/lease.py).
9. Each sweep again at the fleet size while the grid serves a steady allocation load: allocation p99 and max
   with the sweep running and without.

The full run (``make bench``) writes its table and the machine into docs/benchmarks.md. ``--quick``
(``make bench-quick``, and tests/test_bench_quick.py) runs a small version of each in a few minutes: it
checks that the harness works, not the timings.

Exit status: 0 when every scenario ran (whether or not it met its target), 1 when an invariant was broken
(the hot agent's counters or a budget disagree with the usage log), 2 when a scenario could not run at all.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench import db, lease, scenarios, sweeps
from bench.loadgen import wrk_available
from bench.report import DOCS_PATH, Report, docs_write, log, machine_facts, machine_line
from bench.server import ROOT, GunicornServer


def _guarded(report: Report, scenario: str, function, *args) -> None:
    """Run one scenario; a scenario that cannot run is an ERROR row, and the others still run."""
    started = time.perf_counter()
    try:
        function(report, *args)
    except Exception as exc:
        message = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300]
        report.add(scenario, "could not run", message, "-", "ERROR")
        report.harness_errors.append(f"{scenario}: {message}")
        traceback.print_exc()
    log(f"{scenario} took {time.perf_counter() - started:.0f} s")


ALL_SCENARIOS = ("1", "2", "3", "4", "5", "6", "7", "8", "9")


def _positive(text: str) -> int:
    value = int(text.replace("_", "").replace(",", ""))
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _sweep_names(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [name for name in names if name not in sweeps.SWEEPS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"not a sweep: {', '.join(unknown) if unknown else repr(text)}")
    return names


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small version of each scenario")
    parser.add_argument(
        "--loadgen",
        choices=["auto", "wrk", "python"],
        default="auto",
        help="load generator of scenarios 1, 3 and 7: wrk if installed (auto), or the built-in Python client",
    )
    parser.add_argument(
        "--workers", type=int, default=3, help="gunicorn workers (default 3, as the Dockerfile)"
    )
    parser.add_argument("--worker-class", default="sync", help="gunicorn worker class (default sync)")
    parser.add_argument("--threads", type=int, default=1, help="threads per worker (gthread)")
    parser.add_argument(
        "--scenarios", default=",".join(ALL_SCENARIOS), help="a subset to run, e.g. 1,3 (default: all)"
    )
    parser.add_argument(
        "--agents",
        type=_positive,
        help=f"fleet size of the sweeps, scenarios 4 and 9 (default {sweeps.FULL.agents:,}; "
        f"--quick {sweeps.QUICK.agents:,})",
    )
    parser.add_argument(
        "--reference-agents",
        type=_positive,
        help=f"the fleet size the sweeps are compared with (default {sweeps.FULL.reference:,}; "
        f"--quick {sweeps.QUICK.reference:,}; a tenth of --agents when that is smaller)",
    )
    parser.add_argument(
        "--sweeps",
        type=_sweep_names,
        default=",".join(sweeps.SWEEPS),
        help="the sweeps of scenarios 4 and 9, e.g. holds_expire (default: all of them)",
    )
    parser.add_argument(
        "--docs",
        choices=["auto", "yes", "no"],
        default="auto",
        help="write the results into docs/benchmarks.md (auto: a full run of every scenario)",
    )
    args = parser.parse_args(argv)
    if args.loadgen == "wrk" and not wrk_available():
        parser.error("--loadgen wrk: wrk is not installed (apt-get install wrk)")
    return args


def _environment(database_url: str, redis_url: str, redis_ok: bool) -> None:
    """Point this process and every process it starts at the bench's database and Redis database."""
    os.environ.update(
        {
            "DATABASE_URL": database_url,
            "DJANGO_SETTINGS_MODULE": "bench.settings",
            "DEBUG": "false",
            # The servers run as in production (DEBUG off), which needs a key; this one is the bench's own.
            "SECRET_KEY": os.environ.get("SECRET_KEY") or "bench-only-" + "k" * 50,
            "LOG_LEVEL": "WARNING",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if redis_ok:
        os.environ["REDIS_URL"] = redis_url
    else:
        os.environ.pop("REDIS_URL", None)


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    profile = scenarios.QUICK if args.quick else scenarios.FULL
    sweep_profile = sweeps.sweep_profile(
        quick=args.quick, agents=args.agents, reference=args.reference_agents, names=args.sweeps
    )
    chosen = {part.strip() for part in args.scenarios.split(",") if part.strip()}
    use_wrk = args.loadgen == "wrk" or (args.loadgen == "auto" and wrk_available())
    started = time.perf_counter()

    database_url = db.bench_database_url(quick=args.quick)
    redis_url = db.bench_redis_url()
    redis_prefix = db.redis_key_prefix(database_url)
    redis_ok = db.redis_forget(redis_url, redis_prefix)
    _environment(database_url, redis_url, redis_ok)
    os.environ["REDIS_KEY_PREFIX"] = redis_prefix
    report = Report()
    redis_text = redis_url if redis_ok else "not reachable"
    log(f"{profile.name} run: database {db.database_name(database_url)}, Redis {redis_text}")
    if {"4", "9"} & chosen:
        log(f"sweep fleet: {sweep_profile.agents:,} agents, compared with {sweep_profile.reference:,}")
    if not redis_ok:
        report.notes.append(
            f"Redis not reachable at {redis_url}: ran with the filesystem broker and file cache"
        )

    with db.DatabaseLock(database_url), tempfile.TemporaryDirectory(prefix="axiom-bench-") as workdir:
        db.database_recreate(database_url)
        import django

        django.setup()
        from django.core.management import call_command
        from django.db import connections

        from ledger.services import reference_data_load

        call_command("migrate", verbosity=0, interactive=False)
        reference_data_load()
        scenarios.baseline_tables_create()
        fixtures = scenarios.fixtures_create()
        facts = machine_facts(database_url, redis_ok, redis_url)
        log(f"setup took {time.perf_counter() - started:.0f} s")

        # The grid and the bare baseline, each on its own gunicorn with the same worker configuration.
        workers = {"workers": args.workers, "worker_class": args.worker_class, "threads": args.threads}
        server = GunicornServer(
            application="bench.wsgi:application", log_path=Path(workdir) / "gunicorn.log", **workers
        )
        baseline_server = GunicornServer(
            application="bench.baseline_wsgi:application",
            log_path=Path(workdir) / "gunicorn-baseline.log",
            **workers,
        )
        servers = (server, baseline_server)
        # In this order: the writes on a small database first, then the 10 million rows, then the sweeps
        # (which then also read a large usage log, as they would in production).
        with_server = [
            ("1", "1 many agents", scenarios.allocation, (profile, fixtures, *servers, use_wrk)),
            ("2", "2 batch", scenarios.batch, (profile, fixtures, server)),
            ("3", "3 hot agent", scenarios.hot_agent, (profile, fixtures, *servers, database_url, use_wrk)),
            ("7", "7 budgets", scenarios.budgets, (profile, *servers, use_wrk)),
            ("6", "6 allocate in-process", scenarios.in_process, (profile, fixtures)),
            ("5", "5 reads", scenarios.reads, (profile, fixtures, server)),
            ("8", "8 SDK lease", lease.lease, (profile, fixtures, server)),
        ]
        if {"1", "2", "3", "5", "7", "8"} & chosen:
            baseline = baseline_server if {"1", "3", "7"} & chosen else contextlib.nullcontext()
            with server, baseline:
                for key, label, function, extra in with_server:
                    if key in chosen:
                        _guarded(report, label, function, *extra)
        elif "6" in chosen:
            _guarded(report, "6 allocate in-process", scenarios.in_process, profile, fixtures)
        if "4" in chosen:
            _guarded(report, "4 sweeps", sweeps.sweeps, sweep_profile)
        if "9" in chosen:
            with server:
                load_agents = fixtures.alloc_agents
                _guarded(report, "9 sweep under load", sweeps.under_load, sweep_profile, load_agents, server)
        connections.close_all()

    if redis_ok:
        db.redis_forget(redis_url, redis_prefix)
    report.rows.sort(key=lambda row: row.scenario[0])  # stable: scenario order, rows as measured
    loadgen = "wrk (scenarios 1, 3, 7) + asyncio client" if use_wrk else "asyncio client"
    print()
    description = f"{server.description} per server"
    print(f"Axiom Grid bench ({profile.name}): {description}, loopback, load generator {loadgen}")
    print(f"machine: {machine_line(facts)}")
    print(report.table())
    for note in report.notes:
        print(f"note: {note}")
    elapsed = time.perf_counter() - started
    every = chosen == set(ALL_SCENARIOS) and args.sweeps == sweeps.SWEEPS
    if args.docs == "yes" or (args.docs == "auto" and not args.quick and every):
        sweeps_only = chosen <= {"4", "9"}  # their own block: a full run's table stays
        ran = ", ".join(sorted(chosen))
        docs_write(report, facts, profile.name, ran, description, loadgen, sweeps_only=sweeps_only)
        print(f"results written to {DOCS_PATH.relative_to(ROOT)}")
    if report.harness_errors:
        print(f"bench: harness errors in {len(report.harness_errors)} scenario(s) ({elapsed:.0f} s)")
        return 2
    if report.invariant_errors:
        print(f"bench: invariant broken: {'; '.join(report.invariant_errors)} ({elapsed:.0f} s)")
        return 1
    print(f"bench: harness ok, every scenario ran ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Scenarios 4 and 9: the fleet-wide sweeps at scale, alone and under allocation load.

Scenario 4 grows the sweep fleet to the reference size (100,000 agents), runs every sweep, grows it to the
size asked for (``--agents``, 1,000,000 by default) and runs every sweep again, each in a fresh process
(``bench.worker sweep``): seconds, statements sent and the peak RSS of that process, at both sizes, and
the ratio of the times. Scenario 9 runs each sweep again at the full size while the grid's gunicorn serves a
steady allocation load, and compares the allocation latency (p99, max) with the sweep running and without.

The sweeps are called only through their public service functions; what they do inside (chunks,
transactions) is theirs.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace

from bench import db
from bench.loadgen import LoadResult, python_load
from bench.report import Report, log, ms
from bench.server import ROOT, GunicornServer
from bench.worker import SWEEPS

SWEEP_APPLICATION_NAME = "axiom-bench-sweep"
LOAD_AMOUNT = 1
LOAD_FLEET_AGENTS = 32  # agents of the sweep fleet in the load (besides scenario 1's)
LOAD_OTHER_AGENTS = 32  # scenario 1's agents, which no sweep acts on

TARGETS = {
    "reference_seconds": 5.0,  # each sweep at the reference size (100,000 agents)
    "time_ratio_per_size_ratio": 1.2,  # 1M / 100k: at most 12x for 10x the agents
    "peak_rss_mb": 300.0,
    "load_max_ms": 1000.0,  # the slowest allocation while a sweep runs
}

# A sweep run shorter than this is one sample among the machine's noise (a few batches, a fraction of a
# second): it is run the profile's ``runs`` times in all, each from the same starting state, and its median
# run is the one reported. Longer runs are measured once.
REPEAT_UNDER_SECONDS = 5.0
# The firing evaluation starts from the states the evaluation before it left, which its own run changes: it
# cannot be run again from the same state.
NOT_REPEATABLE = frozenset({"rules_evaluate_firing"})


@dataclass(frozen=True)
class SweepProfile:
    agents: int  # the fleet size of the run (--agents)
    reference: int  # the size it is compared with (--reference-agents)
    timeout_base: float  # seconds a sweep may take: this, plus timeout_per_agent per agent
    timeout_per_agent: float
    load_rate: float  # allocations per second of scenario 9's load
    load_connections: int
    load_quiet_seconds: float  # the load without a sweep, before each sweep
    names: tuple[str, ...] = SWEEPS  # the sweeps that run (--sweeps)
    runs: int = 1  # runs of a short sweep (REPEAT_UNDER_SECONDS), of which the median is reported

    @property
    def timeout(self) -> float:
        return self.timeout_base + self.timeout_per_agent * self.agents

    @property
    def id_width(self) -> int:
        return len(str(self.agents))


FULL = SweepProfile(
    agents=1_000_000,
    reference=100_000,
    timeout_base=120,
    timeout_per_agent=0.0005,  # 620 s at a million
    load_rate=100,
    load_connections=8,
    load_quiet_seconds=10,
    runs=3,
)
QUICK = SweepProfile(
    agents=1_000,
    reference=200,
    timeout_base=60,
    timeout_per_agent=0.0,
    load_rate=40,
    load_connections=4,
    load_quiet_seconds=1,
)


def sweep_profile(
    *, quick: bool, agents: int | None, reference: int | None, names: tuple[str, ...] = SWEEPS
) -> SweepProfile:
    """The profile with the sizes and sweeps asked for. A reference at or above the fleet size becomes a
    tenth of it."""
    profile = QUICK if quick else FULL
    agents = agents or profile.agents
    reference = reference or profile.reference
    if reference >= agents:
        reference = max(1, agents // 10)
    return replace(profile, agents=agents, reference=reference, names=names)


# --- The fleet ------------------------------------------------------------------------------------------

_fleet = {"agents": 0}


def _sql(statement: str, params=None, *, url: str | None = None) -> None:
    """Run ``statement`` in the bench database, or in the database ``url`` names (the reference copy)."""
    if url is not None:
        import psycopg

        with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(statement, params)
        return
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(statement, params)


def _scalar(statement: str, params=None):
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(statement, params)
        return cursor.fetchone()[0]


def fleet_grow(report: Report, profile: SweepProfile, agents: int) -> None:
    """The sweep fleet, grown to ``agents`` (nothing to do when it is that large already)."""
    from django.db import connection, transaction

    from ledger.periods import month_bounds

    first = _fleet["agents"] + 1
    if agents < first:
        return
    start, end = month_bounds(dt.datetime.now(dt.UTC))
    log(f"sweeps: growing the fleet to {agents:,} agents")
    started = time.perf_counter()
    with transaction.atomic(), connection.cursor() as cursor:
        db.sweep_fleet_grow(cursor, first=first, last=agents, width=profile.id_width, start=start, end=end)
    # As pgbench does after its load: the state autovacuum keeps on a running server (hint bits set, the
    # visibility map and statistics up to date), not autovacuum working through the new rows while sweeps
    # are timed.
    _sql("VACUUM (ANALYZE)")
    _checkpoint(report)
    _fleet["agents"] = agents
    quotas = _scalar("SELECT count(*) FROM quotas WHERE agent_id LIKE 'sw-%%'")
    report.add(
        "4 sweeps",
        f"fleet of {agents:,} agents (SQL generate + VACUUM ANALYZE)",
        f"{quotas:,} quota rows; agents {first:,}-{agents:,} in {time.perf_counter() - started:.0f} s",
    )


def _checkpoint(report: Report) -> None:
    """Finish the checkpoint that writing the fleet started, so that it does not go on writing pages out
    under the sweeps that are timed next (a checkpoint is spread over minutes, and every page it writes is
    logged in full again when a sweep next changes it). A server where the bench's user may not
    (``pg_checkpoint``) is measured without it, and the table says so."""
    from django.db import DatabaseError

    try:
        _sql("CHECKPOINT")
    except DatabaseError as exc:
        note = f"scenario 4: no CHECKPOINT after writing the fleet ({str(exc).strip().splitlines()[0]})"
        if note not in report.notes:
            report.notes.append(note)


def _policies_create() -> None:
    """A scaling policy per tier. ENTERPRISE scales vertically at its bound (+10 % of the base limit of the
    most used resource): the fleet's agents at their maximum instance count get quota grants, which lock
    quota rows that allocations take."""
    from optimization.models import ScalingPolicy

    metrics = {"FREE": "budget_utilization_percent"}
    for tier in ("FREE", "PRO", "ENTERPRISE"):
        ScalingPolicy.objects.update_or_create(
            tier_id=tier,
            defaults={
                "metric": metrics.get(tier, "resource_utilization_percent"),
                "scale_up_threshold": 80,
                "scale_down_threshold": 30,
                "step": 1,
                "min_instances": 1,
                "max_instances": db.SWEEP_AT_BOUND_INSTANCES,
                "cooldown_seconds": 600,
                "enabled": True,
                "quota_step_percent": 10 if tier == "ENTERPRISE" else 0,
            },
        )


def _before(name: str, url: str | None = None) -> None:
    """What each sweep starts from: no alerts, states or scaling events, every agent as generated
    (the firing evaluation instead starts from the states the evaluation before it left), and every
    expiring hold open again for the expiry sweep. In the bench database, or in the one ``url`` names."""
    if name != "rules_evaluate_firing":
        for statement in db.SWEEP_RESET_SQL.split(";"):
            if statement.strip():
                _sql(statement, url=url)
    if name == "holds_expire":
        _sql(db.SWEEP_HOLDS_ARM_SQL, url=url)
        # The state a running server's autovacuum keeps: statistics that know of the open holds (the
        # fleet's saw every hold ended), and none of the dead rows the run before left, which autovacuum
        # would otherwise clean up while this run is timed.
        _sql("VACUUM (ANALYZE) allocation_allocation", url=url)


# --- One sweep in its own process -----------------------------------------------------------------------


def _sweep_env(timeout: float, database_url: str | None = None) -> dict[str, str]:
    """The sweep worker's environment. JIT is off for its session (``BENCH_SWEEP_PGOPTIONS`` overrides):
    PostgreSQL cannot interrupt a JIT compilation (neither a timeout nor a cancel nor pg_terminate_backend
    ends it), and a statement whose size grows with the fleet can take minutes to compile, holding up every
    DROP DATABASE on the server meanwhile. The statement timeout ends whatever else runs away, on the
    server's side."""
    options = os.environ.get("BENCH_SWEEP_PGOPTIONS", "-c jit=off")
    return {
        **os.environ,
        **({"DATABASE_URL": database_url} if database_url else {}),
        "PGAPPNAME": SWEEP_APPLICATION_NAME,
        "PGOPTIONS": f"{options} -c statement_timeout={int(timeout * 1000)}",
    }


def _sweep_backends_end(database_url: str | None = None) -> None:
    """End the server sessions a killed sweep worker left behind (they would go on holding row locks), in
    the bench database or in the one ``database_url`` names."""
    _sql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name = %s AND pid <> pg_backend_pid()",
        [SWEEP_APPLICATION_NAME],
        url=database_url,
    )


class SweepProcess:
    """``python -m bench.worker sweep NAME`` started in the background, its output in temporary files."""

    def __init__(self, name: str, timeout: float, *, wait: bool = False, database_url: str | None = None):
        """With ``wait`` the worker sets up, then starts the sweep only on ``go()``. ``database_url``: another
        database than the bench's (the reference copy)."""
        self.name = name
        self.timeout = timeout
        self.database_url = database_url
        # Files, not pipes: nothing reads the worker's output until it ends, and a full pipe would stop it.
        self.output = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed in result()
        self.errors = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed in result()
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.worker", "sweep", name, *(["--wait"] if wait else [])],
            cwd=ROOT,
            env=_sweep_env(timeout, database_url),
            stdin=subprocess.PIPE if wait else subprocess.DEVNULL,
            stdout=self.output,
            stderr=self.errors,
        )

    def wait_ready(self) -> None:
        """Until the worker has set Django up and connected (it says BENCH_READY), or has ended."""
        deadline = time.monotonic() + 120
        while self.process.poll() is None and time.monotonic() < deadline:
            self.output.seek(0)
            if "BENCH_READY" in self.output.read():
                return
            time.sleep(0.05)

    def go(self) -> None:
        """Start the sweep of a worker started with ``wait`` (once it is ready)."""
        if self.process.stdin is not None and not self.process.stdin.closed:
            with contextlib.suppress(BrokenPipeError):  # a worker that already failed: result() says why
                self.process.stdin.write(b"go\n")
                self.process.stdin.close()

    def done(self) -> bool:
        return self.process.poll() is not None or time.monotonic() - self.started > self.timeout + 30

    def result(self) -> dict:
        """The worker's BENCH_JSON, or ``{"timeout": True}``; an error when it failed otherwise."""
        try:
            remaining = self.timeout + 30 - (time.monotonic() - self.started)
            self.process.wait(timeout=max(0.0, remaining))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            _sweep_backends_end(self.database_url)
            return {"timeout": True}
        finally:
            self.output.seek(0)
            self.errors.seek(0)
            stdout, stderr = self.output.read(), self.errors.read()
            self.output.close()
            self.errors.close()
        line = next((ln for ln in stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
        if line is None and "statement timeout" in stderr:
            return {"timeout": True}
        if self.process.returncode != 0 or line is None:
            raise RuntimeError(f"{self.name} failed: {stderr.strip()[-600:]}")
        return json.loads(line.removeprefix("BENCH_JSON "))


def _outcome_text(name: str, outcome) -> str:
    if isinstance(outcome, dict):
        keys = ("alerts", "fired", "conditions_true", "scaled_up", "scaled_down", "vertical", "evaluated")
        shown = {k: outcome[k] for k in keys if k in outcome}
        return ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in shown.items())
    if isinstance(outcome, int):
        return f"{outcome:,} {'holds ended' if name == 'holds_expire' else 'alerts'}"
    return str(outcome)[:80]


# --- Scenario 4 -----------------------------------------------------------------------------------------


def sweeps(report: Report, profile: SweepProfile) -> None:
    """Scenario 4: every sweep at the reference size and at the fleet size, each run in a fresh process.

    The fleet is grown to the reference size and the bench database copied (the reference database), then
    grown to the full size; the runs at the two sizes then take turns, each in its own database on the same
    server, so that the machine's speed, which drifts by tens of percent over minutes on a shared VM, is
    the same for both sides of each ratio."""
    small, large = profile.reference, profile.agents
    _policies_create()
    options = os.environ.get("BENCH_SWEEP_PGOPTIONS", "-c jit=off")
    report.notes.append(
        f"scenarios 4 and 9: each sweep runs in a fresh process with PGOPTIONS '{options}' "
        "(PostgreSQL cannot interrupt a JIT compilation, not even at the statement timeout)"
    )
    report.notes.append(
        f"scenario 4: the {small:,}-agent fleet is a copy of the bench database made at that size; the runs "
        "at the two sizes alternate"
    )
    fleet_grow(report, profile, small)
    reference_url = _reference_copy()
    try:
        fleet_grow(report, profile, large)
        for name in profile.names:
            little, big = _sweep_measure(name, {small: reference_url, large: None}, profile)
            _sweep_rows(report, f"4 {name}", little, big, small, large, profile)
    finally:
        db.database_drop(reference_url)


def _reference_copy() -> str:
    """A copy of the bench database as it is now, named after it (``..._reference``); returns its URL.
    Copying needs the bench database without sessions: this process's own is closed first (Django opens it
    again when next used)."""
    from django.db import connections

    connections.close_all()
    log("sweeps: copying the fleet as the reference database")
    return db.database_copy(os.environ["DATABASE_URL"], suffix="_reference")


def _sweep_measure(name: str, databases: dict[int, str | None], profile: SweepProfile) -> list[dict]:
    """One sweep at each size (fleet size -> the URL of its database, None for the bench database): runs
    in fresh processes from the state ``_before`` sets, the sizes taking turns. A size whose run is short
    runs again, up to the profile's ``runs`` in all, and gives its median run, with the number of runs as
    ``runs``. The results in the order of ``databases``."""
    runs: dict[int, list[dict]] = {size: [] for size in databases}
    pending = list(databases)
    while pending:
        for size in list(pending):
            url = databases[size]
            _before(name, url)
            count = len(runs[size])
            log(f"scenario 4: {name} over {size:,} agents" + (f", run {count + 1}" if count else ""))
            result = SweepProcess(name, profile.timeout, database_url=url).result()
            log(f"scenario 4: {name} over {size:,} agents: {_result_text(result, profile.timeout)}")
            runs[size].append(result)
            short = not result.get("timeout") and result["seconds"] < REPEAT_UNDER_SECONDS
            if not short or name in NOT_REPEATABLE or len(runs[size]) >= profile.runs:
                pending.remove(size)
    return [_median_run(runs[size]) for size in databases]


def _median_run(runs: list[dict]) -> dict:
    if len(runs) == 1:
        return runs[0]
    median = sorted(runs, key=lambda run: run["seconds"])[len(runs) // 2]
    return {**median, "runs": len(runs), "peak_rss_mb": max(run["peak_rss_mb"] for run in runs)}


def _result_text(result: dict, timeout: float) -> str:
    if result.get("timeout"):
        return _seconds_text(result, timeout)
    rss = result["peak_rss_mb"]
    return f"{_seconds_text(result, timeout)}, {result['queries']:,} statements, {rss:.0f} MB"


def _seconds_text(result: dict, timeout: float) -> str:
    if result.get("timeout"):
        return f"timed out after {timeout:.0f} s"
    runs = f", median of {result['runs']} runs" if result.get("runs", 1) > 1 else ""
    return f"{result['seconds']:.2f} s ({_outcome_text(result['sweep'], result['outcome'])}{runs})"


def _sweep_rows(
    report: Report,
    scenario: str,
    little: dict,
    big: dict,
    small: int,
    large: int,
    profile: SweepProfile,
) -> None:
    both = not little.get("timeout") and not big.get("timeout")
    target = TARGETS["reference_seconds"]
    report.check(
        scenario,
        f"seconds @ {small:,} agents",
        _seconds_text(little, profile.timeout),
        f"<= {target:.0f} s",
        not little.get("timeout") and little["seconds"] <= target,
    )
    report.add(scenario, f"seconds @ {large:,} agents", _seconds_text(big, profile.timeout))
    size_ratio = large / small
    allowed = TARGETS["time_ratio_per_size_ratio"] * size_ratio
    if both:
        ratio = big["seconds"] / little["seconds"] if little["seconds"] > 0 else float("inf")
        report.check(
            scenario,
            f"time ratio {large:,} / {small:,} ({size_ratio:.0f}x the agents)",
            f"{ratio:.1f}x",
            f"<= {allowed:.0f}x",
            ratio <= allowed,
        )
        report.check(
            scenario,
            f"queries @ {small:,} / @ {large:,}",
            f"{little['queries']:,} / {big['queries']:,}",
            f"<= {size_ratio:.0f}x (a fixed number per chunk)",
            big["queries"] <= little["queries"] * size_ratio,
        )
    else:
        report.add(scenario, f"time ratio {large:,} / {small:,}", "no ratio: a run timed out", "-", "FAIL")
    measured = [r for r in (little, big) if not r.get("timeout")]
    if measured:
        peak = max(r["peak_rss_mb"] for r in measured)
        text = " / ".join(
            "timed out" if r.get("timeout") else f"{r['peak_rss_mb']:.0f} MB" for r in (little, big)
        )
        report.check(
            scenario,
            f"peak RSS of the sweep's process @ {small:,} / @ {large:,}",
            f"{text} (at start {measured[0]['rss_before_mb']:.0f} MB)",
            f"<= {TARGETS['peak_rss_mb']:.0f} MB",
            both and peak <= TARGETS["peak_rss_mb"],
        )


# --- Scenario 9: allocations while a sweep runs ---------------------------------------------------------

_load_keys: list[tuple[str, str]] = []


def _fleet_load_agents(profile: SweepProfile) -> list[tuple[str, str]]:
    """Up to LOAD_FLEET_AGENTS agents of the fleet at their scaling bound (ENTERPRISE, at maximum instances,
    where scaling up grants quota), spread over the whole fleet, each with an API key."""
    from allocation.keys import api_key_issue
    from ledger.models import Agent

    if _load_keys:
        return _load_keys
    numbers = list(range(2, profile.agents + 1, 3000))  # SWEEP_AT_BOUND: g % 3000 = 2
    step = max(1, len(numbers) // LOAD_FLEET_AGENTS)
    chosen = numbers[::step][:LOAD_FLEET_AGENTS]
    ids = [f"{db.SWEEP_PREFIX}{number:0{profile.id_width}d}" for number in chosen]
    for agent in Agent.objects.filter(pk__in=ids).order_by("pk"):
        _load_keys.append((agent.pk, api_key_issue(agent=agent, name="bench-load")[1]))
    return _load_keys


def _load(
    server: GunicornServer,
    targets: list[tuple[str, str]],
    profile: SweepProfile,
    *,
    seconds: float,
    until=None,
) -> LoadResult:
    body = json.dumps({"resource_type": "AI_TOKENS", "amount": LOAD_AMOUNT}).encode()
    run = f"s{time.time_ns():x}"

    def make(index: int):
        path, key = targets[index % len(targets)]
        headers = {
            "Content-Type": "application/json",
            "Authorization": f"Bearer {key}",
            "Idempotency-Key": f"{run}-{index}",
        }
        return "POST", path, headers, body

    return python_load(
        port=server.port,
        make_request=make,
        connections=profile.load_connections,
        max_requests=int(profile.load_rate * (seconds + 60)),
        seconds=seconds,
        rate=profile.load_rate,
        until=until,
    )


def _started(sweep: SweepProcess):
    """The load's stop condition that starts ``sweep`` when the load claims its first request: the
    requests claimed while it runs are the ones measured, even when it takes less than one request."""
    started = False

    def until() -> bool:
        nonlocal started
        if not started:
            started = True
            sweep.go()
            return False
        return sweep.done()

    return until


def _load_text(result: LoadResult) -> str:
    slowest = max(result.latencies_ms) if result.latencies_ms else None
    return f"p99 {ms(result.p99_ms)}, max {ms(slowest)} ({result.requests:,} requests)"


def _server_errors(result: LoadResult) -> int:
    return result.socket_errors + sum(n for status, n in result.statuses.items() if status >= 500)


def under_load(report: Report, profile: SweepProfile, other_agents: list[tuple[str, str]], server) -> None:
    """Scenario 9: before each sweep, the allocation load alone for a few seconds; then the same load for as
    long as the sweep runs (at the fleet size). The slowest allocation during the sweep is judged."""
    from django.urls import reverse

    _policies_create()
    fleet_grow(report, profile, profile.agents)
    agents = _fleet_load_agents(profile) + other_agents[:LOAD_OTHER_AGENTS]
    targets = [(reverse("api:allocations", kwargs={"agent_id": a}), key) for a, key in agents]
    report.add(
        "9 sweep under load",
        "load: POST allocations, fresh Idempotency-Key each",
        f"{profile.load_rate:.0f}/s over {profile.load_connections} connections to {server.description}; "
        f"{len(agents)} agents ({len(agents) - len(other_agents[:LOAD_OTHER_AGENTS])} of the fleet at their "
        f"scaling bound, the rest outside it); fleet {profile.agents:,} agents",
    )
    _load(server, targets, profile, seconds=profile.load_quiet_seconds)  # warm the workers (caches)
    target = TARGETS["load_max_ms"]
    for name in profile.names:
        scenario = f"9 {name}"
        _before(name)
        log(f"scenario 9: allocation load alone ({profile.load_quiet_seconds:.0f} s), then during {name}")
        quiet = _load(server, targets, profile, seconds=profile.load_quiet_seconds)
        sweep = SweepProcess(name, profile.timeout, wait=True)
        sweep.wait_ready()
        during = _load(server, targets, profile, seconds=profile.timeout + 30, until=_started(sweep))
        result = sweep.result()
        errors = _server_errors(quiet) + _server_errors(during)
        log(f"scenario 9: {name}: without {_load_text(quiet)}; during {_load_text(during)}, {errors} errors")
        report.add(scenario, "allocations without a sweep", _load_text(quiet))
        slowest = max(during.latencies_ms) if during.latencies_ms else float("inf")
        report.check(
            scenario,
            "allocations during the sweep",
            _load_text(during)
            + (f"; {errors} socket errors or 5xx" if errors else "")
            + f"; the sweep {_seconds_text(result, profile.timeout)}",
            f"max <= {target:.0f} ms, no errors",
            slowest <= target and errors == 0 and not result.get("timeout"),
        )

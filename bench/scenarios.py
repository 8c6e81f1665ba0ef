"""The scenarios of the bench, each bounded in requests and in seconds (see bench/run.py); the sweeps' (4 and
9) are in bench/sweeps.py."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

from bench import db, ingest
from bench.loadgen import LoadResult, python_load, wrk_load
from bench.report import Report, log, ms, per_second, statements_seen
from bench.server import ROOT, CpuMeter, GunicornServer

CONNECTIONS = 32
AMOUNT = 1
HOT_AMOUNT = 3  # not 1, so that "used == 201s x amount" cannot hold by accident
ALLOC_AGENTS = 64
HOT_QUOTA_ID = ALLOC_AGENTS + 1  # the bare baseline's hot row; rows 1-64 are scenario 1's
BASELINE_URLCONF = "bench.baseline_urls"
INPROC_THREADS = 4  # scenario 6's second run: one process, this many threads
HUGE_LIMIT = 10**15
BATCH_ITEMS = 1000
BUDGET_AGENTS = 64  # scenario 7, each side: as many agents as scenario 1
BUDGET_LIMIT = "10000000000"  # dollars: a hard budget on every level that never refuses in a bench run


@dataclass(frozen=True)
class Profile:
    name: str
    http_requests: int
    http_seconds: float  # per round and side
    http_rounds: int
    warmup_requests: int
    batch_batches: int
    batch_seconds: float
    batch_connections: int
    pgbench_seconds: int
    read_rows: int
    read_requests: int
    read_warmup: int
    inproc_count: int
    inproc_seconds: float


FULL = Profile(
    name="full",
    http_requests=400_000,
    http_seconds=10,
    http_rounds=3,
    warmup_requests=400,
    batch_batches=300,
    batch_seconds=20,
    batch_connections=4,
    pgbench_seconds=10,
    read_rows=10_000_000,
    read_requests=200,
    read_warmup=20,
    inproc_count=50_000,
    inproc_seconds=15,
)
QUICK = Profile(
    name="quick",
    http_requests=30_000,
    http_seconds=3,
    http_rounds=1,
    warmup_requests=96,
    batch_batches=4,
    batch_seconds=4,
    batch_connections=2,
    pgbench_seconds=2,
    read_rows=100_000,
    read_requests=40,
    read_warmup=5,
    inproc_count=300,
    inproc_seconds=3,
)

TARGETS = {
    "batch_items_per_second": 20_000,
    "read_p95_ms": 30.0,
    "inproc_per_second": 2_500,
    # Scenarios 1 and 3 are judged against the bare baseline measured in the same run, never in absolute
    # numbers: the shared 2-core machines these run on differ by 2x in speed from one hour to the next.
    "many_agents_throughput_ratio": 0.8,
    "hot_agent_throughput_ratio": 0.75,
    "hot_agent_p99_ratio": 1.5,
    "budgets_spread_throughput_ratio": 0.6,
}


@dataclass
class Fixtures:
    operator_key: str
    alloc_agents: list[tuple[str, str]]  # (agent id, key)
    hot_agent: tuple[str, str]
    inproc_agents: list[str]  # one per thread of scenario 6


def fixtures_create() -> Fixtures:
    from allocation.keys import api_key_issue, operator_key_issue
    from ledger.services import agent_create

    def custom_agent(agent_id: str):
        from ledger.models import ResourceType

        limits = dict.fromkeys(ResourceType.objects.values_list("code", flat=True), HUGE_LIMIT)
        return agent_create(agent_id=agent_id, tier_code="CUSTOM", name=agent_id, custom_limits=limits)

    _, operator_key = operator_key_issue(username="bench", name="bench")
    alloc_agents = []
    for index in range(ALLOC_AGENTS):
        agent = custom_agent(f"alloc-{index:03d}")
        alloc_agents.append((agent.pk, api_key_issue(agent=agent, name="bench")[1]))
    hot = custom_agent("hot-agent")
    inproc = [custom_agent(f"inproc-agent-{index}").pk for index in range(INPROC_THREADS)]
    return Fixtures(
        operator_key=operator_key,
        alloc_agents=alloc_agents,
        hot_agent=(hot.pk, api_key_issue(agent=hot, name="bench")[1]),
        inproc_agents=inproc,
    )


def baseline_tables_create() -> None:
    from django.db import connection

    from bench.baseline import BASELINE_SCHEMA_SQL

    with connection.cursor() as cursor:
        for statement in BASELINE_SCHEMA_SQL.split(";"):
            if statement.strip():
                cursor.execute(statement)
        cursor.execute(
            "INSERT INTO bench_quota (id, used, lim) SELECT g, 0, %s FROM generate_series(1, %s) g "
            "ON CONFLICT (id) DO NOTHING",
            [HUGE_LIMIT, HOT_QUOTA_ID],
        )


def sql(statement: str, params=None) -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(statement, params)


def scalar(statement: str, params=None):
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(statement, params)
        return cursor.fetchone()[0]


def json_headers(token: str | None, idempotency_key: str | None = None) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if idempotency_key:
        headers["Idempotency-Key"] = idempotency_key
    return headers


def run_id() -> str:
    return f"b{time.time_ns():x}"


def cpu_meter(server: GunicornServer) -> CpuMeter:
    from django.db import connection

    return CpuMeter(server=server, database_name=connection.settings_dict["NAME"])


# --- Scenarios 1 and 3: the grid against the bare baseline, in alternating rounds ---------------------


@dataclass
class Side:
    """One side of a comparison: a server, the paths it is loaded on, and where its rows go."""

    scenario: str  # the table's scenario cell for this side's rows
    server: GunicornServer
    targets: list[tuple[str, str | None]]  # (path, bearer token or None), round-robin
    body: str
    idempotency: bool  # a fresh Idempotency-Key per request


@dataclass
class Measured:
    warmup: LoadResult
    rounds: list[tuple[LoadResult, CpuMeter]]


def _post_load(
    *, side: Side, requests: int, seconds: float, use_wrk: bool, keep_bodies: int = 0
) -> LoadResult:
    run = run_id()
    if use_wrk:
        return wrk_load(
            port=side.server.port,
            targets=side.targets,
            body=side.body,
            connections=CONNECTIONS,
            max_requests=requests,
            seconds=seconds,
            idempotency=side.idempotency,
            run_id=run,
        )
    encoded = side.body.encode()

    def make(index: int):
        path, token = side.targets[index % len(side.targets)]
        return "POST", path, json_headers(token, f"{run}-{index}" if side.idempotency else None), encoded

    return python_load(
        port=side.server.port,
        make_request=make,
        connections=CONNECTIONS,
        max_requests=requests,
        seconds=seconds,
        keep_bodies=keep_bodies,
    )


def _alternating_rounds(profile: Profile, sides: list[Side], use_wrk: bool, name: str) -> list[Measured]:
    """Warm each side up (Python client: it opens the quota periods and warms the workers), then load the
    sides in turns, round after round, so that whatever else the shared machine does meanwhile (the load
    generator runs on it too) falls on both alike."""
    measured = []
    for side in sides:
        warmup = _post_load(
            side=side, requests=profile.warmup_requests, seconds=10, use_wrk=False, keep_bodies=1
        )
        if warmup.count(201) == 0:
            answer = warmup.bodies[0][:300] if warmup.bodies else b"no answer"
            raise RuntimeError(f"{side.scenario} warm-up answered {dict(warmup.statuses)}: {answer!r}")
        measured.append(Measured(warmup=warmup, rounds=[]))
    tool = "wrk" if use_wrk else "python"
    for number in range(1, profile.http_rounds + 1):
        for side, results in zip(sides, measured, strict=True):
            log(
                f"{name}: round {number}/{profile.http_rounds}, {side.scenario} ({tool}, {CONNECTIONS} "
                f"connections, {profile.http_seconds:.0f} s)"
            )
            with cpu_meter(side.server) as meter:
                result = _post_load(
                    side=side, requests=profile.http_requests, seconds=profile.http_seconds, use_wrk=use_wrk
                )
            results.rounds.append((result, meter))
    return measured


def _side_rows(report: Report, profile: Profile, side: Side, measured: Measured, use_wrk: bool) -> None:
    results = [result for result, _ in measured.rounds]
    requests = sum(result.requests for result in results)
    elapsed = sum(result.elapsed for result in results)
    bound = " (request bound hit: a lower bound)" if any(r.request_bound_hit for r in results) else ""
    tool = "wrk" if use_wrk else "python"
    scenario = side.scenario
    report.add(
        scenario,
        f"throughput ({tool}, {CONNECTIONS} conn, {len(results)} x {profile.http_seconds:.0f} s)",
        per_second(requests / elapsed if elapsed else 0.0) + bound,
    )
    report.add(scenario, "latency p50 by round", " / ".join(ms(result.p50_ms) for result in results))
    report.add(scenario, "latency p99 by round", " / ".join(ms(result.p99_ms) for result in results))
    report.add(
        scenario,
        "server CPU per request by round",
        " / ".join(meter.per_request(result.requests) for result, meter in measured.rounds),
    )
    errors = sum(result.errors(ok=(201,)) for result in results)
    report.check(scenario, "errors (non-201, socket)", f"{errors} of {requests}", "0", errors == 0)


def _ratio_rows(
    report: Report,
    scenario: str,
    grid: Measured,
    bare: Measured,
    *,
    throughput_target: float | None,
    p99_target: float | None,
) -> None:
    """The grid against the bare baseline, round by round; the median of the rounds is judged (reported
    only, for a target of None)."""
    pairs = [(ours, base) for (ours, _), (base, _) in zip(grid.rounds, bare.rounds, strict=True)]
    throughput = [ours.rps / base.rps for ours, base in pairs if base.rps]
    p99 = [ours.p99_ms / base.p99_ms for ours, base in pairs if ours.p99_ms and base.p99_ms]
    if not throughput or not p99:
        report.add(scenario, "grid / bare baseline", "no ratio: a side answered nothing", "-", "FAIL")
        return
    ratio = statistics.median(throughput)
    metric = "RATIO to the bare baseline (no middleware): throughput, median of rounds"
    result = f"{ratio:.2f}x (rounds {' / '.join(f'{value:.2f}' for value in throughput)})"
    if throughput_target is None:
        report.add(scenario, metric, result)
    else:
        report.check(scenario, metric, result, f">= {throughput_target:.2f}x", ratio >= throughput_target)
    ratio = statistics.median(p99)
    result = f"{ratio:.2f}x (rounds {' / '.join(f'{value:.2f}' for value in p99)})"
    metric = "RATIO to the bare baseline (no middleware): p99, median of rounds"
    if p99_target is None:
        report.add(scenario, metric, result)
    else:
        report.check(scenario, metric, result, f"<= {p99_target:.2f}x", ratio <= p99_target)


def _baseline_path(quota_id: int) -> str:
    from django.urls import reverse

    return reverse("bench-baseline", urlconf=BASELINE_URLCONF, kwargs={"quota_id": quota_id})


def _calls_per_request(send, count: int = 50) -> float:
    """Python function calls per request, counted by cProfile over ``count`` warm requests: unlike time,
    the count does not move with the machine's speed or its other load."""
    import cProfile
    import pstats

    profile = cProfile.Profile()
    profile.enable()
    try:
        for index in range(count):
            response = send(index)
            if response.status_code != 201:
                raise RuntimeError(f"request answered {response.status_code}: {response.content[:300]!r}")
    finally:
        profile.disable()
    return pstats.Stats(profile).total_calls / count


def allocation(
    report: Report,
    profile: Profile,
    fixtures: Fixtures,
    server: GunicornServer,
    baseline_server: GunicornServer,
    use_wrk: bool,
) -> None:
    """Scenario 1, many agents: the allocation endpoint with everything on (API key, unique
    Idempotency-Key, audit, usage row) over 64 agents, against the bare baseline over 64 rows, each on
    its own server at 32 connections."""
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext, override_settings
    from django.urls import reverse

    body = json.dumps({"resource_type": "AI_TOKENS", "amount": AMOUNT})
    ours = [(reverse("api:allocations", kwargs={"agent_id": a}), key) for a, key in fixtures.alloc_agents]
    bare = [(_baseline_path(quota_id), None) for quota_id in range(1, ALLOC_AGENTS + 1)]

    # Preflight in this process: the endpoint works, and how many queries one request costs once the
    # process is warm (the first request of a process also loads the per-process caches).
    client = Client()
    path, key = ours[0]
    for attempt in range(3):
        with CaptureQueriesContext(connection) as queries, statements_seen(connection) as kinds:
            response = client.post(
                path,
                body,
                content_type="application/json",
                headers={"authorization": f"Bearer {key}", "idempotency-key": f"{run_id()}-preflight"},
            )
        if response.status_code != 201:
            raise RuntimeError(
                f"allocation preflight {attempt} answered {response.status_code}: {response.content[:300]!r}"
            )
    queries_text = f"{len(queries.captured_queries)} ({' '.join(kinds)})"
    prefix = run_id()
    ours_calls = _calls_per_request(
        lambda index: client.post(
            path,
            body,
            content_type="application/json",
            headers={"authorization": f"Bearer {key}", "idempotency-key": f"{prefix}-calls-{index}"},
        )
    )
    # The baseline's own settings: a client made here loads no middleware.
    with override_settings(MIDDLEWARE=[], ROOT_URLCONF=BASELINE_URLCONF):
        bare_client = Client()
        bare_calls = _calls_per_request(
            lambda index: bare_client.post(bare[0][0], body, content_type="application/json")
        )

    sides = [
        Side("1 bare baseline", baseline_server, bare, body, idempotency=False),
        Side("1 many agents", server, ours, body, idempotency=True),
    ]
    bare_runs, grid_runs = _alternating_rounds(profile, sides, use_wrk, "scenario 1")
    _ratio_rows(
        report,
        "1 many agents",
        grid_runs,
        bare_runs,
        throughput_target=TARGETS["many_agents_throughput_ratio"],
        p99_target=None,
    )
    _side_rows(report, profile, sides[1], grid_runs, use_wrk)
    _side_rows(report, profile, sides[0], bare_runs, use_wrk)
    report.add("1 many agents", "queries per request (warm, in process)", queries_text)
    report.add(
        "1 many agents",
        "Python function calls per request (in process, test client)",
        f"{ours_calls:,.0f}, bare baseline {bare_calls:,.0f} ({ours_calls / bare_calls:.2f}x)",
    )


# --- Scenario 2: batch ingestion ------------------------------------------------------------------------


def _route(name: str, **kwargs) -> str | None:
    from django.urls import NoReverseMatch, reverse

    try:
        return reverse(name, kwargs=kwargs or None)
    except NoReverseMatch:
        return None


def batch(report: Report, profile: Profile, fixtures: Fixtures, server: GunicornServer) -> None:
    """Scenario 2: 1000-item batches on the batch routes, when they exist; items per second."""
    port = server.port
    agents = fixtures.alloc_agents
    variants = []
    usage_path = _route("api:usage-batch")
    if usage_path is None:
        report.add(
            "2 batch usage", "items/s", "not available: route api:usage-batch does not resolve", "-", "n/a"
        )
    else:
        variants.append(("2 batch usage", "usage"))
    if _route("api:allocations-batch", agent_id=agents[0][0]) is None:
        report.add(
            "2 batch allocations",
            "items/s",
            "not available: route api:allocations-batch does not resolve",
            "-",
            "n/a",
        )
    else:
        variants.append(("2 batch allocations", "allocations"))

    for scenario, kind in variants:
        run = run_id()
        requests = []
        for batch in range(profile.batch_batches):
            if kind == "usage":
                items = [
                    {
                        "agent_id": agents[(batch + i) % len(agents)][0],
                        "resource_type": "AI_TOKENS",
                        "amount": AMOUNT,
                        "idempotency_key": f"{run}-{batch}-{i}",
                    }
                    for i in range(BATCH_ITEMS)
                ]
                path, token = usage_path, fixtures.operator_key
            else:
                agent_id, token = agents[batch % len(agents)]
                items = [
                    {"resource_type": "AI_TOKENS", "amount": AMOUNT, "idempotency_key": f"{run}-{batch}-{i}"}
                    for i in range(BATCH_ITEMS)
                ]
                path = _route("api:allocations-batch", agent_id=agent_id)
            requests.append(("POST", path, json_headers(token), json.dumps({"items": items}).encode()))

        def make(index: int, requests=requests):
            return requests[index]

        preflight = python_load(
            port=port, make_request=make, connections=1, max_requests=1, seconds=60, keep_bodies=1
        )
        if preflight.requests != 1 or not 200 <= next(iter(preflight.statuses)) < 300:
            answer = preflight.bodies[0][:300] if preflight.bodies else b"no answer"
            raise RuntimeError(f"{kind} batch preflight answered {dict(preflight.statuses)}: {answer!r}")
        rows_before = scalar("SELECT count(*) FROM usage_logs")
        summary = {"accepted": 0, "refused": 0, "replayed": 0}

        def count(status: int, response_body: bytes, summary=summary) -> None:
            # The answer is 200 with one result per item and a summary at the end; read only the summary.
            if 200 <= status < 300:
                for name in summary:
                    match = re.search(rb'"%s"\s*:\s*(\d+)' % name.encode(), response_body[-400:])
                    summary[name] += int(match.group(1)) if match else 0

        log(f"scenario 2: {kind} batches ({profile.batch_connections} connections)")
        with cpu_meter(server) as meter:
            result = python_load(
                port=port,
                make_request=lambda index, requests=requests: requests[index + 1],
                connections=profile.batch_connections,
                max_requests=len(requests) - 1,
                seconds=profile.batch_seconds,
                on_response=count,
            )
        rows_written = scalar("SELECT count(*) FROM usage_logs") - rows_before
        accepted = summary["accepted"]
        items_per_second = accepted / result.elapsed if result.elapsed else 0.0
        target = TARGETS["batch_items_per_second"]
        report.check(
            scenario,
            f"items/s ({BATCH_ITEMS}-item batches, {profile.batch_connections} conn)",
            per_second(items_per_second),
            f">= {target:,}",
            items_per_second >= target,
        )
        report.add(scenario, "batch latency p50 / p99", f"{ms(result.p50_ms)} / {ms(result.p99_ms)}")
        report.add(scenario, "server CPU per batch", meter.per_request(result.requests))
        errors = result.errors(ok=tuple(range(200, 300)))
        refused = summary["refused"] + summary["replayed"]
        report.check(
            scenario,
            "failed batches / refused items",
            f"{errors} of {result.requests} / {refused:,} of {result.requests * BATCH_ITEMS:,}",
            "0 / 0",
            errors == 0 and refused == 0,
        )
        report.check(
            scenario,
            "usage rows written = items accepted",
            f"{rows_written:,} = {accepted:,}",
            "equal",
            rows_written == accepted,
        )
    if usage_path is not None:  # the usage batch against its floor, side by side
        ingest.floor_ratio(
            report,
            scenario="2 batch usage",
            server=server,
            grid_path=usage_path,
            operator_key=fixtures.operator_key,
            agent_ids=[agent_id for agent_id, _ in agents],
            limit=HUGE_LIMIT,
            rounds=ingest.Rounds(profile.http_rounds, profile.batch_seconds / 4, profile.batch_connections),
            run=run_id(),
        )


# --- Scenario 3: the hot agent --------------------------------------------------------------------------


def _pgbench(database_url: str, seconds: int) -> float | None:
    from urllib.parse import unquote, urlsplit

    binary = shutil.which("pgbench")
    if binary is None:
        return None
    parts = urlsplit(database_url)
    env = {**os.environ}
    if parts.password:
        env["PGPASSWORD"] = unquote(parts.password)
    command = [
        binary, "-n", "-c", "8", "-j", "2", "-T", str(seconds),
        "-D", f"quota_id={HOT_QUOTA_ID}", "-f", str(ROOT / "bench" / "hot_row.sql"),
    ]  # fmt: skip
    command += ["-h", parts.hostname or "127.0.0.1", "-p", str(parts.port or 5432)]
    if parts.username:
        command += ["-U", unquote(parts.username)]
    command.append(parts.path.lstrip("/"))
    completed = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=seconds + 60, check=False
    )
    match = re.search(r"tps = ([0-9.]+)", completed.stdout)
    if completed.returncode != 0 or match is None:
        raise RuntimeError(f"pgbench failed: {completed.stderr.strip()[-300:]}")
    return float(match.group(1))


def hot_agent(
    report: Report,
    profile: Profile,
    fixtures: Fixtures,
    server: GunicornServer,
    baseline_server: GunicornServer,
    database_url: str,
    use_wrk: bool,
) -> None:
    """Scenario 3, hot agent: 32 connections allocating on one agent and one resource, a fresh
    Idempotency-Key per call, against the bare baseline on one row, in alternating rounds. The agent's
    counters must equal its usage log exactly."""
    from django.db import connection
    from django.urls import reverse

    scenario = "3 hot agent"
    agent_id, key = fixtures.hot_agent
    sides = [
        Side(
            "3 bare hot row",
            baseline_server,
            [(_baseline_path(HOT_QUOTA_ID), None)],
            json.dumps({"amount": HOT_AMOUNT}),
            idempotency=False,
        ),
        Side(
            scenario,
            server,
            [(reverse("api:allocations", kwargs={"agent_id": agent_id}), key)],
            json.dumps({"resource_type": "AI_TOKENS", "amount": HOT_AMOUNT}),
            idempotency=True,
        ),
    ]
    with connection.cursor() as cursor:
        deadlocks_before = db.deadlocks(cursor)
    log_before = len(server.log_text())
    bare_runs, grid_runs = _alternating_rounds(profile, sides, use_wrk, "scenario 3")
    time.sleep(1.0)  # the statistics collector reports deadlocks with a delay
    with connection.cursor() as cursor:
        deadlocks = db.deadlocks(cursor) - deadlocks_before
        cursor.execute(
            "SELECT COALESCE(SUM(used), 0), COALESCE(SUM(reserved), 0) FROM quotas WHERE agent_id = %s",
            [agent_id],
        )
        used, reserved = cursor.fetchone()
        cursor.execute(
            "SELECT COALESCE(SUM(amount), 0), count(*) FROM usage_logs WHERE agent_id = %s", [agent_id]
        )
        usage_sum, usage_rows = cursor.fetchone()
    deadlocks += server.log_text()[log_before:].lower().count("deadlock")

    _ratio_rows(
        report,
        scenario,
        grid_runs,
        bare_runs,
        throughput_target=TARGETS["hot_agent_throughput_ratio"],
        p99_target=TARGETS["hot_agent_p99_ratio"],
    )
    report.check(scenario, "deadlocks", str(deadlocks), "0", deadlocks == 0)

    # The ledger must agree with itself whatever the client saw: counter = usage log = rows x amount.
    counts = f"used {used:,} = usage sum {usage_sum:,} = {usage_rows:,} rows x {HOT_AMOUNT}"
    ledger_ok = used == usage_sum == usage_rows * HOT_AMOUNT and reserved == 0
    report.add(
        scenario,
        "exact final counts",
        counts + ("" if reserved == 0 else f"; reserved {reserved:,}"),
        "used = usage sum = rows x amount",
        "pass" if ledger_ok else "ERROR",
    )
    if not ledger_ok:
        report.invariant_errors.append(f"hot agent counts disagree: {counts}, reserved {reserved}")

    # And every 201 the clients saw is one usage row. The Python client finishes what is in flight, so its
    # count is exact; wrk drops the requests in flight when it stops (at most one per connection per run),
    # and the server may still commit those.
    results = [grid_runs.warmup, *(result for result, _ in grid_runs.rounds)]
    created = sum(result.count(201) for result in results)
    socket_errors = sum(result.socket_errors for result in results)
    if use_wrk:
        dropped = CONNECTIONS * len(grid_runs.rounds) + socket_errors
        answered_ok = created <= usage_rows <= created + dropped
        target = f"201s <= rows <= 201s + {dropped:,} (wrk drops what is in flight)"
    else:
        answered_ok = usage_rows == created
        target = "rows = 201s"
    text = f"{usage_rows:,} rows, {created:,} 201s"
    if answered_ok:
        report.add(scenario, "usage rows against 201 answers", text, target, "pass")
    elif socket_errors and not use_wrk:
        report.add(
            scenario,
            "usage rows against 201 answers",
            f"undecidable: {socket_errors} requests without an answer; {text}",
            target,
            "FAIL",
        )
    else:
        report.add(scenario, "usage rows against 201 answers", text, target, "ERROR")
        report.invariant_errors.append(f"hot agent: {text}")

    _side_rows(report, profile, sides[1], grid_runs, use_wrk)
    _side_rows(report, profile, sides[0], bare_runs, use_wrk)

    log(f"scenario 3: pgbench on the bare hot row (8 clients, {profile.pgbench_seconds} s)")
    tps = _pgbench(database_url, profile.pgbench_seconds)
    if tps is None:
        report.add(scenario, "pgbench, bare hot row", "not available: pgbench is not installed", "-", "n/a")
        return

    def rps(measured: Measured) -> float:
        elapsed = sum(result.elapsed for result, _ in measured.rounds)
        return sum(result.requests for result, _ in measured.rounds) / elapsed if elapsed else 0.0

    shares = f"grid at {rps(grid_runs) / tps:.2f}x of it, bare HTTP at {rps(bare_runs) / tps:.2f}x"
    report.add(
        scenario,
        "context: pgbench, the bare UPDATE+INSERT on one row, 8 clients, no HTTP",
        f"{tps:,.0f} tx/s ({shares})",
    )


# --- Scenario 4: sweeps (bench/sweeps.py) ---------------------------------------------------------------


# --- Scenario 5: reading at scale -----------------------------------------------------------------------


def reads(report: Report, profile: Profile, fixtures: Fixtures, server: GunicornServer) -> None:
    """Scenario 5: a large usage log generated in SQL, then p95 of one agent's reading endpoints, and the
    same with a different agent on every request (an operator key): then each request reads pages that
    PostgreSQL's buffer cache does not hold yet, as it would with a fleet of agents reading."""
    from django.db import connection
    from django.urls import reverse

    from allocation.keys import api_key_issue
    from ledger.models import Agent
    from ledger.periods import month_bounds

    port = server.port
    now = dt.datetime.now(dt.UTC)
    start, end = month_bounds(now)
    log(f"scenario 5: generating {profile.read_rows:,} usage rows over {db.READ_AGENTS:,} agents")
    started = time.perf_counter()
    sql(db.READ_AGENTS_SQL, {"agents": db.READ_AGENTS})
    sql(db.READ_QUOTAS_SQL, {"start": start})
    with connection.cursor() as cursor:
        db.usage_bulk_insert(
            cursor, db.READ_USAGE_SQL, {"agents": db.READ_AGENTS, "rows": profile.read_rows, "now": now}
        )
    sql(db.READ_COUNTERS_SQL)
    sql("ANALYZE")
    report.add(
        "5 reads",
        "usage_logs rows (SQL generate + index + ANALYZE)",
        f"{scalar('SELECT count(*) FROM usage_logs'):,} in {time.perf_counter() - started:.0f} s",
    )
    agent = Agent.objects.get(pk="rd-0000")
    key = api_key_issue(agent=agent, name="bench")[1]
    routes = (
        ("metrics", "optimization:agent-metrics"),
        ("cost", "api:cost"),
        ("usage", "api:usage"),
    )
    agent_rows = scalar("SELECT count(*) FROM usage_logs WHERE agent_id = %s", [agent.pk])
    target = TARGETS["read_p95_ms"]
    for name, route in routes:
        path = reverse(route, kwargs={"agent_id": agent.pk})
        headers = json_headers(key)

        def make(index: int, path=path, headers=headers):
            return "GET", path, headers, b""

        python_load(port=port, make_request=make, connections=1, max_requests=profile.read_warmup, seconds=30)
        log(f"scenario 5: GET {name} x {profile.read_requests}")
        result = python_load(
            port=port, make_request=make, connections=1, max_requests=profile.read_requests, seconds=60
        )
        errors = result.errors(ok=(200,))
        report.check(
            f"5 GET {name}",
            f"p95 ({result.requests} sequential, agent with {agent_rows:,} rows)",
            f"{ms(result.p95_ms)} (p50 {ms(result.p50_ms)})",
            f"<= {target:.0f} ms",
            errors == 0 and result.p95_ms is not None and result.p95_ms <= target,
        )
        # Agents rd-0001 onwards, a different one on every request; each endpoint its own range.
        first = 1 + routes.index((name, route)) * profile.read_requests
        paths = [
            reverse(route, kwargs={"agent_id": f"{db.READ_PREFIX}{(first + i) % db.READ_AGENTS:04d}"})
            for i in range(profile.read_requests)
        ]
        operator = json_headers(fixtures.operator_key)
        spread = python_load(
            port=port,
            make_request=lambda index, paths=paths, operator=operator: ("GET", paths[index], operator, b""),
            connections=1,
            max_requests=len(paths),
            seconds=60,
        )
        errors += spread.errors(ok=(200,))
        report.add(
            f"5 GET {name}",
            f"p95 ({spread.requests} sequential, a different agent each)",
            f"{ms(spread.p95_ms)} (p50 {ms(spread.p50_ms)})",
            f"(<= {target:.0f} ms)",
        )
        if errors:
            report.add(f"5 GET {name}", "errors", f"{errors}", "0", "FAIL")


# --- Scenario 6: the service alone ----------------------------------------------------------------------


def in_process(report: Report, profile: Profile, fixtures: Fixtures) -> None:
    """Scenario 6: ``allocation_create`` in a loop in one fresh process, no HTTP: one thread, then one
    thread per agent; each beside the same statement sent by bare psycopg, the floor of this machine. The
    target is judged on the process with its threads (a threaded worker's shape); the one-thread figure is
    reported beside its floor."""
    for agents in (fixtures.inproc_agents[:1], fixtures.inproc_agents):
        _in_process_run(report, profile, agents)


def _in_process_run(report: Report, profile: Profile, agents: list[str]) -> None:
    threads = len(agents)
    label = "1 thread" if threads == 1 else f"{threads} threads, an agent each"
    command = [
        sys.executable, "-m", "bench.worker", "allocate", ",".join(agents),
        "--count", str(profile.inproc_count), "--seconds", str(profile.inproc_seconds),
    ]  # fmt: skip
    log(f"scenario 6: allocation_create in one process, {label} ({2 * profile.inproc_seconds:.0f} s)")
    before = _used(agents)
    completed = subprocess.run(
        command, cwd=ROOT, env=os.environ.copy(), capture_output=True, text=True,
        timeout=2 * profile.inproc_seconds + 240, check=False,
    )  # fmt: skip
    line = next((ln for ln in completed.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if completed.returncode != 0 or line is None:
        raise RuntimeError(f"in-process allocation failed: {completed.stderr.strip()[-600:]}")
    data = json.loads(line.removeprefix("BENCH_JSON "))
    target = TARGETS["inproc_per_second"]
    scenario = "6 allocate in-process"
    metric = f"allocations/s, {label} ({data['allocations']:,} in {data['seconds']:.1f} s)"
    if threads == 1:
        # Reported, not judged: one thread waits for each durable commit in turn, so it is bounded by one
        # connection's commit latency, which the floor row below measures. The target is the process's,
        # judged on the threaded run.
        report.add(scenario, metric, per_second(data["per_second"]), f"(>= {target:,})")
    else:
        report.check(
            scenario, metric, per_second(data["per_second"]), f">= {target:,}", data["per_second"] >= target
        )
    floor = data["floor_per_second"]
    share = data["per_second"] / floor if floor else 0.0
    report.add(
        scenario,
        f"floor, {label}: the same statement from bare psycopg",
        f"{per_second(floor)} (service at {share:.0%} of it)",
    )
    if threads == 1:
        kinds = " ".join(data["query_kinds"])
        report.add(scenario, "queries per allocation", f"{data['queries_per_allocation']} ({kinds})")
    used = _used(agents) - before
    expected = data["total_taken"] + data["floor_taken"]
    ok = used == expected * AMOUNT
    report.add(
        scenario,
        f"used = allocations x amount, {label}",
        f"{used:,} = {expected:,} x {AMOUNT}",
        "equal",
        "pass" if ok else "ERROR",
    )
    if not ok:
        report.invariant_errors.append(f"in-process allocations: used {used} for {expected} allocations")


def _used(agents: list[str]) -> int:
    return scalar("SELECT COALESCE(SUM(used), 0) FROM quotas WHERE agent_id = ANY(%s)", [agents])


# --- Scenario 7: budgets on every call ------------------------------------------------------------------


@dataclass(frozen=True)
class BudgetFleet:
    agents: list[tuple[str, str]]  # (agent id, key)
    team_of: dict[str, str]  # agent id -> team id
    organization_of: dict[str, str]  # team id -> organization id
    budget_ids: list[int]


def _budget_fleet(prefix: str, *, hot_team: bool) -> BudgetFleet:
    """``BUDGET_AGENTS`` agents, each under a hard monthly budget of its own, of its team and of its
    organization, none of which refuses in a bench run. Spread: each agent in a team of its own in an
    organization of its own, so that no two agents' calls lock the same budget row. Hot team: every agent
    in one team of one organization, so that every call locks that team's and that organization's row."""
    from allocation.keys import api_key_issue
    from ledger.budgets import agent_team_set, budget_create, organization_create, team_create
    from ledger.models import ResourceType
    from ledger.services import agent_create

    limits = dict.fromkeys(ResourceType.objects.values_list("code", flat=True), HUGE_LIMIT)
    agents: list[tuple[str, str]] = []
    team_of: dict[str, str] = {}
    organization_of: dict[str, str] = {}
    budget_ids: list[int] = []

    def budget(scope: str, scope_id: str) -> None:
        created = budget_create(scope=scope, scope_id=scope_id, window="month", limit_usd=BUDGET_LIMIT)
        budget_ids.append(created.pk)

    team = None
    for index in range(BUDGET_AGENTS):
        if team is None or not hot_team:
            organization = organization_create(id=f"{prefix}-org-{index:03d}")
            team = team_create(id=f"{prefix}-team-{index:03d}", organization_id=organization.pk)
            organization_of[team.pk] = organization.pk
            budget("organization", organization.pk)
            budget("team", team.pk)
        agent = agent_create(
            agent_id=f"{prefix}-{index:03d}", tier_code="CUSTOM", name=prefix, custom_limits=limits
        )
        agent_team_set(agent=agent, team_id=team.pk)
        team_of[agent.pk] = team.pk
        budget("agent", agent.pk)
        agents.append((agent.pk, api_key_issue(agent=agent, name="bench")[1]))
    return BudgetFleet(agents, team_of, organization_of, budget_ids)


def _budgets_reconcile(fleet: BudgetFleet) -> tuple[int, int, object, object]:
    """How many of the fleet's budgets equal their scope's usage log exactly (spent = the sum of the usage
    rows' costs, nothing reserved), of how many; and the organizations' spent against the usage log's."""
    from decimal import Decimal

    from django.db import connection

    agent_ids = [agent_id for agent_id, _ in fleet.agents]
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT agent_id, SUM(cost_usd) FROM usage_logs WHERE agent_id = ANY(%s) GROUP BY agent_id",
            [agent_ids],
        )
        cost = dict(cursor.fetchall())
        cursor.execute(
            "SELECT scope, agent_id, team_id, organization_id, spent_usd, reserved_usd FROM ledger_budget "
            "WHERE id = ANY(%s)",
            [fleet.budget_ids],
        )
        budgets = cursor.fetchall()
    zero = Decimal(0)
    by_scope: dict[tuple[str, str], Decimal] = {}
    for agent_id in agent_ids:
        team_id = fleet.team_of[agent_id]
        for key in (("agent", agent_id), ("team", team_id), ("organization", fleet.organization_of[team_id])):
            by_scope[key] = by_scope.get(key, zero) + cost.get(agent_id, zero)
    exact = 0
    organizations_spent = zero
    for scope, agent_id, team_id, organization_id, spent, reserved in budgets:
        scope_id = {"agent": agent_id, "team": team_id, "organization": organization_id}[scope]
        exact += spent == by_scope.get((scope, scope_id), zero) and reserved == 0
        if scope == "organization":
            organizations_spent += spent
    return exact, len(budgets), organizations_spent, sum(cost.values(), zero)


def budgets(
    report: Report,
    profile: Profile,
    server: GunicornServer,
    baseline_server: GunicornServer,
    use_wrk: bool,
) -> None:
    """Scenario 7, budgets on every call: scenario 1's allocation (everything on) by agents under a hard
    agent, team and organization budget each, charged in the allocation's statement, against the bare
    baseline over 64 rows, in alternating rounds. Spread (each agent its own team and organization) is
    judged; one hot team (every agent in one team of one organization: two budget rows every call locks)
    is reported beside it. Afterwards every budget must equal its scope's usage log."""
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext
    from django.urls import reverse

    log(f"scenario 7: {2 * BUDGET_AGENTS} agents with agent, team and organization budgets")
    spread = _budget_fleet("bs", hot_team=False)
    hot = _budget_fleet("bh", hot_team=True)
    body = json.dumps({"resource_type": "AI_TOKENS", "amount": AMOUNT})

    def targets(fleet: BudgetFleet) -> list[tuple[str, str | None]]:
        return [(reverse("api:allocations", kwargs={"agent_id": a}), key) for a, key in fleet.agents]

    # In this process, warm: how many statements an allocation that checks three budgets costs.
    client = Client()
    path, key = targets(spread)[0]
    for attempt in range(3):
        with CaptureQueriesContext(connection) as queries, statements_seen(connection) as kinds:
            response = client.post(
                path,
                body,
                content_type="application/json",
                headers={"authorization": f"Bearer {key}", "idempotency-key": f"{run_id()}-preflight"},
            )
        if response.status_code != 201:
            raise RuntimeError(
                f"budgets preflight {attempt} answered {response.status_code}: {response.content[:300]!r}"
            )
    queries_text = f"{len(queries.captured_queries)} ({' '.join(kinds)})"

    bare = [(_baseline_path(quota_id), None) for quota_id in range(1, ALLOC_AGENTS + 1)]
    sides = [
        Side("7 bare baseline", baseline_server, bare, body, idempotency=False),
        Side("7 budgets spread", server, targets(spread), body, idempotency=True),
        Side("7 budgets hot team", server, targets(hot), body, idempotency=True),
    ]
    with connection.cursor() as cursor:
        deadlocks_before = db.deadlocks(cursor)
    log_before = len(server.log_text())
    bare_runs, spread_runs, hot_runs = _alternating_rounds(profile, sides, use_wrk, "scenario 7")
    time.sleep(1.0)  # the statistics collector reports deadlocks with a delay
    with connection.cursor() as cursor:
        deadlocks = db.deadlocks(cursor) - deadlocks_before
    deadlocks += server.log_text()[log_before:].lower().count("deadlock")

    _ratio_rows(
        report,
        "7 budgets spread",
        spread_runs,
        bare_runs,
        throughput_target=TARGETS["budgets_spread_throughput_ratio"],
        p99_target=None,
    )
    _ratio_rows(report, "7 budgets hot team", hot_runs, bare_runs, throughput_target=None, p99_target=None)
    report.check("7 budgets spread", "deadlocks (both budget sides)", str(deadlocks), "0", deadlocks == 0)
    for scenario, fleet in (("7 budgets spread", spread), ("7 budgets hot team", hot)):
        exact, count, organizations_spent, usage_cost = _budgets_reconcile(fleet)
        ok = exact == count and organizations_spent == usage_cost
        report.add(
            scenario,
            "budgets = usage log (spent = its rows' cost, nothing reserved)",
            f"{exact} of {count} budgets; organizations ${organizations_spent.normalize():f} = usage "
            f"${usage_cost.normalize():f}",
            "all",
            "pass" if ok else "ERROR",
        )
        if not ok:
            report.invariant_errors.append(f"{scenario}: {exact} of {count} budgets equal their usage log")
    _side_rows(report, profile, sides[1], spread_runs, use_wrk)
    _side_rows(report, profile, sides[2], hot_runs, use_wrk)
    _side_rows(report, profile, sides[0], bare_runs, use_wrk)
    report.add("7 budgets spread", "queries per request (warm, in process)", queries_text)

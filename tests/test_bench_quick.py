"""The benchmark harness runs: ``python -m bench.run --quick`` ends by itself, exits 0 and prints the table
with a row for every scenario, scenarios 1, 3 and 7 compare the grid with the bare baseline, and the sweeps
(scenarios 4 and 9) report every sweep at both fleet sizes and under load. The timings are not asserted here
(nor whether a target was met); only that the harness has not rotted.

It runs in a database of its own named after the test database (``<test database>_bench_quick`` on the same
server), which it drops afterwards, and writes only Redis keys under its own prefix: a test run touches
nothing it did not create.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from django.db import connection
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_SECONDS = 300  # a few minutes on a shared 2-core machine
SCENARIOS = ("1", "2", "3", "4", "5", "6", "7", "8", "9")
SWEEPS = ("budget_sweep", "rules_evaluate", "rules_evaluate_firing", "scaling_evaluate", "holds_expire")


@pytest.fixture
def bench_database_url(django_db_setup, django_db_blocker):
    """A database named after this run's test database, dropped when the test ends."""
    database = connection.settings_dict
    name = f"{database['NAME']}_bench_quick"
    credentials = database["USER"] + (f":{database['PASSWORD']}" if database["PASSWORD"] else "")
    server = f"postgres://{credentials}@{database['HOST'] or '127.0.0.1'}:{database['PORT'] or 5432}"
    yield f"{server}/{name}"
    with django_db_blocker.unblock(), psycopg.connect(f"{server}/postgres", autocommit=True) as maintenance:
        for database_name in (name, f"{name}_reference"):  # the copy scenario 4 makes of the fleet
            drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database_name))
            maintenance.execute(drop)


def test_bench_quick_runs_every_scenario_and_prints_the_table(bench_database_url):
    env = {**os.environ, "BENCH_DATABASE_URL": bench_database_url}
    completed = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--docs", "no"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_SECONDS,
        check=False,
    )
    output = completed.stdout
    assert completed.returncode == 0, (
        f"exit {completed.returncode}\n{output[-4000:]}\n{completed.stderr[-4000:]}"
    )
    assert re.search(r"^\| scenario +\| metric +\| result +\| target +\| pass/fail \|$", output, re.M), output
    for scenario in SCENARIOS:
        assert re.search(rf"^\| {scenario} \S", output, re.M), f"no row for scenario {scenario}\n{output}"
    assert "| ERROR" not in output, output
    assert "note: scenario 4: the 200-agent fleet is a copy of the bench database" in output, output
    with psycopg.connect(bench_database_url.rsplit("/", 1)[0] + "/postgres") as maintenance:
        copies = maintenance.execute(
            "SELECT count(*) FROM pg_database WHERE datname = %s",
            [bench_database_url.rsplit("/", 1)[1] + "_reference"],
        ).fetchone()[0]
    assert copies == 0  # the bench dropped its copy
    ratio = r"RATIO to the bare baseline \(no middleware\): {}, median of rounds"
    for scenario in ("1 many agents", "3 hot agent", "7 budgets spread", "7 budgets hot team"):
        for measure in ("throughput", "p99"):
            row = rf"^\| {scenario} +\| {ratio.format(measure)} +\| \d"
            assert re.search(row, output, re.M), f"no {measure} ratio for {scenario}\n{output}"
    assert re.search(r"^\| 1 bare baseline +\| errors \(non-201, socket\) +\| 0 of \d", output, re.M), output
    assert re.search(r"^\| 3 bare hot row +\| errors \(non-201, socket\) +\| 0 of \d", output, re.M), output
    assert re.search(r"^\| 3 hot agent +\| exact final counts .*\| pass +\|$", output, re.M), output
    assert re.search(r"^\| 7 bare baseline +\| errors \(non-201, socket\) +\| 0 of \d", output, re.M), output
    for side in ("spread", "hot team"):
        row = rf"^\| 7 budgets {side} +\| budgets = usage log .*\| pass +\|$"
        assert re.search(row, output, re.M), f"budgets of 7 {side} disagree with the usage log\n{output}"
    for sweep in SWEEPS:
        for metric in (
            r"seconds @ 200 agents",
            r"seconds @ 1,000 agents",
            r"time ratio 1,000 / 200 \(5x the agents\)",
            r"queries @ 200 / @ 1,000",
            r"peak RSS of the sweep's process @ 200 / @ 1,000",
        ):
            row = rf"^\| 4 {sweep} +\| {metric} +\| \d"
            assert re.search(row, output, re.M), f"no row {metric!r} for 4 {sweep}\n{output}"
        for metric in ("allocations without a sweep", "allocations during the sweep"):
            row = rf"^\| 9 {sweep} +\| {metric} +\| p99 \d"
            assert re.search(row, output, re.M), f"no row {metric!r} for 9 {sweep}\n{output}"
    # The holds the fleet has (one agent in twenty) are all ended, at both sizes.
    for size, holds in (("200", 10), ("1,000", 50)):
        row = rf"^\| 4 holds_expire +\| seconds @ {size} agents +\| [\d.]+ s \({holds} holds ended\)"
        assert re.search(row, output, re.M), f"not every hold ended at {size} agents\n{output}"
    assert "bench: harness ok" in output

"""The bench's one table, the machine it ran on, and docs/benchmarks.md."""

from __future__ import annotations

import datetime as dt
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench import db
from bench.loadgen import wrk_available
from bench.server import ROOT

DOCS_PATH = ROOT / "docs" / "benchmarks.md"
RESULTS_BEGIN = "<!-- bench:results:begin -->"
RESULTS_END = "<!-- bench:results:end -->"
# A run of the sweep scenarios alone (4, 9) has its own block, so that it does not replace a full run's table.
SWEEPS_BEGIN = "<!-- bench:sweeps:begin -->"
SWEEPS_END = "<!-- bench:sweeps:end -->"


# --- The table ------------------------------------------------------------------------------------------


@dataclass
class Row:
    scenario: str
    metric: str
    result: str
    target: str = "-"
    verdict: str = "info"  # pass, FAIL (target missed), info, n/a, ERROR (broken harness or invariant)


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    harness_errors: list[str] = field(default_factory=list)
    invariant_errors: list[str] = field(default_factory=list)

    def add(self, scenario: str, metric: str, result: str, target: str = "-", verdict: str = "info") -> None:
        self.rows.append(Row(scenario, metric, result, target, verdict))

    def check(self, scenario: str, metric: str, result: str, target: str, ok: bool) -> None:
        self.add(scenario, metric, result, target, "pass" if ok else "FAIL")

    def table(self) -> str:
        header = Row("scenario", "metric", "result", "target", "pass/fail")
        rows = [header, *self.rows]
        widths = [
            max(len(getattr(row, name)) for row in rows)
            for name in ("scenario", "metric", "result", "target", "verdict")
        ]

        def line(row: Row) -> str:
            cells = (row.scenario, row.metric, row.result, row.target, row.verdict)
            return (
                "| " + " | ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)) + " |"
            )

        separator = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
        return "\n".join([line(header), separator, *(line(row) for row in self.rows)])


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def statement_kind(sql: str | None) -> str:
    """The first word of a captured statement (SELECT, WITH, INSERT, ...)."""
    words = (sql or "").split()
    return words[0].upper() if words else "?"


@contextmanager
def statements_seen(connection) -> Iterator[list[str]]:
    """The kind of every statement run on ``connection`` meanwhile, from an execute wrapper: it sees the
    SQL as sent, where CaptureQueriesContext records None for a statement psycopg cannot render back."""
    kinds: list[str] = []

    def wrapper(execute, sql, params, many, context):
        kinds.append(statement_kind(sql))
        return execute(sql, params, many, context)

    with connection.execute_wrapper(wrapper):
        yield kinds


def per_second(value: float) -> str:
    return f"{value:,.0f}/s"


# --- The machine ---------------------------------------------------------------------------


def machine_facts(database_url: str, redis_ok: bool, redis_url: str) -> dict:
    cpu_model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    except OSError:
        pass
    postgres = db.server_facts(database_url)
    redis_version = "not reachable"
    if redis_ok:
        import redis

        client = redis.Redis.from_url(redis_url, socket_connect_timeout=2)
        redis_version = client.info("server").get("redis_version", "?")
        client.close()
    wrk_version = "not installed"
    if wrk_available():
        completed = subprocess.run(["wrk", "-v"], capture_output=True, text=True, timeout=10, check=False)
        wrk_version = (completed.stdout or completed.stderr).splitlines()[0].split(" [")[0]
    import django
    import gunicorn

    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory": memory,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgresql": postgres["version"],
        "postgresql_settings": postgres["settings"],
        "redis": redis_version,
        "django": django.get_version(),
        "gunicorn": gunicorn.__version__,
        "wrk": wrk_version,
        "pgbench": "installed" if shutil.which("pgbench") else "not installed",
        "load_average": " / ".join(f"{value:.2f}" for value in os.getloadavg()),
        "python_speed_us": python_speed_us(),
    }


def python_speed_us() -> float:
    """How fast this machine runs Python: the best of five timings of ``sum(range(1000))``, in microseconds.

    The same code's numbers move with it from one machine (or one hour of a shared one) to the next; it
    puts runs on different machines side by side. About 10 us on a current desktop core."""
    import timeit

    return min(timeit.repeat("sum(range(1000))", number=2000, repeat=5)) / 2000 * 1e6


def machine_line(facts: dict) -> str:
    """The machine in one line: what the table's absolute numbers move with."""
    return (
        f"{facts['cpus']} x {facts['cpu_model']}, {facts['memory']}, Linux {facts['kernel']}; "
        f"PostgreSQL {facts['postgresql'].split()[0]}, Redis {facts['redis']}, Python {facts['python']} "
        f"(`sum(range(1000))` in {facts['python_speed_us']:.1f} us), Django {facts['django']}; "
        f"load average {facts['load_average']} at the start; server, database and load generator share it"
    )


def docs_write(
    report: Report,
    facts: dict,
    profile_name: str,
    scenarios: str,
    server_description: str,
    loadgen: str,
    *,
    sweeps_only: bool = False,
) -> None:
    begin, end = (SWEEPS_BEGIN, SWEEPS_END) if sweeps_only else (RESULTS_BEGIN, RESULTS_END)
    block = "\n".join(
        [
            begin,
            f"`make bench` on {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC ({profile_name} run, scenarios "
            f"{scenarios}; {server_description}; load generator {loadgen}).",
            f"Machine: {machine_line(facts)}.",
            "",
            report.table(),
            "",
            *(f"- Note: {note}" for note in report.notes),
            end,
        ]
    )
    text = DOCS_PATH.read_text() if DOCS_PATH.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        head, _, rest = text.partition(begin)
        _, _, tail = rest.partition(end)
        text = head + block + tail
    else:
        title = "Latest results of the sweeps at scale" if sweeps_only else "Latest results"
        text = text.rstrip("\n") + f"\n\n## {title}\n\n" + block + "\n"
    DOCS_PATH.parent.mkdir(parents=True, exist_ok=True)
    DOCS_PATH.write_text(text)

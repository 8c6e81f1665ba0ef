"""A periodic task for ``tests/test_beat_singleton.py``, loaded by the worker it starts (``-I``).

Each run appends one line to the file ``BEAT_PROBE_LOG`` names: when a beat sent it (its tick), when it
started and when it finished. It sleeps a little so that the second send of a tick often arrives while
the first is still running.
"""

from __future__ import annotations

import os
import time

from celery import current_task

from axiom_grid.celery import BEAT_SENT_AT_HEADER
from ledger.periodic import periodic_task

PROBE_TASK = "tests.beat_probe"
PROBE_SECONDS = 0.4


@periodic_task(name=PROBE_TASK, acks_late=True, reject_on_worker_lost=True, time_limit=30)
def beat_probe_task() -> None:
    started = time.time()
    time.sleep(PROBE_SECONDS)
    sent_at = current_task.request.get(BEAT_SENT_AT_HEADER)
    with open(os.environ["BEAT_PROBE_LOG"], "a") as log:
        log.write(f"{sent_at} {started:.3f} {time.time():.3f}\n")

"""A gunicorn worker tunes its garbage collector once its application is loaded (``post_worker_init`` in
``gunicorn.conf.py``), and so does each Celery pool process (``worker_process_init``): what is alive then
is frozen out of the collector's sight, and the young generation is collected less often."""

from __future__ import annotations

import gc
import runpy
from pathlib import Path

import pytest

from axiom_grid.startup import GC_YOUNG_THRESHOLD

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def collector_restored():
    # From a process whose collector nothing has tuned yet (a Celery worker a test started in this process
    # may have tuned it).
    gc.unfreeze()
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_gunicorns_post_worker_init_freezes_what_is_loaded_and_raises_the_young_threshold(collector_restored):
    hooks = runpy.run_path(str(ROOT / "gunicorn.conf.py"))
    assert gc.get_freeze_count() == 0
    _, middle, old = gc.get_threshold()

    hooks["post_worker_init"](None)

    assert gc.get_freeze_count() > 10_000
    assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, middle, old)
    assert gc.get_count()[0] < 100  # collected, then frozen: nothing young left over


def test_a_celery_pool_process_tunes_its_collector_once_started(collector_restored):
    """The fleet sweeps run in Celery's pool processes: the same tuning, from ``worker_process_init``."""
    from celery.signals import worker_process_init

    import axiom_grid.celery  # noqa: F401  (connects the worker's signals)

    assert gc.get_freeze_count() == 0
    _, middle, old = gc.get_threshold()

    worker_process_init.send(sender=None)

    assert gc.get_freeze_count() > 10_000
    assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, middle, old)

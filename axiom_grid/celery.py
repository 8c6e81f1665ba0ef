"""The Celery app. Configuration comes from Django settings (``CELERY_*``); tasks are found in each app.

A beat process stamps each periodic task it sends with the time it sent it, so that a worker can tell the
sends of one tick from those of the next (``ledger.periodic``): with two beats running, each tick arrives
twice and must be worked once.

Every task's metrics and log context come from Celery's signals (``axiom_grid.observability.task_signals``);
with ``METRICS_BIND`` the worker serves the metrics of its host there (``_serve_metrics``).
With ``LOG_FORMAT=json`` the worker and beat keep the settings' logging (JSON lines, with each task's id)
instead of Celery's own text format.
"""

from __future__ import annotations

import datetime as dt
import os

from celery import Celery
from celery.signals import (
    beat_embedded_init,
    beat_init,
    before_task_publish,
    setup_logging,
    worker_init,
    worker_process_init,
    worker_ready,
)

from axiom_grid.observability import task_signals  # noqa: F401  (connects the tasks' metrics and log context)
from axiom_grid.observability.logs import log_format

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "axiom_grid.settings")

app = Celery("axiom_grid")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

BEAT_SENT_AT_HEADER = "beat_sent_at"
_in_beat = False


@beat_init.connect
@beat_embedded_init.connect
def _mark_beat_process(**kwargs) -> None:
    global _in_beat
    _in_beat = True


@before_task_publish.connect
def _stamp_beat_send(headers: dict | None = None, **kwargs) -> None:
    # django-celery-beat names the schedule in ``periodic_task_name``; the admin's "run now" does too, but
    # only a beat process stamps: a run from the admin is not a tick.
    if _in_beat and headers is not None and "periodic_task_name" in headers:
        headers.setdefault(BEAT_SENT_AT_HEADER, dt.datetime.now(dt.UTC).isoformat())


@worker_init.connect
@beat_init.connect
def _refuse_the_public_secret_key(**kwargs) -> None:
    # SystemExit, not the ImproperlyConfigured itself: Celery logs and swallows a receiver's Exception.
    from django.core.exceptions import ImproperlyConfigured

    from axiom_grid.startup import ensure_secret_key

    try:
        ensure_secret_key()
    except ImproperlyConfigured as error:
        raise SystemExit(str(error)) from None


@worker_process_init.connect
def _tune_collector(**kwargs) -> None:
    # In each pool process once it has started: a fleet sweep makes its objects batch after batch, and at
    # Python's default threshold every few batches set off a full collection that scans all of Django too.
    from axiom_grid.startup import collector_tune

    collector_tune()


@worker_ready.connect
def _serve_metrics(**kwargs) -> None:
    # In the worker's main process, once: its pool processes' metrics add up in PROMETHEUS_MULTIPROC_DIR.
    import logging

    from django.conf import settings

    if not settings.METRICS_BIND:
        return
    from axiom_grid.observability.exposition import metrics_serve

    try:
        metrics_serve(settings.METRICS_BIND)
    except (OSError, ValueError) as error:
        logging.getLogger(__name__).error(
            "cannot serve metrics on METRICS_BIND=%s: %s", settings.METRICS_BIND, error
        )


def _settings_logging(**kwargs) -> None:
    import logging.config

    from django.conf import settings

    logging.config.dictConfig(settings.LOGGING)


if log_format() == "json":
    # Any receiver of this signal stops Celery from setting up its own logging, so it is connected only for
    # JSON: plain text keeps Celery's format, which names the task of each line.
    setup_logging.connect(_settings_logging, weak=False)

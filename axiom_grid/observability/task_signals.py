"""Every Celery task's metrics and log context, from Celery's signals: no task has to do anything.

- ``task_prerun``: the run starts; its task id is set for its log lines (``logs.task_id_var``).
- ``task_postrun``: its duration; a success (or a periodic task's ``{"skipped": ...}``) counts its outcome,
  the time of the success and what the task returned it touched (``metrics.task_rows_count``).
- ``task_failure``: a failure. Celery sends it in the process that ran the task for an exception, and in
  the worker's main process for what the pool process could not report (a hard time limit, a lost worker
  whose message is not requeued), so it counts failures that ``task_postrun`` never sees.
- ``task_retry``: a retry.

Connected when ``axiom_grid.celery`` is imported, so in the worker, in beat and in an eager ``apply()``.
"""

from __future__ import annotations

import time

from celery.signals import task_failure, task_postrun, task_prerun, task_retry

from axiom_grid.observability.logs import task_id_var
from axiom_grid.observability.metrics import (
    TASK_LAST_SUCCESS,
    TASK_RUNS,
    TASK_SECONDS,
    task_rows_count,
)

# task id -> (when it started, the log context's token); a task's pre- and postrun run in one thread.
_running: dict[str, tuple[float, object]] = {}


def _task_name(task, sender=None) -> str:
    return getattr(task, "name", None) or getattr(sender, "name", None) or "unknown"


@task_prerun.connect(weak=False)
def _task_started(task_id: str | None = None, **kwargs) -> None:
    if task_id is not None:
        _running[task_id] = (time.perf_counter(), task_id_var.set(task_id))


@task_postrun.connect(weak=False)
def _task_finished(task_id=None, task=None, retval=None, state=None, sender=None, **kwargs) -> None:
    started, token = _running.pop(task_id, (None, None))
    if token is not None:
        task_id_var.reset(token)
    name = _task_name(task, sender)
    if started is not None:
        TASK_SECONDS.labels(name).observe(time.perf_counter() - started)
    if state != "SUCCESS":
        return  # a failure or a retry is counted by its own signal
    if isinstance(retval, dict) and "skipped" in retval:
        TASK_RUNS.labels(name, "skipped").inc()
        return
    TASK_RUNS.labels(name, "success").inc()
    TASK_LAST_SUCCESS.labels(name).set(time.time())
    task_rows_count(name, retval)


@task_failure.connect(weak=False)
def _task_failed(sender=None, **kwargs) -> None:
    TASK_RUNS.labels(_task_name(sender), "failure").inc()


@task_retry.connect(weak=False)
def _task_retried(sender=None, **kwargs) -> None:
    TASK_RUNS.labels(_task_name(sender), "retry").inc()

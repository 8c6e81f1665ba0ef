"""The service's Prometheus metrics, each defined once, and the small functions the code counts through.

Labels are bounded: a route is its URL pattern (``api/v1/agents/<agent_id:agent_id>/allocations``), never
a path; a reason is an error code; a task is its registered name. Nothing is labelled by agent: the fleet's
utilization is a distribution (``exposition``), not a series per agent.

Several processes serve one host (gunicorn's workers, Celery's pool, beat). With
``PROMETHEUS_MULTIPROC_DIR`` set, prometheus_client keeps every process's values in files there, and
``/metrics`` in any web process adds them up: a counter of a process that has exited still counts, so totals
never go back. The variable must be set before prometheus_client is first imported (it chooses then), and
the directory emptied when the service starts: ``axiom_grid.procfile`` does both for ``make run``, and
``gunicorn.conf.py`` gives gunicorn's workers a private directory when it is unset. Without it each process
counts on its own (the registry of prometheus_client's default mode), which is right for one process: a
test, ``manage.py``, a shell.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from prometheus_client import Counter, Gauge, Histogram


def multiprocess_dir() -> str:
    """The directory shared by this host's processes, or "" in single-process mode."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")


if multiprocess_dir():
    # A process started with the variable but not by the runner that makes the directory still counts.
    os.makedirs(multiprocess_dir(), exist_ok=True)

# --- HTTP ----------------------------------------------------------------------------------------------

HTTP_REQUESTS = Counter(
    "axiom_grid_http_requests",
    "HTTP requests answered, by route (the URL pattern; 'unmatched' for no route), method and status code.",
    ["route", "method", "status"],
)
HTTP_REQUEST_SECONDS = Histogram(
    "axiom_grid_http_request_duration_seconds",
    "Time from a request reaching Django to its response leaving it, by route and method.",
    ["route", "method"],
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

# --- Allocations ---------------------------------------------------------------------------------------

ALLOCATIONS = Counter(
    "axiom_grid_allocations",
    "Allocations written (single, batch items, executions, compat), by resource type and kind "
    "(committed or held).",
    ["resource_type", "kind"],
)
ALLOCATED_UNITS = Counter(
    "axiom_grid_allocated_units",
    "Resource units allocated (committed or held), by resource type.",
    ["resource_type"],
)
ALLOCATION_REFUSALS = Counter(
    "axiom_grid_allocation_refusals",
    "Allocations the ledger refused, by resource type and reason (the error code: quota_exceeded, "
    "budget_exceeded, agent_throttled, agent_suspended, run_not_found, run_ended, ...).",
    ["resource_type", "reason"],
)

# --- Tasks ---------------------------------------------------------------------------------------------

TASK_SECONDS = Histogram(
    "axiom_grid_task_duration_seconds",
    "Celery task run time, by task.",
    ["task"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
TASK_RUNS = Counter(
    "axiom_grid_task_runs",
    "Celery task runs by task and outcome: success, skipped (a periodic task whose tick already ran or "
    "whose lock another run holds), retry or failure (an exception, a time limit, a lost worker).",
    ["task", "outcome"],
)
TASK_ROWS = Counter(
    "axiom_grid_task_rows",
    "What task runs report they touched, by task and kind: the count a task returns (kind 'rows'), or each "
    "count of the summary it returns (kind = its key, e.g. 'expired').",
    ["task", "kind"],
)
TASK_LAST_SUCCESS = Gauge(
    "axiom_grid_task_last_success_timestamp_seconds",
    "Unix time of each task's last successful run (alert on it growing old).",
    ["task"],
    multiprocess_mode="max",
)

# --- Alert delivery ------------------------------------------------------------------------------------

ALERT_DELIVERIES = Counter(
    "axiom_grid_alert_deliveries",
    "Alert delivery attempts by channel (webhook, email) and outcome: delivered, retry (failed, another "
    "attempt is due later) or failed (failed for the last time).",
    ["channel", "outcome"],
)
ALERT_DELIVERY_FAILURES = Counter(
    "axiom_grid_alert_delivery_failures",
    "Failed alert delivery attempts by channel and reason: http_3xx, http_4xx, http_5xx or error "
    "(no answer: connection, TLS, timeout, SMTP, a disabled or deleted endpoint).",
    ["channel", "reason"],
)
ALERT_DELIVERY_LAG_SECONDS = Histogram(
    "axiom_grid_alert_delivery_lag_seconds",
    "Time from an alert's creation to its delivery, by channel.",
    ["channel"],
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 3 * 3600, 6 * 3600, 24 * 3600),
)


# --- Counting ------------------------------------------------------------------------------------------


def allocation_count(*, resource_type: str, held: bool, amount: int, count: int = 1) -> None:
    """``count`` allocations of ``amount`` units in all."""
    ALLOCATIONS.labels(resource_type, "held" if held else "committed").inc(count)
    ALLOCATED_UNITS.labels(resource_type).inc(amount)


def refusal_count(*, resource_type: str, reason: str, count: int = 1) -> None:
    ALLOCATION_REFUSALS.labels(resource_type, reason).inc(count)


def alert_delivery_count(
    *, channel: str, outcome: str, lag_seconds: float | None = None, status_code: int | None = None
) -> None:
    """One delivery's attempt: ``delivered`` (with its lag), ``retry`` or ``failed`` (with the answer's status
    code, None when there was no answer)."""
    ALERT_DELIVERIES.labels(channel, outcome).inc()
    if outcome == "delivered":
        if lag_seconds is not None:
            ALERT_DELIVERY_LAG_SECONDS.labels(channel).observe(max(lag_seconds, 0.0))
        return
    reason = "error" if status_code is None else f"http_{status_code // 100}xx"
    ALERT_DELIVERY_FAILURES.labels(channel, reason).inc()


def task_rows_count(task: str, result: object) -> None:
    """Count what a task returned: an int is rows, a summary's int values are counted under their keys
    (anything else, such as a list of errors or a status text, is not a count)."""
    if isinstance(result, bool):
        return
    if isinstance(result, int):
        TASK_ROWS.labels(task, "rows").inc(max(result, 0))
    elif isinstance(result, Mapping):
        for key, value in result.items():
            if isinstance(value, int) and not isinstance(value, bool):
                TASK_ROWS.labels(task, str(key)).inc(max(value, 0))

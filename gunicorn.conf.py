"""gunicorn's settings file, read from the working directory by every gunicorn started in the project
(the Procfile's, the Docker image's, compose's, the tests' and the benchmark's servers); the command lines
give the rest.

Metrics: gunicorn's workers are separate processes, and their Prometheus metrics add up only in
prometheus_client's multiprocess mode (``axiom_grid/observability/metrics.py``). When
``PROMETHEUS_MULTIPROC_DIR`` is set (``make run`` sets ``var/prometheus``, shared with the Celery worker and
beat, and empties it) the workers use it; otherwise this master makes a private directory for its own
workers, before any of them starts, and removes it when it exits. A worker that exits is marked dead, so a
live gauge stops counting it (its counters keep counting: totals do not go back).

Memory: each worker, once its application is loaded, freezes what it holds out of the garbage collector's
sight and collects young objects less often (``axiom_grid.startup.collector_tune``).

Logs: with ``LOG_FORMAT=json`` gunicorn's own lines (its error log, and the access log when one is asked
for) are JSON lines too, an access line with the request id of its answer and its method, path, status and
duration under ``http``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping

# Before anything imports prometheus_client: it chooses its mode when first imported.
_OWN_DIR_VARIABLE = "AXIOM_GUNICORN_METRICS_DIR"
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.environ[_OWN_DIR_VARIABLE] = tempfile.mkdtemp(
        prefix="axiom-grid-metrics-"
    )


def post_worker_init(worker) -> None:
    from axiom_grid.startup import collector_tune

    collector_tune()


def child_exit(server, worker) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server) -> None:
    own = os.environ.get(_OWN_DIR_VARIABLE)
    if own and own == os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        shutil.rmtree(own, ignore_errors=True)


class AccessFields(logging.Filter):
    """An access line's request id and HTTP fields, from the atoms gunicorn formats it with."""

    def filter(self, record: logging.LogRecord) -> bool:
        atoms = record.args
        if isinstance(atoms, Mapping):
            request_id = atoms.get("{x-request-id}o")
            if request_id:
                record.request_id = request_id
            record.http = {
                "method": atoms.get("m"),
                "path": atoms.get("U"),
                "status": atoms.get("s"),
                "duration_seconds": float(atoms.get("L") or 0),
            }
        return True


def _json_logging() -> dict:
    from axiom_grid.observability.logs import JsonFormatter

    def handler(stream: str, *filters: str) -> dict:
        return {
            "class": "logging.StreamHandler",
            "formatter": "json",
            "stream": f"ext://sys.{stream}",
            "filters": list(filters),
        }

    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "filters": {"access": {"()": AccessFields}},
        "handlers": {"error": handler("stderr"), "access": handler("stdout", "access")},
        "root": {"level": "INFO", "handlers": ["error"]},
        "loggers": {
            "gunicorn.error": {"level": "INFO", "handlers": ["error"], "propagate": False},
            "gunicorn.access": {"level": "INFO", "handlers": ["access"], "propagate": False},
        },
    }


def _log_format() -> str:
    from axiom_grid.observability.logs import log_format

    return log_format()


if _log_format() == "json":
    logconfig_dict = _json_logging()

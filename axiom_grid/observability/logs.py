"""Log lines that say which request or task they belong to, as JSON with ``LOG_FORMAT=json``.

The request id lives in a context variable for the duration of a request (``middleware``) and the task id
for the duration of a task (``task_signals``): a context variable, not a thread-local, so that it is right
in gunicorn's threads and in an asyncio task alike. ``ContextFilter`` is on the console handler
(``settings.LOGGING``), so every line that reaches it carries them, whichever logger wrote it.

``JsonFormatter`` writes one JSON object per line: ``time`` (UTC, ISO 8601), ``level``, ``logger``,
``message``, ``process``, then ``request_id`` or ``task_id`` when there is one, and ``exception`` (the
traceback) when the line carries one. ``json.dumps`` escapes newlines, so a traceback stays on its line.

No Django here: gunicorn's master, which does not load Django, formats its own lines with it too
(``gunicorn.conf.py``).
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import os
import re
import uuid
from collections.abc import Mapping

LOG_FORMATS = ("text", "json")

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
task_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("task_id", default=None)

REQUEST_ID_HEADER = "X-Request-ID"
REQUEST_ID_MAX_LENGTH = 128
# Visible ASCII only: no spaces or control characters to split a log line or a header, nothing to escape.
_REQUEST_ID = re.compile(rf"[\x21-\x7e]{{1,{REQUEST_ID_MAX_LENGTH}}}")


def log_format() -> str:
    """``LOG_FORMAT`` as ``settings.LOG_FORMAT`` reads it (``text`` unless set), for what must know it before
    Django is set up: Celery's logging signal and gunicorn's master. The settings refuse other values."""
    return os.environ.get("LOG_FORMAT", "").strip().lower() or "text"


def request_id_from(header: str | None) -> str:
    """The caller's request id if it is one (1 to 128 visible ASCII characters), else a new one."""
    if header and _REQUEST_ID.fullmatch(header):
        return header
    return uuid.uuid4().hex


class ContextFilter(logging.Filter):
    """Puts the current request id and task id on every record (None outside a request or a task)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            # django.request's line about a 4xx or 5xx answer comes after the request's context: it
            # carries the request itself.
            record.request_id = request_id_var.get() or getattr(
                getattr(record, "request", None), "request_id", None
            )
        if getattr(record, "task_id", None) is None:
            record.task_id = task_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        created = dt.datetime.fromtimestamp(record.created, tz=dt.UTC)
        line = {
            "time": created.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        for name in ("request_id", "task_id"):
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        http = getattr(record, "http", None)
        if isinstance(http, Mapping):
            line["http"] = dict(http)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str)

"""Usage exports as CSV: the range an export covers, its columns, and its text, written chunk by chunk.

An export reads the usage log in keyset chunks (``ledger.selectors.usage_log_chunks``) and writes each
chunk with the csv module as one piece of text, so that a view can stream a month of a busy fleet without
holding it in memory. A row shows what the JSON usage list shows (``allocation.representation.usage_body``:
decimal strings, UTC times ending in ``Z``) plus the period it is charged to and the allocation it came
from, as columns a spreadsheet can sort and sum.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections.abc import Iterator

from django.conf import settings

from allocation.representation import USAGE_COLUMNS, iso_datetime, usage_body
from ledger.periods import month_bounds
from ledger.selectors import usage_log_chunks

# Rows read by one query. A chunk of 5,000 rows is about 2 MB of Python objects and 1 MB of CSV; the
# setting is there for tests that need many chunks from few rows.
DEFAULT_CHUNK_ROWS = 5000

USAGE_CSV_HEADER = (
    "created_at",
    "agent_id",
    "resource_type",
    "kind",
    "amount",
    "unit_price_usd",
    "cost_usd",
    "period_start",
    "task_id",
    "allocation_id",
    "idempotency_key",
    "metadata",
    "id",
)
_COLUMNS = (*USAGE_COLUMNS, "period_start")
# A cell starting with one of these is a formula to a spreadsheet. The text columns an agent chooses
# (task id, idempotency key, the allocation id its metadata may name) get a leading apostrophe there, so
# that opening an export never runs what an agent wrote into it.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def usage_export_range(
    *, since: dt.datetime | None, until: dt.datetime | None, now: dt.datetime
) -> tuple[dt.datetime, dt.datetime]:
    """The [since, until) an export covers. ``until`` is at most ``now``, the moment the export begins, so
    that rows written while it streams never make it longer; without ``until`` it is ``now``. Without
    ``since`` it is the start of the quota period (UTC calendar month) in which the range ends: a bare
    export is the current month so far, and ``until=2025-04-01T00:00:00Z`` alone is March 2025."""
    until = now if until is None or until > now else until
    if since is None:
        since = _period_start_before(until)
    return since, until


def _period_start_before(moment: dt.datetime) -> dt.datetime:
    start, _ = month_bounds(moment)
    if start < moment:
        return start
    try:  # ``moment`` is a month's first instant: the range ending there is the month before it
        return month_bounds(moment - dt.timedelta(microseconds=1))[0]
    except OverflowError:  # before year 1: nothing can be there
        return moment


def usage_export_csv(
    *,
    since: dt.datetime,
    until: dt.datetime,
    agent_id: str | None = None,
    resource_type_id: str | None = None,
    chunk_size: int | None = None,
) -> Iterator[str]:
    """The CSV text of the usage rows in [since, until), oldest first: the header and the first chunk's rows
    as one piece, then one piece per further chunk of the log. Nothing is read before the first piece is
    asked for."""
    chunks = usage_log_chunks(
        since=since,
        until=until,
        columns=_COLUMNS,
        chunk_size=chunk_size or getattr(settings, "USAGE_EXPORT_CHUNK_ROWS", DEFAULT_CHUNK_ROWS),
        agent_id=agent_id,
        resource_type_id=resource_type_id,
    )
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")  # RFC 4180
    writer.writerow(USAGE_CSV_HEADER)
    for chunk in chunks:
        writer.writerows(usage_csv_row(row) for row in chunk)
        yield _drain(buffer)
    if buffer.tell():  # no rows at all: the header alone
        yield _drain(buffer)


def _drain(buffer: io.StringIO) -> str:
    text = buffer.getvalue()
    buffer.seek(0)
    buffer.truncate()
    return text


def usage_csv_row(row: dict) -> tuple:
    """One usage row (``values(*USAGE_COLUMNS, "period_start")``) as the export's cells, in header order."""
    body = usage_body(row)
    metadata = body["metadata"] if isinstance(body["metadata"], dict) else {}
    allocation_id = metadata.get("allocation_id", "")
    return (
        body["created_at"],
        body["agent_id"],
        body["resource_type"],
        body["kind"],
        body["amount"],
        body["unit_price_usd"],
        body["cost_usd"],
        iso_datetime(row["period_start"]),
        _text_cell(body["task_id"]),
        _text_cell(allocation_id if isinstance(allocation_id, str) else json.dumps(allocation_id)),
        _text_cell(body["idempotency_key"]),
        json.dumps(body["metadata"], separators=(",", ":"), ensure_ascii=False),
        body["id"],
    )


def _text_cell(value: str) -> str:
    return "'" + value if value.startswith(_FORMULA_STARTS) else value


def usage_export_filename(*, scope: str, since: dt.datetime, until: dt.datetime) -> str:
    """``usage-<scope>-<since>-<until>.csv`` with UTC times to the second; characters a file system may
    refuse (an agent id's ':') become '_'."""
    safe_scope = "".join(char if char.isalnum() or char in "-_." else "_" for char in scope)
    return f"usage-{safe_scope}-{_stamp(since)}-{_stamp(until)}.csv"


def _stamp(moment: dt.datetime) -> str:
    utc = moment.astimezone(dt.UTC)
    return f"{utc.year:04d}{utc.month:02d}{utc.day:02d}T{utc.hour:02d}{utc.minute:02d}{utc.second:02d}Z"

"""Monthly partitions of the ledger's growing tables, created ahead of time, and retention of old rows.

Five tables grow with every call: the usage log, the audit trail, executions and scaling events (only ever
appended to), and allocations. Each is range-partitioned by month, with one ``DEFAULT`` partition that
takes any row whose month has no partition yet (a clock far ahead, a back-dated import), so that an insert
never fails for want of a partition. A ``PartitionedTable`` says how: its partition column and where a
month starts in that column's values.

- The four append-only tables are partitioned on their time column, ``created_at``. A partitioned table's
  primary key must hold the partition key, so their database key is ``(id, created_at)``; Django still
  knows ``id`` alone as the key, and ids come from one sequence owned by the column (PostgreSQL 15 has no
  identity columns on partitioned tables), so they stay unique.
- Allocations are partitioned on their primary key ``id`` itself. Their ids are version 7 UUIDs
  (``ledger.ids``), whose first 48 bits are the Unix milliseconds of their making, so a month is one range
  of ids: from the smallest UUID of its first millisecond to that of the next month's. The key stays
  ``(id)``, and every lookup by id (settle, release, a read, a batch's replay) reads one partition. An id
  that is no version 7 UUID (a version 4 one of an older row) falls in the default partition, but for the
  rare one whose first bits happen to land in a month's range.

``partitions_maintain`` (the periodic task ``ledger.partitions_maintain``) creates the partitions of the
current month and the next ``GRID_PARTITIONS_AHEAD_MONTHS``, moving into a new partition whatever rows the
default partition already holds for its month, in the same transaction. It then applies
``GRID_RETENTION``: a partition whose whole month is older than the table's retention is detached, dumped
to ``GRID_RETENTION_DUMP_DIR`` as a gzipped CSV when that is set, and dropped. Dropping a month is one
catalog change, not billions of deletes, and the append-only triggers (which refuse DELETE) are left alone.

A month of allocations that still holds an open hold is not dropped: retention keeps it, and the next run
tries again once the hold has ended. Alerts are not partitioned (docs/operations.md says why): their
retention deletes old rows in bounded chunks, each chunk its own short transaction.

The tables are named here, not imported as models, so that migrations can call the same code.
"""

from __future__ import annotations

import datetime as dt
import gzip
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

logger = logging.getLogger(__name__)


def _timestamp_literal(moment: dt.datetime) -> str:
    # A bound with its offset written out: the session's time zone must not move a month's edges.
    return f"'{moment:%Y-%m-%d %H:%M:%S}+00'"


def _uuid7_floor(moment: dt.datetime) -> str:
    """The smallest version 7 UUID of ``moment``'s millisecond: every id made before it sorts below."""
    milliseconds = int(moment.timestamp() * 1000)
    digits = f"{milliseconds:012x}" + "0" * 20
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


def _uuid7_literal(moment: dt.datetime) -> str:
    return f"'{_uuid7_floor(moment)}'"


# The month (UTC, without time zone) of a row by its partition column; NULL for a row that belongs to no
# month (an id that is no version 7 UUID), which stays in the default partition.
_CREATED_MONTH_SQL = "date_trunc('month', created_at AT TIME ZONE 'UTC')"
_UUID7_MONTH_SQL = (
    "CASE WHEN substr(id::text, 15, 1) = '7' THEN date_trunc('month', "
    "to_timestamp(('x' || substr(id::text, 1, 8) || substr(id::text, 10, 4))::bit(48)::bigint / 1000.0) "
    "AT TIME ZONE 'UTC') END"
)


@dataclass(frozen=True)
class PartitionedTable:
    key: str  # its name in GRID_RETENTION
    table: str
    column: str  # the partition key
    # The SQL literal of the partition key's lowest value in the month starting at the given moment.
    bound: Callable[[dt.datetime], str] = _timestamp_literal
    month_sql: str = _CREATED_MONTH_SQL
    # Ids from a sequence owned by the column (the primary key then holds the partition column too), or
    # given by the application (the partition column is the primary key).
    id_sequence: bool = True
    # Rows retention must not drop (SQL condition): a month holding one is kept whole, until the next run.
    keep_sql: str = ""

    @property
    def primary_key(self) -> str:
        return self.column if self.column == "id" else f"id, {self.column}"


PARTITIONED_TABLES = (
    PartitionedTable("usage_logs", "usage_logs", "created_at"),
    PartitionedTable("audit_trail", "allocation_auditrecord", "created_at"),
    PartitionedTable("executions", "optimization_execution", "created_at"),
    PartitionedTable("scaling_events", "optimization_scalingevent", "created_at"),
    # An open hold still counts in its quota's reserved units: settled, released or expired, it may go.
    PartitionedTable(
        "allocations",
        "allocation_allocation",
        "id",
        bound=_uuid7_literal,
        month_sql=_UUID7_MONTH_SQL,
        id_sequence=False,
        keep_sql="status = 'held'",
    ),
)
# Retention by chunked delete, for the table that stays unpartitioned.
CHUNKED_TABLES = ("alerts",)
DEFAULT_AHEAD_MONTHS = 3
DELETE_CHUNK = 5000
# How long attaching or detaching a partition waits for the parent's lock before the run gives up (and the
# next run tries again): a lock request that waits also holds up every writer queued behind it.
LOCK_TIMEOUT = "5s"
# gzip's own default: Python's (9) spends several times the CPU for a few percent less on a ledger's CSV.
GZIP_LEVEL = 6


def table_spec(key_or_table: str) -> PartitionedTable:
    for spec in PARTITIONED_TABLES:
        if key_or_table in (spec.key, spec.table):
            return spec
    raise KeyError(key_or_table)


# --- months -------------------------------------------------------------------------------------------


def month_start(moment: dt.datetime) -> dt.datetime:
    moment = moment.astimezone(dt.UTC)
    return moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def month_add(month: dt.datetime, months: int) -> dt.datetime:
    index = month.year * 12 + month.month - 1 + months
    return month.replace(year=index // 12, month=index % 12 + 1)


def partition_name(table: str, month: dt.datetime) -> str:
    return f"{table}_p{month:%Y%m}"


def default_partition_name(table: str) -> str:
    return f"{table}_default"


def _month_of(table: str, name: str) -> dt.datetime | None:
    found = re.fullmatch(re.escape(table) + r"_p(\d{4})(\d{2})", name)
    if not found:
        return None
    return dt.datetime(int(found[1]), int(found[2]), 1, tzinfo=dt.UTC)


def _bounds(spec: PartitionedTable, month: dt.datetime) -> str:
    return f"FOR VALUES FROM ({spec.bound(month)}) TO ({spec.bound(month_add(month, 1))})"


# --- catalog ------------------------------------------------------------------------------------------


def _fetch(cursor, sql: str, params=()) -> list[tuple]:
    cursor.execute(sql, params)
    return cursor.fetchall()


def is_partitioned(table: str, *, cursor=None) -> bool:
    with _cursor(cursor) as cur:
        return bool(
            _fetch(cur, "SELECT 1 FROM pg_partitioned_table WHERE partrelid = to_regclass(%s)", [table])
        )


def attached_partitions(table: str, *, cursor=None) -> list[str]:
    """The names of ``table``'s partitions, the default one included."""
    with _cursor(cursor) as cur:
        rows = _fetch(
            cur,
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = to_regclass(%s) ORDER BY c.relname",
            [table],
        )
    return [name for (name,) in rows]


def _detached_partitions(cursor, table: str) -> list[str]:
    """Tables named like a month of ``table`` that are no partition of it: left by a retention run that
    detached them and did not finish."""
    rows = _fetch(
        cursor,
        "SELECT c.relname FROM pg_class c WHERE c.relnamespace = current_schema()::regnamespace "
        "AND c.relkind = 'r' AND c.relname LIKE %s "
        "AND NOT EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = c.oid) ORDER BY c.relname",
        [table.replace("_", r"\_") + r"\_p%"],
    )
    return [name for (name,) in rows if _month_of(table, name) is not None]


class _cursor:
    """The given cursor, or a new one on Django's connection, closed after."""

    def __init__(self, cursor):
        self.given = cursor
        self.own = None

    def __enter__(self):
        if self.given is not None:
            return self.given
        self.own = connection.cursor()
        return self.own

    def __exit__(self, *exc):
        if self.own is not None:
            self.own.close()


# --- turning a table into a partitioned one (and back), for the migrations ---------------------------


def _definitions(cursor, table: str) -> dict:
    """What must be made again on a rebuilt ``table``: its indexes other than the primary key, its foreign
    keys and its own triggers, as PostgreSQL prints them, and its primary key's name."""
    indexes = _fetch(
        cursor,
        "SELECT c.relname, pg_get_indexdef(i.indexrelid) FROM pg_index i JOIN pg_class c "
        "ON c.oid = i.indexrelid WHERE i.indrelid = to_regclass(%s) AND NOT i.indisprimary ORDER BY 1",
        [table],
    )
    foreign_keys = _fetch(
        cursor,
        "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE conrelid = to_regclass(%s) AND contype = 'f' AND conparentid = 0 ORDER BY 1",
        [table],
    )
    triggers = _fetch(
        cursor,
        "SELECT tgname, pg_get_triggerdef(oid) FROM pg_trigger WHERE tgrelid = to_regclass(%s) "
        "AND NOT tgisinternal AND tgparentid = 0 ORDER BY 1",
        [table],
    )
    primary = _fetch(
        cursor,
        "SELECT conname FROM pg_constraint WHERE conrelid = to_regclass(%s) AND contype = 'p'",
        [table],
    )
    columns = _fetch(
        cursor,
        "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attnum > 0 "
        "AND NOT attisdropped ORDER BY attnum",
        [table],
    )
    return {
        "indexes": indexes,
        "foreign_keys": foreign_keys,
        "triggers": triggers,
        "primary": primary[0][0] if primary else f"{table}_pkey",
        "columns": ", ".join(f'"{name}"' for (name,) in columns),
    }


def _rebuild(cursor, table: str, *, create: str, after_create: list[str], key: str) -> None:
    """Rebuild ``table`` as ``create`` makes it (a ``CREATE TABLE`` of ``table`` from ``LIKE {old}``),
    with its rows, indexes, foreign keys, triggers and next id."""
    old = f"{table}_rebuilt_from"
    cursor.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
    found = _definitions(cursor, table)
    sequence = _fetch(cursor, "SELECT pg_get_serial_sequence(%s, 'id')", [table])[0][0]
    cursor.execute(f"ALTER TABLE {table} RENAME TO {old}")
    cursor.execute(f"ALTER TABLE {old} RENAME CONSTRAINT {found['primary']} TO {old}_pkey")
    for name, _ in found["indexes"]:
        cursor.execute(f'DROP INDEX "{name}"')
    if sequence:
        cursor.execute(f"ALTER SEQUENCE {sequence} RENAME TO {old}_id_seq")
    cursor.execute(create.format(old=old))
    for statement in after_create:
        cursor.execute(statement.format(old=old))
    cursor.execute(f"INSERT INTO {table} ({found['columns']}) SELECT {found['columns']} FROM {old}")
    if _fetch(cursor, "SELECT pg_get_serial_sequence(%s, 'id')", [table])[0][0]:
        # The next id continues after the old sequence's last one (none yet: it starts at 1) and after
        # every id the rows hold.
        issued = (
            f"(SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END FROM {old}_id_seq)"
            if sequence
            else "0"
        )
        cursor.execute(
            f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
            f"GREATEST({issued}, (SELECT coalesce(max(id), 0) FROM {old})) + 1, false)"
        )
    cursor.execute(f"DROP TABLE {old}")
    cursor.execute(f"ALTER TABLE {table} ADD CONSTRAINT {found['primary']} PRIMARY KEY ({key})")
    for _, definition in found["indexes"]:
        cursor.execute(definition)
    for name, definition in found["foreign_keys"]:
        # A foreign key added to a partitioned table cannot be NOT VALID before PostgreSQL 18; the rows were
        # valid on the old table, so it is checked now.
        cursor.execute(f'ALTER TABLE {table} ADD CONSTRAINT "{name}" {definition.replace(" NOT VALID", "")}')
    for _, definition in found["triggers"]:
        cursor.execute(definition)
    cursor.execute(f"ANALYZE {table}")


def table_partition(cursor, table: str, *, now: dt.datetime | None = None, ahead: int | None = None) -> None:
    """Turn ``table`` into a table partitioned by month on its partition column: a default partition, one
    for each month that has rows and for ``now``'s month to ``ahead`` months after, its rows copied over.

    Only months with rows get a partition of their own: one back-dated row must not make a partition for
    every month since (a row written later for a month between lands in the default partition)."""
    spec = table_spec(table)
    if is_partitioned(table, cursor=cursor):
        return
    with_rows = _fetch(
        cursor,
        f"SELECT DISTINCT month FROM (SELECT {spec.month_sql} AS month FROM {table}) AS months "
        "WHERE month IS NOT NULL ORDER BY 1",
    )
    current = month_start(now or timezone.now())
    months = {month.replace(tzinfo=dt.UTC) for (month,) in with_rows}
    months.update(
        month_add(current, offset) for offset in range((DEFAULT_AHEAD_MONTHS if ahead is None else ahead) + 1)
    )
    partitions = [f"CREATE TABLE {default_partition_name(table)} PARTITION OF {table} DEFAULT"]
    partitions += [
        f"CREATE TABLE {partition_name(table, month)} PARTITION OF {table} {_bounds(spec, month)}"
        for month in sorted(months)
    ]
    sequence = (
        [
            f"CREATE SEQUENCE {table}_id_seq AS bigint OWNED BY {table}.id",
            f"ALTER TABLE {table} ALTER COLUMN id SET DEFAULT nextval('{table}_id_seq'::regclass)",
        ]
        if spec.id_sequence
        else []
    )
    _rebuild(
        cursor,
        table,
        create=f"CREATE TABLE {table} (LIKE {{old}} INCLUDING DEFAULTS INCLUDING CONSTRAINTS "
        f"INCLUDING STORAGE INCLUDING COMMENTS) PARTITION BY RANGE ({spec.column})",
        after_create=[*sequence, *partitions],
        key=spec.primary_key,
    )


def table_unpartition(cursor, table: str) -> None:
    """Undo ``table_partition``: one plain table again, with an identity ``id`` as Django makes it where
    the ids came from a sequence."""
    spec = table_spec(table)
    if not is_partitioned(table, cursor=cursor):
        return
    # A sequence's id default is not copied: the sequence goes with the old table, an identity replaces it.
    _rebuild(
        cursor,
        table,
        create=f"CREATE TABLE {table} (LIKE {{old}} {'' if spec.id_sequence else 'INCLUDING DEFAULTS '}"
        "INCLUDING CONSTRAINTS INCLUDING STORAGE INCLUDING COMMENTS)",
        after_create=(
            [f"ALTER TABLE {table} ALTER COLUMN id ADD GENERATED BY DEFAULT AS IDENTITY"]
            if spec.id_sequence
            else []
        ),
        key="id",
    )
    # The partitions went with the old parent (DROP TABLE drops them); any detached month stays.


# --- partitions ahead ---------------------------------------------------------------------------------


def partition_create(*, table: str, month: dt.datetime) -> int | None:
    """Create ``table``'s partition of ``month`` unless it exists; return how many rows it took over from
    the default partition, or None if it was there already.

    The partition is made apart and then attached, with the default partition's rows of that month moved
    into it in the same transaction: attaching takes only a SHARE UPDATE EXCLUSIVE lock on the parent
    (inserts go on), where ``CREATE TABLE ... PARTITION OF`` would lock every writer out, and it would fail
    outright on a default partition that holds rows of the month.
    """
    spec = table_spec(table)
    month = month_start(month)
    name = partition_name(table, month)
    default = default_partition_name(table)
    with transaction.atomic(), connection.cursor() as cursor:
        if name in attached_partitions(table, cursor=cursor):
            return None
        cursor.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        cursor.execute(f"LOCK TABLE {table} IN SHARE UPDATE EXCLUSIVE MODE")
        # No insert may land in the default partition between the move and the attach.
        cursor.execute(f"LOCK TABLE {default} IN ACCESS EXCLUSIVE MODE")
        if name in attached_partitions(table, cursor=cursor):
            return None
        cursor.execute(
            f"CREATE TABLE {name} (LIKE {table} INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING STORAGE)"
        )
        within = f"{spec.column} >= {spec.bound(month)} AND {spec.column} < {spec.bound(month_add(month, 1))}"
        # The partition's bound as a constraint, so that attaching it need not scan it to check.
        cursor.execute(
            f"ALTER TABLE {name} ADD CONSTRAINT {name}_bound CHECK ({spec.column} IS NOT NULL AND {within})"
        )
        columns = _definitions(cursor, table)["columns"]
        # Straight from the default partition: the parent's append-only trigger (a statement trigger)
        # does not fire for a statement on a partition.
        cursor.execute(
            f"WITH moved AS (DELETE FROM {default} WHERE {within} "
            f"RETURNING {columns}) INSERT INTO {name} ({columns}) SELECT {columns} FROM moved"
        )
        moved = cursor.rowcount
        cursor.execute(f"ALTER TABLE {table} ATTACH PARTITION {name} {_bounds(spec, month)}")
        cursor.execute(f"ALTER TABLE {name} DROP CONSTRAINT {name}_bound")
    if moved:
        logger.info("partition %s created, %s rows moved from %s", name, moved, default)
    return moved


def partitions_ahead(*, now: dt.datetime | None = None, ahead: int | None = None) -> list[str]:
    """Create every partitioned table's partitions from ``now``'s month to ``ahead`` months after; return
    the names of those created."""
    ahead = settings.GRID_PARTITIONS_AHEAD_MONTHS if ahead is None else ahead
    current = month_start(now or timezone.now())
    created = []
    for spec in PARTITIONED_TABLES:
        if not is_partitioned(spec.table):
            continue  # its migration has not run yet
        for offset in range(ahead + 1):
            month = month_add(current, offset)
            if partition_create(table=spec.table, month=month) is not None:
                created.append(partition_name(spec.table, month))
    return created


# --- retention ----------------------------------------------------------------------------------------


def retention_months(key: str) -> int | None:
    return settings.GRID_RETENTION.get(key)


def retention_cutoff(*, months: int, now: dt.datetime | None = None) -> dt.datetime:
    """The start of the oldest month kept: the current month and the ``months`` before it are kept."""
    return month_add(month_start(now or timezone.now()), -months)


def partition_dump(
    *, name: str, directory: str | os.PathLike, query: str | None = None, params: list | None = None
) -> Path:
    """Write table ``name`` (or what ``query`` selects) to ``directory``/``name``.csv.gz (CSV with a header
    line), through a temporary file renamed into place, so a file of that name is always whole."""
    target_dir = Path(directory)
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / f"{name}.csv.gz"
    partial = target_dir / f".{name}.csv.gz.partial"
    connection.ensure_connection()
    # psycopg's COPY streams the table without holding it in memory.
    with (
        connection.connection.cursor() as cursor,
        gzip.open(partial, "wb", compresslevel=GZIP_LEVEL) as out,
        cursor.copy(
            f"COPY {f'({query})' if query else name} TO STDOUT WITH (FORMAT csv, HEADER)", params
        ) as copy,
    ):
        for data in copy:
            out.write(data)
    os.replace(partial, target)
    return target


def default_partition_expire(*, table: str, cutoff: dt.datetime, dump_dir: str | None = None) -> int:
    """Delete the rows of ``table``'s default partition created before ``cutoff`` (rows written for a month
    that had no partition, or whose partition retention already dropped, or allocations whose ids are no
    version 7 UUIDs) but those retention must keep, dumped first to
    ``dump_dir``/``<default partition>_before_YYYYMM.csv.gz`` when given; return how many. One transaction:
    a failed dump deletes nothing."""
    spec = table_spec(table)
    default = default_partition_name(table)
    # By the time of making, which every partitioned table has, whatever its partition column.
    expired = "created_at < %s" + (f" AND NOT ({spec.keep_sql})" if spec.keep_sql else "")
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(f"SELECT EXISTS (SELECT 1 FROM {default} WHERE {expired})", [cutoff])
        if not cursor.fetchone()[0]:
            return 0
        if dump_dir:
            partition_dump(
                name=f"{default}_before_{cutoff:%Y%m}",
                directory=dump_dir,
                query=f"SELECT * FROM {default} WHERE {expired} ORDER BY created_at, id",
                params=[cutoff],
            )
        # Straight on the partition: the parent's append-only trigger refuses deletes through the parent.
        cursor.execute(f"DELETE FROM {default} WHERE {expired}", [cutoff])
        deleted = cursor.rowcount
    logger.info("%s rows of %s before %s deleted", deleted, default, cutoff)
    return deleted


def partitions_expire(
    *, table: str, months: int, now: dt.datetime | None = None, dump_dir: str | None = None
) -> list[str]:
    """Detach, dump (to ``dump_dir`` if given) and drop ``table``'s partitions of months before the
    retention cutoff; return their names. The default partition stays, less its rows before the cutoff."""
    return _partitions_expire(table=table, months=months, now=now, dump_dir=dump_dir)[0]


class _Kept(Exception):
    """A detached partition holds rows retention must keep: its detaching is rolled back."""


def _partitions_expire(
    *, table: str, months: int, now: dt.datetime | None = None, dump_dir: str | None = None
) -> tuple[list[str], list[str]]:
    """``partitions_expire``'s work; returns the partitions dropped, and those past the cutoff kept for
    rows retention must keep (open holds), which the next run tries again."""
    spec = table_spec(table)
    cutoff = retention_cutoff(months=months, now=now)
    expired = [
        name
        for name in attached_partitions(table)
        if (month := _month_of(table, name)) is not None and month_add(month, 1) <= cutoff
    ]
    kept = []
    for name in expired:
        # Its own short transaction: detaching locks the parent against writers until commit, and the dump
        # may take long.
        try:
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
                cursor.execute(f"ALTER TABLE {table} DETACH PARTITION {name}")
                # Looked at once detached, under the lock detaching takes: no row can change meanwhile.
                if spec.keep_sql:
                    cursor.execute(f"SELECT EXISTS (SELECT 1 FROM {name} WHERE {spec.keep_sql})")
                    if cursor.fetchone()[0]:
                        raise _Kept(name)
        except _Kept:
            logger.warning("partition %s kept past retention: it holds rows where %s", name, spec.keep_sql)
            kept.append(name)
    with connection.cursor() as cursor:
        leftovers = _detached_partitions(cursor, table)
    dropped = []
    for name in leftovers:
        month = _month_of(table, name)
        if month_add(month, 1) > cutoff:
            continue
        if dump_dir:
            path = partition_dump(name=name, directory=dump_dir)
            logger.info("partition %s dumped to %s", name, path)
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(f"DROP TABLE {name}")
        logger.info("partition %s dropped (retention %s months)", name, months)
        dropped.append(name)
    default_partition_expire(table=table, cutoff=cutoff, dump_dir=dump_dir)
    return dropped, kept


def alerts_expire(*, months: int, now: dt.datetime | None = None, chunk: int = DELETE_CHUNK) -> int:
    """Delete alerts (and their deliveries) created, and last sent out, before the retention cutoff,
    ``chunk`` at a time; return how many alerts."""
    cutoff = retention_cutoff(months=months, now=now)
    sql = (
        "WITH chunk AS (SELECT id FROM optimization_alert WHERE created_at < %s "
        "AND (notified_at IS NULL OR notified_at < %s) ORDER BY created_at LIMIT %s FOR UPDATE SKIP LOCKED), "
        "deliveries AS (DELETE FROM optimization_alertdelivery d USING chunk WHERE d.alert_id = chunk.id) "
        "DELETE FROM optimization_alert a USING chunk WHERE a.id = chunk.id"
    )
    return _delete_in_chunks(sql, [cutoff, cutoff, chunk], chunk)


def _delete_in_chunks(sql: str, params: list, chunk: int) -> int:
    total = 0
    while True:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(sql, params)
            deleted = cursor.rowcount
        total += deleted
        if deleted < chunk:
            return total


def partitions_maintain(*, now: dt.datetime | None = None) -> dict:
    """The periodic task's work: partitions ahead, then retention of every table that has one. Its result
    names the partitions created and dropped, those past retention kept for open holds, and how many rows
    of each unpartitioned table were deleted."""
    now = now or timezone.now()
    dump_dir = settings.GRID_RETENTION_DUMP_DIR or None
    result: dict = {"created": partitions_ahead(now=now), "dropped": [], "kept": [], "deleted": {}}
    for spec in PARTITIONED_TABLES:
        months = retention_months(spec.key)
        if months is not None and is_partitioned(spec.table):
            dropped, kept = _partitions_expire(table=spec.table, months=months, now=now, dump_dir=dump_dir)
            result["dropped"] += dropped
            result["kept"] += kept
    expire = {"alerts": alerts_expire}
    for key in CHUNKED_TABLES:
        months = retention_months(key)
        if months is not None:
            result["deleted"][key] = expire[key](months=months, now=now)
    return result

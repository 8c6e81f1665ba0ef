"""Set-based writes of many rows in one statement: ``bulk_update_columns`` (some columns, each row its
own values) and ``bulk_insert`` (many rows from column arrays).

Each is one statement over ``unnest`` of array parameters: a fixed number of parameters whatever the
number of rows, and no model instances. A ``CASE`` with one arm per row, the ORM's way (``bulk_update``),
grows a statement of N arms that PostgreSQL plans, and may JIT-compile, in time that grows with N.
"""

from __future__ import annotations

import datetime as dt
from contextlib import contextmanager

import psycopg
from django.db import connection, models


def bulk_update_column(
    *,
    model: type[models.Model],
    field: str,
    values: dict,
    add: bool = False,
    touch: dt.datetime | None = None,
) -> int:
    """Set ``field`` (or add to it, with ``add``) to ``values[pk]`` for every pk in ``values``.

    ``touch`` also sets ``updated_at``. Returns the number of rows updated.
    """
    return bulk_update_columns(
        model=model, pks=list(values), columns={field: list(values.values())}, add=add, touch=touch
    )


def bulk_update_columns(
    *,
    model: type[models.Model],
    pks: list,
    columns: dict[str, list],
    add: bool = False,
    touch: dt.datetime | None = None,
    tids: list[str] | None = None,
) -> int:
    """For each position i, set every field in ``columns`` of the row ``pks[i]`` to its ``values[i]`` (or add
    it, with ``add``). ``touch`` also sets ``updated_at``. Returns the number of rows updated.

    One ``UPDATE ... FROM unnest(pks, values...)``, one array parameter per column. ``tids``: the rows'
    tuple ids (``ctid``, as text), for rows this transaction has locked, whose ctid cannot change until it
    ends: each row is then read from its page directly, not found again through the primary key's index
    (the key is still checked).
    """
    if not pks:
        return 0
    meta = model._meta
    fields = {name: meta.get_field(name) for name in columns}
    quote = connection.ops.quote_name
    pk_type = meta.pk.db_type(connection)
    assignments = [
        f"{quote(field.column)} = " + (f"t.{quote(field.column)} + v.c{i}" if add else f"v.c{i}")
        for i, field in enumerate(fields.values())
    ]
    params: list = []
    if touch is not None:
        assignments.append("updated_at = %s")
        params.append(touch)
    arrays = [f"%b::{pk_type}[]"] + [f"%b::{field.db_type(connection)}[]" for field in fields.values()]
    params += [list(pks), *(list(values) for values in columns.values())]
    aliases = ["pk", *(f"c{i}" for i in range(len(fields)))]
    where = f"t.{quote(meta.pk.column)} = v.pk"
    if tids is not None:
        arrays.append("%b::text[]::tid[]")
        params.append(list(tids))
        aliases.append("tid")
        where = f"t.ctid = v.tid AND {where}"
    sql = (
        f"UPDATE {quote(meta.db_table)} AS t SET {', '.join(assignments)} "
        f"FROM unnest({', '.join(arrays)}) AS v({', '.join(aliases)}) "
        f"WHERE {where}"
    )
    return _execute_with_arrays(sql, params)


# Fields whose Python values psycopg adapts as they are; any other field's values go through the field's
# own preparation (a JSONField's dict, for one, must be wrapped for jsonb).
_PLAIN_FIELDS = (
    models.CharField,
    models.TextField,
    models.IntegerField,
    models.BigIntegerField,
    models.DecimalField,
    models.DateTimeField,
    models.BooleanField,
    models.ForeignKey,
)


def bulk_insert(
    *,
    model: type[models.Model],
    columns: dict[str, list],
    constants: dict | None = None,
    ignore_conflicts: bool = False,
) -> int:
    """Insert one row per position of the lists in ``columns`` (field name -> that column's values); every
    field in ``constants`` takes the same value in every row. Returns the number of rows inserted.

    One ``INSERT ... SELECT FROM unnest(arrays)``: one array parameter per column whatever the number of
    rows, and no model instances. Defaults and ``save()`` are not applied: pass every column that has no
    database default.
    """
    constants = constants or {}
    lengths = {len(values) for values in columns.values()}
    if len(lengths) > 1:
        raise ValueError(f"bulk_insert: columns of different lengths {sorted(lengths)}")
    rows = lengths.pop() if lengths else 0
    if rows == 0:
        return 0
    meta = model._meta
    quote = connection.ops.quote_name
    targets, selects, arrays, params = [], [], [], []
    for name, value in constants.items():
        field = meta.get_field(name)
        targets.append(quote(field.column))
        selects.append(f"%s::{field.db_type(connection)}")
        params.append(field.get_db_prep_save(value, connection))
    for index, (name, values) in enumerate(columns.items()):
        field = meta.get_field(name)
        targets.append(quote(field.column))
        selects.append(f"v.c{index}")
        arrays.append(f"%b::{field.db_type(connection)}[]")
        if not isinstance(field, _PLAIN_FIELDS):
            values = [field.get_db_prep_save(value, connection) for value in values]
        params.append(list(values))
    aliases = ", ".join(f"c{index}" for index in range(len(columns)))
    sql = (
        f"INSERT INTO {quote(meta.db_table)} ({', '.join(targets)}) "
        f"SELECT {', '.join(selects)} FROM unnest({', '.join(arrays)}) AS v({aliases})"
    )
    if ignore_conflicts:
        sql += " ON CONFLICT DO NOTHING"
    return _execute_with_arrays(sql, params)


def plan_by_key() -> None:
    """For the rest of the current transaction, have PostgreSQL reach rows through their keys: no
    sequential scans, hash joins or merge joins while anything else can do.

    For a batch whose statements each find a few thousand rows by key (``id = ANY(...)``, a join over
    ``unnest``). On a table of a few times that many rows the planner judges a scan of the whole table
    cheaper; each batch then reads all of it, so a sweep of many batches grows with the square of the
    table, and the scans push the rows the batch needs out of the buffer cache. It also keeps a batch read
    ``ORDER BY`` an index ``LIMIT n`` on the index's order when the statistics count too few matching rows
    (an ANALYZE from before they came), rather than sorting every one of them for each batch. ``SET
    LOCAL``: it ends with the transaction, and only discourages (a statement with no other plan still
    runs)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT set_config('enable_seqscan', 'off', true), set_config('enable_hashjoin', 'off', true), "
            "set_config('enable_mergejoin', 'off', true)"
        )


def _execute_with_arrays(sql: str, params: list) -> int:
    with server_bound_cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.rowcount


@contextmanager
def server_bound_cursor():
    """A cursor that binds parameters on the server, for statements over large arrays: mark them ``%b`` (or
    ``%(name)b``) and they travel in binary. Django's own cursors bind on the client: they would write every
    array out as a literal, escaping each element with a regular expression, which cost more than the
    statement itself at 16,000 rows. A statement run through it a few times is also prepared by psycopg
    (``prepare_threshold`` in the database OPTIONS): the allocation's call uses it for that. Queries are
    logged and errors translated as through ``connection.cursor()``."""
    connection.ensure_connection()
    connection.validate_thread_sharing()
    raw = psycopg.Cursor(connection.connection)  # psycopg's own cursor binds on the server
    cursor = connection.make_debug_cursor(raw) if connection.queries_logged else connection.make_cursor(raw)
    with cursor:
        yield cursor

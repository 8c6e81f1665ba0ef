"""Set-based updates of one integer column over many rows, each row getting its own value.

On PostgreSQL this is one ``UPDATE ... FROM unnest(ids, values)``: two array parameters whatever the number
of rows. A ``CASE`` with one arm per row (the portable way, used on SQLite) grows a statement of N arms that
PostgreSQL plans, and may JIT-compile, in time that grows with N.
"""

from __future__ import annotations

import datetime as dt

from django.db import connection, models
from django.db.models import Case, F, Value, When


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
    if not values:
        return 0
    meta = model._meta
    column = meta.get_field(field).column
    if connection.vendor == "postgresql":
        pk_type = "text" if isinstance(meta.pk, models.CharField) else "bigint"
        table = connection.ops.quote_name(meta.db_table)
        quoted = connection.ops.quote_name(column)
        expression = f"t.{quoted} + v.value" if add else "v.value"
        touch_sql = ", updated_at = %s" if touch is not None else ""
        params: list = [*([touch] if touch is not None else []), list(values), list(values.values())]
        sql = (
            f"UPDATE {table} AS t SET {quoted} = {expression}{touch_sql} "
            f"FROM unnest(%s::{pk_type}[], %s::bigint[]) AS v(pk, value) "
            f"WHERE t.{connection.ops.quote_name(meta.pk.column)} = v.pk"
        )
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.rowcount
    output = meta.get_field(field)
    case = Case(*[When(pk=pk, then=Value(value)) for pk, value in values.items()], output_field=output)
    changes = {field: F(field) + case if add else case}
    if touch is not None:
        changes["updated_at"] = touch
    return model.objects.filter(pk__in=list(values)).update(**changes)

"""Schema that Django's models cannot declare, added by the migrations.

The append-only rows that name a quota carry one composite foreign key: an allocation's and a grant's
``(quota_id, agent_id, resource_type_id)`` reference ``quotas (id, agent_id, resource_type_id)``, and a
usage row's ``(quota_id, agent_id, resource_type_id, period_start)`` references the same columns of
``quotas``. A row then names a quota that exists, and that quota's own agent, resource type and (for usage)
period, which the quota's foreign keys check in turn. It replaces three single-column keys: PostgreSQL
checks a foreign key row by row, so three keys were three lookups per usage row and three per allocation,
six per allocation in all, and about a third of the server's time on a 1,000-item batch.

Django has no composite foreign keys, so the single-column relations stay in the models (for joins and
``on_delete``) with ``db_constraint=False``, and the composite key is added here. The key is added
``NOT VALID`` and validated after, so that a large existing table is checked without blocking its writers.
"""

from __future__ import annotations

from django.db import migrations


def _name(table: str) -> str:
    return f"{table}_quota_identity_fk"


def quota_identity_fk(table: str, *, with_period: bool = False) -> migrations.RunSQL:
    """A migration operation adding the composite quota key to ``table`` (and dropping it on reverse);
    ``with_period``: the key also holds the row's ``period_start`` to its quota's."""
    columns = "quota_id, agent_id, resource_type_id" + (", period_start" if with_period else "")
    targets = "id, agent_id, resource_type_id" + (", period_start" if with_period else "")
    name = _name(table).replace("_fk", "_period_fk") if with_period else _name(table)
    return migrations.RunSQL(
        sql=[
            f"ALTER TABLE {table} ADD CONSTRAINT {name} FOREIGN KEY ({columns}) "
            f"REFERENCES quotas ({targets}) DEFERRABLE INITIALLY DEFERRED NOT VALID",
            f"ALTER TABLE {table} VALIDATE CONSTRAINT {name}",
        ],
        reverse_sql=[f"ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {name}"],
        elidable=False,
    )

"""Schema that Django's models cannot declare, added by the migrations.

The append-only rows that name a quota (usage rows, allocations) carry one composite foreign key:
``(quota_id, agent_id, resource_type_id)`` references ``quotas (id, agent_id, resource_type_id)``. A row
then names a quota that exists, and that quota's own agent and resource type, which the quota's foreign keys
check in turn. It replaces three single-column keys: PostgreSQL checks a foreign key row by row at commit,
so three keys were three lookups per usage row and three per allocation, six per allocation in all, and
about a third of the server's time on a 1,000-item batch.

Django has no composite foreign keys, so the single-column relations stay in the models (for joins and
``on_delete``) with ``db_constraint=False``, and the composite key is added here. The key is added
``NOT VALID`` and validated after, so that a large existing table is checked without blocking its writers.
"""

from __future__ import annotations

from django.db import migrations


def _name(table: str) -> str:
    return f"{table}_quota_identity_fk"


def quota_identity_fk(table: str) -> migrations.RunSQL:
    """A migration operation adding the composite quota key to ``table`` (and dropping it on reverse)."""
    return migrations.RunSQL(
        sql=[
            f"ALTER TABLE {table} ADD CONSTRAINT {_name(table)} "
            "FOREIGN KEY (quota_id, agent_id, resource_type_id) "
            "REFERENCES quotas (id, agent_id, resource_type_id) DEFERRABLE INITIALLY DEFERRED NOT VALID",
            f"ALTER TABLE {table} VALIDATE CONSTRAINT {_name(table)}",
        ],
        reverse_sql=[f"ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {_name(table)}"],
        elidable=False,
    )

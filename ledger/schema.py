"""Schema that Django's models cannot declare, added by the migrations.

The append-only rows that name a quota (usage rows, allocations) carry one composite foreign key:
``(quota_id, agent_id, resource_type_id)`` references ``quotas (id, agent_id, resource_type_id)``. A row
then names a quota that exists, and that quota's own agent and resource type, which the quota's foreign keys
check in turn. It replaces three single-column keys: PostgreSQL checks a foreign key row by row at commit,
so three keys were three lookups per usage row and three per allocation, six per allocation in all, and
about a third of the server's time on a 1,000-item batch.

Django has no composite foreign keys, so the single-column relations stay in the models (for joins and
``on_delete``) with ``db_constraint=False``, and the composite key is added here, on PostgreSQL only.
SQLite, the embedded default for trying the service out, goes without it. The key is added ``NOT VALID``
and validated after, so that a large existing table is checked without blocking its writers.
"""

from __future__ import annotations

from django.db import migrations


def _name(table: str) -> str:
    return f"{table}_quota_identity_fk"


def quota_identity_fk(table: str) -> migrations.RunPython:
    """A migration operation adding the composite quota key to ``table`` (and dropping it on reverse)."""

    def add(apps, schema_editor) -> None:
        if schema_editor.connection.vendor != "postgresql":
            return
        schema_editor.execute(
            f"ALTER TABLE {table} ADD CONSTRAINT {_name(table)} "
            "FOREIGN KEY (quota_id, agent_id, resource_type_id) "
            "REFERENCES quotas (id, agent_id, resource_type_id) DEFERRABLE INITIALLY DEFERRED NOT VALID"
        )
        schema_editor.execute(f"ALTER TABLE {table} VALIDATE CONSTRAINT {_name(table)}")

    def drop(apps, schema_editor) -> None:
        if schema_editor.connection.vendor == "postgresql":
            schema_editor.execute(f"ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {_name(table)}")

    return migrations.RunPython(add, drop, elidable=False)

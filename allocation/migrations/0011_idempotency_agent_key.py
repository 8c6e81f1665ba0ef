"""Idempotency records carry the agent whose key space they are in (``agent_id``, null for an operator's),
and an agent's records are unique on ``(agent_id, key)``: the key a table distributed by agent needs
(docs/scaling.md). An operator's stay unique on ``(principal, key)``.

Existing records get their agent from their principal (``agent:<id>``), 10,000 per statement, each in its
own transaction; the records are kept a day, so there are at most a day's worth. ``grid_mutation_record``,
the writer of a single request's record, is defined again to write the new column.
"""

from django.db import migrations, models
from django.db.models import Q

from allocation.sql import FUNCTIONS_SQL

BACKFILL_CHUNK = 10_000


def agent_ids_fill(apps, schema_editor):
    with schema_editor.connection.cursor() as cursor:
        cursor.execute("SELECT coalesce(min(id), 0), coalesce(max(id), -1) FROM allocation_idempotencyrecord")
        low, high = cursor.fetchone()
        for start in range(low, high + 1, BACKFILL_CHUNK):
            cursor.execute(
                "UPDATE allocation_idempotencyrecord SET agent_id = substr(principal, 7) "
                "WHERE id >= %s AND id < %s AND principal LIKE 'agent:%%' AND agent_id IS NULL",
                [start, start + BACKFILL_CHUNK],
            )


class Migration(migrations.Migration):
    atomic = False  # the backfill commits chunk by chunk

    dependencies = [("allocation", "0010_audit_trail_partitioned")]

    operations = [
        migrations.AddField(
            model_name="idempotencyrecord",
            name="agent_id",
            field=models.CharField(blank=True, max_length=64, null=True),
        ),
        migrations.RunPython(agent_ids_fill, migrations.RunPython.noop, elidable=True),
        migrations.AddConstraint(
            model_name="idempotencyrecord",
            constraint=models.UniqueConstraint(
                condition=Q(agent_id__isnull=False), fields=("agent_id", "key"), name="idempotency_agent_key"
            ),
        ),
        migrations.AddConstraint(
            model_name="idempotencyrecord",
            constraint=models.UniqueConstraint(
                condition=Q(agent_id__isnull=True), fields=("principal", "key"), name="idempotency_operator_key"
            ),
        ),
        migrations.RemoveConstraint(model_name="idempotencyrecord", name="idempotency_unique_key"),
        # grid_mutation_record writes the new column.
        migrations.RunSQL(FUNCTIONS_SQL, migrations.RunSQL.noop),
    ]

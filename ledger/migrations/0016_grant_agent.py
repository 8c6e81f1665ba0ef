"""Grants carry their quota's agent and resource type, checked by one composite key to the quota.

``ledger_grant`` gains ``agent_id`` and ``resource_type_id``, filled from the grant's quota, and the key
``(quota_id, agent_id, resource_type_id)`` -> ``quotas (id, agent_id, resource_type_id)`` (the target of
the allocations' and usage rows' keys, ``ledger/schema.py``), which replaces the single-column key on
``quota_id``.

Not atomic, so that a large grants table is never locked for the whole of it: the columns are added
(nullable: no rewrite), the existing rows are filled in chunks by id, each chunk its own transaction, and
then, in one short transaction that holds the table against writers, the rows written meanwhile are filled
and the columns made NOT NULL. The key is added ``NOT VALID`` and validated after, without blocking
writers. Every step can be run again after a failure, and each is reversed.
"""

import django.db.models.deletion
from django.db import migrations, models, transaction

from ledger.schema import quota_identity_fk

# Grants filled per transaction of the backfill.
BACKFILL_CHUNK = 10_000

FILL_SQL = """
UPDATE ledger_grant AS g SET agent_id = q.agent_id, resource_type_id = q.resource_type_id
FROM quotas AS q
WHERE q.id = g.quota_id AND g.agent_id IS NULL AND g.id >= %s AND g.id < %s
"""


def backfill(apps, schema_editor):
    connection = schema_editor.connection
    with connection.cursor() as cursor:
        cursor.execute("SELECT min(id), max(id) FROM ledger_grant WHERE agent_id IS NULL")
        low, high = cursor.fetchone()
    if low is None:
        return
    for start in range(low, high + 1, BACKFILL_CHUNK):
        with transaction.atomic(using=connection.alias), connection.cursor() as cursor:
            cursor.execute(FILL_SQL, [start, start + BACKFILL_CHUNK])


def finish(apps, schema_editor):
    # Writers of grants wait for this one transaction (SHARE ROW EXCLUSIVE lets readers through): the rows
    # they wrote since the backfill are filled, and no new one can miss its agent before NOT NULL.
    connection = schema_editor.connection
    with transaction.atomic(using=connection.alias), connection.cursor() as cursor:
        cursor.execute("LOCK TABLE ledger_grant IN SHARE ROW EXCLUSIVE MODE")
        cursor.execute(FILL_SQL, [0, 2**63 - 1])
        cursor.execute(
            "ALTER TABLE ledger_grant ALTER COLUMN agent_id SET NOT NULL, "
            "ALTER COLUMN resource_type_id SET NOT NULL"
        )


def unfinish(apps, schema_editor):
    with schema_editor.connection.cursor() as cursor:
        cursor.execute(
            "ALTER TABLE ledger_grant ALTER COLUMN agent_id DROP NOT NULL, "
            "ALTER COLUMN resource_type_id DROP NOT NULL"
        )


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("ledger", "0015_usage_logs_partitioned"),
    ]

    operations = [
        migrations.AddField(
            model_name="grant",
            name="agent",
            field=models.ForeignKey(
                db_constraint=False,
                db_index=False,
                null=True,
                on_delete=django.db.models.deletion.PROTECT,
                related_name="grants",
                to="ledger.agent",
            ),
        ),
        migrations.AddField(
            model_name="grant",
            name="resource_type",
            field=models.ForeignKey(
                db_constraint=False,
                db_index=False,
                null=True,
                on_delete=django.db.models.deletion.PROTECT,
                related_name="+",
                to="ledger.resourcetype",
            ),
        ),
        migrations.RunPython(backfill, migrations.RunPython.noop, elidable=False),
        migrations.SeparateDatabaseAndState(
            database_operations=[migrations.RunPython(finish, unfinish, elidable=False)],
            state_operations=[
                migrations.AlterField(
                    model_name="grant",
                    name="agent",
                    field=models.ForeignKey(
                        db_constraint=False,
                        db_index=False,
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="grants",
                        to="ledger.agent",
                    ),
                ),
                migrations.AlterField(
                    model_name="grant",
                    name="resource_type",
                    field=models.ForeignKey(
                        db_constraint=False,
                        db_index=False,
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="+",
                        to="ledger.resourcetype",
                    ),
                ),
            ],
        ),
        quota_identity_fk("ledger_grant"),
        # The composite key checks the quota too: the single-column key goes (its index stays, for reading
        # a quota's grants and for the composite key's checks when a quota is deleted).
        migrations.AlterField(
            model_name="grant",
            name="quota",
            field=models.ForeignKey(
                db_constraint=False,
                on_delete=django.db.models.deletion.PROTECT,
                related_name="grants",
                to="ledger.quota",
            ),
        ),
    ]

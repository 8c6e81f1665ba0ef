"""Executions and scaling events become partitioned by month on ``created_at`` (``ledger/partitions.py``).

Django's state does not change: ``id`` stays the model's primary key. In the database the key is
``(id, created_at)``, as PostgreSQL requires of a partitioned table, and ids come from a sequence owned by
the column. The rows are copied into the new table in this migration's transaction, which holds the
tables locked meanwhile: on a large ledger, plan the downtime (docs/operations.md).
"""

from django.db import migrations

from ledger.partitions import table_partition, table_unpartition

TABLES = ["optimization_execution", "optimization_scalingevent"]


def partition(apps, schema_editor):
    with schema_editor.connection.cursor() as cursor:
        for table in TABLES:
            table_partition(cursor, table)


def unpartition(apps, schema_editor):
    with schema_editor.connection.cursor() as cursor:
        for table in TABLES:
            table_unpartition(cursor, table)


class Migration(migrations.Migration):
    dependencies = [("optimization", "0010_usage_rollups"), ("ledger", "0015_usage_logs_partitioned")]

    operations = [migrations.RunPython(partition, unpartition, elidable=False)]

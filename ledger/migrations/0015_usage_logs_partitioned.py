"""The usage log becomes partitioned by month on ``created_at`` (``ledger/partitions.py``).

Django's state does not change: ``id`` stays the model's primary key. In the database the key is
``(id, created_at)``, as PostgreSQL requires of a partitioned table, and ids come from a sequence owned by
the column. The rows are copied into the new table in this migration's transaction, which holds the usage
log locked meanwhile: on a large ledger, plan the downtime (docs/operations.md).
"""

from django.db import migrations

from ledger.partitions import table_partition, table_unpartition

TABLES = ["usage_logs"]


def partition(apps, schema_editor):
    with schema_editor.connection.cursor() as cursor:
        for table in TABLES:
            table_partition(cursor, table)


def unpartition(apps, schema_editor):
    with schema_editor.connection.cursor() as cursor:
        for table in TABLES:
            table_unpartition(cursor, table)


class Migration(migrations.Migration):
    dependencies = [("ledger", "0014_quota_period_index")]

    operations = [migrations.RunPython(partition, unpartition, elidable=False)]

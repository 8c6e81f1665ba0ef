"""The audit trail becomes partitioned by month on ``created_at`` (``ledger/partitions.py``).

Django's state does not change: ``id`` stays the model's primary key. In the database the key is
``(id, created_at)``, as PostgreSQL requires of a partitioned table, and ids come from a sequence owned by
the column. The rows are copied into the new table in this migration's transaction, which holds the audit
trail locked meanwhile: on a large ledger, plan the downtime (docs/operations.md).
"""

from django.db import migrations

from ledger.partitions import table_partition, table_unpartition

TABLES = ["allocation_auditrecord"]


def partition(apps, schema_editor):
    with schema_editor.connection.cursor() as cursor:
        for table in TABLES:
            table_partition(cursor, table)


def unpartition(apps, schema_editor):
    with schema_editor.connection.cursor() as cursor:
        for table in TABLES:
            table_unpartition(cursor, table)


class Migration(migrations.Migration):
    dependencies = [("allocation", "0009_allocation_lease"), ("ledger", "0015_usage_logs_partitioned")]

    operations = [migrations.RunPython(partition, unpartition, elidable=False)]

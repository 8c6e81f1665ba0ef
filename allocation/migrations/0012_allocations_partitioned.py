"""Allocations become partitioned by month on their primary key, ``id`` (``ledger/partitions.py``).

Their ids are version 7 UUIDs, which begin with the milliseconds of their making, so each month is one range
of ids; ids of another kind (version 4, from before) stay in the default partition. Django's state does not
change, and neither does the database's primary key: ``(id)``, the partition key itself. The indexes, the
check constraints and the composite quota key are made again on the new table. The rows are copied in this
migration's transaction, which holds the allocations locked meanwhile: on a large ledger, plan the downtime
(docs/operations.md).
"""

from django.db import migrations

from ledger.partitions import table_partition, table_unpartition

TABLES = ["allocation_allocation"]


def partition(apps, schema_editor):
    with schema_editor.connection.cursor() as cursor:
        for table in TABLES:
            table_partition(cursor, table)


def unpartition(apps, schema_editor):
    with schema_editor.connection.cursor() as cursor:
        for table in TABLES:
            table_unpartition(cursor, table)


class Migration(migrations.Migration):
    dependencies = [("allocation", "0011_idempotency_agent_key"), ("ledger", "0016_grant_agent")]

    operations = [migrations.RunPython(partition, unpartition, elidable=False)]

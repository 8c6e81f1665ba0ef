"""The allocation statement writes its quota row by id and agent (docs/scaling.md: every lookup by id names
the agent): ``FUNCTIONS_SQL`` is run again."""

from django.db import migrations

from allocation.sql import FUNCTIONS_SQL


class Migration(migrations.Migration):
    dependencies = [("allocation", "0012_allocations_partitioned")]

    operations = [migrations.RunSQL(FUNCTIONS_SQL, migrations.RunSQL.noop)]

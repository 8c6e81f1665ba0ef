"""``grid_allocate`` writes the usage row's period and checks the quota keys before it locks the quota."""

from django.db import migrations

from allocation.sql import FUNCTIONS_SQL


class Migration(migrations.Migration):
    dependencies = [
        ("allocation", "0005_allocation_functions"),
        ("ledger", "0009_usage_period"),
    ]

    operations = [migrations.RunSQL(FUNCTIONS_SQL, migrations.RunSQL.noop)]

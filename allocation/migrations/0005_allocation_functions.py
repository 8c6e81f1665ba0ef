"""The hot path's PostgreSQL functions, ``grid_allocate`` and ``grid_mutation_record`` (allocation/sql.py).

A migration that changes them runs ``FUNCTIONS_SQL`` again; a test compares the database's functions with
the module's text.
"""

from django.db import migrations

from allocation.sql import DROP_FUNCTIONS_SQL, FUNCTIONS_SQL


class Migration(migrations.Migration):
    dependencies = [
        ("allocation", "0004_audit_agent_time_index"),
        ("ledger", "0006_quota_within_limit_counts_listed"),
    ]

    operations = [migrations.RunSQL(FUNCTIONS_SQL, DROP_FUNCTIONS_SQL)]

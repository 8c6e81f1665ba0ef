"""Drop the agents' three ``varchar_pattern_ops`` index twins.

Django gives every indexed ``varchar`` column a second index for ``LIKE 'prefix%'``. No query filters
agents by a prefix (the admin searches with ``icontains``, which such an index cannot serve), and a
fleet-wide update of agents (``scaling_evaluate`` raising the instance count of tens of thousands) is not
a HOT update on full pages, so it writes every index of the table: three of its six were these twins.
"""

from django.db import migrations

TWINS = {
    "ledger_agent_id_7c5baef0_like": "id",
    "ledger_agent_status_8f00d315_like": "status",
    "ledger_agent_tier_id_6b217029_like": "tier_id",
}


class Migration(migrations.Migration):
    dependencies = [("ledger", "0004_no_quota_index_on_append_only_rows")]

    operations = [
        migrations.RunSQL(
            sql=[f'DROP INDEX IF EXISTS "{name}"' for name in TWINS],
            reverse_sql=[
                f'CREATE INDEX IF NOT EXISTS "{name}" ON ledger_agent ("{column}" varchar_pattern_ops)'
                for name, column in TWINS.items()
            ],
            elidable=False,
        )
    ]

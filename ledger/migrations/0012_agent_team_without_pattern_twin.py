"""The agents' team column without its ``varchar_pattern_ops`` twin, like their other columns (0005).

A migration of its own: Django creates the twin among a migration's deferred statements, after its RunSQL.
"""

from django.db import migrations

AGENT_PATTERN_TWINS_DROP_SQL = """
DO $$
DECLARE twin record;
BEGIN
    FOR twin IN SELECT indexname FROM pg_indexes
                WHERE tablename = 'ledger_agent' AND indexdef LIKE '%varchar_pattern_ops%' LOOP
        EXECUTE format('DROP INDEX %I', twin.indexname);
    END LOOP;
END
$$;
"""


class Migration(migrations.Migration):
    dependencies = [("ledger", "0011_budgets")]

    operations = [migrations.RunSQL(AGENT_PATTERN_TWINS_DROP_SQL, migrations.RunSQL.noop, elidable=False)]

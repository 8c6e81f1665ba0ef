"""The usage log is append-only in the database, not by convention: UPDATE and DELETE are refused.

``grid_append_only()`` is the trigger function (allocation's audit trail uses it too). TRUNCATE is left to
operators and tests; retention, when it comes, drops whole partitions.
"""

from django.db import migrations

APPEND_ONLY_FUNCTION = """
CREATE OR REPLACE FUNCTION grid_append_only() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    RAISE EXCEPTION USING
        ERRCODE = 'GRA01',
        MESSAGE = format('%s is append-only: %s is refused', TG_TABLE_NAME, TG_OP),
        HINT = 'Correct a row by appending another one.';
END
$fn$;
"""


def append_only(table: str) -> migrations.RunSQL:
    """Refuse UPDATE and DELETE on ``table`` (one check per statement)."""
    return migrations.RunSQL(
        f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
        "FOR EACH STATEMENT EXECUTE FUNCTION grid_append_only()",
        f"DROP TRIGGER IF EXISTS {table}_append_only ON {table}",
    )


class Migration(migrations.Migration):
    dependencies = [("ledger", "0009_usage_period")]

    operations = [
        migrations.RunSQL(APPEND_ONLY_FUNCTION, "DROP FUNCTION IF EXISTS grid_append_only()"),
        append_only("usage_logs"),
    ]

"""The audit trail is append-only in the database: UPDATE and DELETE are refused (``grid_append_only``)."""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("allocation", "0006_allocation_functions_usage_period"),
        ("ledger", "0010_append_only_usage_log"),
    ]

    operations = [
        migrations.RunSQL(
            "CREATE TRIGGER allocation_auditrecord_append_only BEFORE UPDATE OR DELETE ON allocation_auditrecord "
            "FOR EACH STATEMENT EXECUTE FUNCTION grid_append_only()",
            "DROP TRIGGER IF EXISTS allocation_auditrecord_append_only ON allocation_auditrecord",
        )
    ]

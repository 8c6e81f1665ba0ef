"""Every usage row names its quota period (``period_start``), held to its quota's by the composite key."""

from django.db import migrations, models

from ledger.schema import quota_identity_fk


class Migration(migrations.Migration):
    dependencies = [("ledger", "0008_periodic_run")]

    operations = [
        migrations.AddField(model_name="usagelog", name="period_start", field=models.DateTimeField(null=True)),
        migrations.RunSQL(
            "UPDATE usage_logs u SET period_start = q.period_start FROM quotas q WHERE q.id = u.quota_id",
            migrations.RunSQL.noop,
        ),
        migrations.AlterField(model_name="usagelog", name="period_start", field=models.DateTimeField()),
        migrations.AddConstraint(
            model_name="quota",
            constraint=models.UniqueConstraint(
                fields=("id", "agent", "resource_type", "period_start"), name="quota_identity_period"
            ),
        ),
        migrations.RunSQL(
            "ALTER TABLE usage_logs DROP CONSTRAINT IF EXISTS usage_logs_quota_identity_fk",
            "ALTER TABLE usage_logs ADD CONSTRAINT usage_logs_quota_identity_fk "
            "FOREIGN KEY (quota_id, agent_id, resource_type_id) REFERENCES quotas (id, agent_id, resource_type_id) "
            "DEFERRABLE INITIALLY DEFERRED",
        ),
        quota_identity_fk("usage_logs", with_period=True),
    ]

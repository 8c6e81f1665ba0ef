"""Executions: ``duration_ms`` and ``success`` become optional.

``optimization_execution`` is partitioned by month (0011): ``ALTER COLUMN ... DROP NOT NULL`` on the parent
reaches every partition, and only changes the catalog (no rewrite, no scan), so it is quick on a large table.
Partitions created later take the parent's columns as they are. Reversing it fails while any execution has
no duration or no outcome: there is no true value to give them.
"""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("optimization", "0011_executions_scaling_events_partitioned"),
    ]

    operations = [
        migrations.AlterField(
            model_name="execution",
            name="duration_ms",
            field=models.PositiveIntegerField(blank=True, null=True),
        ),
        migrations.AlterField(
            model_name="execution",
            name="success",
            field=models.BooleanField(blank=True, help_text="Empty: the outcome was not reported.", null=True),
        ),
    ]

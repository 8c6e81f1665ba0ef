from django.db import migrations


class Migration(migrations.Migration):
    # Reserved for executions: duration and success optional (the metrics work).
    dependencies = [
        ("optimization", "0011_executions_scaling_events_partitioned"),
    ]

    operations = []

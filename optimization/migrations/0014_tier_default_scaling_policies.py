from django.db import migrations


class Migration(migrations.Migration):
    # Reserved for scaling: the tiers' default policies.
    dependencies = [
        ("optimization", "0013_experiment_strategy"),
    ]

    operations = []

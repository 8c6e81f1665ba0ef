from django.db import migrations


class Migration(migrations.Migration):
    # Reserved for experiments: what an arm applies, how an experiment ends.
    dependencies = [
        ("optimization", "0012_execution_optional_outcome"),
    ]

    operations = []

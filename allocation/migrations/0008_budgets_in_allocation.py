"""Allocations name their run and the budgets they charged; grid_allocate charges budgets."""

import django.contrib.postgres.fields
import django.db.models.expressions
from django.db import migrations, models

from allocation.sql import FUNCTIONS_SQL, PREVIOUS_ALLOCATE_DROP_SQL


class Migration(migrations.Migration):
    dependencies = [
        ("allocation", "0007_append_only_audit_trail"),
        ("ledger", "0011_budgets"),
    ]

    operations = [
        migrations.AddField(
            model_name="allocation",
            name="budget_ids",
            field=django.contrib.postgres.fields.ArrayField(
                base_field=models.BigIntegerField(),
                blank=True,
                db_default=django.db.models.expressions.RawSQL("'{}'::bigint[]", []),
                default=list,
                help_text="The budgets charged (a hold: reserved on, settled or released from).",
                size=None,
            ),
        ),
        migrations.AddField(
            model_name="allocation",
            name="run_id",
            field=models.CharField(
                blank=True,
                db_default="",
                default="",
                help_text="The run the call named, if any.",
                max_length=200,
            ),
        ),
        # grid_allocate charges budgets: its new signature is a new function, so the old one is dropped.
        migrations.RunSQL(PREVIOUS_ALLOCATE_DROP_SQL + FUNCTIONS_SQL, migrations.RunSQL.noop),
    ]

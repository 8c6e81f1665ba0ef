import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    # Experiments: what an arm applies (an arm's own scaling policy, owned by no agent or tier; its deal
    # buying), and how an experiment ended (the arm applied to its agents).
    dependencies = [
        ("ledger", "0017_counter_tables_fillfactor"),
        ("optimization", "0012_execution_optional_outcome"),
    ]

    operations = [
        migrations.RemoveConstraint(
            model_name="scalingpolicy",
            name="scaling_policy_agent_or_tier",
        ),
        migrations.AddConstraint(
            model_name="scalingpolicy",
            constraint=models.CheckConstraint(
                condition=models.Q(("agent__isnull", True), ("tier__isnull", True), _connector="OR"),
                name="scaling_policy_one_owner_at_most",
            ),
        ),
        migrations.AddField(
            model_name="experiment",
            name="applied_arm",
            field=models.ForeignKey(
                blank=True,
                help_text="The arm whose strategy was given to every assigned agent when the experiment was "
                "stopped.",
                null=True,
                on_delete=django.db.models.deletion.SET_NULL,
                related_name="+",
                to="optimization.experimentarm",
            ),
        ),
        migrations.AddField(
            model_name="experimentarm",
            name="buy_deals",
            field=models.BooleanField(default=True, help_text="Whether the optimizer may buy deals for them."),
        ),
        migrations.AddField(
            model_name="experimentarm",
            name="deal_max_unit_price_usd",
            field=models.DecimalField(
                blank=True,
                decimal_places=12,
                help_text="The most a unit of a deal bought for them may cost.",
                max_digits=24,
                null=True,
            ),
        ),
    ]

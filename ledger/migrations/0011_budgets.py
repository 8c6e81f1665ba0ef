"""Organizations, teams and budgets; an agent's monthly budget becomes a managed hard budget."""

import django.core.validators
import django.db.models.deletion
import ledger.models
from decimal import Decimal
from django.db import migrations, models

from ledger.budgets import MANAGED_BUDGET_TRIGGER_DROP_SQL, MANAGED_BUDGET_TRIGGER_SQL
from ledger.periods import WINDOW_BOUNDS_SQL

# Agents that had a monthly budget get it as a managed hard agent/month budget, with this month's spend.
MANAGED_BUDGETS_BACKFILL_SQL = """
INSERT INTO ledger_budget
    (scope, agent_id, run_id, budget_window, limit_usd, mode, rollover_percent, thresholds, managed,
     window_start, window_end, spent_usd, reserved_usd, rollover_usd, created_at, updated_at)
SELECT 'agent', a.id, '', 'month', a.monthly_budget_usd, 'hard', 0, '[50, 80, 90, 100]', true,
       w.window_start, w.window_end,
       (SELECT coalesce(sum(q.spent_usd), 0) FROM quotas q
        WHERE q.agent_id = a.id AND q.period_start = w.window_start),
       0, 0, now(), now()
FROM ledger_agent a, grid_budget_window('month', now()) w
WHERE a.monthly_budget_usd IS NOT NULL;
"""


class Migration(migrations.Migration):
    dependencies = [
        ("ledger", "0010_append_only_usage_log"),
    ]

    operations = [
        migrations.CreateModel(
            name="Organization",
            fields=[
                (
                    "id",
                    models.CharField(
                        max_length=64,
                        primary_key=True,
                        serialize=False,
                        validators=[
                            django.core.validators.RegexValidator(
                                "^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}\\Z",
                                "An agent id is 1-64 letters, digits, '-', '_', '.' or ':', starting with a letter or digit.",
                            )
                        ],
                    ),
                ),
                ("name", models.CharField(blank=True, max_length=200)),
                ("created_at", models.DateTimeField(auto_now_add=True)),
            ],
            options={
                "ordering": ["id"],
            },
        ),
        migrations.AlterField(
            model_name="agent",
            name="monthly_budget_usd",
            field=models.DecimalField(
                blank=True,
                decimal_places=2,
                help_text="A hard agent/month budget (kept as one, by a database trigger: ledger/budgets.py).",
                max_digits=20,
                null=True,
                validators=[django.core.validators.MinValueValidator(Decimal("0"))],
            ),
        ),
        migrations.CreateModel(
            name="Team",
            fields=[
                (
                    "id",
                    models.CharField(
                        max_length=64,
                        primary_key=True,
                        serialize=False,
                        validators=[
                            django.core.validators.RegexValidator(
                                "^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}\\Z",
                                "An agent id is 1-64 letters, digits, '-', '_', '.' or ':', starting with a letter or digit.",
                            )
                        ],
                    ),
                ),
                ("name", models.CharField(blank=True, max_length=200)),
                ("created_at", models.DateTimeField(auto_now_add=True)),
                (
                    "organization",
                    models.ForeignKey(
                        blank=True,
                        null=True,
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="teams",
                        to="ledger.organization",
                    ),
                ),
            ],
            options={
                "ordering": ["id"],
            },
        ),
        migrations.AddField(
            model_name="agent",
            name="team",
            field=models.ForeignKey(
                blank=True,
                null=True,
                on_delete=django.db.models.deletion.PROTECT,
                related_name="agents",
                to="ledger.team",
            ),
        ),
        migrations.CreateModel(
            name="Budget",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                (
                    "scope",
                    models.CharField(
                        choices=[
                            ("organization", "Organization"),
                            ("team", "Team"),
                            ("agent", "Agent"),
                            ("run", "Run"),
                        ],
                        max_length=16,
                    ),
                ),
                ("run_id", models.CharField(blank=True, max_length=200)),
                (
                    "window",
                    models.CharField(
                        choices=[
                            ("day", "Day"),
                            ("week", "Week (from Monday 00:00 UTC)"),
                            ("month", "Calendar month"),
                            ("total", "Total (a run's life)"),
                        ],
                        db_column="budget_window",
                        max_length=8,
                    ),
                ),
                (
                    "limit_usd",
                    models.DecimalField(
                        decimal_places=6,
                        max_digits=20,
                        validators=[django.core.validators.MinValueValidator(Decimal("0"))],
                    ),
                ),
                (
                    "mode",
                    models.CharField(
                        choices=[("hard", "Hard: refuse"), ("soft", "Soft: alert only")],
                        default="hard",
                        max_length=8,
                    ),
                ),
                ("rollover_percent", models.PositiveSmallIntegerField(default=0)),
                (
                    "thresholds",
                    models.JSONField(
                        blank=True,
                        default=ledger.models.budget_thresholds_default,
                        help_text="Alert percentages, e.g. [50, 80, 100]",
                    ),
                ),
                (
                    "managed",
                    models.BooleanField(
                        default=False, help_text="The agent's monthly_budget_usd: change it there, not here."
                    ),
                ),
                ("window_start", models.DateTimeField()),
                (
                    "window_end",
                    models.DateTimeField(blank=True, help_text="Empty for a total window.", null=True),
                ),
                ("spent_usd", models.DecimalField(decimal_places=12, default=Decimal("0"), max_digits=28)),
                ("reserved_usd", models.DecimalField(decimal_places=12, default=Decimal("0"), max_digits=28)),
                ("rollover_usd", models.DecimalField(decimal_places=12, default=Decimal("0"), max_digits=28)),
                (
                    "expires_at",
                    models.DateTimeField(
                        blank=True, help_text="A run's end: no call may name it after.", null=True
                    ),
                ),
                (
                    "refused_at",
                    models.DateTimeField(
                        blank=True,
                        help_text="When it first refused a call since it last had room.",
                        null=True,
                    ),
                ),
                ("created_at", models.DateTimeField(auto_now_add=True)),
                ("updated_at", models.DateTimeField(auto_now=True)),
                (
                    "agent",
                    models.ForeignKey(
                        blank=True,
                        null=True,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="budgets",
                        to="ledger.agent",
                    ),
                ),
                (
                    "organization",
                    models.ForeignKey(
                        blank=True,
                        null=True,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="budgets",
                        to="ledger.organization",
                    ),
                ),
                (
                    "team",
                    models.ForeignKey(
                        blank=True,
                        null=True,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="budgets",
                        to="ledger.team",
                    ),
                ),
            ],
            options={
                "ordering": ["id"],
                "constraints": [
                    models.CheckConstraint(
                        condition=models.Q(
                            models.Q(
                                ("agent__isnull", True),
                                ("organization__isnull", False),
                                ("scope", "organization"),
                                ("team__isnull", True),
                            ),
                            models.Q(
                                ("agent__isnull", True),
                                ("organization__isnull", True),
                                ("scope", "team"),
                                ("team__isnull", False),
                            ),
                            models.Q(
                                ("agent__isnull", False),
                                ("organization__isnull", True),
                                ("scope", "agent"),
                                ("team__isnull", True),
                            ),
                            models.Q(
                                ("agent__isnull", False),
                                ("organization__isnull", True),
                                ("scope", "run"),
                                ("team__isnull", True),
                            ),
                            _connector="OR",
                        ),
                        name="budget_scope_target_consistent",
                    ),
                    models.CheckConstraint(
                        condition=models.Q(
                            models.Q(
                                ("scope", "run"), ("window", "total"), models.Q(("run_id", ""), _negated=True)
                            ),
                            models.Q(models.Q(("scope", "run"), _negated=True), ("run_id", "")),
                            _connector="OR",
                        ),
                        name="budget_run_named_total",
                    ),
                    models.CheckConstraint(
                        condition=models.Q(
                            models.Q(("window", "total"), ("window_end__isnull", True)),
                            models.Q(
                                models.Q(("window", "total"), _negated=True),
                                ("window_end__gt", models.F("window_start")),
                            ),
                            _connector="OR",
                        ),
                        name="budget_window_ordered",
                    ),
                    models.CheckConstraint(
                        condition=models.Q(("limit_usd__gte", 0)), name="budget_limit_non_negative"
                    ),
                    models.CheckConstraint(
                        condition=models.Q(("spent_usd__gte", 0)), name="budget_spent_non_negative"
                    ),
                    models.CheckConstraint(
                        condition=models.Q(("reserved_usd__gte", 0)), name="budget_reserved_non_negative"
                    ),
                    models.CheckConstraint(
                        condition=models.Q(("rollover_usd__gte", 0)), name="budget_rollover_non_negative"
                    ),
                    models.CheckConstraint(
                        condition=models.Q(("rollover_percent__gte", 0), ("rollover_percent__lte", 100)),
                        name="budget_rollover_percent",
                    ),
                    models.UniqueConstraint(
                        condition=models.Q(("scope", "run")),
                        fields=("agent", "run_id"),
                        name="budget_unique_run",
                    ),
                    models.UniqueConstraint(
                        condition=models.Q(("managed", True)), fields=("agent",), name="budget_unique_managed"
                    ),
                ],
            },
        ),
        migrations.RunSQL(
            WINDOW_BOUNDS_SQL + MANAGED_BUDGET_TRIGGER_SQL + MANAGED_BUDGETS_BACKFILL_SQL,
            MANAGED_BUDGET_TRIGGER_DROP_SQL,
        ),
    ]

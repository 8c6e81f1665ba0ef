"""Analytics back office: executions (read-only), A/B experiments with their arms, and assignments.

Executions are written by ``execution_record`` with the quota they took, so their pages are view-only.
Experiments and arms are edited here; agents are put into arms only by ``experiment_assign`` (the
"Assign every active agent" action), whose hash keeps the assignment reproducible, so assignments are
view-only too. An experiment's change page shows its report per arm.
"""

from __future__ import annotations

from django.conf import settings
from django.contrib import admin, messages
from django.db.models import Count, QuerySet
from django.http import HttpRequest
from django.utils.html import format_html, format_html_join

from ledger.admin import ViewOnlyAdmin
from ledger.errors import LedgerError
from ledger.models import Agent
from ledger.money import usd_text
from optimization.models import Execution, Experiment, ExperimentArm, ExperimentAssignment
from optimization.services.experiments import experiment_assign, experiment_report


@admin.register(Execution)
class ExecutionAdmin(ViewOnlyAdmin):
    list_display = (
        "created_at",
        "agent",
        "superpower",
        "success",
        "duration_ms",
        "output_units",
        "cost_usd_money",
    )
    money_fields = {"cost_usd": "cost"}
    list_filter = ("success",)
    search_fields = ("agent__id", "superpower", "task_id")
    date_hierarchy = "created_at"
    ordering = ("-created_at",)
    list_select_related = ("agent",)
    show_full_result_count = False  # a count(*) over millions of executions on every page is not worth it


class ExperimentArmInline(admin.TabularInline):
    model = ExperimentArm
    extra = 0
    fields = ("name", "weight", "scaling_policy", "rules", "buy_deals", "deal_max_unit_price_usd")
    filter_horizontal = ("rules",)


@admin.register(Experiment)
class ExperimentAdmin(admin.ModelAdmin):
    list_display = ("name", "started_at", "ended_at", "arm_count", "agent_count")
    search_fields = ("name", "description")
    date_hierarchy = "started_at"
    inlines = [ExperimentArmInline]
    readonly_fields = ("applied_arm", "report")
    actions = ["assign_active_agents"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Experiment]:
        return (
            super()
            .get_queryset(request)
            .annotate(
                arm_total=Count("arms", distinct=True), assignment_total=Count("assignments", distinct=True)
            )
        )

    @admin.display(description="arms", ordering="arm_total")
    def arm_count(self, obj: Experiment) -> int:
        return obj.arm_total

    @admin.display(description="agents", ordering="assignment_total")
    def agent_count(self, obj: Experiment) -> int:
        return obj.assignment_total

    @admin.display(description="report per arm")
    def report(self, obj: Experiment) -> str:
        if obj.pk is None:
            return "-"
        if not settings.ENABLE_PERFORMANCE_ANALYTICS:
            return "performance analytics is switched off (ENABLE_PERFORMANCE_ANALYTICS)"
        rows = experiment_report(experiment=obj)
        if not rows:
            return "no arms yet"
        body = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (
                    row["arm"],
                    row["weight"],
                    row["agents"],
                    row["executions"],
                    row["successes"],
                    usd_text(row["spend_usd"]),
                    usd_text(row["cost_per_successful_task_usd"]),
                )
                for row in rows
            ),
        )
        return format_html(
            "<table><thead><tr><th>arm</th><th>weight</th><th>agents</th><th>executions</th>"
            "<th>successes</th><th>spend</th><th>cost per successful task</th></tr></thead>"
            "<tbody>{}</tbody></table>",
            body,
        )

    @admin.action(description="Assign every active agent (deterministic by agent id)", permissions=["change"])
    def assign_active_agents(self, request: HttpRequest, queryset: QuerySet[Experiment]):
        agents = list(Agent.objects.filter(status=Agent.Status.ACTIVE).order_by("id"))
        for experiment in queryset:
            try:
                assignments = experiment_assign(experiment=experiment, agents=agents)
            except LedgerError as exc:
                self.message_user(request, f"{experiment.name}: {exc.message}", messages.ERROR)
                continue
            self.log_change(request, experiment, f"Assigned {len(assignments)} agents.")
            self.message_user(request, f"{experiment.name}: {len(assignments)} agents assigned.")


@admin.register(ExperimentAssignment)
class ExperimentAssignmentAdmin(ViewOnlyAdmin):
    list_display = ("agent", "experiment", "arm", "assigned_at")
    list_filter = ("experiment",)
    search_fields = ("agent__id", "experiment__name", "arm__name")
    list_select_related = ("agent", "experiment", "arm__experiment")
    ordering = ("experiment", "agent")

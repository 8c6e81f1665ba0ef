"""Back office of scaling: policies (edited here), scaling events (read-only, written by scaling only) and
manual scaling as actions on agent policies.

Why the actions sit on ``ScalingPolicy`` rather than on the agent page: the agent admin lives in ``ledger``,
which must not import ``optimization`` (dependencies point optimization -> allocation -> ledger). An agent
that has no policy of its own gets one (``enabled`` off if it should not auto-scale) to be scaled from here;
``POST /api/v1/agents/{id}/scaling`` scales any agent. Tier policies are skipped by the actions: scaling a
whole tier at once is not something to do by accident from a list.
"""

from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from ledger.errors import LedgerError
from optimization.models import ScalingEvent, ScalingPolicy
from optimization.services.scaling import scaling_apply


@admin.register(ScalingPolicy)
class ScalingPolicyAdmin(admin.ModelAdmin):
    list_display = (
        "__str__",
        "enabled",
        "metric",
        "scale_up_threshold",
        "scale_down_threshold",
        "step",
        "min_instances",
        "max_instances",
        "quota_step_percent",
        "cooldown_seconds",
        "updated_at",
    )
    list_filter = ("enabled", "metric", "tier")
    search_fields = ("agent__id", "tier__code")
    raw_id_fields = ("agent",)
    list_select_related = ("agent", "tier")
    actions = ["scale_up_now", "scale_down_now"]
    fieldsets = [
        (
            "Applies to",
            {
                "fields": ("agent", "tier"),
                "description": "One of them: an agent's own policy wins over its tier's.",
            },
        ),
        (
            "When",
            {
                "fields": (
                    "enabled",
                    "metric",
                    ("scale_up_threshold", "scale_down_threshold"),
                    "cooldown_seconds",
                ),
                "description": "Scale down only below the lower threshold: "
                "the gap between the two stops flapping.",
            },
        ),
        ("How much", {"fields": ("step", ("min_instances", "max_instances"), "quota_step_percent")}),
    ]

    def has_scale_permission(self, request: HttpRequest) -> bool:
        # Scaling changes an agent: the same permission as changing it in the agent admin.
        return request.user.has_perm("ledger.change_agent")

    def _scale(self, request: HttpRequest, queryset: QuerySet, direction: str) -> None:
        changed, unchanged, skipped = [], [], 0
        for policy in queryset.select_related("agent").order_by("pk"):
            if policy.agent is None:
                skipped += 1
                continue
            try:
                event = scaling_apply(
                    agent=policy.agent,
                    direction=direction,
                    trigger=ScalingEvent.Trigger.MANUAL,
                    reason=f"manual scale {direction} in the admin by {request.user.get_username()}",
                    actor=request.user.get_username(),
                )
            except LedgerError as exc:
                self.message_user(request, f"{policy.agent_id}: {exc.message}", messages.ERROR)
                continue
            if event is None:
                unchanged.append(policy.agent_id)
            else:
                changed.append(f"{policy.agent_id} {event.before}->{event.after}")
        if changed:
            self.message_user(request, f"Scaled {direction}: {', '.join(changed)}.", messages.SUCCESS)
        if unchanged:
            self.message_user(
                request, f"Already at the bound, unchanged: {', '.join(unchanged)}.", messages.WARNING
            )
        if skipped:
            self.message_user(
                request, f"{skipped} tier policies skipped: scale agents one by one.", messages.WARNING
            )

    @admin.action(description="Scale the agent up now", permissions=["scale"])
    def scale_up_now(self, request: HttpRequest, queryset: QuerySet) -> None:
        self._scale(request, queryset, ScalingEvent.Direction.UP)

    @admin.action(description="Scale the agent down now", permissions=["scale"])
    def scale_down_now(self, request: HttpRequest, queryset: QuerySet) -> None:
        self._scale(request, queryset, ScalingEvent.Direction.DOWN)


@admin.register(ScalingEvent)
class ScalingEventAdmin(admin.ModelAdmin):
    list_display = (
        "created_at",
        "agent",
        "kind",
        "direction",
        "before",
        "after",
        "resource_type",
        "trigger",
        "actor",
        "reason",
    )
    list_filter = ("kind", "direction", "trigger")
    search_fields = ("agent__id", "reason", "actor")
    list_select_related = ("agent", "resource_type")
    date_hierarchy = "created_at"

    def has_add_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

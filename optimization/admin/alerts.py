"""Back office of budgets and alerts: alerts (acknowledged from the list), their deliveries, alert settings,
webhook endpoints and rule states.

Alerts, deliveries and rule states are written by the sweeps, so their pages are read-only; acknowledging
is an action that calls the service. A webhook's secret is never shown in a list, only on its own page.
"""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from optimization.models import Alert, AlertDelivery, AlertSettings, RuleState, WebhookEndpoint
from optimization.services.alert_delivery import alert_subject
from optimization.services.alerts import alerts_acknowledge


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False


class OpenFilter(admin.SimpleListFilter):
    title = "open"
    parameter_name = "open"

    def lookups(self, request, model_admin):
        return [("yes", "Open"), ("no", "Acknowledged")]

    def queryset(self, request, queryset):
        if self.value() == "yes":
            return queryset.filter(acknowledged_at__isnull=True)
        if self.value() == "no":
            return queryset.filter(acknowledged_at__isnull=False)
        return queryset


class AlertDeliveryInline(admin.TabularInline):
    model = AlertDelivery
    fields = ("channel", "target", "status", "attempts", "last_status_code", "last_error", "next_attempt_at")
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request: HttpRequest, obj=None) -> bool:
        return False


@admin.register(Alert)
class AlertAdmin(admin.ModelAdmin):
    """Every field is read-only; the change permission is what the "Acknowledge" action asks for."""

    list_display = (
        "created_at",
        "subject",
        "kind",
        "severity",
        "title",
        "notifications",
        "is_open",
        "acknowledged_by",
    )
    list_filter = ("kind", "severity", OpenFilter)
    search_fields = ("agent__id", "title", "message", "dedup_key")
    date_hierarchy = "created_at"
    list_select_related = ("agent",)
    readonly_fields = (
        "agent",
        "kind",
        "severity",
        "title",
        "message",
        "data",
        "rule",
        "dedup_key",
        "created_at",
        "notifications",
        "notified_at",
        "delivery_queued_at",
        "acknowledged_at",
        "acknowledged_by",
    )
    inlines = [AlertDeliveryInline]
    actions = ["acknowledge"]

    def has_add_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    @admin.display(boolean=True, description="open")
    def is_open(self, alert: Alert) -> bool:
        return alert.is_open

    @admin.display(description="about", ordering="agent")
    def subject(self, alert: Alert) -> str:
        """The agent, or the team or organization of a budget alert that belongs to no agent."""
        scope, scope_id = alert_subject(alert)
        if scope is None:
            return "-"
        if scope == "run":
            return f"{alert.agent_id} run {scope_id}"
        return alert.agent_id if scope == "agent" else f"{scope} {scope_id}"

    @admin.action(description="Acknowledge selected alerts", permissions=["change"])
    def acknowledge(self, request: HttpRequest, queryset: QuerySet[Alert]):
        count = alerts_acknowledge(
            alert_ids=queryset.values_list("pk", flat=True), actor=request.user.get_username()
        )
        messages.success(request, f"Acknowledged {count} alert(s).")


@admin.register(AlertDelivery)
class AlertDeliveryAdmin(ReadOnlyAdmin):
    list_display = (
        "created_at",
        "alert",
        "channel",
        "target",
        "status",
        "attempts",
        "last_status_code",
        "next_attempt_at",
        "delivered_at",
    )
    list_filter = ("status", "channel")
    search_fields = ("target", "alert__agent__id", "alert__title")
    list_select_related = ("alert",)
    readonly_fields = (
        "alert",
        "channel",
        "webhook",
        "target",
        "status",
        "attempts",
        "last_status_code",
        "last_error",
        "next_attempt_at",
        "delivered_at",
        "created_at",
    )


@admin.register(AlertSettings)
class AlertSettingsAdmin(admin.ModelAdmin):
    list_display = ("agent", "budget_thresholds", "email")
    search_fields = ("agent__id", "email")
    raw_id_fields = ("agent",)


def masked(secret: str) -> str:
    """Enough of a secret to tell two apart, never enough to use one."""
    if not secret:
        return ""
    return f"{secret[:2]}{'•' * 6}{secret[-2:]}" if len(secret) >= 8 else "•" * 6


class WebhookEndpointForm(forms.ModelForm):
    url = forms.URLField(max_length=500, assume_scheme="https")

    class Meta:
        model = WebhookEndpoint
        fields = ["agent", "url", "secret", "enabled", "max_concurrent_requests", "batch_size"]
        # Shown in full on the endpoint's own page (a new one comes with a generated secret), for the
        # operator to hand to the receiver; lists mask it.
        widgets = {"secret": forms.TextInput(attrs={"size": 60, "autocomplete": "off"})}


@admin.register(WebhookEndpoint)
class WebhookEndpointAdmin(admin.ModelAdmin):
    form = WebhookEndpointForm
    list_display = (
        "url",
        "agent",
        "enabled",
        "max_concurrent_requests",
        "batch_size",
        "masked_secret",
        "created_at",
    )
    list_filter = ("enabled",)
    search_fields = ("url", "agent__id")
    raw_id_fields = ("agent",)

    @admin.display(description="secret")
    def masked_secret(self, endpoint: WebhookEndpoint) -> str:
        return masked(endpoint.secret)


@admin.register(RuleState)
class RuleStateAdmin(ReadOnlyAdmin):
    list_display = ("rule", "agent", "subject", "true_since", "last_value", "last_fired_at")
    list_filter = ("rule",)
    search_fields = ("agent__id", "rule__name", "subject")
    list_select_related = ("rule", "agent")
    readonly_fields = ("rule", "agent", "subject", "true_since", "last_value", "last_fired_at")

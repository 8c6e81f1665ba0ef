"""Alerts of an agent: list them, acknowledge one, and read or change where they go; and every alert, for
operators (a team's or an organization's budget alerts belong to no agent).

GET  /api/v1/agents/{id}/alerts?status=open|acknowledged|all      newest first, cursor-paginated
POST /api/v1/agents/{id}/alerts/{alert_id}/acknowledge             idempotent: acknowledging twice is 200
GET  /api/v1/agents/{id}/alert-settings
PUT  /api/v1/agents/{id}/alert-settings                            {"budget_thresholds": [...], "email": ...}
GET  /api/v1/alerts?status=&agent_id=&kind=&scope=&scope_id=       operator: every alert, newest first
POST /api/v1/alerts/{alert_id}/acknowledge                         operator: any alert, idempotent
"""

from __future__ import annotations

from django.urls import path
from drf_spectacular.utils import extend_schema, extend_schema_field
from rest_framework import serializers
from rest_framework.pagination import CursorPagination
from rest_framework.response import Response

from allocation.api.serializers import StrictSerializer
from allocation.api.shared import converters  # noqa: F401  (registers <agent_id:...>)
from allocation.api.shared.auth import IsOperator
from allocation.api.shared.mutation import run_mutation
from allocation.api.shared.views import AgentScopedView, GridAPIView, valid
from ledger.errors import NotFound
from ledger.models import Budget
from optimization.models import Alert, AlertSettings
from optimization.services.alert_delivery import alert_subject
from optimization.services.alerts import (
    THRESHOLD_MAX,
    THRESHOLD_MIN,
    alert_acknowledge,
    alert_settings_get,
    alert_settings_update,
)


class AlertQuery(StrictSerializer):
    status = serializers.ChoiceField(choices=["open", "acknowledged", "all"], required=False, default="open")
    cursor = serializers.CharField(required=False)
    page_size = serializers.IntegerField(required=False, min_value=1, max_value=500)


class AllAlertsQuery(AlertQuery):
    agent_id = serializers.CharField(required=False, max_length=64)
    kind = serializers.ChoiceField(choices=Alert.Kind.values, required=False)
    scope = serializers.ChoiceField(choices=Budget.Scope.values, required=False)
    scope_id = serializers.CharField(required=False, max_length=200)


class AlertOut(serializers.ModelSerializer):
    # Empty for a team's or an organization's budget alert: ``scope`` and ``scope_id`` say whose it is.
    agent_id = serializers.CharField(allow_null=True)
    scope = serializers.SerializerMethodField()
    scope_id = serializers.SerializerMethodField()
    rule_id = serializers.IntegerField(allow_null=True)
    status = serializers.SerializerMethodField()

    class Meta:
        model = Alert
        fields = [
            "id",
            "agent_id",
            "scope",
            "scope_id",
            "kind",
            "severity",
            "title",
            "message",
            "data",
            "rule_id",
            "status",
            "created_at",
            "notifications",
            "notified_at",
            "acknowledged_at",
            "acknowledged_by",
        ]

    def get_status(self, alert: Alert) -> str:
        return "open" if alert.is_open else "acknowledged"

    @extend_schema_field(serializers.CharField(allow_null=True))
    def get_scope(self, alert: Alert) -> str | None:
        return alert_subject(alert)[0]

    @extend_schema_field(serializers.CharField(allow_null=True))
    def get_scope_id(self, alert: Alert) -> str | None:
        return alert_subject(alert)[1]


def _status_filter(alerts, status: str):
    if status == "open":
        return alerts.filter(acknowledged_at__isnull=True)
    if status == "acknowledged":
        return alerts.filter(acknowledged_at__isnull=False)
    return alerts


class AcknowledgeIn(StrictSerializer):
    """An acknowledgement takes no fields."""


@extend_schema_field({"type": "integer", "minimum": THRESHOLD_MIN, "maximum": THRESHOLD_MAX})
class ThresholdField(serializers.Field):
    default_error_messages = {"invalid": f"must be a JSON integer from {THRESHOLD_MIN} to {THRESHOLD_MAX}"}

    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, int) or not THRESHOLD_MIN <= data <= THRESHOLD_MAX:
            self.fail("invalid")
        return data

    def to_representation(self, value):
        return value


class AlertSettingsIn(StrictSerializer):
    budget_thresholds = serializers.ListField(
        child=ThresholdField(), min_length=1, max_length=20, required=False
    )
    email = serializers.EmailField(required=False, allow_blank=True)


class AlertSettingsOut(serializers.ModelSerializer):
    agent_id = serializers.CharField()

    class Meta:
        model = AlertSettings
        fields = ["agent_id", "budget_thresholds", "email"]


class AlertPagination(CursorPagination):
    ordering = ("-created_at", "-id")
    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 500


class AlertListView(AgentScopedView):
    pagination_class = AlertPagination

    @extend_schema(
        parameters=[AlertQuery],
        responses=AlertOut(many=True),
        summary="The agent's alerts, newest first",
    )
    def get(self, request, agent_id):
        agent = self.agent()
        query = valid(AlertQuery, request.query_params.dict())
        alerts = _status_filter(Alert.objects.filter(agent=agent), query["status"])
        paginator = self.pagination_class()
        page = paginator.paginate_queryset(alerts, request, view=self)
        return paginator.get_paginated_response(AlertOut(page, many=True).data)


class AlertAcknowledgeView(AgentScopedView):
    @extend_schema(request=AcknowledgeIn, responses=AlertOut, summary="Acknowledge an alert (idempotent)")
    def post(self, request, agent_id, alert_id):
        def acknowledge(body):
            valid(AcknowledgeIn, body)
            alert = Alert.objects.filter(pk=alert_id, agent=self.agent()).first()
            if alert is None:
                raise NotFound(f"alert {alert_id} not found")
            alert = alert_acknowledge(alert=alert, actor=request.user.label)
            return 200, AlertOut(alert).data

        return run_mutation(request, action="alert.acknowledge", agent_id=agent_id, handler=acknowledge)


class AlertSettingsView(AgentScopedView):
    @extend_schema(responses=AlertSettingsOut, summary="Where the agent's alerts go")
    def get(self, request, agent_id):
        return Response(AlertSettingsOut(alert_settings_get(agent=self.agent())).data)

    @extend_schema(request=AlertSettingsIn, responses=AlertSettingsOut, summary="Change the alert settings")
    def put(self, request, agent_id):
        def update(body):
            data = valid(AlertSettingsIn, body)
            settings_row = alert_settings_update(
                agent=self.agent(), budget_thresholds=data.get("budget_thresholds"), email=data.get("email")
            )
            return 200, AlertSettingsOut(settings_row).data

        return run_mutation(request, action="alert_settings.update", agent_id=agent_id, handler=update)


class AllAlertsView(GridAPIView):
    permission_classes = [IsOperator]
    pagination_class = AlertPagination

    @extend_schema(
        parameters=[AllAlertsQuery],
        responses=AlertOut(many=True),
        summary="Every alert, newest first, with team and organization budget alerts (operator)",
    )
    def get(self, request):
        query = valid(AllAlertsQuery, request.query_params.dict())
        alerts = _status_filter(Alert.objects.all(), query["status"])
        if "agent_id" in query:
            alerts = alerts.filter(agent_id=query["agent_id"])
        if "kind" in query:
            alerts = alerts.filter(kind=query["kind"])
        if "scope" in query:
            alerts = alerts.filter(data__scope=query["scope"])
        if "scope_id" in query:
            alerts = alerts.filter(data__scope_id=query["scope_id"])
        paginator = self.pagination_class()
        page = paginator.paginate_queryset(alerts, request, view=self)
        return paginator.get_paginated_response(AlertOut(page, many=True).data)


class OperatorAlertAcknowledgeView(GridAPIView):
    permission_classes = [IsOperator]

    @extend_schema(
        request=AcknowledgeIn, responses=AlertOut, summary="Acknowledge any alert (operator, idempotent)"
    )
    def post(self, request, alert_id):
        alert = Alert.objects.filter(pk=alert_id).first()

        def acknowledge(body):
            valid(AcknowledgeIn, body)
            if alert is None:
                raise NotFound(f"alert {alert_id} not found")
            return 200, AlertOut(alert_acknowledge(alert=alert, actor=request.user.label)).data

        agent_id = (alert.agent_id or "") if alert is not None else ""
        return run_mutation(request, action="alert.acknowledge", agent_id=agent_id, handler=acknowledge)


urlpatterns = [
    path("v1/alerts", AllAlertsView.as_view(), name="all-alerts"),
    path(
        "v1/alerts/<int:alert_id>/acknowledge",
        OperatorAlertAcknowledgeView.as_view(),
        name="operator-alert-acknowledge",
    ),
    path("v1/agents/<agent_id:agent_id>/alerts", AlertListView.as_view(), name="alerts"),
    path(
        "v1/agents/<agent_id:agent_id>/alerts/<int:alert_id>/acknowledge",
        AlertAcknowledgeView.as_view(),
        name="alert-acknowledge",
    ),
    path("v1/agents/<agent_id:agent_id>/alert-settings", AlertSettingsView.as_view(), name="alert-settings"),
]

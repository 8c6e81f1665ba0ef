"""Performance analytics endpoints: metrics, analysis, recommendations and optimize (experiment reports are
in ``optimization.api.experiments``).

The numbers come from ``optimization.services.analytics`` / ``recommendations`` / ``experiments``; these
views validate the query, call one service and render it: money and percentages as decimal strings, times
as ISO 8601. The ``compat_*`` functions give the same numbers to ``/api/resources`` with camelCase keys.
With ``ENABLE_PERFORMANCE_ANALYTICS`` off every endpoint answers 403 ``feature_disabled``.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

from django.urls import path
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.response import Response

from allocation.api.compat import camelize
from allocation.api.serializers import StrictSerializer
from allocation.api.shared import converters  # noqa: F401  (registers <agent_id:...>)
from allocation.api.shared.mutation import run_mutation
from allocation.api.shared.schema import errors
from allocation.api.shared.views import AgentScopedView, valid
from ledger.errors import FeatureDisabled
from ledger.models import Agent
from optimization.services.analytics import (
    DEFAULT_WINDOW_HOURS,
    MAX_WINDOW_HOURS,
    agent_analysis,
    agent_metrics,
)
from optimization.services.recommendations import agent_recommendations, optimization_run


def render(value):
    """JSON-ready: Decimals as exact strings (never floats), datetimes as ISO 8601, containers recursively."""
    if isinstance(value, Decimal):
        return f"{value:f}"
    if isinstance(value, dt.datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, dict):
        return {str(key): render(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [render(item) for item in value]
    return value


# --- Payloads -------------------------------------------------------------------------------------------


def metrics_payload(agent: Agent, window_hours: int = DEFAULT_WINDOW_HOURS) -> dict:
    return render(agent_metrics(agent=agent, window_hours=window_hours))


def recommendations_payload(agent: Agent) -> dict:
    items = agent_recommendations(agent=agent)
    return render({"agent_id": agent.id, "count": len(items), "recommendations": items})


# --- v1 views -------------------------------------------------------------------------------------------


class MetricsQuery(StrictSerializer):
    window_hours = serializers.IntegerField(
        min_value=1,
        max_value=MAX_WINDOW_HOURS,
        required=False,
        default=DEFAULT_WINDOW_HOURS,
        help_text="The performance window in hours",
    )


class OptimizeIn(StrictSerializer):
    """An optimize run takes no fields; an unknown one is refused rather than ignored."""


class MetricsView(AgentScopedView):
    @extend_schema(
        parameters=[MetricsQuery],
        responses=OpenApiTypes.OBJECT,
        summary="Current usage, performance over a window, and this period's cost with a forecast",
    )
    @errors(FeatureDisabled)
    def get(self, request, agent_id):
        agent = self.agent()
        query = valid(MetricsQuery, request.query_params.dict())
        return Response(metrics_payload(agent, query["window_hours"]))


class AnalysisView(AgentScopedView):
    @extend_schema(
        responses=OpenApiTypes.OBJECT, summary="Bottlenecks, efficiency score and optimization actions"
    )
    @errors(FeatureDisabled)
    def get(self, request, agent_id):
        return Response(render(agent_analysis(agent=self.agent())))


class RecommendationsView(AgentScopedView):
    @extend_schema(responses=OpenApiTypes.OBJECT, summary="Ranked recommendations with expected savings")
    @errors(FeatureDisabled)
    def get(self, request, agent_id):
        return Response(recommendations_payload(self.agent()))


class OptimizeView(AgentScopedView):
    @extend_schema(
        request=OptimizeIn,
        responses=OpenApiTypes.OBJECT,
        summary="Apply the safe high-priority recommendations (scaling, deals within budget)",
    )
    @errors(FeatureDisabled)
    def post(self, request, agent_id):
        def optimize(body):
            valid(OptimizeIn, body)
            return 200, render(optimization_run(agent=self.agent(), actor=request.user.label))

        return run_mutation(request, action="agent.optimize", agent_id=agent_id, handler=optimize)


# --- /api/resources actions (registered by the app's ready()) --------------------------------------------


class CompatMetricsQuery(serializers.Serializer):
    windowHours = serializers.IntegerField(  # noqa: N815 - the compat endpoint's camelCase
        min_value=1, max_value=MAX_WINDOW_HOURS, required=False, default=DEFAULT_WINDOW_HOURS
    )


def compat_metrics(request, agent: Agent) -> dict:
    query = valid(CompatMetricsQuery, request.query_params.dict())
    payload = metrics_payload(agent, query["windowHours"])
    payload.pop("agent_id")
    return {"agentId": agent.id, **camelize(payload)}


def compat_recommendations(request, agent: Agent) -> dict:
    payload = recommendations_payload(agent)
    payload.pop("agent_id")
    return {"agentId": agent.id, **camelize(payload)}


def compat_optimize(request, agent: Agent, data: dict) -> tuple[int, dict]:
    payload = render(optimization_run(agent=agent, actor=request.user.label))
    payload.pop("agent_id")
    return 200, {"agentId": agent.id, **camelize(payload)}


urlpatterns = [
    path("v1/agents/<agent_id:agent_id>/metrics", MetricsView.as_view(), name="agent-metrics"),
    path("v1/agents/<agent_id:agent_id>/analysis", AnalysisView.as_view(), name="agent-analysis"),
    path(
        "v1/agents/<agent_id:agent_id>/recommendations",
        RecommendationsView.as_view(),
        name="agent-recommendations",
    ),
    path("v1/agents/<agent_id:agent_id>/optimize", OptimizeView.as_view(), name="agent-optimize"),
]

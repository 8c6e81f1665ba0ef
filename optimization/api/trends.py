"""Trend endpoints of one agent: daily spend against its daily budget, cost per successful task per day, and
the last hour against the trailing 7 days (``optimization.services.trends``).

Days are UTC dates (``YYYY-MM-DD``); ``start`` and ``end`` both count, at most 366 days apart, by default the
30 days up to today. Money and ratios are decimal strings. With ``ENABLE_PERFORMANCE_ANALYTICS`` off every
endpoint answers 403 ``feature_disabled``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

from django.urls import path
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.response import Response

from allocation.api.serializers import StrictSerializer
from allocation.api.shared import converters  # noqa: F401  (registers <agent_id:...>)
from allocation.api.shared.schema import errors
from allocation.api.shared.views import AgentScopedView, valid
from ledger.errors import FeatureDisabled, LedgerError
from optimization.api.analytics import render
from optimization.services.analytics import analytics_ensure_enabled
from optimization.services.trends import cost_per_successful_task, daily_spend, degradation

DEFAULT_RANGE_DAYS = 30


class DayRangeQuery(StrictSerializer):
    start = serializers.DateField(required=False, help_text="First day (UTC), default 29 days before end")
    end = serializers.DateField(required=False, help_text="Last day (UTC), default today")

    def validate(self, attrs):
        end = attrs.get("end") or timezone.now().date()
        # (bounded by the first representable day, so an end near it does not overflow)
        start = attrs.get("start") or end - dt.timedelta(
            days=min(DEFAULT_RANGE_DAYS - 1, (end - dt.date.min).days)
        )
        return {"start": start, "end": end}


def _days(rows: list[dict]) -> list[dict]:
    return [{**row, "day": row["day"].isoformat()} for row in rows]


class _TrendView(AgentScopedView):
    def series_response(self, series: Callable[..., list[dict]]) -> Response:
        """The days ``series`` (a service of ``optimization.services.trends``) gives for the query's range."""
        agent = self.agent()
        analytics_ensure_enabled()
        query = valid(DayRangeQuery, self.request.query_params.dict())
        rows = series(agent_id=agent.pk, start=query["start"], end=query["end"])
        return Response(
            render(
                {
                    "agent_id": agent.pk,
                    "start": query["start"].isoformat(),
                    "end": query["end"].isoformat(),
                    "days": _days(rows),
                }
            )
        )


class DailySpendView(_TrendView):
    @extend_schema(
        parameters=[DayRangeQuery],
        responses=OpenApiTypes.OBJECT,
        summary="Spend per day against the agent's daily budget",
    )
    @errors(FeatureDisabled, invalid_range=LedgerError)
    def get(self, request, agent_id):
        return self.series_response(daily_spend)


class CostPerSuccessView(_TrendView):
    @extend_schema(
        parameters=[DayRangeQuery],
        responses=OpenApiTypes.OBJECT,
        summary="Cost per successful task, per day",
    )
    @errors(FeatureDisabled, invalid_range=LedgerError)
    def get(self, request, agent_id):
        return self.series_response(cost_per_successful_task)


class DegradationView(AgentScopedView):
    @extend_schema(
        responses=OpenApiTypes.OBJECT,
        summary="p95 duration, error rate and throughput of the last hour against the 7 days before",
    )
    @errors(FeatureDisabled)
    def get(self, request, agent_id):
        agent = self.agent()
        analytics_ensure_enabled()
        return Response(render({"agent_id": agent.pk, **degradation(agent_id=agent.pk)}))


urlpatterns = [
    path("v1/agents/<agent_id:agent_id>/daily-spend", DailySpendView.as_view(), name="agent-daily-spend"),
    path(
        "v1/agents/<agent_id:agent_id>/cost-per-success",
        CostPerSuccessView.as_view(),
        name="agent-cost-per-success",
    ),
    path("v1/agents/<agent_id:agent_id>/degradation", DegradationView.as_view(), name="agent-degradation"),
]

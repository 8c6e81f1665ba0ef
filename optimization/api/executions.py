"""POST /api/v1/agents/{id}/executions: track a superpower execution."""

from __future__ import annotations

from django.urls import path
from drf_spectacular.utils import extend_schema
from rest_framework import serializers

from allocation.api.serializers import RUN_ID, ResourceAmountsField, StrictSerializer
from allocation.api.shared import converters  # noqa: F401  (registers <agent_id:...>)
from allocation.api.shared.mutation import run_mutation
from allocation.api.shared.schema import errors
from allocation.api.shared.views import AgentScopedView, valid
from ledger.errors import (
    AgentSuspended,
    AgentThrottled,
    BudgetExceeded,
    Conflict,
    FeatureDisabled,
    NotFound,
    QuotaExceeded,
)
from optimization.models import Execution
from optimization.services.executions import execution_record


class ExecutionIn(StrictSerializer):
    superpower = serializers.CharField(max_length=100)
    resources = ResourceAmountsField(allow_empty=False)
    duration_ms = serializers.IntegerField(
        min_value=0,
        max_value=2**31 - 1,
        required=False,
        allow_null=True,
        default=None,
        help_text="How long it took. Left out: the execution counts in cost and throughput, not in latency.",
    )
    success = serializers.BooleanField(
        required=False,
        allow_null=True,
        default=None,
        help_text="How it went. Left out: unknown, not counted in success or error rates.",
    )
    output_units = serializers.IntegerField(min_value=0, max_value=2**31 - 1, required=False)
    task_id = serializers.CharField(max_length=200, required=False, allow_blank=True, default="")
    run_id = serializers.CharField(
        **RUN_ID, help_text="A run of the agent (POST .../runs): every resource is charged to its budget."
    )


class ExecutionOut(serializers.ModelSerializer):
    agent_id = serializers.CharField()

    class Meta:
        model = Execution
        fields = [
            "id",
            "agent_id",
            "superpower",
            "resources",
            "duration_ms",
            "success",
            "output_units",
            "cost_usd",
            "task_id",
            "created_at",
        ]


class ExecutionCreateView(AgentScopedView):
    @extend_schema(request=ExecutionIn, responses={201: ExecutionOut}, summary="Track a superpower execution")
    @errors(
        QuotaExceeded,
        BudgetExceeded,
        AgentThrottled,
        AgentSuspended,
        FeatureDisabled,
        run_not_found=NotFound,
        run_ended=Conflict,
    )
    def post(self, request, agent_id):
        def record(body):
            data = valid(ExecutionIn, body)
            execution = execution_record(
                agent=self.agent(),
                superpower=data["superpower"],
                resources=data["resources"],
                duration_ms=data["duration_ms"],
                success=data["success"],
                output_units=data.get("output_units"),
                task_id=data["task_id"],
                idempotency_key=request.headers.get("Idempotency-Key", ""),
                run_id=data["run_id"],
            )
            return 201, ExecutionOut(execution).data

        return run_mutation(request, action="execution.create", agent_id=agent_id, handler=record)


urlpatterns = [
    path("v1/agents/<agent_id:agent_id>/executions", ExecutionCreateView.as_view(), name="executions"),
]

"""A/B experiments over the v1 API, operator only.

* ``POST /api/v1/experiments`` ``{"name", "description"?, "arms": [{"name", "weight"?, "rules"?,
  "scaling_policy"?, "buy_deals"?, "deal_max_unit_price_usd"?}], "agents"?: [...]}``: 201 with the
  experiment, started now, its ``agents`` assigned to arms by weight (a hash of the experiment name and the
  agent id: the same agent always lands in the same arm).
* ``GET /api/v1/experiments``: newest first, in pages of 50. ``GET /api/v1/experiments/{id}``: one.
* ``POST /api/v1/experiments/{id}/agents`` ``{"agents": [...]}``: assign more agents (200).
* ``GET /api/v1/experiments/{id}/report``: per arm, with 95 % intervals, and the winner or why there is
  none (``ENABLE_PERFORMANCE_ANALYTICS``).
* ``POST /api/v1/experiments/{id}/stop`` ``{"apply_winner"?: bool}``: end it; with ``apply_winner`` the
  winner's strategy first becomes every assigned agent's own (409 ``no_winner`` without one).

The rules are ``optimization.services.experiments``'s; these views validate, call one service and shape the
JSON (money and percentages as decimal strings).
"""

from __future__ import annotations

from django.db.models import Count, Prefetch
from django.urls import path
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from rest_framework import generics, serializers
from rest_framework.response import Response

from allocation.api.serializers import StrictSerializer
from allocation.api.shared.auth import ApiKeyAuthentication, IsOperator
from allocation.api.shared.mutation import run_mutation
from allocation.api.shared.schema import errors
from allocation.api.shared.views import GridAPIView, valid
from ledger.errors import Conflict, FeatureDisabled, LedgerError, NotFound
from ledger.models import UNIT_PRICE, OptimizationRule
from optimization.api.analytics import render
from optimization.api.scaling import ScalingPolicyIn
from optimization.models import Experiment, ExperimentArm
from optimization.services.experiments import (
    experiment_agents_add,
    experiment_create,
    experiment_is_running,
    experiment_stop,
    experiment_summary,
)

MAX_ARMS = 20
MAX_AGENTS = 10_000
MAX_WEIGHT = 1_000_000


class ArmIn(StrictSerializer):
    name = serializers.CharField(max_length=100)
    weight = serializers.IntegerField(
        required=False, default=1, min_value=1, max_value=MAX_WEIGHT, help_text="Share of the agents"
    )
    rules = serializers.ListField(
        child=serializers.IntegerField(min_value=1, max_value=2**63 - 1),
        required=False,
        default=list,
        max_length=100,
        help_text="Ids of the optimization rules the arm's agents run under, instead of their own",
    )
    scaling_policy = ScalingPolicyIn(
        required=False, allow_null=True, default=None, help_text="The arm's own scaling policy"
    )
    buy_deals = serializers.BooleanField(
        required=False, default=True, help_text="Whether the optimizer may buy deals for the arm's agents"
    )
    deal_max_unit_price_usd = serializers.DecimalField(
        **UNIT_PRICE, min_value=0, required=False, allow_null=True, default=None
    )


class ExperimentIn(StrictSerializer):
    name = serializers.CharField(max_length=100)
    description = serializers.CharField(required=False, allow_blank=True, default="", max_length=2000)
    arms = serializers.ListField(child=ArmIn(), min_length=1, max_length=MAX_ARMS)
    agents = serializers.ListField(
        child=serializers.CharField(max_length=64), required=False, default=list, max_length=MAX_AGENTS
    )


class AgentsIn(StrictSerializer):
    agents = serializers.ListField(
        child=serializers.CharField(max_length=64), min_length=1, max_length=MAX_AGENTS
    )


class StopIn(StrictSerializer):
    apply_winner = serializers.BooleanField(required=False, default=False)


def _policy(arm: ExperimentArm) -> dict | None:
    policy = arm.scaling_policy
    if policy is None:
        return None
    return {
        "id": policy.pk,
        "metric": policy.metric,
        "scale_up_threshold": policy.scale_up_threshold,
        "scale_down_threshold": policy.scale_down_threshold,
        "step": policy.step,
        "min_instances": policy.min_instances,
        "max_instances": policy.max_instances,
        "quota_step_percent": policy.quota_step_percent,
        "cooldown_seconds": policy.cooldown_seconds,
        "enabled": policy.enabled,
    }


def _experiments():
    return Experiment.objects.prefetch_related(
        Prefetch(
            "arms",
            queryset=ExperimentArm.objects.select_related("scaling_policy")
            .annotate(agent_total=Count("assignments"))
            .prefetch_related(Prefetch("rules", queryset=OptimizationRule.objects.only("pk").order_by("pk")))
            .order_by("name", "pk"),
        )
    ).select_related("applied_arm")


def _status(experiment: Experiment, now) -> str:
    if experiment_is_running(experiment, now):
        return "running"
    return "scheduled" if experiment.started_at > now else "ended"


def experiment_payload(experiment: Experiment) -> dict:
    arms = list(experiment.arms.all())
    return render(
        {
            "id": experiment.pk,
            "name": experiment.name,
            "description": experiment.description,
            "status": _status(experiment, timezone.now()),
            "started_at": experiment.started_at,
            "ended_at": experiment.ended_at,
            "applied_arm": None if experiment.applied_arm_id is None else experiment.applied_arm.name,
            "agents": sum(arm.agent_total for arm in arms),
            "arms": [
                {
                    "id": arm.pk,
                    "name": arm.name,
                    "weight": arm.weight,
                    "agents": arm.agent_total,
                    "rules": [rule.pk for rule in arm.rules.all()],
                    "scaling_policy": _policy(arm),
                    "buy_deals": arm.buy_deals,
                    "deal_max_unit_price_usd": arm.deal_max_unit_price_usd,
                }
                for arm in arms
            ],
        }
    )


def _experiment_get(experiment_id: int) -> Experiment:
    experiment = _experiments().filter(pk=experiment_id).first()
    if experiment is None:
        raise NotFound(f"experiment {experiment_id} not found")
    return experiment


class ExperimentListView(generics.ListAPIView):
    authentication_classes = [ApiKeyAuthentication]
    permission_classes = [IsOperator]

    def get_queryset(self):
        return _experiments().order_by("-started_at", "-pk")

    @extend_schema(
        operation_id="api_v1_experiments_list",
        responses=OpenApiTypes.OBJECT,
        summary="A/B experiments, newest first, in pages of 50 (operator)",
    )
    def get(self, request):
        page = self.paginate_queryset(self.get_queryset())
        return self.get_paginated_response([experiment_payload(experiment) for experiment in page])

    @extend_schema(
        request=ExperimentIn,
        responses={201: OpenApiTypes.OBJECT},
        summary="Start an A/B experiment (operator)",
    )
    @errors(
        already_exists=Conflict,
        invalid_experiment=LedgerError,
        invalid_policy=LedgerError,
        unknown_rules=LedgerError,
        unknown_agents=LedgerError,
        agent_in_another_experiment=Conflict,
    )
    def post(self, request):
        def create(body):
            data = valid(ExperimentIn, body)
            experiment = experiment_create(
                name=data["name"],
                description=data["description"],
                arms=[
                    {
                        "name": arm["name"],
                        "weight": arm["weight"],
                        "rule_ids": arm["rules"],
                        "scaling_policy": None
                        if arm["scaling_policy"] is None
                        else dict(arm["scaling_policy"]),
                        "buy_deals": arm["buy_deals"],
                        "deal_max_unit_price_usd": arm["deal_max_unit_price_usd"],
                    }
                    for arm in data["arms"]
                ],
                agent_ids=data["agents"],
            )
            return 201, experiment_payload(_experiment_get(experiment.pk))

        return run_mutation(request, action="experiment.create", agent_id="", handler=create)


class ExperimentDetailView(GridAPIView):
    permission_classes = [IsOperator]

    @extend_schema(responses=OpenApiTypes.OBJECT, summary="An A/B experiment and its arms (operator)")
    def get(self, request, experiment_id):
        return Response(experiment_payload(_experiment_get(experiment_id)))


class ExperimentAgentsView(GridAPIView):
    permission_classes = [IsOperator]

    @extend_schema(
        request=AgentsIn,
        responses=OpenApiTypes.OBJECT,
        summary="Assign more agents to an experiment (operator)",
    )
    @errors(experiment_ended=Conflict, unknown_agents=LedgerError, agent_in_another_experiment=Conflict)
    def post(self, request, experiment_id):
        def add(body):
            experiment = _experiment_get(experiment_id)
            data = valid(AgentsIn, body)
            assignments = experiment_agents_add(experiment=experiment, agent_ids=data["agents"])
            return 200, {
                "experiment_id": experiment.pk,
                "assignments": [
                    {"agent_id": assignment.agent_id, "arm": assignment.arm.name}
                    for assignment in assignments
                ],
            }

        return run_mutation(request, action="experiment.assign", agent_id="", handler=add)


class ExperimentStopView(GridAPIView):
    permission_classes = [IsOperator]

    @extend_schema(
        request=StopIn,
        responses=OpenApiTypes.OBJECT,
        summary="End an experiment, optionally giving its agents the winner's strategy (operator)",
    )
    @errors(experiment_ended=Conflict, no_winner=Conflict)
    def post(self, request, experiment_id):
        def stop(body):
            experiment = _experiment_get(experiment_id)
            data = valid(StopIn, body)
            result = experiment_stop(experiment=experiment, apply_winner=data["apply_winner"])
            return 200, {**experiment_payload(_experiment_get(experiment.pk)), "applied": result["applied"]}

        return run_mutation(request, action="experiment.stop", agent_id="", handler=stop)


class ExperimentReportView(GridAPIView):
    permission_classes = [IsOperator]

    @extend_schema(
        responses=OpenApiTypes.OBJECT,
        summary="An A/B experiment's results per arm, with 95 % intervals and the winner (operator)",
    )
    @errors(FeatureDisabled)
    def get(self, request, experiment_id):
        experiment = Experiment.objects.filter(pk=experiment_id).first()
        if experiment is None:
            raise NotFound(f"experiment {experiment_id} not found")
        summary = experiment_summary(experiment=experiment)
        return Response(
            render(
                {
                    "experiment_id": experiment.pk,
                    "name": experiment.name,
                    "started_at": experiment.started_at,
                    "ended_at": experiment.ended_at,
                    **summary,
                }
            )
        )


urlpatterns = [
    path("v1/experiments", ExperimentListView.as_view(), name="experiments"),
    path("v1/experiments/<int:experiment_id>", ExperimentDetailView.as_view(), name="experiment"),
    path(
        "v1/experiments/<int:experiment_id>/agents", ExperimentAgentsView.as_view(), name="experiment-agents"
    ),
    path("v1/experiments/<int:experiment_id>/stop", ExperimentStopView.as_view(), name="experiment-stop"),
    path(
        "v1/experiments/<int:experiment_id>/report", ExperimentReportView.as_view(), name="experiment-report"
    ),
]

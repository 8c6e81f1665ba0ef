"""Scaling endpoints: manual scaling, the agent's policy, and its scaling events.

* ``POST /api/v1/agents/{id}/scaling`` ``{"direction": "up"|"down", "step"?, "reason"?}``: operator only
  (an agent's key on itself answers 403 ``forbidden``; on another agent 404, as everywhere). 201 with the
  scaling event, or 200 ``{"changed": false, ...}`` when the agent is already at that bound.
* ``GET|PUT|DELETE /api/v1/agents/{id}/scaling-policy``: the policy that governs the agent, for every agent,
  with ``source`` (``experiment``, ``agent``, ``tier``; ``none`` with ``enabled: false`` when no policy
  applies); PUT (operator) creates or changes the agent's own policy (the override), ``enabled`` included;
  DELETE (operator) drops the override and answers the policy that governs the agent again.
* ``GET /api/v1/agents/{id}/scaling-events``: newest first, cursor-paginated.
"""

from __future__ import annotations

from decimal import Decimal

from django.urls import path
from drf_spectacular.utils import extend_schema, extend_schema_field
from rest_framework import serializers
from rest_framework.pagination import CursorPagination
from rest_framework.response import Response

from allocation.api.serializers import StrictSerializer
from allocation.api.shared import converters  # noqa: F401  (registers <agent_id:...>)
from allocation.api.shared.mutation import run_mutation
from allocation.api.shared.schema import errors
from allocation.api.shared.views import AgentScopedView, valid
from ledger.errors import Conflict, LedgerError, NotFound
from optimization.models import ScalingEvent, ScalingPolicy
from optimization.services.scaling import (
    PolicySource,
    scaling_apply,
    scaling_bounds,
    scaling_policy_effective,
    scaling_policy_override_delete,
    scaling_policy_resolve,
    scaling_policy_set,
)

NO_POLICY = "none"
SOURCES = [PolicySource.EXPERIMENT, PolicySource.AGENT, PolicySource.TIER, NO_POLICY]

MAX_INSTANCES = 10_000
THRESHOLD = {"max_digits": 6, "decimal_places": 2, "min_value": Decimal("0")}


def _ensure_operator(request, what: str) -> None:
    if not request.user.is_operator:
        raise LedgerError(f"only an operator can {what}", code="forbidden", status=403)


class ScaleIn(StrictSerializer):
    direction = serializers.ChoiceField(choices=ScalingEvent.Direction.choices)
    step = serializers.IntegerField(required=False, default=1, min_value=1, max_value=MAX_INSTANCES)
    reason = serializers.CharField(required=False, allow_blank=True, max_length=300, default="")


class ScalingEventOut(serializers.ModelSerializer):
    agent_id = serializers.CharField()
    resource_type = serializers.CharField(source="resource_type_id", allow_null=True)

    class Meta:
        model = ScalingEvent
        fields = [
            "id",
            "agent_id",
            "direction",
            "kind",
            "trigger",
            "resource_type",
            "before",
            "after",
            "reason",
            "actor",
            "created_at",
        ]


class ScaleUnchangedOut(serializers.Serializer):
    changed = serializers.BooleanField(help_text="Always false: the agent is already at that bound")
    agent_id = serializers.CharField()
    direction = serializers.ChoiceField(choices=ScalingEvent.Direction.choices)
    instance_count = serializers.IntegerField()
    min_instances = serializers.IntegerField()
    max_instances = serializers.IntegerField()
    reason = serializers.CharField()


class ScalingPolicyIn(StrictSerializer):
    metric = serializers.ChoiceField(choices=ScalingPolicy._meta.get_field("metric").choices, required=False)
    scale_up_threshold = serializers.DecimalField(**THRESHOLD, required=False)
    scale_down_threshold = serializers.DecimalField(**THRESHOLD, required=False)
    step = serializers.IntegerField(min_value=1, max_value=MAX_INSTANCES, required=False)
    min_instances = serializers.IntegerField(min_value=0, max_value=MAX_INSTANCES, required=False)
    max_instances = serializers.IntegerField(min_value=1, max_value=MAX_INSTANCES, required=False)
    quota_step_percent = serializers.IntegerField(min_value=0, max_value=1000, required=False)
    cooldown_seconds = serializers.IntegerField(min_value=0, max_value=30 * 86400, required=False)
    enabled = serializers.BooleanField(required=False)


class ScalingPolicyOut(serializers.ModelSerializer):
    """A policy as it governs the agent; ``source`` (in the context) says where it comes from."""

    source = serializers.SerializerMethodField(
        help_text="Where the agent's policy comes from: its arm of a running experiment, its own override, "
        "its tier's default, or none (auto-scaling off)"
    )
    scope = serializers.SerializerMethodField(help_text="The same as source (kept for existing clients)")
    # Null with source "none": no policy row governs the agent.
    id = serializers.IntegerField(read_only=True, allow_null=True)
    updated_at = serializers.DateTimeField(read_only=True, allow_null=True)
    agent_id = serializers.CharField(allow_null=True)
    tier = serializers.CharField(source="tier_id", allow_null=True)

    class Meta:
        model = ScalingPolicy
        fields = [
            "id",
            "source",
            "scope",
            "agent_id",
            "tier",
            "metric",
            "scale_up_threshold",
            "scale_down_threshold",
            "step",
            "min_instances",
            "max_instances",
            "quota_step_percent",
            "cooldown_seconds",
            "enabled",
            "updated_at",
        ]

    @extend_schema_field(serializers.ChoiceField(choices=SOURCES))
    def get_source(self, obj: ScalingPolicy) -> str:
        return self.context.get("source") or (PolicySource.AGENT if obj.agent_id else PolicySource.TIER)

    def get_scope(self, obj: ScalingPolicy) -> str:
        return self.get_source(obj)


def _effective_policy_out(agent) -> dict:
    """The policy that governs ``agent`` as the API shows it: every agent has an answer, a disabled
    placeholder (``source: none``) when no policy applies."""
    policy, source = scaling_policy_effective(agent=agent)
    if policy is None:
        policy, source = ScalingPolicy(enabled=False), NO_POLICY
    return ScalingPolicyOut(policy, context={"source": source}).data


class ScaleView(AgentScopedView):
    @extend_schema(
        request=ScaleIn,
        responses={201: ScalingEventOut, 200: ScaleUnchangedOut},
        summary="Scale an agent up or down now (operator)",
    )
    @errors(forbidden=403)
    def post(self, request, agent_id):
        def scale(body):
            agent = self.agent()  # another agent's id answers 404 before the operator check
            _ensure_operator(request, "scale an agent")
            data = valid(ScaleIn, body)
            event = scaling_apply(
                agent=agent,
                direction=data["direction"],
                trigger=ScalingEvent.Trigger.MANUAL,
                reason=data["reason"] or f"manual scale {data['direction']} by {request.user.label}",
                actor=request.user.label,
                step=data["step"],
            )
            if event is not None:
                return 201, ScalingEventOut(event).data
            agent.refresh_from_db()
            low, high = scaling_bounds(
                agent_min=agent.min_instances,
                agent_max=agent.max_instances,
                policy=scaling_policy_resolve(agent=agent),
            )
            bound = "maximum" if data["direction"] == ScalingEvent.Direction.UP else "minimum"
            return 200, {
                "changed": False,
                "agent_id": agent.pk,
                "direction": data["direction"],
                "instance_count": agent.instance_count,
                "min_instances": low,
                "max_instances": high,
                "reason": f"already at the {bound} of {high if bound == 'maximum' else low} instances",
            }

        return run_mutation(request, action="scaling.manual", agent_id=agent_id, handler=scale)


class ScalingPolicyView(AgentScopedView):
    @extend_schema(responses=ScalingPolicyOut, summary="The scaling policy that governs the agent")
    def get(self, request, agent_id):
        return Response(_effective_policy_out(self.agent()))

    @extend_schema(
        request=ScalingPolicyIn,
        responses={200: ScalingPolicyOut, 201: ScalingPolicyOut},
        summary="Create or change the agent's own scaling policy (operator)",
    )
    @errors(forbidden=403, invalid_policy=LedgerError, policy_conflict=Conflict)
    def put(self, request, agent_id):
        def save(body):
            agent = self.agent()
            _ensure_operator(request, "change a scaling policy")
            policy, created = scaling_policy_set(agent=agent, **valid(ScalingPolicyIn, body))
            # The override as written (source "agent"), even while an experiment's arm governs the agent.
            return (201 if created else 200), ScalingPolicyOut(
                policy, context={"source": PolicySource.AGENT}
            ).data

        return run_mutation(request, action="scaling.policy", agent_id=agent_id, handler=save)

    @extend_schema(
        request=None,
        responses={200: ScalingPolicyOut},
        summary="Drop the agent's own scaling policy: its tier's governs it again (operator)",
    )
    @errors(forbidden=403)
    def delete(self, request, agent_id):
        def drop(body):
            agent = self.agent()
            _ensure_operator(request, "change a scaling policy")
            if not scaling_policy_override_delete(agent=agent):
                raise NotFound(f"agent {agent_id!r} has no scaling policy of its own")
            return 200, _effective_policy_out(agent)

        return run_mutation(request, action="scaling.policy_delete", agent_id=agent_id, handler=drop)


class ScalingEventPagination(CursorPagination):
    ordering = ("-created_at", "-id")
    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 500


class ScalingEventQuery(StrictSerializer):
    cursor = serializers.CharField(required=False, help_text="From the `next` or `previous` link")
    page_size = serializers.IntegerField(
        required=False, min_value=1, max_value=ScalingEventPagination.max_page_size
    )


class ScalingEventListView(AgentScopedView):
    pagination_class = ScalingEventPagination

    @extend_schema(
        parameters=[ScalingEventQuery],
        responses=ScalingEventOut(many=True),
        summary="The agent's scaling events, newest first",
    )
    def get(self, request, agent_id):
        valid(ScalingEventQuery, request.query_params.dict())  # as the other lists: a bad page_size is a 400
        events = ScalingEvent.objects.filter(agent=self.agent())
        paginator = self.pagination_class()
        page = paginator.paginate_queryset(events, request, view=self)
        return paginator.get_paginated_response(ScalingEventOut(page, many=True).data)


urlpatterns = [
    path("v1/agents/<agent_id:agent_id>/scaling", ScaleView.as_view(), name="scaling"),
    path("v1/agents/<agent_id:agent_id>/scaling-policy", ScalingPolicyView.as_view(), name="scaling-policy"),
    path(
        "v1/agents/<agent_id:agent_id>/scaling-events", ScalingEventListView.as_view(), name="scaling-events"
    ),
]

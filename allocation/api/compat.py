"""``/api/resources``: the product description's own endpoint, camelCase like its client code.

It is a thin adapter over the same services, authentication and isolation as v1. Actions that belong to the
optimization app are looked up in ``COMPAT_ACTIONS``, which that app fills in when it is installed; until
then they answer 501 ``not_implemented``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, PolymorphicProxySerializer, extend_schema
from rest_framework import serializers
from rest_framework.response import Response

from allocation import services
from allocation.api.serializers import AmountField, JsonTextSerializer, QuotaOut, ResourceTypeField
from allocation.api.shared.auth import agent_for
from allocation.api.shared.errors import error_body
from allocation.api.shared.mutation import run_mutation
from allocation.api.shared.schema import errors
from allocation.api.shared.views import GridAPIView, valid
from allocation.api.views import cost_payload
from ledger.errors import (
    AgentSuspended,
    AgentThrottled,
    BudgetExceeded,
    Conflict,
    FeatureDisabled,
    LedgerError,
    NotFound,
    QuotaExceeded,
)
from ledger.money import money_round

# action name -> callable(request, agent, body) -> (status, data); filled by the optimization app.
COMPAT_GET_ACTIONS: dict[str, Callable] = {}
COMPAT_POST_ACTIONS: dict[str, Callable] = {}


def _camel(key: str) -> str:
    # Resource type codes (COMPUTE_MS) are data, not field names: keys with capitals stay as they are.
    if key != key.lower() or "_" not in key:
        return key
    head, *rest = key.split("_")
    return head + "".join("USD" if part == "usd" else part.title() for part in rest)


def camelize(value):
    if isinstance(value, dict):
        return {_camel(str(k)): camelize(v) for k, v in value.items()}
    if isinstance(value, list):
        return [camelize(item) for item in value]
    return value


class CompatQuery(serializers.Serializer):
    action = serializers.ChoiceField(choices=["quota", "cost", "metrics", "recommendations"])
    agentId = serializers.CharField(max_length=64)  # noqa: N815 - the product's own parameter name


class CompatPost(JsonTextSerializer):
    action = serializers.ChoiceField(choices=["allocate", "check", "share", "purchase", "optimize"])
    agentId = serializers.CharField(max_length=64)  # noqa: N815
    resourceType = ResourceTypeField(required=False)  # noqa: N815
    amount = AmountField(required=False)
    taskId = serializers.CharField(max_length=200, required=False, allow_blank=True, default="")  # noqa: N815
    targetAgentId = serializers.CharField(max_length=64, required=False)  # noqa: N815
    dealId = serializers.CharField(max_length=64, required=False)  # noqa: N815
    hold = serializers.BooleanField(required=False, default=False)


# What each action needs besides ``agentId`` (``_require``): the request body's variants in the API schema.
REQUIRED_BY_ACTION = {
    "allocate": ("resourceType", "amount"),
    "check": ("resourceType", "amount"),
    "share": ("resourceType", "amount", "targetAgentId"),
    "purchase": ("dealId", "amount"),
    "optimize": (),
}


def _post_variant(action: str) -> type[serializers.Serializer]:
    """``CompatPost`` as the schema of one action: its ``action``, with the fields it requires."""
    fields = {name: copy.deepcopy(field) for name, field in CompatPost._declared_fields.items()}
    fields["action"] = serializers.ChoiceField(choices=[action])
    for name in REQUIRED_BY_ACTION[action]:
        field = fields[name]  # a field is copied by its arguments: required is one of them
        fields[name] = type(field)(*field._args, **{**field._kwargs, "required": True})
    return type(f"Compat{action.title()}In", (serializers.Serializer,), fields)


COMPAT_POST_SCHEMA = PolymorphicProxySerializer(
    component_name="CompatPostIn",
    serializers={action: _post_variant(action) for action in REQUIRED_BY_ACTION},
    resource_type_field_name="action",
)


def _require(data: dict, *names: str) -> None:
    missing = [name for name in names if name not in data]
    if missing:
        raise serializers.ValidationError({name: ["This field is required."] for name in missing})


def _not_implemented(action: str):
    return Response(
        error_body("not_implemented", f"action {action!r} needs the optimization app, which is not enabled"),
        status=501,
    )


class ResourcesView(GridAPIView):
    @extend_schema(
        parameters=[
            OpenApiParameter(
                "action", str, enum=["quota", "cost", "metrics", "recommendations"], required=True
            ),
            OpenApiParameter("agentId", str, required=True),
        ],
        responses=OpenApiTypes.OBJECT,
        summary="The product description's resource endpoint (read)",
    )
    @errors(FeatureDisabled, NotFound)
    def get(self, request):
        query = valid(CompatQuery, request.query_params.dict())
        agent = agent_for(request.user, query["agentId"])
        action = query["action"]
        if action == "quota":
            quotas = QuotaOut(services.agent_quotas(agent=agent), many=True).data
            return Response({"agentId": agent.id, "quotas": camelize(quotas)})
        if action == "cost":
            cost = cost_payload(services.agent_cost(agent=agent))
            return Response(
                {
                    "agentId": agent.id,
                    "periodStart": cost["period_start"],
                    "periodEnd": cost["period_end"],
                    "byResourceType": cost["by_resource_type"],
                    "totalUSD": cost["total_usd"],
                    "monthlyBudgetUSD": cost["monthly_budget_usd"],
                    "budgetUtilizationPercent": cost["budget_utilization_percent"],
                }
            )
        handler = COMPAT_GET_ACTIONS.get(action)
        if handler is None:
            return _not_implemented(action)
        return Response(handler(request, agent))

    @extend_schema(
        parameters=[
            OpenApiParameter(
                "action",
                str,
                enum=["optimize"],
                description="Takes the place of the body's `action`",
            )
        ],
        request=COMPAT_POST_SCHEMA,
        responses={200: OpenApiTypes.OBJECT, 201: OpenApiTypes.OBJECT},
        summary="The product description's resource endpoint (allocate, check, share, purchase, optimize)",
    )
    @errors(
        QuotaExceeded,
        BudgetExceeded,
        AgentThrottled,
        AgentSuspended,
        FeatureDisabled,
        NotFound,
        no_price=Conflict,
        invalid_target=LedgerError,
        deal_not_open=Conflict,
        deal_insufficient=Conflict,
        deal_changed=Conflict,
        own_deal=Conflict,
    )
    def post(self, request):
        action = request.query_params.get("action") or (
            request.data.get("action") if isinstance(request.data, dict) else None
        )
        agent_id = request.data.get("agentId", "") if isinstance(request.data, dict) else ""

        def handle(body):
            data = valid(CompatPost, {**body, "action": action} if action else body)
            agent = agent_for(request.user, data["agentId"])
            name = data["action"]
            if name == "check":
                _require(data, *REQUIRED_BY_ACTION[name])
                result = services.quota_check(
                    agent=agent, resource_type_id=data["resourceType"], amount=data["amount"]
                )
                return 200, result.body()
            if name == "allocate":
                _require(data, *REQUIRED_BY_ACTION[name])
                allocation = services.allocation_create(
                    agent=agent,
                    resource_type_id=data["resourceType"],
                    amount=data["amount"],
                    task_id=data["taskId"],
                    hold=data["hold"],
                    idempotency_key=request.headers.get("Idempotency-Key", ""),
                )
                return 201, {
                    "allocationId": str(allocation.pk),
                    "agentId": agent.id,
                    "resourceType": allocation.resource_type_id,
                    "allocatedAmount": allocation.amount,
                    "costUSD": f"{money_round(allocation.cost_usd):f}",
                    "status": allocation.status,
                    "expiresAt": allocation.expires_at.isoformat() if allocation.expires_at else None,
                }
            if name == "share":
                _require(data, *REQUIRED_BY_ACTION[name])
                result = services.quota_share(
                    source=agent,
                    target_id=data["targetAgentId"],
                    resource_type_id=data["resourceType"],
                    amount=data["amount"],
                    actor=request.user.label,
                )
                return 200, camelize(result)
            handler = COMPAT_POST_ACTIONS.get(name)
            if handler is None:
                raise LedgerError(
                    f"action {name!r} needs the optimization app, which is not enabled",
                    code="not_implemented",
                    status=501,
                )
            return handler(request, agent, data)

        return run_mutation(
            request, action=f"compat.{action or 'unknown'}", agent_id=str(agent_id), handler=handle
        )

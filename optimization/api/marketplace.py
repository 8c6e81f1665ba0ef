"""Marketplace endpoints (``ENABLE_MARKETPLACE_OPTIMIZATION``; agent-listed deals also need
``ENABLE_COLLABORATION_SHARING``). Switched off, they answer 403 ``feature_disabled``.

* ``GET /api/v1/marketplace/deals?resource_type=``: open, unexpired deals, cheapest first (any key).
* ``GET /api/v1/agents/{id}/deals``: the agent's forecast shortfalls and the deals below list price for them.
* ``POST /api/v1/agents/{id}/deals``: list the agent's unused quota of this period for sale.
* ``POST /api/v1/marketplace/deals/{deal_id}/purchase`` ``{"agent_id", "amount"}``: buy, all or nothing; an
  agent's key buys for itself only (another agent id answers 404). The price is charged to the buyer's
  budgets: 429 ``budget_exceeded`` (with the budget's figures and ``Retry-After``) when a hard one lacks room.

Which agent sells a deal is shown to operators only: to an agent's key a seller is ``"agent"`` or
``"platform"``, so the marketplace does not reveal which agents exist. Money is rendered as decimal strings.
"""

from __future__ import annotations

from django.urls import path
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.pagination import CursorPagination
from rest_framework.response import Response

from allocation.api.serializers import AmountField, ResourceTypeField, StrictSerializer
from allocation.api.shared import converters  # noqa: F401  (registers <agent_id:...>)
from allocation.api.shared.auth import agent_for
from allocation.api.shared.mutation import run_mutation
from allocation.api.shared.schema import errors
from allocation.api.shared.views import AgentScopedView, GridAPIView, valid
from ledger.errors import (
    AgentSuspended,
    BudgetExceeded,
    Conflict,
    FeatureDisabled,
    LedgerError,
    QuotaExceeded,
)
from ledger.models import Agent
from optimization.models import Deal, Purchase
from optimization.services.marketplace import deal_list, deal_purchase, deals_for_agent, deals_open

UNIT_PRICE = {"max_digits": 24, "decimal_places": 12}


class DealOut(serializers.ModelSerializer):
    resource_type = serializers.CharField(source="resource_type_id")
    seller = serializers.SerializerMethodField()
    seller_agent_id = serializers.SerializerMethodField()

    class Meta:
        model = Deal
        fields = [
            "id",
            "resource_type",
            "amount_total",
            "amount_left",
            "unit_price_usd",
            "seller",
            "seller_agent_id",
            "status",
            "expires_at",
            "created_at",
        ]

    def get_seller(self, obj: Deal) -> str:
        return "platform" if obj.seller_id is None else "agent"

    def get_seller_agent_id(self, obj: Deal) -> str | None:
        """The selling agent, for an operator or for the seller itself; hidden from every other key."""
        principal = self.context.get("principal")
        if principal is None or obj.seller_id is None:
            return None
        if principal.is_operator or (principal.agent is not None and principal.agent.pk == obj.seller_id):
            return obj.seller_id
        return None


class DealIn(StrictSerializer):
    resource_type = ResourceTypeField()
    amount = AmountField()
    unit_price_usd = serializers.DecimalField(**UNIT_PRICE, min_value=0)
    expires_at = serializers.DateTimeField(
        required=False, help_text="After now and no later than the end of the current period"
    )


class DealQuery(StrictSerializer):
    resource_type = ResourceTypeField(required=False)
    cursor = serializers.CharField(required=False)
    page_size = serializers.IntegerField(required=False, min_value=1, max_value=500)


class PurchaseIn(StrictSerializer):
    agent_id = serializers.CharField(max_length=64)
    amount = AmountField()


class PurchaseOut(serializers.ModelSerializer):
    agent_id = serializers.CharField(source="buyer_id")
    deal_id = serializers.CharField()
    resource_type = serializers.CharField(source="deal.resource_type_id")
    deal_amount_left = serializers.IntegerField(source="deal.amount_left")
    deal_status = serializers.CharField(source="deal.status")

    class Meta:
        model = Purchase
        fields = [
            "id",
            "deal_id",
            "agent_id",
            "resource_type",
            "amount",
            "unit_price_usd",
            "cost_usd",
            "deal_amount_left",
            "deal_status",
            "created_at",
        ]


class DealPagination(CursorPagination):
    ordering = ("unit_price_usd", "created_at", "id")
    page_size = 100
    page_size_query_param = "page_size"
    max_page_size = 500


class AgentDealsOut(serializers.Serializer):
    agent_id = serializers.CharField()
    period_start = serializers.DateTimeField()
    period_end = serializers.DateTimeField()
    shortfalls = serializers.ListField(child=serializers.DictField(), help_text="Forecast shortfalls")
    list_prices = serializers.DictField(
        child=serializers.DecimalField(max_digits=None, decimal_places=None), help_text="By resource type"
    )
    deals = DealOut(many=True)


class DealSearchView(GridAPIView):
    pagination_class = DealPagination

    @extend_schema(parameters=[DealQuery], responses=DealOut(many=True), summary="Open deals, cheapest first")
    @errors(FeatureDisabled)
    def get(self, request):
        query = valid(DealQuery, request.query_params.dict())
        deals = deals_open(resource_type_id=query.get("resource_type"))
        paginator = self.pagination_class()
        page = paginator.paginate_queryset(deals, request, view=self)
        data = DealOut(page, many=True, context={"principal": request.user}).data
        return paginator.get_paginated_response(data)


class AgentDealsView(AgentScopedView):
    @extend_schema(
        responses=AgentDealsOut, summary="Deals below list price for what the agent is forecast to lack"
    )
    @errors(FeatureDisabled)
    def get(self, request, agent_id):
        found = deals_for_agent(agent=self.agent())
        return Response(
            {
                "agent_id": found["agent_id"],
                "period_start": found["period_start"].isoformat(),
                "period_end": found["period_end"].isoformat(),
                "shortfalls": found["shortfalls"],
                "list_prices": {code: f"{price:f}" for code, price in found["list_prices"].items()},
                "deals": DealOut(found["deals"], many=True, context={"principal": request.user}).data,
            }
        )

    @extend_schema(request=DealIn, responses={201: DealOut}, summary="List unused quota for sale")
    @errors(QuotaExceeded, FeatureDisabled, invalid_price=LedgerError, invalid_expiry=LedgerError)
    def post(self, request, agent_id):
        def offer(body):
            data = valid(DealIn, body)
            deal = deal_list(
                agent=self.agent(),
                resource_type_id=data["resource_type"],
                amount=data["amount"],
                unit_price_usd=data["unit_price_usd"],
                expires_at=data.get("expires_at"),
            )
            return 201, DealOut(deal, context={"principal": request.user}).data

        return run_mutation(request, action="deal.list", agent_id=agent_id, handler=offer)


class DealPurchaseView(GridAPIView):
    @extend_schema(request=PurchaseIn, responses={201: PurchaseOut}, summary="Buy units of a deal")
    @errors(
        AgentSuspended,
        BudgetExceeded,
        FeatureDisabled,
        deal_not_open=Conflict,
        deal_insufficient=Conflict,
        deal_changed=Conflict,
        own_deal=Conflict,
    )
    def post(self, request, deal_id):
        agent_id = request.data.get("agent_id", "") if isinstance(request.data, dict) else ""

        def buy(body):
            data = valid(PurchaseIn, body)
            buyer = agent_for(request.user, data["agent_id"])
            purchase = deal_purchase(
                deal_id=deal_id, buyer=buyer, amount=data["amount"], actor=request.user.label
            )
            return 201, PurchaseOut(purchase).data

        return run_mutation(request, action="deal.purchase", agent_id=str(agent_id)[:64], handler=buy)


def compat_purchase(request, agent: Agent, data: dict) -> tuple[int, dict]:
    """``POST /api/resources`` ``{"action": "purchase", "agentId", "dealId", "amount"}``: the same purchase,
    answered camelCase. ``agent`` is already resolved (and isolated) by the compat view."""
    missing = [name for name in ("dealId", "amount") if name not in data]
    if missing:
        raise serializers.ValidationError({name: ["This field is required."] for name in missing})
    purchase = deal_purchase(
        deal_id=data["dealId"], buyer=agent, amount=data["amount"], actor=request.user.label
    )
    return 201, {
        "purchaseId": purchase.pk,
        "dealId": str(purchase.deal_id),
        "agentId": agent.pk,
        "resourceType": purchase.deal.resource_type_id,
        "amount": purchase.amount,
        "costUSD": str(purchase.cost_usd),
    }


urlpatterns = [
    path("v1/marketplace/deals", DealSearchView.as_view(), name="deals"),
    path("v1/marketplace/deals/<uuid:deal_id>/purchase", DealPurchaseView.as_view(), name="deal-purchase"),
    path("v1/agents/<agent_id:agent_id>/deals", AgentDealsView.as_view(), name="agent-deals"),
]

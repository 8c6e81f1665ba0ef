"""REST API v1. Views validate input, call one service and shape the output; the rules live in services."""

from __future__ import annotations

import django_filters
from drf_spectacular.utils import extend_schema
from rest_framework import generics
from rest_framework.pagination import CursorPagination
from rest_framework.response import Response

from allocation import services
from allocation.api.serializers import (
    AgentCreatedOut,
    AgentCreateIn,
    AgentOut,
    AgentPatchIn,
    AllocationIn,
    AllocationOut,
    CostOut,
    LeaseIn,
    QuotaCheckIn,
    QuotaCheckOut,
    QuotaOut,
    ReleaseIn,
    SettleIn,
    ShareIn,
    ShareOut,
    UsageOut,
    UsageQuery,
    allocation_in,
)
from allocation.api.shared.auth import ApiKeyAuthentication, CachedApiKeyAuthentication, IsOperator
from allocation.api.shared.mutation import run_mutation
from allocation.api.shared.schema import errors
from allocation.api.shared.views import AgentScopedView, valid
from allocation.keys import api_key_issue
from allocation.models import Allocation
from allocation.representation import USAGE_COLUMNS, allocation_body, iso_datetime, usage_body
from ledger.budgets import agent_team_set
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
from ledger.models import Agent, UsageLog
from ledger.services import agent_create, agent_update

# --- Agents (operator) ----------------------------------------------------------------------------------


class AgentFilter(django_filters.FilterSet):
    tier = django_filters.CharFilter(field_name="tier_id")
    status = django_filters.ChoiceFilter(choices=Agent.Status.choices)

    class Meta:
        model = Agent
        fields = ["tier", "status"]


class AgentListCreateView(generics.ListAPIView):
    authentication_classes = [ApiKeyAuthentication]
    permission_classes = [IsOperator]
    serializer_class = AgentOut
    queryset = Agent.objects.prefetch_related("limit_overrides").order_by("id")
    filterset_class = AgentFilter

    @extend_schema(
        request=AgentCreateIn, responses={201: AgentCreatedOut}, summary="Create an agent and its first key"
    )
    @errors(agent_exists=Conflict)
    def post(self, request):
        def create(body):
            data = valid(AgentCreateIn, body)
            agent = agent_create(
                agent_id=data["id"],
                tier_code=data["tier"].code,
                name=data["name"],
                monthly_budget_usd=data["monthly_budget_usd"],
                custom_limits=data["custom_limits"],
                metadata=data["metadata"],
            )
            _, raw_key = api_key_issue(agent=agent, name="first key")
            return 201, {**AgentOut(agent).data, "api_key": raw_key}

        agent_id = str(request.data.get("id", "")) if isinstance(request.data, dict) else ""
        return run_mutation(
            request, action="agent.create", agent_id=agent_id, handler=create, secret_fields=("api_key",)
        )


class AgentDetailView(AgentScopedView):
    @extend_schema(responses=AgentOut)
    def get(self, request, agent_id):
        return Response(AgentOut(self.agent()).data)

    @extend_schema(request=AgentPatchIn, responses=AgentOut)
    @errors(forbidden=403, invalid_instances=LedgerError, team_not_found=NotFound)
    def patch(self, request, agent_id):
        def update(body):
            agent = self.agent()
            if not request.user.is_operator:
                raise LedgerError("only an operator can change an agent", code="forbidden", status=403)
            data = valid(AgentPatchIn, body)
            team_changed = "team_id" in data
            team_id = data.pop("team_id", None)
            agent = agent_update(agent=agent, actor=request.user.label, **data)
            if team_changed:
                agent = agent_team_set(agent=agent, team_id=team_id)
            return 200, AgentOut(agent).data

        return run_mutation(request, action="agent.update", agent_id=agent_id, handler=update)


# --- Quotas, checks, allocations ------------------------------------------------------------------------


class QuotaListView(AgentScopedView):
    @extend_schema(responses=QuotaOut(many=True))
    def get(self, request, agent_id):
        return Response(QuotaOut(services.agent_quotas(agent=self.agent()), many=True).data)


class QuotaCheckView(AgentScopedView):
    @extend_schema(request=QuotaCheckIn, responses=QuotaCheckOut)
    def post(self, request, agent_id):
        def check(body):
            data = valid(QuotaCheckIn, body)
            result = services.quota_check(
                agent=self.agent(),
                resource_type_id=data["resource_type"],
                amount=data["amount"],
                run_id=data["run_id"],
            )
            return 200, result.body()

        return run_mutation(request, action="quota.check", agent_id=agent_id, handler=check, audited=False)


class AllocationCreateView(AgentScopedView):
    authentication_classes = [CachedApiKeyAuthentication]

    @extend_schema(request=AllocationIn, responses={201: AllocationOut})
    @errors(
        QuotaExceeded,
        BudgetExceeded,
        AgentThrottled,
        AgentSuspended,
        no_price=Conflict,
        invalid_hold_ttl=LedgerError,
        run_not_found=NotFound,
        run_ended=Conflict,
    )
    def post(self, request, agent_id):
        # The hot path: one statement takes the quota and writes the allocation, its usage row, its audit
        # record and its stored response (one_statement); the agent key is usually known from a few
        # seconds ago (CachedApiKeyAuthentication); the serializers are reused, not rebuilt.
        def allocate(body, frame):
            data = allocation_in.validated(body)
            draft = services.allocation_prepare(
                agent=self.agent(),
                resource_type_id=data["resource_type"],
                amount=data["amount"],
                task_id=data["task_id"],
                hold=data["hold"],
                hold_ttl_seconds=data.get("hold_ttl_seconds"),
                idempotency_key=frame.idempotency_key or "",
                run_id=data["run_id"],
            )
            payload = allocation_body(draft.allocation)
            services.allocation_write(
                draft, api_key_id=frame.api_key_id, record=frame.records(status=201, data=payload)
            )
            return 201, payload

        return run_mutation(
            request, action="allocation.create", agent_id=agent_id, handler=allocate, one_statement=True
        )


class LeaseCreateView(AgentScopedView):
    """A lease: a hold that the client counts down locally (the SDK's ``Grid.lease``) and settles with the
    total it used. Settled and released like any hold; at expiry it is charged in full."""

    @extend_schema(request=LeaseIn, responses={201: AllocationOut})
    @errors(
        QuotaExceeded,
        BudgetExceeded,
        AgentThrottled,
        AgentSuspended,
        no_price=Conflict,
        run_not_found=NotFound,
        run_ended=Conflict,
    )
    def post(self, request, agent_id):
        def lease(body):
            data = valid(LeaseIn, body)
            allocation = services.lease_open(
                agent=self.agent(),
                resource_type_id=data["resource_type"],
                amount=data["amount"],
                ttl_seconds=data.get("ttl_seconds"),
                task_id=data["task_id"],
                run_id=data["run_id"],
                idempotency_key=request.headers.get("Idempotency-Key", ""),
            )
            return 201, allocation_body(allocation)

        return run_mutation(request, action="lease.create", agent_id=agent_id, handler=lease)


class AllocationDetailView(AgentScopedView):
    @extend_schema(responses=AllocationOut)
    def get(self, request, agent_id, allocation_id):
        allocation = Allocation.objects.filter(pk=allocation_id, agent=self.agent()).first()
        if allocation is None:
            raise NotFound(f"allocation {allocation_id} not found")
        return Response(AllocationOut(allocation).data)


class AllocationSettleView(AgentScopedView):
    @extend_schema(request=SettleIn, responses=AllocationOut)
    @errors(QuotaExceeded, BudgetExceeded, hold_not_open=Conflict)
    def post(self, request, agent_id, allocation_id):
        def settle(body):
            data = valid(SettleIn, body)
            allocation = services.hold_settle(
                agent=self.agent(),
                allocation_id=allocation_id,
                amount=data["amount"],
                idempotency_key=request.headers.get("Idempotency-Key", ""),
            )
            return 200, AllocationOut(allocation).data

        return run_mutation(request, action="allocation.settle", agent_id=agent_id, handler=settle)


class AllocationReleaseView(AgentScopedView):
    @extend_schema(request=ReleaseIn, responses=AllocationOut)
    @errors(hold_not_open=Conflict)
    def post(self, request, agent_id, allocation_id):
        def release(body):
            valid(ReleaseIn, body)
            allocation = services.hold_release(agent=self.agent(), allocation_id=allocation_id)
            return 200, AllocationOut(allocation).data

        return run_mutation(request, action="allocation.release", agent_id=agent_id, handler=release)


class ShareCreateView(AgentScopedView):
    @extend_schema(request=ShareIn, responses={201: ShareOut})
    @errors(QuotaExceeded, AgentSuspended, FeatureDisabled, invalid_target=LedgerError)
    def post(self, request, agent_id):
        def share(body):
            data = valid(ShareIn, body)
            result = services.quota_share(
                source=self.agent(),
                target_id=data["target_agent_id"],
                resource_type_id=data["resource_type"],
                amount=data["amount"],
                actor=request.user.label,
            )
            return 201, result

        return run_mutation(request, action="quota.share", agent_id=agent_id, handler=share)


# --- Reading the ledger ---------------------------------------------------------------------------------


class UsagePagination(CursorPagination):
    ordering = ("-created_at", "-id")
    page_size = 100
    page_size_query_param = "page_size"
    max_page_size = 1000


class UsageListView(AgentScopedView):
    pagination_class = UsagePagination

    @extend_schema(parameters=[UsageQuery], responses=UsageOut(many=True))
    def get(self, request, agent_id):
        agent = self.agent()
        query = valid(UsageQuery, request.query_params.dict())
        rows = UsageLog.objects.filter(agent=agent).values(*USAGE_COLUMNS)
        if "resource_type" in query:
            rows = rows.filter(resource_type_id=query["resource_type"])
        if "since" in query:
            rows = rows.filter(created_at__gte=query["since"])
        if "until" in query:
            rows = rows.filter(created_at__lt=query["until"])
        paginator = self.pagination_class()
        page = paginator.paginate_queryset(rows, request, view=self)
        return paginator.get_paginated_response([usage_body(row) for row in page])


class CostView(AgentScopedView):
    @extend_schema(responses=CostOut)
    def get(self, request, agent_id):
        return Response(cost_payload(services.agent_cost(agent=self.agent())))


def cost_payload(cost: dict) -> dict:
    return {
        "agent_id": cost["agent_id"],
        "period_start": iso_datetime(cost["period_start"]),
        "period_end": iso_datetime(cost["period_end"]),
        "by_resource_type": {code: f"{value:f}" for code, value in cost["by_resource_type"].items()},
        "total_usd": f"{cost['total_usd']:f}",
        "monthly_budget_usd": None if cost["monthly_budget_usd"] is None else str(cost["monthly_budget_usd"]),
        "budget_utilization_percent": None
        if cost["budget_utilization_percent"] is None
        else str(cost["budget_utilization_percent"]),
    }

"""Organizations, teams, dollar budgets and runs over the v1 API.

* ``POST|GET /api/v1/organizations``, ``GET /api/v1/organizations/{id}``: operator only.
* ``POST|GET /api/v1/teams``, ``GET /api/v1/teams/{id}``: operator only; a team may belong to one
  organization. An agent joins a team with ``PATCH /api/v1/agents/{id}`` ``{"team_id": ...}``.
* ``POST|GET /api/v1/budgets`` (``?scope=&scope_id=``), ``GET|PATCH|DELETE /api/v1/budgets/{id}``:
  operator only. A budget of an organization, a team or an agent; its scope and window are what it is,
  its limit, mode, rollover and thresholds can change (an agent's ``monthly_budget_usd`` budget is
  ``managed``: its limit changes with that field).
* ``POST /api/v1/agents/{id}/runs``: a run budget; the agent's own key may create one.
* ``GET /api/v1/agents/{id}/budgets``: every budget that applies to the agent now, with its current
  window's figures as they stand now (a window that has ended reads as the next one, rolled over).

The rules are ``ledger.budgets``'s; these views validate, call one service and shape the JSON. Money is
rendered as decimal strings.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import django_filters
from django.db.models import Q
from django.urls import path, register_converter
from django.utils import timezone
from drf_spectacular.utils import extend_schema, extend_schema_field
from rest_framework import generics, serializers
from rest_framework.response import Response

from allocation.api.serializers import DECIMAL_STRING, StrictSerializer
from allocation.api.shared import converters  # noqa: F401  (registers <agent_id:...>)
from allocation.api.shared.auth import ApiKeyAuthentication, IsOperator
from allocation.api.shared.mutation import run_mutation
from allocation.api.shared.schema import errors
from allocation.api.shared.views import AgentScopedView, GridAPIView, valid
from ledger.budgets import (
    EDITABLE_FIELDS,
    MAX_RUN_ID_LENGTH,
    MAX_RUN_TTL_SECONDS,
    THRESHOLD_MAX,
    THRESHOLD_MIN,
    budget_create,
    budget_delete,
    budget_figures,
    budget_update,
    budgets_applying,
    organization_create,
    run_create,
    team_create,
)
from ledger.errors import Conflict, LedgerError, NotFound
from ledger.models import AGENT_ID_PATTERN, Budget, Organization, Team, agent_id_validator
from ledger.money import money_text

MAX_BIGINT = 2**63 - 1


class ScopeIdConverter:
    """An organization's or a team's id in a path: the agent id's syntax, so a segment that cannot be one
    (a NUL byte, 65 characters) is no route and never reaches a query. Not ``AgentIdConverter``: these
    paths do not name an agent."""

    regex = AGENT_ID_PATTERN

    def to_python(self, value: str) -> str:
        return value

    def to_url(self, value: str) -> str:
        return value


register_converter(ScopeIdConverter, "scope_id")


# --- Input ------------------------------------------------------------------------------------------------

# What a budget's limit may be (``ledger.budgets.limit_validate``): 0 to under 10^14 dollars, 6 places.
LIMIT_USD = {"max_digits": 20, "decimal_places": 6, "min_value": Decimal("0")}
ID_FIELD = {"max_length": 64, "validators": [agent_id_validator]}
SCOPES = [Budget.Scope.ORGANIZATION, Budget.Scope.TEAM, Budget.Scope.AGENT]
WINDOWS = [Budget.Window.DAY, Budget.Window.WEEK, Budget.Window.MONTH]


@extend_schema_field({"type": "integer", "minimum": THRESHOLD_MIN, "maximum": THRESHOLD_MAX})
class BudgetThresholdField(serializers.Field):
    default_error_messages = {"invalid": f"must be a JSON integer from {THRESHOLD_MIN} to {THRESHOLD_MAX}"}

    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, int) or not THRESHOLD_MIN <= data <= THRESHOLD_MAX:
            self.fail("invalid")
        return data

    def to_representation(self, value):
        return value


def thresholds_field(**kwargs) -> serializers.ListField:
    return serializers.ListField(
        child=BudgetThresholdField(),
        max_length=20,
        help_text="Percentages of the limit at which an alert is raised, once per window; [] for none",
        **kwargs,
    )


class OrganizationIn(StrictSerializer):
    id = serializers.CharField(**ID_FIELD)
    name = serializers.CharField(max_length=200, required=False, allow_blank=True, default="")


class TeamIn(StrictSerializer):
    id = serializers.CharField(**ID_FIELD)
    name = serializers.CharField(max_length=200, required=False, allow_blank=True, default="")
    organization_id = serializers.CharField(max_length=64, required=False, allow_null=True, default=None)


class BudgetIn(StrictSerializer):
    scope = serializers.ChoiceField(
        choices=SCOPES, help_text="A run's budget is created with POST /api/v1/agents/{id}/runs"
    )
    scope_id = serializers.CharField(max_length=64, help_text="The organization's, team's or agent's id")
    window = serializers.ChoiceField(
        choices=WINDOWS, help_text="day (UTC), week (from Monday 00:00 UTC) or month (calendar, UTC)"
    )
    limit_usd = serializers.DecimalField(**LIMIT_USD)
    mode = serializers.ChoiceField(
        choices=Budget.Mode.choices, required=False, default=Budget.Mode.HARD, help_text="hard refuses"
    )
    rollover_percent = serializers.IntegerField(
        min_value=0,
        max_value=100,
        required=False,
        default=0,
        help_text="Share of the limit the unused part of a window may add to the next one",
    )
    thresholds = thresholds_field(required=False)


class BudgetPatchIn(StrictSerializer):
    limit_usd = serializers.DecimalField(**LIMIT_USD, required=False)
    mode = serializers.ChoiceField(choices=Budget.Mode.choices, required=False)
    rollover_percent = serializers.IntegerField(min_value=0, max_value=100, required=False)
    thresholds = thresholds_field(required=False)


class RunIn(StrictSerializer):
    run_id = serializers.CharField(max_length=MAX_RUN_ID_LENGTH, help_text="The caller's name for the run")
    limit_usd = serializers.DecimalField(**LIMIT_USD, help_text="What the whole run may spend")
    ttl_seconds = serializers.IntegerField(
        min_value=1,
        max_value=MAX_RUN_TTL_SECONDS,
        required=False,
        allow_null=True,
        default=None,
        help_text="The run ends this long after it is created (a day unless given)",
    )


# --- Output -----------------------------------------------------------------------------------------------


class OrganizationOut(serializers.ModelSerializer):
    class Meta:
        model = Organization
        fields = ["id", "name"]


class TeamOut(serializers.ModelSerializer):
    organization_id = serializers.CharField(allow_null=True)

    class Meta:
        model = Team
        fields = ["id", "name", "organization_id"]


class BudgetOut(serializers.Serializer):
    """A budget and its current window's figures at the moment of the answer (``budget_body``)."""

    id = serializers.IntegerField()
    scope = serializers.ChoiceField(choices=Budget.Scope.choices)
    scope_id = serializers.CharField(help_text="The organization's, team's or agent's id; a run's run_id")
    agent_id = serializers.CharField(allow_null=True, help_text="An agent's or a run's budget: the agent")
    run_id = serializers.CharField(allow_null=True, help_text="A run's budget: the run")
    window = serializers.ChoiceField(choices=Budget.Window.choices)
    window_start = serializers.DateTimeField()
    window_end = serializers.DateTimeField(allow_null=True, help_text="null for a run's total window")
    limit_usd = serializers.DecimalField(**DECIMAL_STRING)
    spent_usd = serializers.DecimalField(**DECIMAL_STRING)
    reserved_usd = serializers.DecimalField(**DECIMAL_STRING, help_text="Quoted cost of open holds")
    rollover_usd = serializers.DecimalField(**DECIMAL_STRING, help_text="Carried from the last window")
    remaining_usd = serializers.DecimalField(
        **DECIMAL_STRING,
        help_text="What is left: limit and rollover, less spent and reserved (negative after a limit cut)",
    )
    mode = serializers.ChoiceField(choices=Budget.Mode.choices)
    rollover_percent = serializers.IntegerField()
    thresholds = serializers.ListField(child=serializers.IntegerField())
    managed = serializers.BooleanField(help_text="The agent's monthly_budget_usd: its limit changes there")
    expires_at = serializers.DateTimeField(allow_null=True, help_text="A run's end")


def _time(value: dt.datetime | None) -> str | None:
    return None if value is None else value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def budget_body(budget: Budget, *, now: dt.datetime | None = None) -> dict:
    """``BudgetOut`` of ``budget``: its figures as ``budget_figures`` reads them at ``now`` (rolled, if
    its window has ended since it was last charged)."""
    figures = budget_figures(budget, now=now)
    is_run = budget.scope == Budget.Scope.RUN
    return {
        "id": budget.pk,
        "scope": budget.scope,
        "scope_id": budget.scope_id,
        "agent_id": budget.agent_id,
        "run_id": budget.run_id if is_run else None,
        "window": budget.window,
        "window_start": _time(figures.window_start),
        "window_end": _time(figures.window_end),
        "limit_usd": money_text(budget.limit_usd),
        "spent_usd": money_text(figures.spent_usd),
        "reserved_usd": money_text(figures.reserved_usd),
        "rollover_usd": money_text(figures.rollover_usd),
        "remaining_usd": money_text(figures.remaining_usd),
        "mode": budget.mode,
        "rollover_percent": budget.rollover_percent,
        "thresholds": list(budget.thresholds),
        "managed": budget.managed,
        "expires_at": _time(budget.expires_at),
    }


# --- Organizations and teams ------------------------------------------------------------------------------


class OperatorListView(generics.ListAPIView):
    """An operator's list, in pages of 50 (``?page=``) as the agents' list."""

    authentication_classes = [ApiKeyAuthentication]
    permission_classes = [IsOperator]


class OperatorView(GridAPIView):
    permission_classes = [IsOperator]


class OrganizationListCreateView(OperatorListView):
    serializer_class = OrganizationOut
    queryset = Organization.objects.order_by("id")

    @extend_schema(request=OrganizationIn, responses={201: OrganizationOut}, summary="Create an organization")
    @errors(already_exists=Conflict, invalid_id=LedgerError)
    def post(self, request):
        def create(body):
            data = valid(OrganizationIn, body)
            organization = organization_create(id=data["id"], name=data["name"])
            return 201, OrganizationOut(organization).data

        return run_mutation(request, action="organization.create", agent_id="", handler=create)


class OrganizationDetailView(OperatorView):
    @extend_schema(responses=OrganizationOut, summary="An organization")
    def get(self, request, organization_id):
        organization = Organization.objects.filter(pk=organization_id).first()
        if organization is None:
            raise NotFound(f"organization {organization_id!r} not found", code="not_found")
        return Response(OrganizationOut(organization).data)


class TeamFilter(django_filters.FilterSet):
    organization_id = django_filters.CharFilter(field_name="organization_id")

    class Meta:
        model = Team
        fields = ["organization_id"]


class TeamListCreateView(OperatorListView):
    serializer_class = TeamOut
    queryset = Team.objects.order_by("id")
    filterset_class = TeamFilter

    @extend_schema(request=TeamIn, responses={201: TeamOut}, summary="Create a team")
    @errors(already_exists=Conflict, invalid_id=LedgerError, organization_not_found=NotFound)
    def post(self, request):
        def create(body):
            data = valid(TeamIn, body)
            team = team_create(id=data["id"], name=data["name"], organization_id=data["organization_id"])
            return 201, TeamOut(team).data

        return run_mutation(request, action="team.create", agent_id="", handler=create)


class TeamDetailView(OperatorView):
    @extend_schema(responses=TeamOut, summary="A team")
    def get(self, request, team_id):
        team = Team.objects.filter(pk=team_id).first()
        if team is None:
            raise NotFound(f"team {team_id!r} not found", code="not_found")
        return Response(TeamOut(team).data)


# --- Budgets ----------------------------------------------------------------------------------------------


class BudgetFilter(django_filters.FilterSet):
    scope = django_filters.ChoiceFilter(choices=Budget.Scope.choices)
    scope_id = django_filters.CharFilter(
        method="scope_id_filter", label="The organization's, team's or agent's id, or a run's run_id"
    )

    class Meta:
        model = Budget
        fields = ["scope", "scope_id"]

    def scope_id_filter(self, queryset, name, value):
        # Without ``scope`` an id names whatever has it: an organization, a team and an agent may share one.
        return queryset.filter(
            Q(scope=Budget.Scope.ORGANIZATION, organization_id=value)
            | Q(scope=Budget.Scope.TEAM, team_id=value)
            | Q(scope=Budget.Scope.AGENT, agent_id=value)
            | Q(scope=Budget.Scope.RUN, run_id=value)
        )


def _budget(budget_id: int) -> Budget:
    budget = Budget.objects.filter(pk=budget_id).first() if budget_id <= MAX_BIGINT else None
    if budget is None:
        raise NotFound(f"budget {budget_id} not found")
    return budget


class BudgetListCreateView(OperatorListView):
    serializer_class = BudgetOut
    queryset = Budget.objects.order_by("id")
    filterset_class = BudgetFilter

    def list(self, request, *args, **kwargs):
        now = timezone.now()
        page = self.paginate_queryset(self.filter_queryset(self.get_queryset()))
        return self.get_paginated_response([budget_body(budget, now=now) for budget in page])

    @extend_schema(request=BudgetIn, responses={201: BudgetOut}, summary="Create a budget")
    @errors(
        organization_not_found=NotFound,
        team_not_found=NotFound,
        agent_not_found=NotFound,
        invalid_scope=LedgerError,
        invalid_limit=LedgerError,
    )
    def post(self, request):
        def create(body):
            data = valid(BudgetIn, body)
            budget = budget_create(
                scope=data["scope"],
                scope_id=data["scope_id"],
                window=data["window"],
                limit_usd=data["limit_usd"],
                mode=data["mode"],
                rollover_percent=data["rollover_percent"],
                thresholds=data.get("thresholds"),
            )
            return 201, budget_body(budget)

        return run_mutation(request, action="budget.create", agent_id="", handler=create)


class BudgetDetailView(OperatorView):
    @extend_schema(responses=BudgetOut, summary="A budget and its current window")
    def get(self, request, budget_id):
        return Response(budget_body(_budget(budget_id)))

    @extend_schema(
        request=BudgetPatchIn,
        responses=BudgetOut,
        summary="Change a budget's limit, mode, rollover or thresholds",
    )
    @errors(immutable_field=LedgerError, managed_budget=Conflict, invalid_limit=LedgerError)
    def patch(self, request, budget_id):
        def update(body):
            budget = _budget(budget_id)
            # A field of the budget that cannot change is named as such, not as an unknown field.
            fixed = {name: body[name] for name in body if name in BudgetOut._declared_fields}
            fixed = {name: value for name, value in fixed.items() if name not in EDITABLE_FIELDS}
            if fixed:
                budget_update(budget=budget, changes=fixed)
            data = valid(BudgetPatchIn, body)
            budget = budget_update(budget=budget, changes=dict(data))
            return 200, budget_body(budget)

        return run_mutation(request, action="budget.update", agent_id="", handler=update)

    @extend_schema(responses={204: None}, summary="Delete a budget")
    @errors(managed_budget=Conflict)
    def delete(self, request, budget_id):
        def delete(body):
            budget_delete(budget=_budget(budget_id))
            return 204, None

        return run_mutation(request, action="budget.delete", agent_id="", handler=delete)


# --- An agent's runs and budgets ----------------------------------------------------------------------------


class RunCreateView(AgentScopedView):
    @extend_schema(
        request=RunIn,
        responses={201: BudgetOut},
        summary="Start a run: a budget for the calls that name it (the agent's own key may)",
    )
    @errors(already_exists=Conflict, invalid_run_id=LedgerError, invalid_limit=LedgerError)
    def post(self, request, agent_id):
        def create(body):
            data = valid(RunIn, body)
            budget = run_create(
                agent=self.agent(),
                run_id=data["run_id"],
                limit_usd=data["limit_usd"],
                ttl_seconds=data["ttl_seconds"],
            )
            return 201, budget_body(budget)

        return run_mutation(request, action="run.create", agent_id=agent_id, handler=create)


class AgentBudgetsView(AgentScopedView):
    @extend_schema(
        responses=BudgetOut(many=True),
        summary="Every budget that applies to the agent now: its own, its team's, its organization's, its "
        "runs'",
    )
    def get(self, request, agent_id):
        now = timezone.now()
        budgets = budgets_applying(agent=self.agent(), now=now)
        return Response([budget_body(budget, now=now) for budget in budgets])


urlpatterns = [
    path("v1/agents/<agent_id:agent_id>/runs", RunCreateView.as_view(), name="agent-runs"),
    path("v1/agents/<agent_id:agent_id>/budgets", AgentBudgetsView.as_view(), name="agent-budgets"),
    path("v1/organizations", OrganizationListCreateView.as_view(), name="organizations"),
    path(
        "v1/organizations/<scope_id:organization_id>",
        OrganizationDetailView.as_view(),
        name="organization",
    ),
    path("v1/teams", TeamListCreateView.as_view(), name="teams"),
    path("v1/teams/<scope_id:team_id>", TeamDetailView.as_view(), name="team"),
    path("v1/budgets", BudgetListCreateView.as_view(), name="budgets"),
    path("v1/budgets/<int:budget_id>", BudgetDetailView.as_view(), name="budget"),
]

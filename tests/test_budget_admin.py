"""Organizations, teams and budgets in the back office: the pages show each budget's current window as of
now, every write goes through ``ledger.budgets`` (so a new budget counts what its scope has spent), bad
input comes back as a form error with nothing written, and the counters are never editable."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
from django.db import connection
from django.db.models import Sum
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from allocation.services import allocation_create
from ledger import budgets
from ledger.models import Agent, Budget, Organization, Quota, Team, UsageLog
from ledger.periods import month_bounds, window_bounds
from tests.factories import AgentFactory, OrganizationFactory, TeamFactory

pytestmark = pytest.mark.django_db


def _url(model, view: str, *args) -> str:
    return reverse(f"admin:ledger_{model._meta.model_name}_{view}", args=args)


@pytest.fixture
def team(reference_data) -> Team:
    return TeamFactory(id="team-search", organization=OrganizationFactory(id="org-acme"))


@pytest.fixture
def spending_agent(team) -> Agent:
    """An agent of the team that has spent something this month and today."""
    agent = AgentFactory(id="agent-spender", team=team)
    allocation_create(agent=agent, resource_type_id="AI_TOKENS", amount=50_000)
    allocation_create(agent=agent, resource_type_id="COMPUTE_MS", amount=20_000)
    return agent


def _budget_form(**fields) -> dict:
    data = {
        "scope": "team",
        "scope_id": "team-search",
        "window": "month",
        "limit_usd": "10",
        "mode": "hard",
        "rollover_percent": "0",
        "thresholds": "50, 80, 100",
    }
    data.update(fields)
    return data


# --- Pages ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", [Organization, Team, Budget], ids=lambda model: model.__name__)
def test_changelist_add_and_change_pages_render(model, spending_agent, admin_client_logged_in):
    budgets.budget_create(scope="team", scope_id="team-search", window="day", limit_usd="5")
    obj = model.objects.order_by("pk").first()
    assert admin_client_logged_in.get(_url(model, "changelist")).status_code == 200
    assert admin_client_logged_in.get(_url(model, "add")).status_code == 200
    assert admin_client_logged_in.get(_url(model, "change", obj.pk)).status_code == 200


def test_organization_and_team_lists_count_their_teams_agents_and_budgets(
    spending_agent, admin_client_logged_in
):
    TeamFactory(id="team-ads", organization=Organization.objects.get(pk="org-acme"))
    AgentFactory(id="agent-second", team=spending_agent.team)
    budgets.budget_create(scope="organization", scope_id="org-acme", window="month", limit_usd="100")

    organizations = admin_client_logged_in.get(_url(Organization, "changelist"))
    row = organizations.context["cl"].result_list.get(pk="org-acme")
    assert (row.team_count, row.budget_count) == (2, 1)

    teams = admin_client_logged_in.get(_url(Team, "changelist"))
    counts = {team.pk: team.agent_count for team in teams.context["cl"].result_list}
    assert counts == {"team-ads": 0, "team-search": 2}
    assert "org-acme" in teams.content.decode()

    # The counts link to the lists they count.
    members = admin_client_logged_in.get(_url(Agent, "changelist"), {"team__id__exact": "team-search"})
    assert {agent.pk for agent in members.context["cl"].result_list} == {"agent-spender", "agent-second"}
    org_budgets = admin_client_logged_in.get(
        _url(Budget, "changelist"), {"organization__id__exact": "org-acme"}
    )
    assert [budget.scope for budget in org_budgets.context["cl"].result_list] == ["organization"]
    org_teams = admin_client_logged_in.get(_url(Team, "changelist"), {"organization__id__exact": "org-acme"})
    assert org_teams.context["cl"].result_count == 2


def test_budget_list_shows_the_current_window_with_an_ended_one_rolled_over(team, admin_client_logged_in):
    budget = budgets.budget_create(
        scope="team", scope_id="team-search", window="day", limit_usd="10", rollover_percent=50
    )
    # Yesterday's window, $3 spent of $10: today opens with half the limit carried at most, $5.
    yesterday = timezone.now() - dt.timedelta(days=1)
    start, end = window_bounds("day", yesterday)
    Budget.objects.filter(pk=budget.pk).update(window_start=start, window_end=end, spent_usd=Decimal("3"))

    page = admin_client_logged_in.get(_url(Budget, "changelist"))
    row = page.context["cl"].result_list.get(pk=budget.pk)
    admin = page.context["cl"].model_admin
    today_start, today_end = window_bounds("day", timezone.now())
    assert admin.current_window_start(row) == f"{today_start:%Y-%m-%d %H:%M}"
    assert admin.current_window_end(row) == f"{today_end:%Y-%m-%d %H:%M}"
    assert (admin.spent(row), admin.rollover(row), admin.remaining(row)) == ("$0.00", "$5.00", "$15.00")
    # Money as money: not the twelve stored decimals.
    assert "$15.00" in page.content.decode() and "15.000000000000" not in page.content.decode()


def test_budget_list_filters_and_searches_by_scope_id_and_run(spending_agent, admin_client_logged_in):
    team_budget = budgets.budget_create(scope="team", scope_id="team-search", window="week", limit_usd="5")
    run = budgets.run_create(agent=spending_agent, run_id="nightly-loop", limit_usd="1")
    url = _url(Budget, "changelist")

    def shown(**query) -> set[int]:
        response = admin_client_logged_in.get(url, query)
        assert response.status_code == 200
        return {budget.pk for budget in response.context["cl"].result_list}

    assert shown(q="team-search") == {team_budget.pk}
    assert shown(q="nightly") == {run.pk}
    assert shown(scope__exact="run") == {run.pk}
    assert shown(window__exact="week", mode__exact="hard") == {team_budget.pk}


def test_budget_changelist_makes_no_query_per_row(team, admin_client_logged_in):
    budgets.budget_create(scope="team", scope_id="team-search", window="day", limit_usd="1")
    with CaptureQueriesContext(connection) as one_row:
        assert admin_client_logged_in.get(_url(Budget, "changelist")).status_code == 200
    for window in ("week", "month"):
        budgets.budget_create(scope="team", scope_id="team-search", window=window, limit_usd="1")
    budgets.budget_create(scope="organization", scope_id="org-acme", window="day", limit_usd="1")
    with CaptureQueriesContext(connection) as four_rows:
        assert admin_client_logged_in.get(_url(Budget, "changelist")).status_code == 200
    assert len(four_rows) == len(one_row)


# --- Creating budgets goes through the service ------------------------------------------------------------


def test_budget_added_in_the_admin_counts_what_the_team_spent_this_window(
    spending_agent, admin_client_logged_in
):
    month_spent = Quota.objects.filter(
        agent__team_id="team-search", period_start=month_bounds(timezone.now())[0]
    ).aggregate(total=Sum("spent_usd"))["total"]
    day_start, _ = window_bounds("day", timezone.now())
    day_spent = UsageLog.objects.filter(agent__team_id="team-search", created_at__gte=day_start).aggregate(
        total=Sum("cost_usd")
    )["total"]
    assert month_spent > 0 and day_spent > 0

    for window in ("month", "day"):
        response = admin_client_logged_in.post(_url(Budget, "add"), _budget_form(window=window))
        assert response.status_code == 302, response.content.decode()[:2000]

    month, day = Budget.objects.filter(scope="team").order_by("pk")
    assert (month.window, month.spent_usd, month.limit_usd, month.thresholds) == (
        "month",
        month_spent,
        Decimal("10"),
        [50, 80, 100],
    )
    assert (day.window, day.spent_usd, day.window_start) == ("day", day_spent, day_start)
    assert month.team_id == "team-search" and not month.managed


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"scope_id": "team-nobody"}, "scope_id", "team 'team-nobody' not found"),
        ({"scope": "organization", "scope_id": "team-search"}, "scope_id", "not found"),
        ({"limit_usd": "-1"}, "limit_usd", ""),
        ({"limit_usd": "1.1234567"}, "limit_usd", ""),
        ({"limit_usd": "1000000000000000"}, "limit_usd", ""),
        ({"rollover_percent": "150"}, "rollover_percent", "100"),
        ({"thresholds": "50, eighty"}, "thresholds", "Whole percentages"),
        ({"thresholds": "0, 50"}, "thresholds", "from 1 to 1000"),
        ({"window": "total"}, "window", ""),
        ({"scope": "run"}, "scope", ""),
        ({"mode": "loud"}, "mode", ""),
    ],
)
def test_budget_with_bad_input_is_refused_by_the_form_and_nothing_is_written(
    fields, field, message, team, admin_client_logged_in
):
    response = admin_client_logged_in.post(_url(Budget, "add"), _budget_form(**fields))
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert field in errors, errors
    assert message in " ".join(errors[field])
    assert not Budget.objects.exists()


def test_budget_change_goes_through_the_service_and_never_touches_the_counters(
    spending_agent, admin_client_logged_in
):
    budget = budgets.budget_create(scope="agent", scope_id=spending_agent.pk, window="week", limit_usd="5")
    counters = (budget.spent_usd, budget.reserved_usd, budget.rollover_usd, budget.window_start)
    page = admin_client_logged_in.get(_url(Budget, "change", budget.pk)).content.decode()
    for counter in ("spent_usd", "reserved_usd", "rollover_usd", "window_start", "scope", "window"):
        assert f'name="{counter}"' not in page
    assert 'value="50, 80, 90, 100"' in page

    response = admin_client_logged_in.post(
        _url(Budget, "change", budget.pk),
        {
            "limit_usd": "7.50",
            "mode": "soft",
            "rollover_percent": "25",
            "thresholds": "90",
            # Not fields of the form: ignored.
            "spent_usd": "0",
            "reserved_usd": "0",
            "window": "day",
            "scope": "organization",
        },
    )
    assert response.status_code == 302
    budget.refresh_from_db()
    assert (budget.limit_usd, budget.mode, budget.rollover_percent, budget.thresholds) == (
        Decimal("7.5"),
        "soft",
        25,
        [90],
    )
    assert (budget.scope, budget.window) == ("agent", "week")
    assert (budget.spent_usd, budget.reserved_usd, budget.rollover_usd, budget.window_start) == counters


def test_budget_change_with_a_bad_value_shows_the_error_and_changes_nothing(team, admin_client_logged_in):
    budget = budgets.budget_create(scope="team", scope_id="team-search", window="month", limit_usd="5")
    response = admin_client_logged_in.post(
        _url(Budget, "change", budget.pk),
        {"limit_usd": "6", "mode": "hard", "rollover_percent": "101", "thresholds": "50"},
    )
    assert response.status_code == 200
    assert "rollover_percent" in response.context["adminform"].form.errors
    budget.refresh_from_db()
    assert (budget.limit_usd, budget.rollover_percent, budget.thresholds) == (
        Decimal("5"),
        0,
        [50, 80, 90, 100],
    )


def test_the_agents_monthly_budget_is_changed_on_the_agent_not_here(team, admin_client_logged_in):
    agent = AgentFactory(id="agent-monthly", monthly_budget_usd=Decimal("12.00"))
    managed = Budget.objects.get(agent=agent, managed=True)

    page = admin_client_logged_in.get(_url(Budget, "change", managed.pk)).content.decode()
    assert 'name="limit_usd"' not in page
    assert "change the agent" in page and "monthly budget (monthly_budget_usd)" in page

    response = admin_client_logged_in.post(
        _url(Budget, "change", managed.pk),
        {"limit_usd": "999", "mode": "hard", "rollover_percent": "0", "thresholds": "80"},
    )
    assert response.status_code == 302
    managed.refresh_from_db()
    assert (managed.limit_usd, managed.thresholds) == (Decimal("12"), [80])

    assert admin_client_logged_in.post(_url(Budget, "delete", managed.pk), {"post": "yes"}).status_code == 403
    response = admin_client_logged_in.post(
        _url(Budget, "changelist"),
        {"action": "delete_selected", "_selected_action": [managed.pk], "post": "yes"},
        follow=True,
    )
    assert Budget.objects.filter(pk=managed.pk).exists()


def test_a_budget_is_deleted_through_the_service(team, admin_client_logged_in):
    budget = budgets.budget_create(scope="team", scope_id="team-search", window="month", limit_usd="5")
    response = admin_client_logged_in.post(_url(Budget, "delete", budget.pk), {"post": "yes"})
    assert response.status_code == 302
    assert not Budget.objects.filter(pk=budget.pk).exists()


# --- Organizations, teams and the agent's team ------------------------------------------------------------


def test_organization_and_team_added_in_the_admin(reference_data, admin_client_logged_in):
    response = admin_client_logged_in.post(_url(Organization, "add"), {"id": "org-new", "name": "New"})
    assert response.status_code == 302
    response = admin_client_logged_in.post(
        _url(Team, "add"), {"id": "team-new", "name": "Newcomers", "organization": "org-new"}
    )
    assert response.status_code == 302
    assert Team.objects.get(pk="team-new").organization_id == "org-new"


@pytest.mark.parametrize("org_id", ["org-acme", "bad id!", ""])
def test_organization_with_a_taken_or_bad_id_is_a_form_error(org_id, team, admin_client_logged_in):
    response = admin_client_logged_in.post(_url(Organization, "add"), {"id": org_id, "name": "Again"})
    assert response.status_code == 200
    assert "id" in response.context["adminform"].form.errors
    assert list(Organization.objects.values_list("pk", "name")) == [("org-acme", "Organization org-acme")]


def test_team_moved_to_another_organization(team, admin_client_logged_in):
    OrganizationFactory(id="org-other")
    response = admin_client_logged_in.post(
        _url(Team, "change", team.pk), {"name": "Search", "organization": "org-other"}
    )
    assert response.status_code == 302
    team.refresh_from_db()
    assert (team.name, team.organization_id) == ("Search", "org-other")


def _agent_form(**fields) -> dict:
    data = {
        "limit_overrides-TOTAL_FORMS": "0",
        "limit_overrides-INITIAL_FORMS": "0",
        "limit_overrides-MIN_NUM_FORMS": "0",
        "limit_overrides-MAX_NUM_FORMS": "1000",
        "metadata": "{}",
        "initial-metadata": "{}",
    }
    data.update(fields)
    return data


def test_agent_team_is_set_in_the_admin_and_shown_with_its_budgets(team, admin_client_logged_in):
    budget = budgets.budget_create(scope="team", scope_id="team-search", window="day", limit_usd="3")
    response = admin_client_logged_in.post(
        _url(Agent, "add"), _agent_form(id="agent-joined", name="J", tier="PRO", team="team-search")
    )
    assert response.status_code == 302
    agent = Agent.objects.get(pk="agent-joined")
    assert agent.team_id == "team-search"

    page = admin_client_logged_in.get(_url(Agent, "change", agent.pk)).content.decode()
    assert reverse("admin:ledger_budget_change", args=[budget.pk]) in page
    assert "<td>$3.00</td>" in page  # its team's budget, all of it remaining
    listing = admin_client_logged_in.get(_url(Agent, "changelist"), {"q": "team-search"})
    assert [row.pk for row in listing.context["cl"].result_list] == ["agent-joined"]

    response = admin_client_logged_in.post(
        _url(Agent, "change", agent.pk),
        _agent_form(name="J", team="", monthly_budget_usd="", min_instances=1, max_instances=10),
    )
    assert response.status_code == 302
    agent.refresh_from_db()
    assert agent.team_id is None

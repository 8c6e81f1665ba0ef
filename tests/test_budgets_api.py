"""The budgets over HTTP: organizations, teams, budgets, runs and an agent's budgets, who may call them, the
bad input they refuse, and the 429 ``budget_exceeded`` refusals of allocations, checks and executions (the
rules themselves are tested at the service layer in test_budgets.py)."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
from django.urls import reverse
from django.utils import timezone

from allocation.models import Allocation, AuditRecord
from ledger.budgets import budget_create, run_create
from ledger.models import Agent, Budget, Quota, UsageLog
from optimization.models import Execution
from tests.factories import OrganizationFactory, TeamFactory

pytest.register_assert_rewrite("tests.api_fixtures")

from tests.api_fixtures import assert_error, ledger_snapshot  # noqa: E402

pytest_plugins = ["tests.api_fixtures"]

pytestmark = pytest.mark.django_db

# COMPUTE_MS lists at $0.00001 a millisecond: 1,000 ms cost exactly one cent.
CENT_MS = 1_000
BUDGET_FIELDS = {
    "id",
    "scope",
    "scope_id",
    "agent_id",
    "run_id",
    "window",
    "window_start",
    "window_end",
    "limit_usd",
    "spent_usd",
    "reserved_usd",
    "rollover_usd",
    "remaining_usd",
    "mode",
    "rollover_percent",
    "thresholds",
    "managed",
    "expires_at",
}


def _post(client, url: str, body: dict, **extra):
    return client.post(url, body, format="json", **extra)


def _patch(client, url: str, body: dict):
    return client.patch(url, body, format="json")


def _allocate(keyed, cents: int = 1, **extra):
    body = {"resource_type": "COMPUTE_MS", "amount": cents * CENT_MS, **extra}
    return _post(keyed.client, reverse("api:allocations", args=[keyed.id]), body)


def _budgets_snapshot() -> list:
    return sorted(Budget.objects.values_list("id", "limit_usd", "spent_usd", "reserved_usd", "mode"))


@pytest.fixture
def team(reference_data):
    organization = OrganizationFactory(id="acme")
    return TeamFactory(id="research", organization=organization)


# --- Organizations and teams ------------------------------------------------------------------------------


def test_an_operator_creates_and_lists_organizations_and_teams(operator_client):
    created = _post(operator_client, reverse("api:organizations"), {"id": "acme", "name": "Acme"})
    assert created.status_code == 201, created.content
    assert created.json() == {"id": "acme", "name": "Acme"}

    team = _post(
        operator_client, reverse("api:teams"), {"id": "research", "name": "R", "organization_id": "acme"}
    )
    assert team.status_code == 201, team.content
    assert team.json() == {"id": "research", "name": "R", "organization_id": "acme"}
    loose = _post(operator_client, reverse("api:teams"), {"id": "loose"})
    assert loose.json() == {"id": "loose", "name": "", "organization_id": None}

    organizations = operator_client.get(reverse("api:organizations")).json()
    assert organizations["results"] == [{"id": "acme", "name": "Acme"}]
    teams = operator_client.get(reverse("api:teams")).json()["results"]
    assert [row["id"] for row in teams] == ["loose", "research"]
    in_acme = operator_client.get(reverse("api:teams"), {"organization_id": "acme"}).json()["results"]
    assert [row["id"] for row in in_acme] == ["research"]
    assert operator_client.get(reverse("api:organization", args=["acme"])).json()["name"] == "Acme"
    assert operator_client.get(reverse("api:team", args=["research"])).json()["organization_id"] == "acme"
    assert AuditRecord.objects.filter(action="organization.create", outcome="ok").count() == 1


def test_organization_and_team_bad_input_is_refused(operator_client, team):
    assert_error(_post(operator_client, reverse("api:organizations"), {"id": "acme"}), 409, "already_exists")
    assert_error(
        _post(operator_client, reverse("api:organizations"), {"id": "-bad"}), 400, "validation_error"
    )
    assert_error(
        _post(operator_client, reverse("api:organizations"), {"id": "x", "extra": 1}), 400, "validation_error"
    )
    assert_error(
        _post(operator_client, reverse("api:teams"), {"id": "t2", "organization_id": "nope"}),
        404,
        "organization_not_found",
    )
    assert_error(operator_client.get(reverse("api:organization", args=["nope"])), 404, "not_found")
    assert_error(operator_client.get(reverse("api:team", args=["nope"])), 404, "not_found")


def test_an_agent_key_cannot_manage_organizations_teams_or_budgets(agent_a, team):
    before = ledger_snapshot(), _budgets_snapshot()
    client = agent_a.client
    assert_error(_post(client, reverse("api:organizations"), {"id": "mine"}), 403, "forbidden")
    assert_error(_post(client, reverse("api:teams"), {"id": "mine"}), 403, "forbidden")
    body = {"scope": "agent", "scope_id": agent_a.id, "window": "day", "limit_usd": "1000"}
    assert_error(_post(client, reverse("api:budgets"), body), 403, "forbidden")
    assert_error(client.get(reverse("api:budgets")), 403, "forbidden")
    assert_error(client.get(reverse("api:organizations")), 403, "forbidden")
    assert_error(client.get(reverse("api:teams")), 403, "forbidden")
    assert_error(client.get(reverse("api:team", args=["research"])), 403, "forbidden")
    # Nor join a team of its choosing.
    assert_error(
        _patch(client, reverse("api:agent", args=[agent_a.id]), {"team_id": "research"}), 403, "forbidden"
    )
    assert (ledger_snapshot(), _budgets_snapshot()) == before
    assert Agent.objects.get(pk=agent_a.id).team_id is None


# --- An agent's team ----------------------------------------------------------------------------------------


def test_an_operator_puts_an_agent_in_a_team_and_takes_it_out(operator_client, agent_a, team):
    url = reverse("api:agent", args=[agent_a.id])
    assert operator_client.get(url).json()["team_id"] is None

    joined = _patch(operator_client, url, {"team_id": "research", "name": "renamed"})
    assert joined.status_code == 200, joined.content
    assert (joined.json()["team_id"], joined.json()["name"]) == ("research", "renamed")
    assert Agent.objects.get(pk=agent_a.id).team_id == "research"
    assert operator_client.get(url).json()["team_id"] == "research"

    assert _patch(operator_client, url, {"name": "again"}).json()["team_id"] == "research"
    left = _patch(operator_client, url, {"team_id": None})
    assert left.json()["team_id"] is None
    assert Agent.objects.get(pk=agent_a.id).team_id is None


def test_joining_a_team_that_does_not_exist_changes_nothing(operator_client, agent_a):
    url = reverse("api:agent", args=[agent_a.id])
    before = ledger_snapshot()

    assert_error(_patch(operator_client, url, {"team_id": "ghost", "name": "renamed"}), 404, "team_not_found")
    assert_error(_patch(operator_client, url, {"team_id": 12}), 400, "validation_error")

    assert ledger_snapshot() == before
    assert Agent.objects.get(pk=agent_a.id).team_id is None


# --- Budgets ------------------------------------------------------------------------------------------------


def test_an_operator_creates_reads_changes_lists_and_deletes_a_budget(operator_client, team):
    created = _post(
        operator_client,
        reverse("api:budgets"),
        {
            "scope": "team",
            "scope_id": "research",
            "window": "day",
            "limit_usd": "5",
            "mode": "soft",
            "rollover_percent": 20,
            "thresholds": [90, 50, 50],
        },
    )
    assert created.status_code == 201, created.content
    budget = created.json()
    assert set(budget) == BUDGET_FIELDS
    today = timezone.now().astimezone(dt.UTC).date()
    assert budget["scope"] == "team" and budget["scope_id"] == "research"
    assert (budget["agent_id"], budget["run_id"], budget["expires_at"]) == (None, None, None)
    assert budget["window"] == "day"
    assert budget["window_start"] == f"{today.isoformat()}T00:00:00Z"
    assert budget["window_end"] == f"{(today + dt.timedelta(days=1)).isoformat()}T00:00:00Z"
    assert (budget["limit_usd"], budget["spent_usd"], budget["reserved_usd"]) == ("5.00", "0.00", "0.00")
    assert (budget["rollover_usd"], budget["remaining_usd"]) == ("0.00", "5.00")
    assert (budget["mode"], budget["rollover_percent"], budget["thresholds"]) == ("soft", 20, [50, 90])
    assert budget["managed"] is False
    url = reverse("api:budget", args=[budget["id"]])

    assert operator_client.get(url).json() == budget

    changed = _patch(operator_client, url, {"limit_usd": "7.125", "mode": "hard", "thresholds": []})
    assert changed.status_code == 200, changed.content
    assert (changed.json()["limit_usd"], changed.json()["mode"], changed.json()["thresholds"]) == (
        "7.125",
        "hard",
        [],
    )
    assert Budget.objects.get(pk=budget["id"]).limit_usd == Decimal("7.125")

    listed = operator_client.get(reverse("api:budgets"), {"scope": "team", "scope_id": "research"}).json()
    assert [row["id"] for row in listed["results"]] == [budget["id"]]
    assert listed["results"][0] == changed.json()
    other = operator_client.get(reverse("api:budgets"), {"scope": "organization", "scope_id": "research"})
    assert other.json()["results"] == []

    deleted = operator_client.delete(url)
    assert deleted.status_code == 204 and deleted.content == b""
    assert not Budget.objects.filter(pk=budget["id"]).exists()
    assert_error(operator_client.get(url), 404, "not_found")
    assert_error(operator_client.delete(url), 404, "not_found")
    assert AuditRecord.objects.filter(action="budget.delete", outcome="ok").count() == 1


def test_a_budget_created_mid_month_counts_what_the_agent_spent(operator_client, agent_a):
    assert _allocate(agent_a, cents=3).status_code == 201

    created = _post(
        operator_client,
        reverse("api:budgets"),
        {"scope": "agent", "scope_id": agent_a.id, "window": "month", "limit_usd": 1},
    )

    assert created.status_code == 201, created.content
    assert (created.json()["spent_usd"], created.json()["remaining_usd"]) == ("0.03", "0.97")
    assert created.json()["agent_id"] == agent_a.id


@pytest.mark.parametrize(
    ("change", "status", "code"),
    [
        ({"scope": "galaxy"}, 400, "validation_error"),
        ({"scope": "run"}, 400, "validation_error"),
        ({"window": "total"}, 400, "validation_error"),
        ({"window": "fortnight"}, 400, "validation_error"),
        ({"limit_usd": "-1"}, 400, "validation_error"),
        ({"limit_usd": "0.0000001"}, 400, "validation_error"),
        ({"limit_usd": "1e20"}, 400, "validation_error"),
        ({"limit_usd": "lots"}, 400, "validation_error"),
        ({"mode": "sometimes"}, 400, "validation_error"),
        ({"rollover_percent": 101}, 400, "validation_error"),
        ({"thresholds": [0]}, 400, "validation_error"),
        ({"thresholds": ["50"]}, 400, "validation_error"),
        ({"colour": "red"}, 400, "validation_error"),
        ({"scope_id": "ghost-team"}, 404, "team_not_found"),
        ({"scope": "organization", "scope_id": "ghost"}, 404, "organization_not_found"),
        ({"scope": "agent", "scope_id": "ghost"}, 404, "agent_not_found"),
    ],
)
def test_a_bad_budget_is_refused_and_nothing_is_written(operator_client, team, change, status, code):
    body = {"scope": "team", "scope_id": "research", "window": "day", "limit_usd": "5", **change}
    before = _budgets_snapshot()

    assert_error(_post(operator_client, reverse("api:budgets"), body), status, code)

    assert _budgets_snapshot() == before
    assert AuditRecord.objects.filter(action="budget.create", outcome=code).count() == 1


@pytest.mark.parametrize(
    ("change", "status", "code"),
    [
        ({"scope": "agent"}, 400, "immutable_field"),
        ({"window": "month"}, 400, "immutable_field"),
        ({"spent_usd": "0"}, 400, "immutable_field"),
        ({"limit_usd": "-0.01"}, 400, "validation_error"),
        ({"limit_usd": "1.0000001"}, 400, "validation_error"),
        ({"rollover_percent": -1}, 400, "validation_error"),
        ({"colour": "red"}, 400, "validation_error"),
    ],
)
def test_a_bad_budget_change_is_refused_and_nothing_changes(operator_client, team, change, status, code):
    budget = budget_create(scope="team", scope_id="research", window="day", limit_usd="5")
    before = _budgets_snapshot()

    assert_error(_patch(operator_client, reverse("api:budget", args=[budget.pk]), change), status, code)

    assert _budgets_snapshot() == before


def test_the_agents_monthly_budget_is_changed_on_the_agent(operator_client, agent_a):
    _patch(operator_client, reverse("api:agent", args=[agent_a.id]), {"monthly_budget_usd": "10.00"})
    managed = Budget.objects.get(agent_id=agent_a.id, managed=True)
    url = reverse("api:budget", args=[managed.pk])
    assert operator_client.get(url).json()["managed"] is True

    assert_error(_patch(operator_client, url, {"limit_usd": "20"}), 409, "managed_budget")
    assert_error(operator_client.delete(url), 409, "managed_budget")
    # What is not its limit may change here.
    assert _patch(operator_client, url, {"thresholds": [75]}).json()["thresholds"] == [75]
    assert Budget.objects.get(pk=managed.pk).limit_usd == Decimal("10")


def test_unknown_budget_ids_answer_404(operator_client, reference_data):
    for budget_id in (1, 2**63 - 1, 2**70):
        url = f"/api/v1/budgets/{budget_id}"
        assert_error(operator_client.get(url), 404, "not_found")
        assert_error(_patch(operator_client, url, {"mode": "soft"}), 404, "not_found")
        assert_error(operator_client.delete(url), 404, "not_found")


def test_budget_lists_are_paginated(operator_client, team):
    for n in range(51):
        budget_create(scope="team", scope_id="research", window="day", limit_usd=str(n + 1))

    first = operator_client.get(reverse("api:budgets"), {"scope": "team"}).json()
    second = operator_client.get(first["next"]).json()

    assert first["count"] == 51 and len(first["results"]) == 50
    assert [row["limit_usd"] for row in first["results"][:2]] == ["1.00", "2.00"]
    assert [row["limit_usd"] for row in second["results"]] == ["51.00"]
    assert_error(operator_client.get(reverse("api:budgets"), {"page": 9}), 404, "not_found")
    assert_error(operator_client.get(reverse("api:budgets"), {"scope": "galaxy"}), 400, "validation_error")


# --- Runs and an agent's budgets ----------------------------------------------------------------------------


def test_an_agent_starts_its_own_run_and_reads_its_budgets(agent_a, team, operator_client):
    Agent.objects.filter(pk=agent_a.id).update(team=team)
    team_budget = budget_create(scope="team", scope_id="research", window="week", limit_usd="50")
    org_budget = budget_create(scope="organization", scope_id="acme", window="month", limit_usd="500")
    agent_budget = budget_create(scope="agent", scope_id=agent_a.id, window="day", limit_usd="5")

    created = _post(
        agent_a.client,
        reverse("api:agent-runs", args=[agent_a.id]),
        {"run_id": "loop-1", "limit_usd": "1.00", "ttl_seconds": 3600},
    )
    assert created.status_code == 201, created.content
    run = created.json()
    assert set(run) == BUDGET_FIELDS
    assert (run["scope"], run["scope_id"], run["agent_id"], run["run_id"]) == (
        "run",
        "loop-1",
        agent_a.id,
        "loop-1",
    )
    assert (run["window"], run["window_end"], run["limit_usd"]) == ("total", None, "1.00")
    expires_at = dt.datetime.fromisoformat(run["expires_at"])
    assert dt.timedelta(minutes=59) < expires_at - timezone.now() <= dt.timedelta(hours=1)

    assert _allocate(agent_a, cents=2, run_id="loop-1").status_code == 201
    budgets = agent_a.client.get(reverse("api:agent-budgets", args=[agent_a.id]))
    assert budgets.status_code == 200, budgets.content
    by_id = {row["id"]: row for row in budgets.json()}
    assert list(by_id) == sorted([team_budget.pk, org_budget.pk, agent_budget.pk, run["id"]])
    assert all(set(row) == BUDGET_FIELDS for row in by_id.values())
    assert (by_id[run["id"]]["spent_usd"], by_id[run["id"]]["remaining_usd"]) == ("0.02", "0.98")
    for budget in (team_budget, org_budget, agent_budget):
        assert by_id[budget.pk]["spent_usd"] == "0.02"
    assert by_id[team_budget.pk]["window"] == "week"
    assert (by_id[org_budget.pk]["scope"], by_id[org_budget.pk]["scope_id"]) == ("organization", "acme")
    # The operator sees the same.
    assert operator_client.get(reverse("api:agent-budgets", args=[agent_a.id])).json() == budgets.json()


def test_runs_refuse_bad_input_and_repeats(agent_a):
    url = reverse("api:agent-runs", args=[agent_a.id])
    assert _post(agent_a.client, url, {"run_id": "loop-1", "limit_usd": "1"}).status_code == 201
    before = _budgets_snapshot()

    assert_error(_post(agent_a.client, url, {"run_id": "loop-1", "limit_usd": "1"}), 409, "already_exists")
    assert_error(_post(agent_a.client, url, {"run_id": "", "limit_usd": "1"}), 400, "validation_error")
    assert_error(_post(agent_a.client, url, {"run_id": "x" * 201, "limit_usd": "1"}), 400, "validation_error")
    assert_error(_post(agent_a.client, url, {"run_id": "r", "limit_usd": "-1"}), 400, "validation_error")
    assert_error(
        _post(agent_a.client, url, {"run_id": "r", "limit_usd": "0.0000001"}), 400, "validation_error"
    )
    assert_error(
        _post(agent_a.client, url, {"run_id": "r", "limit_usd": "1", "ttl_seconds": 0}),
        400,
        "validation_error",
    )
    assert_error(_post(agent_a.client, url, {"run_id": "r"}), 400, "validation_error")

    assert _budgets_snapshot() == before


def test_an_agent_cannot_start_runs_or_read_budgets_of_another(agent_a, agent_b):
    budget_create(scope="agent", scope_id=agent_b.id, window="day", limit_usd="5")
    before = _budgets_snapshot()

    refused = _post(
        agent_a.client, reverse("api:agent-runs", args=[agent_b.id]), {"run_id": "r", "limit_usd": "1"}
    )
    assert_error(refused, 404, "not_found")
    assert_error(agent_a.client.get(reverse("api:agent-budgets", args=[agent_b.id])), 404, "not_found")

    assert _budgets_snapshot() == before
    assert agent_a.client.get(reverse("api:agent-budgets", args=[agent_a.id])).json() == []


def test_an_operator_starts_a_run_for_any_agent(operator_client, agent_a):
    created = _post(
        operator_client, reverse("api:agent-runs", args=[agent_a.id]), {"run_id": "r", "limit_usd": 2}
    )
    assert created.status_code == 201, created.content
    assert Budget.objects.get(pk=created.json()["id"]).agent_id == agent_a.id


# --- Refusals -----------------------------------------------------------------------------------------------


def test_an_allocation_over_a_team_budget_is_refused_with_429_and_writes_nothing(agent_a, team):
    Agent.objects.filter(pk=agent_a.id).update(team=team)
    budget = budget_create(scope="team", scope_id="research", window="day", limit_usd="0.05")
    assert _allocate(agent_a, cents=4).status_code == 201
    before = ledger_snapshot(), _budgets_snapshot()

    refused = _allocate(agent_a, cents=2)

    details = assert_error(refused, 429, "budget_exceeded")
    today = timezone.now().astimezone(dt.UTC).date()
    window_end = dt.datetime.combine(today + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)
    assert details == {
        "budget_id": budget.pk,
        "scope": "team",
        "scope_id": "research",
        "window": "day",
        "window_start": f"{today.isoformat()}T00:00:00Z",
        "window_end": window_end.isoformat().replace("+00:00", "Z"),
        "limit_usd": "0.05",
        "rollover_usd": "0",
        "spent_usd": "0.04",
        "reserved_usd": "0",
        "requested_usd": "0.02",
    }
    retry_after = int(refused["Retry-After"])
    assert 1 <= retry_after <= 86400
    assert abs((timezone.now() + dt.timedelta(seconds=retry_after) - window_end).total_seconds()) < 5
    assert (ledger_snapshot(), _budgets_snapshot()) == before
    assert AuditRecord.objects.filter(action="allocation.create", outcome="budget_exceeded").count() == 1
    # What still fits is taken.
    assert _allocate(agent_a, cents=1).status_code == 201


def test_a_hold_over_a_budget_is_refused_too(agent_a):
    budget_create(scope="agent", scope_id=agent_a.id, window="month", limit_usd="0.05")
    before = ledger_snapshot()

    assert_error(_allocate(agent_a, cents=6, hold=True), 429, "budget_exceeded")
    assert ledger_snapshot() == before
    held = _allocate(agent_a, cents=5, hold=True)
    assert held.status_code == 201
    assert Budget.objects.get(agent_id=agent_a.id).reserved_usd == Decimal("0.05")


def test_quota_checks_answer_budget_exceeded(agent_a, team):
    Agent.objects.filter(pk=agent_a.id).update(team=team)
    budget = budget_create(scope="organization", scope_id="acme", window="day", limit_usd="0.01")
    url = reverse("api:quota-checks", args=[agent_a.id])

    fits = _post(agent_a.client, url, {"resource_type": "COMPUTE_MS", "amount": CENT_MS})
    over = _post(agent_a.client, url, {"resource_type": "COMPUTE_MS", "amount": 2 * CENT_MS})

    assert fits.json()["allowed"] is True
    assert over.status_code == 200
    assert (over.json()["allowed"], over.json()["reason"]) == (False, "budget_exceeded")
    assert over.json()["details"]["budget_id"] == budget.pk
    assert over.json()["details"]["requested_usd"] == "0.02"


def test_an_allocation_naming_an_unknown_or_ended_run_is_refused(agent_a, agent_b):
    before = ledger_snapshot()
    assert_error(_allocate(agent_a, run_id="nope"), 404, "run_not_found")
    # Another agent's run is not this agent's.
    run_create(agent=agent_b.agent, run_id="b-run", limit_usd="1")
    assert_error(_allocate(agent_a, run_id="b-run"), 404, "run_not_found")
    ended = run_create(agent=agent_a.agent, run_id="old", limit_usd="1", ttl_seconds=1)
    Budget.objects.filter(pk=ended.pk).update(expires_at=timezone.now() - dt.timedelta(seconds=1))
    assert_error(_allocate(agent_a, run_id="old"), 409, "run_ended")
    assert ledger_snapshot() == before


def test_a_run_budget_refuses_its_101st_cent(agent_a):
    run = _post(
        agent_a.client, reverse("api:agent-runs", args=[agent_a.id]), {"run_id": "loop", "limit_usd": "1.00"}
    ).json()
    for _ in range(100):
        response = _allocate(agent_a, cents=1, run_id="loop")
        assert response.status_code == 201, response.content
        assert response.json()["cost_usd"] == "0.010000000000"
    before = ledger_snapshot()

    details = assert_error(_allocate(agent_a, cents=1, run_id="loop"), 429, "budget_exceeded")

    assert (details["scope"], details["scope_id"], details["window_end"]) == ("run", "loop", None)
    assert (details["spent_usd"], details["requested_usd"]) == ("1", "0.01")
    assert ledger_snapshot() == before
    assert Budget.objects.get(pk=run["id"]).spent_usd == Decimal("1")
    # Calls that do not name the run are not charged to it.
    assert _allocate(agent_a, cents=1).status_code == 201
    assert Budget.objects.get(pk=run["id"]).spent_usd == Decimal("1")


def test_an_execution_naming_a_run_is_charged_to_it(agent_a):
    run = run_create(agent=agent_a.agent, run_id="exec-run", limit_usd="0.05")
    url = reverse("optimization:executions", args=[agent_a.id])
    body = {
        "superpower": "search",
        "resources": {"COMPUTE_MS": 2 * CENT_MS, "NETWORK_REQS": 10},  # $0.001 a request
        "duration_ms": 5,
        "success": True,
        "run_id": "exec-run",
    }

    created = _post(agent_a.client, url, body)

    assert created.status_code == 201, created.content
    assert Budget.objects.get(pk=run.pk).spent_usd == Decimal("0.03")  # 2 cents of compute, 1 of network
    assert set(Allocation.objects.values_list("run_id", flat=True)) == {"exec-run"}
    before = ledger_snapshot(), Execution.objects.count()

    # Its compute (2 cents) still fits the run, its network (1 cent) does not: neither is taken.
    details = assert_error(_post(agent_a.client, url, {**body, "duration_ms": 6}), 429, "budget_exceeded")

    assert details["scope"] == "run" and details["requested_usd"] == "0.01"
    assert (ledger_snapshot(), Execution.objects.count()) == before
    assert Budget.objects.get(pk=run.pk).spent_usd == Decimal("0.03")
    assert_error(_post(agent_a.client, url, {**body, "run_id": "ghost"}), 404, "run_not_found")


def test_budget_figures_follow_allocations_over_http(agent_a, operator_client):
    budget = budget_create(scope="agent", scope_id=agent_a.id, window="day", limit_usd="0.10")
    _allocate(agent_a, cents=3)
    _allocate(agent_a, cents=2, hold=True)

    body = operator_client.get(reverse("api:budget", args=[budget.pk])).json()

    assert (body["spent_usd"], body["reserved_usd"], body["remaining_usd"]) == ("0.03", "0.02", "0.05")
    assert Quota.objects.get(agent_id=agent_a.id, resource_type_id="COMPUTE_MS").used == 3 * CENT_MS
    assert UsageLog.objects.filter(agent_id=agent_a.id).count() == 1


def test_a_budget_created_twice_under_one_idempotency_key_is_created_once(operator_client, team):
    body = {"scope": "team", "scope_id": "research", "window": "month", "limit_usd": "9.99"}

    first = _post(operator_client, reverse("api:budgets"), body, HTTP_IDEMPOTENCY_KEY="budget-1")
    again = _post(operator_client, reverse("api:budgets"), body, HTTP_IDEMPOTENCY_KEY="budget-1")
    other = _post(
        operator_client, reverse("api:budgets"), {**body, "limit_usd": "1"}, HTTP_IDEMPOTENCY_KEY="budget-1"
    )

    assert (first.status_code, again.status_code) == (201, 201)
    assert again["Idempotent-Replayed"] == "true" and again.json() == first.json()
    assert_error(other, 422, "idempotency_key_reused")
    assert Budget.objects.filter(scope="team").count() == 1

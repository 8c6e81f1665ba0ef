"""Dollar budgets checked inside the allocation: scopes, windows, rollover, holds, runs, soft budgets and the
agent's monthly budget (the service layer; the API is in test_budgets_api.py, races in
test_budget_concurrency.py)."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
from django.db import connection

from allocation import services
from allocation.models import Allocation
from ledger.budgets import (
    budget_create,
    budget_figures,
    budget_update,
    budgets_applying,
    run_create,
)
from ledger.errors import BudgetExceeded, Conflict, LedgerError, NotFound
from ledger.models import Agent, Budget, Quota, UsageLog
from ledger.periods import UTC, window_bounds
from tests.factories import AgentFactory, OrganizationFactory, TeamFactory

pytestmark = pytest.mark.django_db

# COMPUTE_MS lists at $0.00001 a millisecond: 1,000 ms cost one cent.
CENT_MS = 1_000
T0 = dt.datetime(2026, 12, 9, 10, 0, tzinfo=UTC)  # a Wednesday


def _allocate(agent: Agent, cents: int, *, at: dt.datetime = T0, **extra) -> Allocation:
    return services.allocation_create(
        agent=agent, resource_type_id="COMPUTE_MS", amount=cents * CENT_MS, now=at, **extra
    )


def _budget(pk: int) -> Budget:
    return Budget.objects.get(pk=pk)


@pytest.fixture
def team_agents(reference_data):
    organization = OrganizationFactory(id="acme")
    team = TeamFactory(id="research", organization=organization)
    agents = [AgentFactory(id=f"agent-{n}", team=team) for n in range(3)]
    return organization, team, agents


def test_a_team_budget_refuses_the_call_that_does_not_fit_and_writes_nothing(team_agents):
    _, team, agents = team_agents
    budget = budget_create(scope="team", scope_id=team.id, window="day", limit_usd="0.05", now=T0)
    for agent in agents:
        _allocate(agent, 1)
    _allocate(agents[0], 2)
    before = (
        Allocation.objects.count(),
        UsageLog.objects.count(),
        sum(Quota.objects.values_list("used", flat=True)),
    )

    with pytest.raises(BudgetExceeded) as refused:
        _allocate(agents[1], 1)

    assert (Allocation.objects.count(), UsageLog.objects.count()) == before[:2]
    assert sum(Quota.objects.values_list("used", flat=True)) == before[2]
    details = refused.value.details
    assert details["budget_id"] == budget.pk
    assert (details["scope"], details["scope_id"], details["window"]) == ("team", "research", "day")
    assert (details["limit_usd"], details["spent_usd"], details["requested_usd"]) == ("0.05", "0.05", "0.01")
    assert details["window_end"] == "2026-12-10T00:00:00Z"
    assert refused.value.retry_at == dt.datetime(2026, 12, 10, tzinfo=UTC)
    assert refused.value.status == 429
    assert _budget(budget.pk).spent_usd == Decimal("0.05")
    assert _budget(budget.pk).refused_at is not None


def test_every_level_binds_agent_then_team_then_organization(team_agents):
    organization, team, agents = team_agents
    other_team = TeamFactory(id="ops", organization=organization)
    outsider = AgentFactory(id="agent-ops", team=other_team)
    budget_create(scope="agent", scope_id=agents[0].id, window="month", limit_usd="0.02", now=T0)
    budget_create(scope="team", scope_id=team.id, window="month", limit_usd="0.04", now=T0)
    org_budget = budget_create(
        scope="organization", scope_id=organization.id, window="week", limit_usd="0.05", now=T0
    )

    _allocate(agents[0], 2)
    with pytest.raises(BudgetExceeded) as agent_refusal:
        _allocate(agents[0], 1)
    _allocate(agents[1], 2)
    with pytest.raises(BudgetExceeded) as team_refusal:
        _allocate(agents[2], 1)
    _allocate(outsider, 1)
    with pytest.raises(BudgetExceeded) as org_refusal:
        _allocate(outsider, 1)

    assert agent_refusal.value.details["scope"] == "agent"
    assert team_refusal.value.details["scope"] == "team"
    assert org_refusal.value.details["scope"] == "organization"
    assert _budget(org_budget.pk).spent_usd == Decimal("0.05")
    assert org_refusal.value.details["window_start"] == "2026-12-07T00:00:00Z"  # Monday


def test_a_hold_reserves_its_quoted_cost_and_settles_or_releases_it_exactly(team_agents):
    _, team, agents = team_agents
    budget = budget_create(scope="team", scope_id=team.id, window="day", limit_usd="0.10", now=T0)
    hold = _allocate(agents[0], 6, hold=True)
    assert (_budget(budget.pk).reserved_usd, _budget(budget.pk).spent_usd) == (Decimal("0.06"), 0)
    with pytest.raises(BudgetExceeded):
        _allocate(agents[1], 5)

    services.hold_settle(agent=agents[0], allocation_id=hold.pk, amount=4 * CENT_MS, now=T0)
    assert (_budget(budget.pk).reserved_usd, _budget(budget.pk).spent_usd) == (0, Decimal("0.04"))

    second = _allocate(agents[1], 5, hold=True)
    services.hold_release(agent=agents[1], allocation_id=second.pk, now=T0)
    third = _allocate(agents[2], 6, hold=True, hold_ttl_seconds=60)
    assert services.holds_expire(now=T0 + dt.timedelta(minutes=2)) == 1
    final = _budget(budget.pk)
    assert (final.reserved_usd, final.spent_usd) == (0, Decimal("0.04"))
    assert Allocation.objects.get(pk=third.pk).budget_ids == [budget.pk]


def test_settling_above_the_hold_needs_room_for_the_difference(team_agents):
    _, team, agents = team_agents
    budget = budget_create(scope="team", scope_id=team.id, window="day", limit_usd="0.05", now=T0)
    hold = _allocate(agents[0], 3, hold=True)
    _allocate(agents[1], 2)

    with pytest.raises(BudgetExceeded):
        services.hold_settle(agent=agents[0], allocation_id=hold.pk, amount=4 * CENT_MS, now=T0)

    assert Allocation.objects.get(pk=hold.pk).status == Allocation.Status.HELD
    assert (_budget(budget.pk).reserved_usd, _budget(budget.pk).spent_usd) == (
        Decimal("0.03"),
        Decimal("0.02"),
    )
    services.hold_settle(agent=agents[0], allocation_id=hold.pk, amount=3 * CENT_MS, now=T0)
    assert _budget(budget.pk).spent_usd == Decimal("0.05")


def test_a_run_budget_refuses_its_101st_cent(reference_data):
    agent = AgentFactory(id="looper")
    run = run_create(agent=agent, run_id="task-42", limit_usd="1.00", now=T0)
    for _ in range(100):
        _allocate(agent, 1, run_id="task-42")
    with pytest.raises(BudgetExceeded) as refused:
        _allocate(agent, 1, run_id="task-42")

    assert refused.value.details["scope"] == "run"
    assert refused.value.details["scope_id"] == "task-42"
    assert refused.value.details["window_end"] is None
    assert refused.value.retry_at is None
    assert _budget(run.pk).spent_usd == Decimal("1.00")
    _allocate(agent, 1)  # a call that names no run is not the run's


def test_a_call_naming_an_unknown_or_ended_run_is_refused(reference_data):
    agent = AgentFactory(id="looper")
    run_create(agent=agent, run_id="short", limit_usd="1", ttl_seconds=60, now=T0)
    with pytest.raises(NotFound) as unknown:
        _allocate(agent, 1, run_id="nope")
    with pytest.raises(Conflict) as ended:
        _allocate(agent, 1, run_id="short", at=T0 + dt.timedelta(minutes=2))
    assert (unknown.value.code, ended.value.code) == ("run_not_found", "run_ended")
    assert not Allocation.objects.exists()
    with pytest.raises(Conflict):
        run_create(agent=agent, run_id="short", limit_usd="1", now=T0)


def test_a_window_rolls_over_at_its_boundary_with_rollover(team_agents):
    _, team, agents = team_agents
    budget = budget_create(
        scope="team", scope_id=team.id, window="day", limit_usd="0.10", rollover_percent=50, now=T0
    )
    _allocate(agents[0], 7)
    midnight = dt.datetime(2026, 12, 10, tzinfo=UTC)

    # Readers see the new window before anything charges it: 0.03 unused, within the 0.05 cap.
    figures = budget_figures(_budget(budget.pk), now=midnight)
    assert (figures.window_start, figures.rollover_usd, figures.remaining_usd) == (
        midnight,
        Decimal("0.03"),
        Decimal("0.13"),
    )
    _allocate(agents[1], 13, at=midnight)
    with pytest.raises(BudgetExceeded):
        _allocate(agents[1], 1, at=midnight + dt.timedelta(hours=1))
    rolled = _budget(budget.pk)
    assert (rolled.window_start, rolled.window_end) == (midnight, midnight + dt.timedelta(days=1))
    assert (rolled.spent_usd, rolled.rollover_usd) == (Decimal("0.13"), Decimal("0.03"))

    # Nothing spent on the 11th: the 12th opens with the cap (half the limit), not the 0.10 left.
    _allocate(agents[1], 1, at=dt.datetime(2026, 12, 12, 9, tzinfo=UTC))
    assert _budget(budget.pk).rollover_usd == Decimal("0.05")


def test_a_soft_budget_never_refuses(team_agents):
    _, team, agents = team_agents
    budget = budget_create(
        scope="team", scope_id=team.id, window="day", limit_usd="0.01", mode="soft", now=T0
    )
    for agent in agents:
        _allocate(agent, 2)
    assert _budget(budget.pk).spent_usd == Decimal("0.06")
    assert _budget(budget.pk).refused_at is None


def test_the_agents_monthly_budget_is_a_hard_month_budget(reference_data):
    agent = AgentFactory(id="spender")
    _allocate(agent, 3, at=dt.datetime.now(UTC))
    # The trigger follows every write of the field, whoever makes it: here a plain UPDATE.
    Agent.objects.filter(pk=agent.pk).update(monthly_budget_usd=Decimal("0.05"))
    agent.refresh_from_db()
    managed = Budget.objects.get(agent=agent, managed=True)
    assert (managed.scope, managed.window, managed.mode, managed.limit_usd) == (
        "agent",
        "month",
        "hard",
        Decimal("0.05"),
    )
    assert managed.spent_usd == Decimal("0.03")  # this month's spend so far

    _allocate(agent, 2, at=dt.datetime.now(UTC))
    with pytest.raises(BudgetExceeded):
        _allocate(agent, 1, at=dt.datetime.now(UTC))
    with pytest.raises(Conflict):
        budget_update(budget=managed, changes={"limit_usd": "9"})

    agent.monthly_budget_usd = Decimal("1")
    agent.save()
    assert Budget.objects.get(pk=managed.pk).limit_usd == Decimal("1")
    _allocate(agent, 1, at=dt.datetime.now(UTC))
    agent.monthly_budget_usd = None
    agent.save()
    assert not Budget.objects.filter(agent=agent).exists()


def test_quota_check_answers_budget_exceeded_without_taking_anything(team_agents):
    _, team, agents = team_agents
    budget = budget_create(
        scope="team", scope_id=team.id, window="day", limit_usd="0.02", now=dt.datetime.now(UTC)
    )
    _allocate(agents[0], 2, at=dt.datetime.now(UTC))

    check = services.quota_check(agent=agents[1], resource_type_id="COMPUTE_MS", amount=CENT_MS)
    assert (check.allowed, check.reason) == (False, "budget_exceeded")
    assert check.details["budget_id"] == budget.pk
    assert services.quota_check(agent=agents[1], resource_type_id="COMPUTE_MS", amount=1).allowed is False
    budget_update(budget=budget, changes={"limit_usd": "0.03"})
    assert (
        services.quota_check(agent=agents[1], resource_type_id="COMPUTE_MS", amount=CENT_MS).allowed is True
    )
    assert services.quota_check(
        agent=agents[1], resource_type_id="COMPUTE_MS", amount=CENT_MS, run_id="x"
    ).reason == ("run_not_found")


def test_a_budget_created_mid_window_starts_from_what_the_scope_spent(team_agents):
    _, team, agents = team_agents
    now = dt.datetime.now(UTC)
    _allocate(agents[0], 2, at=now)
    _allocate(agents[1], 1, at=now)
    daily = budget_create(scope="team", scope_id=team.id, window="day", limit_usd="1", now=now)
    monthly = budget_create(scope="organization", scope_id="acme", window="month", limit_usd="1", now=now)
    assert daily.spent_usd == monthly.spent_usd == Decimal("0.03")
    assert [budget.pk for budget in budgets_applying(agent=agents[0], now=now)] == [daily.pk, monthly.pk]


def test_an_execution_is_refused_whole_when_its_cost_overruns_the_run(reference_data):
    from optimization.services.executions import execution_record

    agent = AgentFactory(id="executor")
    run = run_create(agent=agent, run_id="r1", limit_usd="0.015", now=T0)
    with pytest.raises(BudgetExceeded):
        execution_record(
            agent=agent,
            superpower="search",
            resources={"AI_TOKENS": 10_000, "COMPUTE_MS": CENT_MS},
            duration_ms=5,
            success=True,
            now=T0,
            run_id="r1",
        )
    assert _budget(run.pk).spent_usd == 0
    assert not UsageLog.objects.exists()


@pytest.mark.parametrize("window", ["day", "week", "month"])
def test_the_database_and_python_agree_on_window_bounds(db, window):
    instants = [
        dt.datetime(2026, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        dt.datetime(2027, 1, 1, tzinfo=UTC),
        dt.datetime(2024, 2, 29, 12, tzinfo=UTC),
        dt.datetime(2026, 12, 6, 23, 30, tzinfo=UTC),  # a Sunday
        dt.datetime(2026, 12, 7, 0, 0, tzinfo=UTC),  # a Monday
        dt.datetime(2026, 3, 29, 1, 30, tzinfo=dt.timezone(dt.timedelta(hours=2))),
    ]
    with connection.cursor() as cursor:
        cursor.execute("SET TIME ZONE 'Europe/Paris'")  # the session's zone must not matter
        try:
            for at in instants:
                # Read back as UTC wall time: the driver labels what it reads with UTC, whatever the zone.
                cursor.execute(
                    "SELECT window_start AT TIME ZONE 'UTC', window_end AT TIME ZONE 'UTC' "
                    "FROM grid_budget_window(%s, %s)",
                    [window, at],
                )
                expected = tuple(bound.replace(tzinfo=None) for bound in window_bounds(window, at))
                assert cursor.fetchone() == expected, at
        finally:
            cursor.execute("SET TIME ZONE 'UTC'")


def test_bad_budgets_are_refused_and_nothing_is_written(team_agents):
    _, team, _ = team_agents
    cases = [
        {"scope": "galaxy", "scope_id": team.id, "window": "day", "limit_usd": "1"},
        {"scope": "team", "scope_id": "nope", "window": "day", "limit_usd": "1"},
        {"scope": "team", "scope_id": team.id, "window": "year", "limit_usd": "1"},
        {"scope": "team", "scope_id": team.id, "window": "total", "limit_usd": "1"},
        {"scope": "team", "scope_id": team.id, "window": "day", "limit_usd": "-1"},
        {"scope": "team", "scope_id": team.id, "window": "day", "limit_usd": "0.0000001"},
        {"scope": "team", "scope_id": team.id, "window": "day", "limit_usd": "NaN"},
        {"scope": "team", "scope_id": team.id, "window": "day", "limit_usd": "1", "mode": "loud"},
        {"scope": "team", "scope_id": team.id, "window": "day", "limit_usd": "1", "rollover_percent": 101},
        {"scope": "team", "scope_id": team.id, "window": "day", "limit_usd": "1", "thresholds": [0]},
        {"scope": "run", "scope_id": team.id, "window": "total", "limit_usd": "1"},
    ]
    for case in cases:
        with pytest.raises(LedgerError):
            budget_create(now=T0, **case)
    assert not Budget.objects.exists()

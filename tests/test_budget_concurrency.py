"""Dollar budgets under concurrency, on real PostgreSQL: threads with their own connections race for the
room of agent, team and organization budgets, and the budgets must come out exact (never over a limit,
spent = the usage log's costs, reserved = the open holds' quotes) without a deadlock.

Every call runs at a controlled clock inside one window of each budget (``T0``, a Wednesday), so a run
that happens to straddle midnight or a month's end measures the same thing.
"""

from __future__ import annotations

import datetime as dt
import random
import threading
from collections import Counter
from decimal import Decimal

import pytest
from django.db.models import Q, Sum

from allocation import services
from allocation.models import Allocation
from ledger.budgets import budget_create
from ledger.errors import BudgetExceeded, LedgerError
from ledger.models import Agent, Budget, Quota, UsageLog
from ledger.money import usage_cost
from ledger.periods import UTC
from ledger.services import quotas_open_all, reference_data_load
from optimization.services.executions import execution_record
from tests.concurrency import race
from tests.factories import AgentFactory, OrganizationFactory, TeamFactory

pytestmark = pytest.mark.django_db(transaction=True)

T0 = dt.datetime(2026, 12, 9, 10, 0, tzinfo=UTC)  # a Wednesday: inside one day, week and month window
CENT_MS = 1_000  # COMPUTE_MS lists at $0.00001 a millisecond: 1,000 ms cost one cent
CENT = Decimal("0.01")
THREADS = 30  # connections of one race; the embedded server allows 100, shared with other test runs


@pytest.fixture
def reference(transactional_db):
    reference_data_load()


def _agents(team, ids: list[str]) -> list[Agent]:
    """Agents of ``team`` with their periods of ``T0`` open, so the race is about budgets, not openings."""
    agents = [AgentFactory(id=agent_id, team=team) for agent_id in ids]
    for agent in agents:
        quotas_open_all(agent=agent, at=T0)
    return agents


def _budget(scope: str, target, limit: str, window: str = "month") -> Budget:
    return budget_create(scope=scope, scope_id=target.pk, window=window, limit_usd=limit, now=T0)


class Outcomes:
    """What each call of a race came to: its result, or the refusal's code. Anything else (a deadlock is
    a ``DatabaseError`` with SQLSTATE 40P01) is kept in ``unexpected`` for the test to show."""

    def __init__(self):
        self.lock = threading.Lock()
        self.results: list[tuple[str, object]] = []
        self.unexpected: list[str] = []

    def call(self, label: str, function, *args, **kwargs):
        try:
            result = function(*args, **kwargs)
        except LedgerError as refusal:
            with self.lock:
                self.results.append((label, refusal))
            return refusal
        except Exception as error:  # every other error (a deadlock: DatabaseError 40P01) fails the test
            sqlstate = getattr(getattr(error.__cause__, "diag", None), "sqlstate", None)
            with self.lock:
                self.unexpected.append(f"{label}: {type(error).__name__} {sqlstate or ''} {error}")
            return error
        with self.lock:
            self.results.append((label, result))
        return result

    def refusal_codes(self) -> Counter:
        return Counter(r.code for _, r in self.results if isinstance(r, LedgerError))


def _in_parallel(calls: list, *, threads: int = THREADS) -> None:
    """Run the zero-argument ``calls`` from ``threads`` threads released at the same moment (each on its
    own connection, closed at its end), shuffled with a fixed seed so that every thread mixes agents."""
    calls = list(calls)
    random.Random(17).shuffle(calls)
    race(threads, lambda i: [call() for call in calls[i::threads]])


def _allocation(outcomes: Outcomes, agent: Agent, cents: int = 1, *, hold: bool = False, **extra):
    return lambda: outcomes.call(
        f"allocate {agent.pk}",
        services.allocation_create,
        agent=agent,
        resource_type_id="COMPUTE_MS",
        amount=cents * CENT_MS,
        hold=hold,
        now=T0,
        **extra,
    )


def _scope(budget: Budget) -> Q:
    """The usage rows and allocations of the agents ``budget`` applies to."""
    return {
        Budget.Scope.AGENT: Q(agent_id=budget.agent_id),
        Budget.Scope.TEAM: Q(agent__team_id=budget.team_id),
        Budget.Scope.ORGANIZATION: Q(agent__team__organization_id=budget.organization_id),
    }[budget.scope]


def _assert_budget_exact(budget: Budget) -> None:
    """The budget equals its ledger: spent = the costs of its scope's usage rows, reserved = the quotes of
    its open holds, and a hard budget is never over its limit."""
    budget.refresh_from_db()
    spent = UsageLog.objects.filter(_scope(budget)).aggregate(total=Sum("cost_usd"))["total"] or Decimal(0)
    held = Allocation.objects.filter(status=Allocation.Status.HELD, budget_ids__contains=[budget.pk])
    reserved = sum((usage_cost(a.amount, a.unit_price_usd) for a in held), Decimal(0))
    label = f"{budget.scope} {budget.scope_id}"
    assert budget.spent_usd == spent, f"{label}: spent {budget.spent_usd}, usage log {spent}"
    assert budget.reserved_usd == reserved, f"{label}: reserved {budget.reserved_usd}, open holds {reserved}"
    assert budget.spent_usd + budget.reserved_usd <= budget.limit_usd + budget.rollover_usd, label


def _assert_quotas_exact(agents: list[Agent]) -> None:
    for quota in Quota.objects.filter(agent__in=agents):
        used = UsageLog.objects.filter(quota_id=quota.pk).aggregate(total=Sum("amount"))["total"] or 0
        held = Allocation.objects.filter(quota_id=quota.pk, status=Allocation.Status.HELD)
        spent = UsageLog.objects.filter(quota_id=quota.pk).aggregate(total=Sum("cost_usd"))["total"] or 0
        assert (quota.used, quota.spent_usd) == (used, spent), quota
        assert quota.reserved == (held.aggregate(total=Sum("amount"))["total"] or 0), quota


# --- One team budget ------------------------------------------------------------------------------------


@pytest.fixture
def team_of_three(reference):
    team = TeamFactory(id="research")
    agents = _agents(team, ["agent-a", "agent-b", "agent-c"])
    # Room for exactly 100 calls of one cent, in the day of T0.
    return team, agents, _budget("team", team, "1.00", window="day")


def test_150_racing_allocations_of_a_team_take_exactly_the_100_its_budget_has_room_for(team_of_three):
    team, agents, budget = team_of_three
    outcomes = Outcomes()

    _in_parallel([_allocation(outcomes, agents[i % 3]) for i in range(150)])

    assert outcomes.unexpected == [], "\n\n".join(outcomes.unexpected)
    accepted = [r for _, r in outcomes.results if isinstance(r, Allocation)]
    assert len(accepted) == 100
    assert outcomes.refusal_codes() == {"budget_exceeded": 50}
    assert {r.details["budget_id"] for _, r in outcomes.results if isinstance(r, BudgetExceeded)} == {
        budget.pk
    }
    budget.refresh_from_db()
    assert budget.spent_usd == sum(a.cost_usd for a in accepted) == Decimal("1.00")
    assert budget.reserved_usd == 0
    assert Allocation.objects.count() == UsageLog.objects.count() == 100
    _assert_budget_exact(budget)
    _assert_quotas_exact(agents)
    assert Quota.objects.filter(resource_type_id="COMPUTE_MS").aggregate(total=Sum("used"))["total"] == (
        100 * CENT_MS
    )


def test_150_racing_holds_reserve_exactly_100_and_settling_them_for_less_returns_the_rest(team_of_three):
    team, agents, budget = team_of_three
    outcomes = Outcomes()

    _in_parallel([_allocation(outcomes, agents[i % 3], hold=True) for i in range(150)])

    assert outcomes.unexpected == [], "\n\n".join(outcomes.unexpected)
    holds = [r for _, r in outcomes.results if isinstance(r, Allocation)]
    assert len(holds) == 100
    assert outcomes.refusal_codes() == {"budget_exceeded": 50}
    budget.refresh_from_db()
    assert (budget.spent_usd, budget.reserved_usd) == (0, Decimal("1.00"))
    _assert_budget_exact(budget)

    # Each hold settles for 100 to 900 ms of its 1,000 (a tenth to nine tenths of a cent), all at once.
    settle_ms = {hold.pk: 100 * (1 + index % 9) for index, hold in enumerate(holds)}
    settled = Outcomes()
    _in_parallel(
        [
            lambda hold=hold: settled.call(
                "settle",
                services.hold_settle,
                agent=hold.agent,
                allocation_id=hold.pk,
                amount=settle_ms[hold.pk],
                now=T0 + dt.timedelta(seconds=1),
            )
            for hold in holds
        ]
    )

    assert settled.unexpected == [], "\n\n".join(settled.unexpected)
    assert settled.refusal_codes() == {}
    budget.refresh_from_db()
    expected = sum(usage_cost(ms, Decimal("0.00001")) for ms in settle_ms.values())
    assert budget.spent_usd == expected == sum(a.cost_usd for a in Allocation.objects.all())
    assert budget.reserved_usd == 0
    assert Allocation.objects.filter(status=Allocation.Status.SETTLED).count() == 100
    _assert_budget_exact(budget)
    _assert_quotas_exact(agents)
    quotas = Quota.objects.filter(resource_type_id="COMPUTE_MS").aggregate(
        used=Sum("used"), held=Sum("reserved")
    )
    assert quotas == {"used": sum(settle_ms.values()), "held": 0}


# --- Agent, team and organization budgets, each binding somewhere -------------------------------------


def test_agent_team_and_organization_budgets_each_bind_where_they_are_tightest(reference):
    """One race over two organizations. In ``tight`` the organization binds overall ($0.50 for two teams
    of $0.30), with an agent budget inside one team; in ``roomy`` (no binding organization) one team binds
    at $0.30 and, in another team, two agents' own budgets bind at 5 and 12 cents. Each total is exact
    whatever the interleaving; every refusal names a budget that is full at the end."""
    tight, roomy = OrganizationFactory(id="tight"), OrganizationFactory(id="roomy")
    teams = {
        name: TeamFactory(id=name, organization=organization)
        for name, organization in (("t1", tight), ("t2", tight), ("t3", roomy), ("t4", roomy))
    }
    sizes = {"t1": 3, "t2": 3, "t3": 3, "t4": 2}
    members = {
        name: _agents(team, [f"{name}-{n}" for n in range(sizes[name])]) for name, team in teams.items()
    }
    budgets = {
        "tight": _budget("organization", tight, "0.50"),
        "roomy": _budget("organization", roomy, "100.00"),
        "t1": _budget("team", teams["t1"], "0.30", window="week"),
        "t2": _budget("team", teams["t2"], "0.30", window="day"),
        "t3": _budget("team", teams["t3"], "0.30"),
        "t4": _budget("team", teams["t4"], "100.00"),
        "t1-0": _budget("agent", members["t1"][0], "0.05", window="day"),
        "t4-0": _budget("agent", members["t4"][0], "0.05", window="week"),
        "t4-1": _budget("agent", members["t4"][1], "0.12"),
    }
    attempts = 15  # calls of one cent per agent: 165 in all
    outcomes = Outcomes()

    _in_parallel(
        [
            _allocation(outcomes, agent)
            for agents in members.values()
            for agent in agents
            for _ in range(attempts)
        ]
    )

    assert outcomes.unexpected == [], "\n\n".join(outcomes.unexpected)
    assert set(outcomes.refusal_codes()) == {"budget_exceeded"}
    for budget in budgets.values():
        budget.refresh_from_db()
    spent = {name: budget.spent_usd for name, budget in budgets.items()}
    # Exact wherever the limit is the tightest bound: 6 x 15 cents of demand against $0.50 in tight (its two
    # teams could take $0.60), 45 against $0.30 in t3, 15 against 5 and 12 cents for t4's agents.
    assert spent["tight"] == Decimal("0.50")
    assert spent["t1"] + spent["t2"] == Decimal("0.50")
    assert spent["t1"] <= Decimal("0.30") and spent["t2"] <= Decimal("0.30")
    assert spent["t1-0"] <= Decimal("0.05")
    assert spent["t3"] == Decimal("0.30")
    assert (spent["t4-0"], spent["t4-1"]) == (Decimal("0.05"), Decimal("0.12"))
    assert spent["t4"] == Decimal("0.17")
    assert spent["roomy"] == spent["t3"] + spent["t4"] == Decimal("0.47")
    accepted = [r for _, r in outcomes.results if isinstance(r, Allocation)]
    assert len(accepted) == 50 + 47
    assert sum(a.cost_usd for a in accepted) == spent["tight"] + spent["roomy"]

    # Nothing is spent but charges (no holds): a budget that refused a call still has no room for one.
    by_id = {budget.pk: budget for budget in budgets.values()}
    refusing = Counter(r.details["budget_id"] for _, r in outcomes.results if isinstance(r, BudgetExceeded))
    for budget_id in refusing:
        budget = by_id[budget_id]
        assert budget.limit_usd - budget.spent_usd < CENT, (
            f"{budget.scope} {budget.scope_id} refused with room"
        )
        assert budget.refused_at is not None
    assert budgets["roomy"].pk not in refusing and budgets["t4"].pk not in refusing
    assert {budgets[name].pk for name in ("t3", "t4-0", "t4-1")} <= set(refusing)
    for budget in budgets.values():
        _assert_budget_exact(budget)
    _assert_quotas_exact(list(Agent.objects.all()))


# --- Opposing lock orders --------------------------------------------------------------------------------


def test_budgets_taken_in_opposing_orders_by_many_agents_at_once_never_deadlock(reference):
    """20 agents of team T in organization O, each with a budget of its own, half of them created before
    T's and O's budgets and half after (so an agent's budget comes first in one half's locks and last in
    the other's), and every writer of budgets at once: allocations, executions that take two resource types
    in one transaction, holds settled (some for more than held) or released while new calls run, holds
    expiring under the sweep, and quota shares between the agents in both directions. Nothing but a
    refusal may come back, and every budget and quota must equal its ledger afterwards."""
    organization = OrganizationFactory(id="o")
    team = TeamFactory(id="t", organization=organization)
    agents = _agents(team, [f"racer-{n:02d}" for n in range(20)])
    budgets = [_budget("agent", agent, "0.12", window="week") for agent in agents[:10]]
    budgets += [_budget("team", team, "1.50", window="day"), _budget("organization", organization, "50.00")]
    budgets += [_budget("agent", agent, "0.12", window="week") for agent in agents[10:]]
    budgets.append(_budget("agent", agents[0], "5.00"))  # a second budget of one agent, in another window
    later = T0 + dt.timedelta(seconds=2)
    outcomes = Outcomes()
    stop = threading.Event()

    def agent_loop(agent: Agent, index: int) -> None:
        held: list[Allocation] = []
        for step in range(10):
            kind = (step + index) % 6
            if kind == 0:
                outcomes.call(
                    "allocate",
                    services.allocation_create,
                    agent=agent,
                    resource_type_id="COMPUTE_MS",
                    amount=CENT_MS,
                    now=T0,
                )
            elif kind == 1:
                # AI_TOKENS before COMPUTE_MS: two quota rows, the budgets held from the first to commit.
                outcomes.call(
                    "execute",
                    execution_record,
                    agent=agent,
                    superpower="race",
                    resources={"COMPUTE_MS": 500, "AI_TOKENS": 5_000},
                    duration_ms=1,
                    success=True,
                    now=T0,
                )
            elif kind in (2, 3):
                hold = outcomes.call(
                    "hold",
                    services.allocation_create,
                    agent=agent,
                    resource_type_id="COMPUTE_MS",
                    amount=2 * CENT_MS,
                    hold=True,
                    now=T0,
                )
                if isinstance(hold, Allocation):
                    held.append(hold)
            elif kind == 4:
                # Expires at T0 + 1 s: the sweep (at T0 + 2 s) returns what it reserved.
                outcomes.call(
                    "short hold",
                    services.allocation_create,
                    agent=agent,
                    resource_type_id="AI_TOKENS",
                    amount=10_000,
                    hold=True,
                    hold_ttl_seconds=1,
                    now=T0,
                )
            elif held:
                hold = held.pop(0)
                if step % 2:
                    outcomes.call(
                        "release", services.hold_release, agent=agent, allocation_id=hold.pk, now=later
                    )
                else:
                    # 1,000 to 3,000 ms of the 2,000 held: settling for more needs room on every budget.
                    amount = CENT_MS * (1 + (index + step) % 3)
                    outcomes.call(
                        "settle",
                        services.hold_settle,
                        agent=agent,
                        allocation_id=hold.pk,
                        amount=amount,
                        now=later,
                    )
        for hold in held:
            outcomes.call(
                "settle",
                services.hold_settle,
                agent=agent,
                allocation_id=hold.pk,
                amount=CENT_MS // 2,
                now=later,
            )

    def sweep_loop() -> None:
        for _ in range(200):  # 200 x 20 ms at most
            outcomes.call("expire", services.holds_expire, now=later)
            if stop.wait(0.02):
                break

    def share_loop(forward: bool) -> None:
        for step in range(15):
            source, target = agents[step % 5], agents[5 + step % 5]
            if not forward:
                source, target = target, source
            outcomes.call(
                "share",
                services.quota_share,
                source=source,
                target_id=target.pk,
                resource_type_id="COMPUTE_MS",
                amount=100,
                actor="race",
                now=T0,
            )

    agents_running = [len(agents)]

    def work(i: int) -> None:
        if i < len(agents):
            try:
                agent_loop(agents[i], i)
            finally:
                with outcomes.lock:
                    agents_running[0] -= 1
                    if not agents_running[0]:
                        stop.set()  # the sweep goes on as long as the agents do, no longer
        elif i == len(agents):
            sweep_loop()
        else:
            share_loop(forward=i % 2 == 0)

    race(len(agents) + 3, work)

    assert outcomes.unexpected == [], "\n\n".join(outcomes.unexpected)
    # Refused calls are budgets or quota without room, or a hold the sweep took before its settle or release.
    assert set(outcomes.refusal_codes()) <= {"budget_exceeded", "quota_exceeded", "hold_not_open"}
    assert outcomes.refusal_codes()["budget_exceeded"] > 0  # the race did reach the limits
    executed = [r for label, r in outcomes.results if label == "execute" and not isinstance(r, LedgerError)]
    assert executed  # some executions took both resources under the budgets
    for budget in budgets:
        _assert_budget_exact(budget)
    _assert_quotas_exact(agents)

    # The sweep returns what every hold left open reserved; then no budget holds a cent in reserve.
    services.holds_expire(now=T0 + dt.timedelta(days=1))
    assert not Allocation.objects.filter(status=Allocation.Status.HELD).exists()
    for budget in budgets:
        _assert_budget_exact(budget)
        assert budget.reserved_usd == 0
    _assert_quotas_exact(agents)

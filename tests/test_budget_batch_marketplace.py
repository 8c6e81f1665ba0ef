"""Budgets charged by batch items and marketplace purchases: an item or a purchase that a hard budget has no
room for is refused with 429 ``budget_exceeded`` like a single allocation, and what is accepted is charged
exactly once, under any concurrency."""

from __future__ import annotations

import datetime as dt
import threading
from decimal import Decimal

import pytest
from django.db import connection, connections
from django.db.models import Sum
from django.urls import reverse
from django.utils import timezone

from allocation.batch import BatchItem, allocations_batch_create
from allocation.keys import operator_key_issue
from allocation.models import Allocation
from allocation.services import allocation_create
from ledger.budgets import (
    agent_team_set,
    budget_create,
    budget_update,
    organization_create,
    run_create,
    team_create,
)
from ledger.errors import BudgetExceeded, LedgerError
from ledger.models import Agent, Budget, Grant, Quota, UsageLog
from ledger.periods import month_bounds
from ledger.services import agent_create, quota_open, reference_data_load
from optimization.models import Deal, Purchase
from optimization.services.marketplace import deal_list, deal_purchase
from tests.concurrency import race

pytest.register_assert_rewrite("tests.api_fixtures")

from tests.api_fixtures import assert_error, client_with_key  # noqa: E402

pytest_plugins = ["tests.api_fixtures"]

pytestmark = pytest.mark.django_db

# COMPUTE_MS lists at $0.00001 a millisecond: 1,000 ms cost one cent.
CENT_MS = 1_000
CENT = Decimal("0.01")
LIMITS = {"COMPUTE_MS": 10**9, "AI_TOKENS": 10**9}


def _team(agent_count: int = 3, *, team_id: str = "research", organization_id: str = "acme") -> list[Agent]:
    """Agents ``{team_id}-0..`` in a team of an organization, each with plenty of quota."""
    organization_create(id=organization_id)
    team_create(id=team_id, organization_id=organization_id)
    agents = []
    for n in range(agent_count):
        agent = agent_create(agent_id=f"{team_id}-{n}", tier_code="CUSTOM", custom_limits=LIMITS)
        agents.append(agent_team_set(agent=agent, team_id=team_id))
    return agents


def _item(agent_id: str, cents: int = 1, **extra) -> dict:
    return {"agent_id": agent_id, "resource_type": "COMPUTE_MS", "amount": cents * CENT_MS, **extra}


def _post(client, items, **headers):
    return client.post(reverse("api:usage-batch"), {"items": items}, format="json", **headers)


def _ok(response) -> dict:
    assert response.status_code == 200, (response.status_code, response.content[:500])
    return response.json()


def _statuses(body: dict) -> list[int]:
    return [result["status"] for result in body["results"]]


def _spent(budget: Budget) -> Decimal:
    return Budget.objects.values_list("spent_usd", flat=True).get(pk=budget.pk)


def _accepted_cost(agent_prefix: str) -> Decimal:
    return UsageLog.objects.filter(agent__id__startswith=agent_prefix).aggregate(total=Sum("cost_usd"))[
        "total"
    ] or Decimal(0)


# --- Batches ----------------------------------------------------------------------------------------------


def test_a_batch_takes_exactly_what_the_team_budget_has_room_for_in_order(operator_client):
    agents = _team()
    team_budget = budget_create(scope="team", scope_id="research", window="month", limit_usd="0.10")
    organization_budget = budget_create(
        scope="organization", scope_id="acme", window="month", limit_usd="100"
    )
    items = [_item(agents[n % 3].pk) for n in range(15)]

    body = _ok(_post(operator_client, items))

    assert _statuses(body) == [201] * 10 + [429] * 5
    assert body["summary"] == {"accepted": 10, "refused": 5, "replayed": 0}
    assert {result["error"]["code"] for result in body["results"][10:]} == {"budget_exceeded"}
    assert _spent(team_budget) == Decimal("0.10") == _accepted_cost("research-")
    assert _spent(organization_budget) == Decimal("0.10")
    assert Allocation.objects.count() == 10
    # Each allocation names the budgets it was charged to.
    assert {tuple(ids) for ids in Allocation.objects.values_list("budget_ids", flat=True)} == {
        tuple(sorted([team_budget.pk, organization_budget.pk]))
    }
    team_budget.refresh_from_db()
    assert team_budget.refused_at is not None
    organization_budget.refresh_from_db()
    assert organization_budget.refused_at is None


def test_a_refused_item_answers_what_a_single_allocation_answers(operator_client):
    agents = _team()
    team_budget = budget_create(scope="team", scope_id="research", window="month", limit_usd="0.05")
    items = [_item(agents[0].pk, 2), _item(agents[1].pk, 2), _item(agents[2].pk, 2), _item(agents[0].pk, 1)]

    body = _ok(_post(operator_client, items))

    assert _statuses(body) == [201, 201, 429, 201]  # a refused item refuses nothing else
    refused = body["results"][2]["error"]
    start, end = month_bounds(timezone.now())
    assert refused["details"] == {
        "budget_id": team_budget.pk,
        "scope": "team",
        "scope_id": "research",
        "window": "month",
        "window_start": start.isoformat().replace("+00:00", "Z"),
        "window_end": end.isoformat().replace("+00:00", "Z"),
        "limit_usd": "0.05",
        "rollover_usd": "0",
        "spent_usd": "0.04",
        "reserved_usd": "0",
        "requested_usd": "0.02",
    }
    # The same call made alone now (the budget has $0.05 spent) names the same budget with the same figures.
    _, raw_key = operator_key_issue(username="single")
    single = client_with_key(raw_key).post(
        reverse("api:allocations", args=[agents[2].pk]),
        {"resource_type": "COMPUTE_MS", "amount": 2 * CENT_MS},
        format="json",
    )
    details = assert_error(single, 429, "budget_exceeded")
    assert details == {**refused["details"], "spent_usd": "0.05"}
    assert single["Retry-After"]


def test_a_batch_item_refused_by_both_its_budget_and_its_quota_is_refused_by_the_budget(operator_client):
    """A single allocation checks its budgets before its quota: so does an item."""
    organization_create(id="acme")
    team_create(id="research", organization_id="acme")
    agent = agent_create(agent_id="small", tier_code="CUSTOM", custom_limits={"COMPUTE_MS": 3 * CENT_MS})
    agent_team_set(agent=agent, team_id="research")
    budget_create(scope="team", scope_id="research", window="month", limit_usd="0.05")

    # After the first item: one cent of quota left, three of budget.
    body = _ok(_post(operator_client, [_item("small", 2), _item("small", 4), _item("small", 2)]))

    assert _statuses(body) == [201, 429, 429]
    assert body["results"][1]["error"]["code"] == "budget_exceeded"
    assert body["results"][2]["error"]["code"] == "quota_exceeded"  # the budget has room for this one


def test_agent_team_and_organization_budgets_bind_in_turn_within_a_batch(operator_client):
    agents = _team(2)
    _team(1, team_id="sales", organization_id="globex")
    agent_budget = budget_create(scope="agent", scope_id="research-0", window="day", limit_usd="0.02")
    team_budget = budget_create(scope="team", scope_id="research", window="week", limit_usd="0.04")
    organization_budget = budget_create(
        scope="organization", scope_id="acme", window="month", limit_usd="0.05"
    )
    items = [
        _item("research-0"),
        _item("research-0"),
        _item("research-0"),  # the agent's $0.02 binds
        _item("research-1"),
        _item("research-1"),
        _item("research-1"),  # the team's $0.04 binds
        _item("sales-0"),  # another team of another organization: its own budgets only
    ]

    body = _ok(_post(operator_client, items))

    assert _statuses(body) == [201, 201, 429, 201, 201, 429, 201]
    assert body["results"][2]["error"]["details"]["budget_id"] == agent_budget.pk
    assert body["results"][5]["error"]["details"]["budget_id"] == team_budget.pk
    assert (_spent(agent_budget), _spent(team_budget), _spent(organization_budget)) == (
        Decimal("0.02"),
        Decimal("0.04"),
        Decimal("0.04"),
    )
    # The organization binds last: $0.01 is left in it.
    budget_update(budget=team_budget, changes={"limit_usd": "1"})
    body = _ok(_post(operator_client, [_item(agents[1].pk), _item(agents[1].pk)]))
    assert _statuses(body) == [201, 429]
    assert body["results"][1]["error"]["details"]["budget_id"] == organization_budget.pk
    assert _spent(organization_budget) == Decimal("0.05")


def test_soft_budgets_are_charged_but_never_refuse_an_item(operator_client):
    _team(1)
    soft = budget_create(scope="team", scope_id="research", window="month", limit_usd="0.01", mode="soft")

    body = _ok(_post(operator_client, [_item("research-0")] * 3))

    assert _statuses(body) == [201, 201, 201]
    assert _spent(soft) == Decimal("0.03")
    soft.refresh_from_db()
    assert soft.refused_at is None


def test_batch_items_may_name_a_run_whose_budget_applies(operator_client):
    agents = _team(2)
    run = run_create(agent=agents[0], run_id="loop-1", limit_usd="0.02")
    team_budget = budget_create(scope="team", scope_id="research", window="month", limit_usd="1")
    items = [
        _item("research-0", run_id="loop-1"),
        _item("research-0"),  # names no run: the run's budget does not apply
        _item("research-0", run_id="loop-1"),
        _item("research-0", run_id="loop-1"),  # the run's third cent
        _item("research-1", run_id="loop-1"),  # another agent's run of that name does not exist
        _item("research-0", run_id="loop-2"),
    ]

    body = _ok(_post(operator_client, items))

    assert _statuses(body) == [201, 201, 201, 429, 404, 404]
    assert body["results"][3]["error"]["details"]["budget_id"] == run.pk
    assert body["results"][3]["error"]["details"]["scope"] == "run"
    assert [body["results"][n]["error"]["code"] for n in (4, 5)] == ["run_not_found"] * 2
    assert body["results"][0]["allocation"]["run_id"] == "loop-1"
    assert body["results"][1]["allocation"]["run_id"] == ""
    assert (_spent(run), _spent(team_budget)) == (Decimal("0.02"), Decimal("0.03"))
    named = Allocation.objects.filter(run_id="loop-1")
    assert named.count() == 2
    assert {tuple(ids) for ids in named.values_list("budget_ids", flat=True)} == {
        tuple(sorted([run.pk, team_budget.pk]))
    }


def test_a_run_that_has_ended_refuses_the_items_that_name_it(operator_client):
    agents = _team(1)
    run_create(
        agent=agents[0],
        run_id="old",
        limit_usd="1",
        ttl_seconds=60,
        now=timezone.now() - dt.timedelta(hours=1),
    )

    body = _ok(_post(operator_client, [_item("research-0", run_id="old"), _item("research-0")]))

    assert _statuses(body) == [409, 201]
    assert body["results"][0]["error"]["code"] == "run_ended"


def test_replaying_a_batch_does_not_charge_its_budgets_twice(operator_client):
    agents = _team()
    team_budget = budget_create(scope="team", scope_id="research", window="month", limit_usd="0.05")
    items = [_item(agents[n % 3].pk, idempotency_key=f"key-{n}") for n in range(7)]

    first = _ok(_post(operator_client, items))
    assert _statuses(first) == [201] * 5 + [429] * 2
    assert _spent(team_budget) == Decimal("0.05")

    # Item keys: the accepted items are replayed, the refused ones are decided again (and refused again).
    again = _ok(_post(operator_client, items))
    assert again["summary"] == {"accepted": 0, "refused": 2, "replayed": 5}
    assert [result["allocation"] for result in again["results"][:5]] == [
        result["allocation"] for result in first["results"][:5]
    ]
    assert _spent(team_budget) == Decimal("0.05")

    # A request-level Idempotency-Key replays the whole answer.
    budget_update(budget=team_budget, changes={"limit_usd": "1"})
    fresh = [_item(agents[0].pk), _item(agents[1].pk)]
    once = _ok(_post(operator_client, fresh, HTTP_IDEMPOTENCY_KEY="whole-batch"))
    twice = _post(operator_client, fresh, HTTP_IDEMPOTENCY_KEY="whole-batch")
    assert twice["Idempotent-Replayed"] == "true"
    assert twice.json() == once
    assert _spent(team_budget) == Decimal("0.07") == _accepted_cost("research-")


def test_a_batch_rolls_an_ended_window_before_charging_it(reference_data):
    agents = _team(1)
    day = dt.datetime(2026, 12, 9, 10, 0, tzinfo=dt.UTC)
    budget = budget_create(
        scope="agent", scope_id="research-0", window="day", limit_usd="0.05", rollover_percent=100, now=day
    )
    Budget.objects.filter(pk=budget.pk).update(spent_usd=Decimal("0.04"))
    next_day = day + dt.timedelta(days=1)
    items = [BatchItem(agent_id=agents[0].pk, resource_type_id="COMPUTE_MS", amount=CENT_MS)] * 7

    outcome = allocations_batch_create(items=items, principal="ops", path="/batch", now=next_day)

    # The new day opens with its $0.05 and the $0.01 the day before left: room for six cents.
    assert [result["status"] for result in outcome.results] == [201] * 6 + [429]
    assert outcome.results[6]["error"]["details"]["rollover_usd"] == "0.01"
    budget.refresh_from_db()
    assert (budget.window_start, budget.window_end) == (
        dt.datetime(2026, 12, 10, tzinfo=dt.UTC),
        dt.datetime(2026, 12, 11, tzinfo=dt.UTC),
    )
    assert (budget.spent_usd, budget.rollover_usd) == (Decimal("0.06"), Decimal("0.01"))


@pytest.mark.django_db(transaction=True)
def test_concurrent_batches_and_single_allocations_of_a_team_never_overspend_its_budget():
    reference_data_load()
    agents = _team()
    for agent in agents:
        quota_open(agent=agent, resource_type_id="COMPUTE_MS")
    team_budget = budget_create(scope="team", scope_id="research", window="month", limit_usd="0.25")

    def work(i: int) -> list[int]:
        if i % 3 == 2:  # single allocations racing the batches
            statuses = []
            for n in range(5):
                try:
                    allocation_create(
                        agent=Agent.objects.get(pk=agents[n % 3].pk),
                        resource_type_id="COMPUTE_MS",
                        amount=CENT_MS,
                    )
                    statuses.append(201)
                except BudgetExceeded:
                    statuses.append(429)
            return statuses
        items = [
            BatchItem(agent_id=agents[(i + n) % 3].pk, resource_type_id="COMPUTE_MS", amount=CENT_MS)
            for n in range(10)
        ]
        outcome = allocations_batch_create(items=items, principal=f"ops-{i}", path="/batch")
        return [result["status"] for result in outcome.results]

    results = race(9, work)  # 6 batches of 10 items and 3 callers of 5 allocations: 75 cents asked

    statuses = [status for result in results for status in result]
    assert set(statuses) == {201, 429}
    assert statuses.count(201) == 25
    assert _spent(team_budget) == Decimal("0.25") == _accepted_cost("research-")
    assert Allocation.objects.count() == 25
    assert sum(Quota.objects.values_list("used", flat=True)) == 25 * CENT_MS


@pytest.mark.django_db(transaction=True)
def test_a_batch_whose_budget_moved_after_its_read_decides_again_and_never_overspends():
    """Another allocation takes most of the team's budget between the batch's unlocked read and its lock of
    the budgets: the batch finds that out under the lock and decides again on what is left."""
    reference_data_load()
    agents = _team(2)
    for agent in agents:
        quota_open(agent=agent, resource_type_id="COMPUTE_MS")
    team_budget = budget_create(scope="team", scope_id="research", window="month", limit_usd="0.10")
    statements: list[str] = []

    def rival():
        try:
            allocation_create(
                agent=Agent.objects.get(pk=agents[1].pk), resource_type_id="COMPUTE_MS", amount=8 * CENT_MS
            )
        finally:
            connections.close_all()

    def wrapper(execute, sql, params, many, context):
        statements.append(sql)
        locks = [s for s in statements if "FOR NO KEY UPDATE" in s and "ledger_budget" in s]
        if len(locks) == 1 and sql is locks[0]:  # the batch's first lock of its budgets
            thread = threading.Thread(target=rival)
            thread.start()
            thread.join(timeout=30)
        return execute(sql, params, many, context)

    items = [BatchItem(agent_id=agents[0].pk, resource_type_id="COMPUTE_MS", amount=CENT_MS)] * 5
    with connection.execute_wrapper(wrapper):
        outcome = allocations_batch_create(items=items, principal="ops", path="/batch")

    # Read alone it would have taken all five cents; after the rival's eight, two are left.
    assert [result["status"] for result in outcome.results] == [201, 201, 429, 429, 429]
    assert outcome.results[2]["error"]["details"]["spent_usd"] == "0.1"
    inserts = [s for s in statements if s.startswith('INSERT INTO "allocation_allocation"')]
    assert len(inserts) == 2  # the first attempt was rolled back, then written again
    assert _spent(team_budget) == Decimal("0.10") == _accepted_cost("research-")


# --- Marketplace purchases --------------------------------------------------------------------------------

PRICE = Decimal("0.0000008")  # a unit of AI_TOKENS on the seller's deal
T0 = month_bounds(timezone.now())[0] + dt.timedelta(days=10, hours=12)


def _market_ledger() -> dict:
    """Everything a purchase writes, to compare before and after a refusal."""
    return {
        "quotas": sorted(
            Quota.objects.values_list("agent_id", "resource_type_id", "limit", "listed", "spent_usd")
        ),
        "grants": Grant.objects.count(),
        "usage": UsageLog.objects.count(),
        "deals": sorted(Deal.objects.values_list("amount_left", "status")),
        "purchases": Purchase.objects.count(),
        "budgets": sorted(Budget.objects.values_list("pk", "spent_usd", "reserved_usd")),
    }


@pytest.fixture
def market(reference_data) -> tuple[Deal, list[Agent]]:
    """A seller's deal of 1,000,000 tokens at $0.0000008, and two buyers in a team of an organization."""
    seller = agent_create(agent_id="seller", tier_code="PRO")
    deal = deal_list(
        agent=seller, resource_type_id="AI_TOKENS", amount=1_000_000, unit_price_usd=PRICE, now=T0
    )
    return deal, _team(2, team_id="buyers")


def test_a_purchase_is_charged_to_the_buyers_budgets(market):
    deal, (buyer, _) = market
    agent_budget = budget_create(scope="agent", scope_id=buyer.pk, window="month", limit_usd="1", now=T0)
    team_budget = budget_create(scope="team", scope_id="buyers", window="month", limit_usd="1", now=T0)
    organization_budget = budget_create(
        scope="organization", scope_id="acme", window="day", limit_usd="1", now=T0
    )
    seller_budget = budget_create(scope="agent", scope_id="seller", window="month", limit_usd="1", now=T0)

    purchase = deal_purchase(deal_id=deal.pk, buyer=buyer, amount=120_000, actor="t", now=T0)

    assert purchase.cost_usd == Decimal("0.096")
    for budget in (agent_budget, team_budget, organization_budget):
        assert _spent(budget) == Decimal("0.096")
    assert _spent(seller_budget) == 0  # the seller is not paid, nor charged


def test_a_purchase_over_a_hard_budget_is_refused_with_budget_exceeded_and_writes_nothing(
    market, operator_client
):
    deal, (buyer, other) = market
    team_budget = budget_create(scope="team", scope_id="buyers", window="month", limit_usd="0.10")
    deal_purchase(deal_id=deal.pk, buyer=other, amount=100_000, actor="t")  # $0.08 of the team's $0.10
    before = _market_ledger()

    response = operator_client.post(
        reverse("optimization:deal-purchase", args=[deal.pk]),
        {"agent_id": buyer.pk, "amount": 50_000},  # $0.04
        format="json",
    )

    details = assert_error(response, 429, "budget_exceeded")
    assert (details["budget_id"], details["scope"], details["scope_id"]) == (team_budget.pk, "team", "buyers")
    assert (details["limit_usd"], details["spent_usd"], details["requested_usd"]) == ("0.1", "0.08", "0.04")
    assert response["Retry-After"]
    assert _market_ledger() == before
    # What still fits is bought.
    purchase = deal_purchase(deal_id=deal.pk, buyer=buyer, amount=25_000, actor="t")
    assert purchase.cost_usd == Decimal("0.02")
    assert _spent(team_budget) == Decimal("0.10")


def test_a_refused_purchase_marks_the_budget_refused(market):
    deal, (buyer, _) = market
    agent_budget = budget_create(scope="agent", scope_id=buyer.pk, window="month", limit_usd="0.01", now=T0)
    before = _market_ledger()

    with pytest.raises(BudgetExceeded) as refused:
        deal_purchase(deal_id=deal.pk, buyer=buyer, amount=20_000, actor="t", now=T0)

    assert refused.value.details["budget_id"] == agent_budget.pk
    assert _market_ledger() == before
    agent_budget.refresh_from_db()
    assert agent_budget.refused_at == T0


def test_a_soft_budget_never_refuses_a_purchase(market):
    deal, (buyer, _) = market
    soft = budget_create(
        scope="team", scope_id="buyers", window="month", limit_usd="0.01", mode="soft", now=T0
    )

    deal_purchase(deal_id=deal.pk, buyer=buyer, amount=100_000, actor="t", now=T0)

    assert _spent(soft) == Decimal("0.08")


@pytest.mark.django_db(transaction=True)
def test_buyers_of_a_team_racing_never_overspend_its_budget():
    reference_data_load()
    seller = agent_create(agent_id="seller", tier_code="PRO")
    deal = deal_list(agent=seller, resource_type_id="AI_TOKENS", amount=1_000_000, unit_price_usd=PRICE)
    buyers = _team(10, team_id="buyers")
    team_budget = budget_create(scope="team", scope_id="buyers", window="month", limit_usd="0.04")

    def buy(i: int):
        try:
            return deal_purchase(
                deal_id=deal.pk, buyer=Agent.objects.get(pk=buyers[i].pk), amount=10_000, actor="t"
            )
        except LedgerError as exc:
            return exc.code

    results = race(10, buy)  # $0.008 each: room for five

    assert sum(isinstance(result, Purchase) for result in results) == 5
    assert [result for result in results if not isinstance(result, Purchase)] == ["budget_exceeded"] * 5
    assert _spent(team_budget) == Decimal("0.04")
    assert UsageLog.objects.filter(kind="purchase").aggregate(total=Sum("cost_usd"))["total"] == Decimal(
        "0.04"
    )
    deal.refresh_from_db()
    assert deal.amount_left == 1_000_000 - 50_000

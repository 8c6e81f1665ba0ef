"""Leases on the server: a hold of its own kind, settled like any hold, charged in full when it expires."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
from django.db.models import Sum
from django.utils import timezone

from allocation import services
from allocation.models import Allocation
from ledger.budgets import budget_create
from ledger.models import Budget, Quota, UsageLog

pytest.register_assert_rewrite("tests.api_fixtures")
from tests.api_fixtures import ledger_snapshot  # noqa: E402

pytest_plugins = ["tests.api_fixtures"]
pytestmark = pytest.mark.django_db

AI_TOKEN_PRICE = Decimal("0.000001")


def _lease(agent, **body):
    return agent.client.post(
        f"/api/v1/agents/{agent.id}/leases", {"resource_type": "AI_TOKENS", **body}, format="json"
    )


def _quota(agent_id: str) -> Quota:
    return Quota.objects.get(agent_id=agent_id, resource_type_id="AI_TOKENS")


def _consumed(agent_id: str) -> int:
    rows = UsageLog.objects.filter(agent_id=agent_id, kind__in=["allocation", "settlement", "execution"])
    return rows.aggregate(total=Sum("amount"))["total"] or 0


def test_a_lease_is_a_hold_marked_as_a_lease(agent_a):
    response = _lease(agent_a, amount=1000, ttl_seconds=120, task_id="hot-loop")
    assert response.status_code == 201, response.json()
    body = response.json()
    assert (body["status"], body["lease"], body["allocated_amount"], body["task_id"]) == (
        "held",
        True,
        1000,
        "hot-loop",
    )
    assert (_quota(agent_a.id).reserved, _quota(agent_a.id).used) == (1000, 0)
    shown = agent_a.client.get(f"/api/v1/agents/{agent_a.id}/allocations/{body['id']}").json()
    assert shown["lease"] is True and shown["expires_at"] == body["expires_at"]
    plain = agent_a.client.post(
        f"/api/v1/agents/{agent_a.id}/allocations",
        {"resource_type": "AI_TOKENS", "amount": 5, "hold": True},
        format="json",
    ).json()
    assert plain["lease"] is False


def test_a_lease_settles_what_its_client_counted_and_returns_the_rest(agent_a):
    lease = _lease(agent_a, amount=1000).json()
    settled = agent_a.client.post(
        f"/api/v1/agents/{agent_a.id}/allocations/{lease['id']}/settle", {"amount": 321}, format="json"
    )
    assert settled.status_code == 200, settled.json()
    assert (settled.json()["status"], settled.json()["allocated_amount"]) == ("settled", 321)
    quota = _quota(agent_a.id)
    assert (quota.used, quota.reserved) == (321, 0)
    assert _consumed(agent_a.id) == 321


def test_an_expired_lease_is_charged_in_full_and_an_expired_hold_released(agent_a):
    lease = _lease(agent_a, amount=1000, ttl_seconds=60).json()
    hold = services.allocation_create(
        agent=agent_a.agent, resource_type_id="AI_TOKENS", amount=400, hold=True, hold_ttl_seconds=60
    )
    later = timezone.now() + dt.timedelta(minutes=2)
    assert services.holds_expire(now=later) == 2
    assert services.holds_expire(now=later) == 0  # nothing is charged twice

    quota = _quota(agent_a.id)
    assert (quota.used, quota.reserved) == (1000, 0)
    assert quota.spent_usd == 1000 * AI_TOKEN_PRICE
    assert _consumed(agent_a.id) == quota.used  # the log and the counters agree
    charge = UsageLog.objects.get(agent_id=agent_a.id, kind="settlement")
    assert (charge.amount, charge.cost_usd, charge.period_start) == (
        1000,
        1000 * AI_TOKEN_PRICE,
        quota.period_start,
    )
    assert charge.metadata == {"allocation_id": lease["id"], "lease_expired": True}

    expired = Allocation.objects.get(pk=lease["id"])
    assert (expired.status, expired.settled_amount, expired.cost_usd) == (
        "expired",
        1000,
        1000 * AI_TOKEN_PRICE,
    )
    released = Allocation.objects.get(pk=hold.pk)
    assert (released.status, released.settled_amount, released.cost_usd) == ("expired", None, 0)
    shown = agent_a.client.get(f"/api/v1/agents/{agent_a.id}/allocations/{lease['id']}").json()
    assert (shown["status"], shown["allocated_amount"], shown["lease"]) == ("expired", 1000, True)

    # Its client, back too late, is told so and changes nothing.
    late = agent_a.client.post(
        f"/api/v1/agents/{agent_a.id}/allocations/{lease['id']}/settle", {"amount": 10}, format="json"
    )
    assert (late.status_code, late.json()["error"]["code"]) == (409, "hold_not_open")
    assert _quota(agent_a.id).used == 1000


def test_an_expired_lease_moves_its_money_from_reserved_to_spent_on_every_budget(agent_a):
    day = budget_create(scope="agent", scope_id=agent_a.id, window="day", limit_usd="0.01")
    month = budget_create(scope="agent", scope_id=agent_a.id, window="month", limit_usd="5")
    run = agent_a.client.post(
        f"/api/v1/agents/{agent_a.id}/runs", {"run_id": "loop-1", "limit_usd": "1"}, format="json"
    )
    assert run.status_code == 201, run.json()
    in_run = _lease(agent_a, amount=5000, ttl_seconds=60, run_id="loop-1")
    outside = _lease(agent_a, amount=2000, ttl_seconds=60)  # a second lease, without the run
    assert (in_run.status_code, outside.status_code) == (201, 201)
    cost = Decimal("0.005")  # 5,000 tokens
    for budget in (day, month):
        budget.refresh_from_db()
        assert (budget.spent_usd, budget.reserved_usd) == (0, cost + Decimal("0.002"))

    # The day has ended when the sweep comes: the charge lands in the window open now, and is not refused
    # even though the new day's hard budget has less room than a fresh reservation would need.
    later = timezone.now() + dt.timedelta(days=1, minutes=1)
    assert services.holds_expire(now=later) == 2
    day.refresh_from_db()
    month.refresh_from_db()
    run_budget = Budget.objects.get(scope="run", run_id="loop-1")
    assert (day.spent_usd, day.reserved_usd) == (cost + Decimal("0.002"), 0)
    assert day.window_start > timezone.now()
    assert (run_budget.spent_usd, run_budget.reserved_usd) == (cost, 0)
    if month.window_start <= timezone.now():  # unless the month ended too
        assert (month.spent_usd, month.reserved_usd) == (cost + Decimal("0.002"), 0)
    else:
        assert month.reserved_usd == 0


def test_a_lease_the_quota_or_a_budget_cannot_hold_is_refused_and_writes_nothing(agent_a):
    before = ledger_snapshot()
    too_big = _lease(agent_a, amount=2_000_000)
    assert (too_big.status_code, too_big.json()["error"]["code"]) == (429, "quota_exceeded")
    assert ledger_snapshot() == before
    budget_create(scope="agent", scope_id=agent_a.id, window="day", limit_usd="0.001")
    before = ledger_snapshot()
    too_dear = _lease(agent_a, amount=5000)
    assert (too_dear.status_code, too_dear.json()["error"]["code"]) == (429, "budget_exceeded")
    assert ledger_snapshot() == before


@pytest.mark.parametrize(
    "body",
    [
        {"amount": 0},
        {"amount": 10, "ttl_seconds": 0},
        {"amount": 10, "ttl_seconds": 8 * 24 * 3600},
        {"amount": 10, "hold": True},
        {"amount": "10"},
        {"amount": 10, "resource_type": "GOLD"},
    ],
)
def test_bad_lease_input_is_a_400_that_changes_nothing(agent_a, body):
    before = ledger_snapshot()
    response = _lease(agent_a, **body)
    assert response.status_code == 400, response.json()
    assert response.json()["error"]["code"] == "validation_error"
    assert ledger_snapshot() == before


def test_another_agents_key_cannot_lease_for_it(agent_a, agent_b):
    response = agent_b.client.post(
        f"/api/v1/agents/{agent_a.id}/leases", {"resource_type": "AI_TOKENS", "amount": 10}, format="json"
    )
    assert response.status_code == 404
    assert not Allocation.objects.exists()


def test_a_retried_lease_with_the_same_idempotency_key_holds_once(agent_a):
    headers = {"HTTP_IDEMPOTENCY_KEY": "lease-once"}
    url = f"/api/v1/agents/{agent_a.id}/leases"
    first = agent_a.client.post(url, {"resource_type": "AI_TOKENS", "amount": 10}, format="json", **headers)
    again = agent_a.client.post(url, {"resource_type": "AI_TOKENS", "amount": 10}, format="json", **headers)
    assert (first.status_code, again.status_code) == (201, 201)
    assert again.headers["Idempotent-Replayed"] == "true"
    assert first.json() == again.json()
    assert Allocation.objects.filter(lease=True).count() == 1
    assert _quota(agent_a.id).reserved == 10

"""Exact quotas under concurrency, on real PostgreSQL: threads with their own connections race for quota."""

from __future__ import annotations

from collections import Counter

import pytest
from django.db import connection, transaction
from django.db.models import Sum
from rest_framework.test import APIClient

from allocation import services
from allocation.keys import api_key_issue
from allocation.models import Allocation, IdempotencyRecord
from ledger.errors import QuotaExceeded
from ledger.models import Agent, Quota, UsageLog
from ledger.services import agent_create, reference_data_load
from tests.concurrency import race

pytestmark = pytest.mark.django_db(transaction=True)

THREADS = 60


@pytest.fixture
def tight_agent(db):
    reference_data_load()
    # Room for exactly K = 7 allocations of 1,000 tokens.
    return agent_create(agent_id="racer", tier_code="CUSTOM", custom_limits={"AI_TOKENS": 7_000})


def _allocate(agent_id: str, *, hold: bool = False):
    agent = Agent.objects.get(pk=agent_id)
    try:
        return services.allocation_create(agent=agent, resource_type_id="AI_TOKENS", amount=1_000, hold=hold)
    except QuotaExceeded:
        return None


def test_racing_allocations_take_exactly_the_quota(tight_agent):
    results = race(THREADS, lambda i: _allocate("racer"))
    assert sum(result is not None for result in results) == 7
    quota = Quota.objects.get(agent=tight_agent, resource_type_id="AI_TOKENS")
    assert (quota.used, quota.reserved, quota.limit) == (7_000, 0, 7_000)
    usage = UsageLog.objects.filter(agent=tight_agent)
    assert usage.count() == 7
    assert usage.aggregate(total=Sum("amount"))["total"] == quota.used
    assert Allocation.objects.filter(agent=tight_agent).count() == 7


def test_racing_holds_and_settlements_stay_exact(tight_agent):
    holds = [h for h in race(THREADS, lambda i: _allocate("racer", hold=True)) if h is not None]
    assert len(holds) == 7
    quota = Quota.objects.get(agent=tight_agent, resource_type_id="AI_TOKENS")
    assert (quota.used, quota.reserved) == (0, 7_000)

    # Settle every hold concurrently: some for less, some for exactly, some for more than held.
    # More than held only fits while others have returned their unused part: the total can never pass 7,000.
    actual = [400, 1_000, 1_600, 250, 1_000, 2_000, 900]

    def settle(i):
        agent = Agent.objects.get(pk="racer")
        try:
            return services.hold_settle(agent=agent, allocation_id=holds[i].pk, amount=actual[i])
        except QuotaExceeded:
            return None

    settled = race(len(holds), settle)
    quota.refresh_from_db()
    refused = [i for i, result in enumerate(settled) if result is None]
    expected_used = sum(amount for i, amount in enumerate(actual) if i not in refused)
    assert quota.used == expected_used <= 7_000
    assert quota.reserved == sum(1_000 for _ in refused)  # a refused settle leaves its hold as it was
    assert all(Allocation.objects.get(pk=holds[i].pk).status == "held" for i in refused)
    usage_total = UsageLog.objects.filter(agent=tight_agent).aggregate(total=Sum("amount"))["total"]
    assert usage_total == quota.used


def test_settle_racing_release_and_expiry_takes_effect_once(tight_agent):
    hold = _allocate("racer", hold=True)
    Allocation.objects.filter(pk=hold.pk).update(expires_at=hold.created_at)  # already expired

    def contend(i):
        agent = Agent.objects.get(pk="racer")
        try:
            if i % 3 == 0:
                return ("settle", services.hold_settle(agent=agent, allocation_id=hold.pk, amount=600).status)
            if i % 3 == 1:
                return ("release", services.hold_release(agent=agent, allocation_id=hold.pk).status)
            return ("expire", services.holds_expire())
        except Exception as exc:  # the losers are refused with hold_not_open
            return ("refused", getattr(exc, "code", type(exc).__name__))

    outcomes = race(12, contend)
    quota = Quota.objects.get(agent=tight_agent, resource_type_id="AI_TOKENS")
    final = Allocation.objects.get(pk=hold.pk).status
    assert quota.reserved == 0
    assert quota.used == (600 if final == "settled" else 0)
    assert UsageLog.objects.filter(agent=tight_agent).count() == (1 if final == "settled" else 0)
    winners = [o for o in outcomes if o[0] in {"settle", "release"}] + [
        o for o in outcomes if o[0] == "expire" and o[1] == 1
    ]
    assert len(winners) == 1
    assert {o[1] for o in outcomes if o[0] == "refused"} <= {"hold_not_open"}


def test_concurrent_duplicates_of_one_idempotency_key_charge_once(tight_agent):
    _, raw_key = api_key_issue(agent=tight_agent)

    def post(i):
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw_key}")
        response = client.post(
            f"/api/v1/agents/{tight_agent.id}/allocations",
            {"resource_type": "AI_TOKENS", "amount": 1_000, "task_id": "t-1"},
            format="json",
            HTTP_IDEMPOTENCY_KEY="same-key",
        )
        return response.status_code, response.json().get("id")

    results = race(40, post)
    assert Counter(status for status, _ in results) == {201: 40}
    assert len({allocation_id for _, allocation_id in results}) == 1
    quota = Quota.objects.get(agent=tight_agent, resource_type_id="AI_TOKENS")
    assert quota.used == 1_000
    assert UsageLog.objects.filter(agent=tight_agent).count() == 1
    assert IdempotencyRecord.objects.count() == 1


def test_agents_sharing_with_each_other_at_once_do_not_deadlock(db):
    reference_data_load()
    for agent_id in ("left", "right"):
        agent_create(agent_id=agent_id, tier_code="CUSTOM", custom_limits={"COMPUTE_MS": 10_000})

    def share(i):
        source, target = ("left", "right") if i % 2 else ("right", "left")
        with transaction.atomic():  # as the API runs it, inside the request's transaction
            return services.quota_share(
                source=Agent.objects.get(pk=source),
                target_id=target,
                resource_type_id="COMPUTE_MS",
                amount=100,
                actor="test",
            )

    race(20, share)
    limits = dict(Quota.objects.values_list("agent_id", "limit"))
    assert limits == {"left": 10_000, "right": 10_000}  # ten shares each way
    assert sum(limits.values()) == 20_000


def test_allocation_costs_a_fixed_number_of_queries(tight_agent, django_assert_max_num_queries):
    from django.test.utils import CaptureQueriesContext

    agent = Agent.objects.get(pk="racer")
    allocation = services.allocation_create(agent=agent, resource_type_id="AI_TOKENS", amount=10)  # opens
    counts = []
    for history in (0, 500):
        UsageLog.objects.bulk_create(
            UsageLog(
                agent=agent,
                resource_type_id="AI_TOKENS",
                quota_id=allocation.quota_id,
                amount=1,
                unit_price_usd=0,
                cost_usd=0,
                kind="allocation",
                created_at=services.timezone.now(),
                period_start=allocation.quota.period_start,
            )
            for _ in range(history)
        )
        with CaptureQueriesContext(connection) as ctx:
            services.allocation_create(agent=agent, resource_type_id="AI_TOKENS", amount=10)
        counts.append(len(ctx.captured_queries))
    # One statement: UPDATE quota + INSERT allocation + INSERT usage row (a WITH), in autocommit.
    assert counts[0] == counts[1] == 1


def test_allocation_over_http_costs_a_fixed_number_of_queries(tight_agent):
    from django.test.utils import CaptureQueriesContext

    _, raw_key = api_key_issue(agent=tight_agent)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw_key}")
    url = f"/api/v1/agents/{tight_agent.id}/allocations"
    body = {"resource_type": "AI_TOKENS", "amount": 5}
    client.post(url, body, format="json")  # opens the period, records the key's last use, caches the key
    counts = {}
    for label, headers in (("plain", {}), ("idempotent", {"HTTP_IDEMPOTENCY_KEY": "k-1"})):
        with CaptureQueriesContext(connection) as ctx:
            assert client.post(url, body, format="json", **headers).status_code == 201
        counts[label] = len(ctx.captured_queries)
    # One statement: UPDATE quota + INSERT allocation, usage row, audit record [and the response stored under
    # the key], in autocommit; the agent key is known from the first request (CachedApiKeyAuthentication).
    assert counts == {"plain": 1, "idempotent": 1}

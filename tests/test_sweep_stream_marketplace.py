"""The marketplace's deal expiry streams: batches of deals by id, each in its own short transaction.

Batches of two expire what one batch expires; a batch costs the same queries for 3 deals as for 30; a crash
loses only the batch in flight and the next run returns every seller's units exactly once.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from ledger.models import Quota
from ledger.periods import month_bounds
from ledger.services import agent_create, quota_open
from optimization.models import Deal
from optimization.services import marketplace
from optimization.services.marketplace import deal_list, deals_expire

pytestmark = pytest.mark.django_db

PERIOD_START, _ = month_bounds(timezone.now())
T0 = PERIOD_START + dt.timedelta(days=10, hours=12)
LATER = T0 + dt.timedelta(hours=2)


@pytest.fixture(autouse=True)
def _marketplace_on(settings):
    settings.ENABLE_MARKETPLACE_OPTIMIZATION = True
    settings.ENABLE_COLLABORATION_SHARING = True


def sellers(size: int) -> None:
    """``size`` sellers, each listing 1,000 AI tokens twice: once for an hour (expired at LATER), once for
    three hours (still open then)."""
    for index in range(size):
        agent = agent_create(agent_id=f"seller-{index:03d}", tier_code="PRO")
        quota_open(agent=agent, resource_type_id="AI_TOKENS", at=T0)
        for hours in (1, 3):
            deal_list(
                agent=agent,
                resource_type_id="AI_TOKENS",
                amount=1_000,
                unit_price_usd=Decimal("0.0000008"),
                expires_at=T0 + dt.timedelta(hours=hours),
                now=T0,
            )


def outcome() -> tuple:
    deals = sorted(Deal.objects.values_list("pk", "status", "closed_at"))
    listed = sorted(Quota.objects.values_list("agent_id", "listed"))
    return deals, listed


def test_batches_of_two_expire_what_one_batch_expires(reference_data):
    sellers(7)
    savepoint = transaction.savepoint()
    assert deals_expire(now=LATER, batch_size=1000) == {"expired": 7, "returned_units": 7_000}
    expected = outcome()
    transaction.savepoint_rollback(savepoint)

    assert deals_expire(now=LATER, batch_size=2) == {"expired": 7, "returned_units": 7_000}
    assert outcome() == expected
    assert {listed for _, listed in expected[1]} == {1_000}  # the three-hour listing is still set aside
    assert deals_expire(now=LATER, batch_size=2) == {"expired": 0, "returned_units": 0}


def _queries(size: int) -> int:
    savepoint = transaction.savepoint()
    sellers(size)
    with CaptureQueriesContext(connection) as captured:
        assert deals_expire(now=LATER, batch_size=1000)["expired"] == size
    transaction.savepoint_rollback(savepoint)
    return len(captured)


def test_a_batch_costs_the_same_queries_for_3_or_30_deals(reference_data):
    assert _queries(3) == _queries(30)


def test_a_crash_loses_only_the_batch_in_flight_and_the_next_run_returns_every_unit_once(
    reference_data, monkeypatch
):
    sellers(7)
    bulk_update_column = marketplace.bulk_update_column
    calls: list[int] = []

    def crash_in_the_third(**kwargs):
        calls.append(1)
        bulk_update_column(**kwargs)
        if len(calls) == 3:
            raise RuntimeError("worker lost")

    monkeypatch.setattr(marketplace, "bulk_update_column", crash_in_the_third)
    with pytest.raises(RuntimeError):
        deals_expire(now=LATER, batch_size=2)
    assert Deal.objects.filter(status="expired").count() == 4  # two batches committed

    monkeypatch.undo()
    assert deals_expire(now=LATER, batch_size=2) == {"expired": 3, "returned_units": 3_000}
    assert set(Quota.objects.values_list("listed", flat=True)) == {1_000}

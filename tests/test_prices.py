"""Prices with more than six decimals are charged exactly, to the ledger's twelve: in an allocation's
``cost_usd``, the period's ``spent_usd``, usage rows, batches, settlements and marketplace purchases."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
from django.urls import reverse
from django.utils import timezone

from allocation import services
from ledger.models import Quota, ResourcePrice, UsageLog
from ledger.money import usage_cost
from ledger.reference_cache import reference_cache_clear

pytest_plugins = ["tests.api_fixtures"]
pytestmark = pytest.mark.django_db

PRICE = Decimal("0.0000008")  # 0.8 micro-dollars: six places would round one unit up to 0.000001


@pytest.fixture
def fine_price(reference_data):
    ResourcePrice.objects.create(
        resource_type_id="AI_TOKENS",
        unit_price_usd=PRICE,
        effective_from=timezone.now() - dt.timedelta(seconds=1),
    )
    reference_cache_clear()


def test_the_cost_of_one_unit_keeps_all_its_decimals():
    assert usage_cost(1, PRICE) == Decimal("0.000000800000")
    assert usage_cost(3, Decimal("0.000000000001")) == Decimal("0.000000000003")


def test_an_allocation_over_http_is_charged_to_twelve_places(agent_a, fine_price):
    response = agent_a.client.post(
        reverse("api:allocations", args=[agent_a.id]),
        {"resource_type": "AI_TOKENS", "amount": 1},
        format="json",
    )

    assert response.status_code == 201, response.content
    assert response.json()["cost_usd"] == "0.000000800000"
    assert response.json()["unit_price_usd"].rstrip("0") == "0.0000008"
    assert Quota.objects.get(agent_id=agent_a.id, resource_type_id="AI_TOKENS").spent_usd == PRICE
    assert UsageLog.objects.get().cost_usd == PRICE
    cost = agent_a.client.get(reverse("api:cost", args=[agent_a.id])).json()
    assert cost["by_resource_type"]["AI_TOKENS"] == "0.000000800000"


def test_a_batch_and_a_settlement_are_charged_to_twelve_places(agent_a, fine_price):
    batch = agent_a.client.post(
        reverse("api:allocations-batch", args=[agent_a.id]),
        {"items": [{"resource_type": "AI_TOKENS", "amount": 1}] * 3},
        format="json",
    )
    assert batch.status_code == 200
    assert [item["allocation"]["cost_usd"] for item in batch.json()["results"]] == ["0.000000800000"] * 3
    hold = services.allocation_create(agent=agent_a.agent, resource_type_id="AI_TOKENS", amount=10, hold=True)
    settled = services.hold_settle(agent=agent_a.agent, allocation_id=hold.pk, amount=1)

    assert settled.cost_usd == PRICE
    quota = Quota.objects.get(agent_id=agent_a.id, resource_type_id="AI_TOKENS")
    assert quota.spent_usd == 4 * PRICE
    assert sum(UsageLog.objects.values_list("cost_usd", flat=True)) == 4 * PRICE


def test_a_purchase_at_a_fine_price_is_charged_to_twelve_places(agent_a, agent_b, reference_data):
    from optimization.services.marketplace import deal_list, deal_purchase

    deal = deal_list(agent=agent_b.agent, resource_type_id="AI_TOKENS", amount=10, unit_price_usd=PRICE)
    purchase = deal_purchase(deal_id=deal.pk, buyer=agent_a.agent, amount=1, actor="t")

    assert purchase.cost_usd == PRICE
    assert UsageLog.objects.get(kind=UsageLog.Kind.PURCHASE).cost_usd == PRICE
    assert Quota.objects.get(agent_id=agent_a.id, resource_type_id="AI_TOKENS").spent_usd == PRICE

"""The marketplace: listing unused quota, buying all or nothing, the refresh sweep, the search endpoints, the
switches, the admin, and exact totals when buyers race for the last units on PostgreSQL."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from decimal import Decimal

import pytest
from django.db.models import Sum
from django.urls import reverse
from django.utils import timezone

from allocation.api.compat import COMPAT_POST_ACTIONS
from allocation.services import allocation_create
from ledger.errors import LedgerError, QuotaExceeded
from ledger.models import Agent, Grant, Quota, UsageLog
from ledger.periods import month_bounds
from ledger.selectors import quota_reconciliation
from ledger.services import agent_create, quota_open, reference_data_load
from optimization.api.marketplace import compat_purchase
from optimization.models import Deal, Purchase
from optimization.services.marketplace import (
    deal_list,
    deal_purchase,
    deals_for_agent,
    discount_for,
    marketplace_refresh,
)
from optimization.tasks.marketplace import marketplace_refresh_task
from tests.concurrency import race

pytest.register_assert_rewrite("tests.api_fixtures")

from tests.api_fixtures import assert_error, client_with_key, keyed_agent  # noqa: E402

pytest_plugins = ["tests.api_fixtures"]

pytestmark = pytest.mark.django_db

PERIOD_START, PERIOD_END = month_bounds(timezone.now())
T0 = PERIOD_START + dt.timedelta(days=10, hours=12)
PRO_TOKENS = 1_000_000
PRICE = Decimal("0.0000008")  # below the AI_TOKENS list price of 0.000001


def _at(seconds: int) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def _quota(agent_id: str, resource_type: str = "AI_TOKENS") -> Quota:
    return Quota.objects.get(agent_id=agent_id, resource_type_id=resource_type, period_start=PERIOD_START)


def _listing(seller: Agent, amount: int = 300_000, price: Decimal = PRICE, **kwargs) -> Deal:
    return deal_list(
        agent=seller,
        resource_type_id=kwargs.pop("resource_type", "AI_TOKENS"),
        amount=amount,
        unit_price_usd=price,
        now=kwargs.pop("now", T0),
        **kwargs,
    )


def _ledger() -> dict:
    """Everything a purchase writes, to compare before and after a refusal."""
    return {
        "quotas": sorted(
            Quota.objects.values_list("agent_id", "resource_type_id", "limit", "listed", "spent_usd")
        ),
        "grants": Grant.objects.count(),
        "usage": UsageLog.objects.count(),
        "deals": sorted(
            (str(pk), left, status)
            for pk, left, status in Deal.objects.values_list("pk", "amount_left", "status")
        ),
        "purchases": Purchase.objects.count(),
    }


@pytest.fixture
def seller(reference_data) -> Agent:
    return agent_create(agent_id="seller", tier_code="PRO")


@pytest.fixture
def buyer(reference_data) -> Agent:
    return agent_create(agent_id="buyer", tier_code="PRO")


# --- Listing --------------------------------------------------------------------------------------------


def test_listing_sets_the_units_aside_until_sold_or_expired(seller):
    deal = _listing(seller, 300_000)

    quota = _quota("seller")
    assert (quota.limit, quota.used, quota.listed, quota.available) == (PRO_TOKENS, 0, 300_000, 700_000)
    assert (deal.amount_total, deal.amount_left, deal.status) == (300_000, 300_000, "open")
    assert (deal.seller_id, deal.seller_quota_id, deal.expires_at) == ("seller", quota.pk, PERIOD_END)
    # What is set aside can no longer be allocated.
    with pytest.raises(QuotaExceeded):
        allocation_create(agent=seller, resource_type_id="AI_TOKENS", amount=700_001, now=T0)
    allocation_create(agent=seller, resource_type_id="AI_TOKENS", amount=700_000, now=T0)


def test_listing_more_than_is_unused_is_refused_and_writes_nothing(seller):
    allocation_create(agent=seller, resource_type_id="AI_TOKENS", amount=800_000, now=T0)
    before = _ledger()

    with pytest.raises(QuotaExceeded) as refused:
        _listing(seller, 200_001)

    assert refused.value.details == {
        "resource_type": "AI_TOKENS",
        "requested": 200_001,
        "available": 200_000,
        "resets_at": refused.value.retry_at.isoformat().replace("+00:00", "Z"),
    }
    assert _ledger() == before
    _listing(seller, 200_000)
    assert _quota("seller").available == 0


def test_listing_through_the_api(seller, reference_data):
    keyed = keyed_agent(id="lister")
    url = reverse("optimization:agent-deals", args=["lister"])

    response = keyed.client.post(
        url, {"resource_type": "AI_TOKENS", "amount": 1_000, "unit_price_usd": "0.0000009"}, format="json"
    )

    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["amount_left"], body["unit_price_usd"], body["seller"]) == (1_000, "0.000000900000", "agent")
    assert body["seller_agent_id"] == "lister"  # the seller sees its own id
    assert _quota("lister").listed == 1_000
    too_much = keyed.client.post(
        url,
        {"resource_type": "AI_TOKENS", "amount": PRO_TOKENS, "unit_price_usd": "0.0000009"},
        format="json",
    )
    assert assert_error(too_much, 429, "quota_exceeded")["available"] == PRO_TOKENS - 1_000


def test_listing_expiry_must_fall_inside_the_current_period(seller):
    for expires_at in (PERIOD_END + dt.timedelta(seconds=1), T0, T0 - dt.timedelta(hours=1)):
        with pytest.raises(LedgerError) as refused:
            _listing(seller, 10, expires_at=expires_at)
        assert refused.value.code == "invalid_expiry"
    assert not Deal.objects.exists()
    assert Quota.objects.filter(listed__gt=0).count() == 0


def test_listing_refuses_other_agents_and_bad_input(reference_data, operator_client):
    own = keyed_agent(id="agent-own")
    keyed_agent(id="agent-other")
    body = {"resource_type": "AI_TOKENS", "amount": 10, "unit_price_usd": "0.000001"}

    assert_error(
        own.client.post(reverse("optimization:agent-deals", args=["agent-other"]), body, format="json"),
        404,
        "not_found",
    )
    url = reverse("optimization:agent-deals", args=["agent-own"])
    for bad in ({**body, "unit_price_usd": "-1"}, {**body, "amount": 0}, {**body, "resource_type": "GOLD"}):
        assert_error(own.client.post(url, bad, format="json"), 400, "validation_error")
    assert not Deal.objects.exists()
    # An operator may list on an agent's behalf.
    assert operator_client.post(url, body, format="json").status_code == 201


# --- Buying ---------------------------------------------------------------------------------------------


def test_purchase_moves_every_unit_and_cent_exactly(seller, buyer):
    deal = _listing(seller, 300_000)

    purchase = deal_purchase(deal_id=deal.pk, buyer=buyer, amount=120_000, actor="agent:buyer", now=_at(60))

    cost = Decimal("0.096000000000")  # 120,000 x 0.0000008
    assert (purchase.amount, purchase.unit_price_usd, purchase.cost_usd) == (120_000, PRICE, cost)
    deal.refresh_from_db()
    assert (deal.amount_left, deal.status, deal.closed_at) == (180_000, "open", None)
    buyer_quota, seller_quota = _quota("buyer"), _quota("seller")
    assert (buyer_quota.limit, buyer_quota.used, buyer_quota.spent_usd) == (1_120_000, 0, cost)
    assert (seller_quota.limit, seller_quota.listed, seller_quota.available) == (880_000, 180_000, 700_000)
    bought = Grant.objects.get(quota=buyer_quota)
    sold = Grant.objects.get(quota=seller_quota)
    assert (bought.amount, bought.reason, bought.counterparty_agent_id) == (
        120_000,
        "marketplace_purchase",
        "seller",
    )
    assert (sold.amount, sold.reason, sold.counterparty_agent_id) == (-120_000, "marketplace_sale", "buyer")
    usage = UsageLog.objects.get(agent=buyer)
    assert (usage.kind, usage.amount, usage.unit_price_usd, usage.cost_usd) == (
        "purchase",
        120_000,
        PRICE,
        cost,
    )
    assert (usage.quota_id, usage.resource_type_id, usage.created_at) == (
        buyer_quota.pk,
        "AI_TOKENS",
        _at(60),
    )
    assert not UsageLog.objects.filter(agent=seller).exists()
    # The counters still are a cache of the ledger rows behind them.
    for quota in (buyer_quota, seller_quota):
        assert quota_reconciliation(quota=quota) == {
            "used": quota.used,
            "limit": quota.limit,
            "spent_usd": quota.spent_usd,
        }


def test_buying_the_rest_sells_the_deal_out(seller, buyer):
    deal = _listing(seller, 300_000)
    deal_purchase(deal_id=deal.pk, buyer=buyer, amount=120_000, actor="t", now=_at(60))
    deal_purchase(deal_id=str(deal.pk), buyer=buyer, amount=180_000, actor="t", now=_at(120))

    deal.refresh_from_db()
    assert (deal.amount_left, deal.status, deal.closed_at) == (0, "sold_out", _at(120))
    seller_quota = _quota("seller")
    assert (seller_quota.limit, seller_quota.listed) == (700_000, 0)
    assert _quota("buyer").limit == 1_300_000
    assert Purchase.objects.aggregate(total=Sum("amount"))["total"] == 300_000
    with pytest.raises(LedgerError) as refused:
        deal_purchase(deal_id=deal.pk, buyer=buyer, amount=1, actor="t", now=_at(180))
    assert (refused.value.code, refused.value.status) == ("deal_not_open", 409)


def test_asking_for_more_than_is_left_is_refused_whole(seller, buyer, operator_client):
    deal = _listing(seller, 300_000)
    before = _ledger()

    response = operator_client.post(
        reverse("optimization:deal-purchase", args=[deal.pk]),
        {"agent_id": "buyer", "amount": 300_001},
        format="json",
    )

    details = assert_error(response, 409, "deal_insufficient")
    assert details == {"requested": 300_001, "amount_left": 300_000}
    assert _ledger() == before


def test_an_expired_deal_is_refused(seller, buyer):
    deal = _listing(seller, 1_000, expires_at=_at(3600))
    before = _ledger()
    with pytest.raises(LedgerError) as refused:
        deal_purchase(deal_id=deal.pk, buyer=buyer, amount=1, actor="t", now=_at(3600))
    assert (refused.value.code, refused.value.status) == ("deal_not_open", 409)
    assert _ledger() == before


def test_an_agent_cannot_buy_its_own_deal(seller):
    deal = _listing(seller, 1_000)
    before = _ledger()
    with pytest.raises(LedgerError) as refused:
        deal_purchase(deal_id=deal.pk, buyer=seller, amount=1, actor="t", now=_at(1))
    assert refused.value.code == "own_deal"
    assert _ledger() == before


def test_platform_deal_purchase_has_no_seller_side(buyer):
    marketplace_refresh(now=T0)
    deal = Deal.objects.get(resource_type_id="AI_TOKENS", seller__isnull=True)

    purchase = deal_purchase(deal_id=deal.pk, buyer=buyer, amount=50_000, actor="t", now=_at(1))

    assert purchase.cost_usd == Decimal("0.035000000000")  # 50,000 x 0.0000007 (30% off an idle fleet)
    assert list(Grant.objects.values_list("amount", "reason", "counterparty_agent_id")) == [
        (50_000, "marketplace_purchase", None)
    ]
    assert _quota("buyer").limit == PRO_TOKENS + 50_000


def test_purchase_api_buys_for_the_key_owner_only(seller, reference_data, operator_client):
    own = keyed_agent(id="agent-own")
    keyed_agent(id="agent-other")
    deal = _listing(seller, 1_000)
    url = reverse("optimization:deal-purchase", args=[deal.pk])

    assert_error(
        own.client.post(url, {"agent_id": "agent-other", "amount": 1}, format="json"), 404, "not_found"
    )
    assert_error(own.client.post(url, {"agent_id": "ghost", "amount": 1}, format="json"), 404, "not_found")
    assert not Purchase.objects.exists()

    response = own.client.post(url, {"agent_id": "agent-own", "amount": 10}, format="json")
    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["agent_id"], body["amount"], body["cost_usd"]) == ("agent-own", 10, "0.000008000000")
    assert (body["deal_amount_left"], body["deal_status"], body["resource_type"]) == (
        990,
        "open",
        "AI_TOKENS",
    )
    assert (
        operator_client.post(url, {"agent_id": "agent-other", "amount": 10}, format="json").status_code == 201
    )
    missing = reverse("optimization:deal-purchase", args=["00000000-0000-0000-0000-000000000000"])
    assert_error(
        operator_client.post(missing, {"agent_id": "agent-own", "amount": 1}, format="json"), 404, "not_found"
    )


def test_compat_purchase_answers_camel_case(seller, reference_data):
    # Through the real wiring: the optimization app registers the purchase action when it is ready.
    assert COMPAT_POST_ACTIONS["purchase"] is compat_purchase
    own = keyed_agent(id="agent-own")
    deal = _listing(seller, 1_000)

    response = own.client.post(
        reverse("api:resources"),
        {"action": "purchase", "agentId": "agent-own", "dealId": str(deal.pk), "amount": 25},
        format="json",
    )

    assert response.status_code == 201, response.content
    body = response.json()
    assert set(body) == {"purchaseId", "dealId", "agentId", "resourceType", "amount", "costUSD"}
    assert (body["dealId"], body["agentId"], body["resourceType"]) == (str(deal.pk), "agent-own", "AI_TOKENS")
    assert (body["amount"], body["costUSD"]) == (25, "0.000020000000")
    no_deal = own.client.post(
        reverse("api:resources"), {"action": "purchase", "agentId": "agent-own", "amount": 1}, format="json"
    )
    assert_error(no_deal, 400, "validation_error")


# --- Switches -------------------------------------------------------------------------------------------


def test_marketplace_switched_off_answers_feature_disabled(seller, reference_data, settings):
    own = keyed_agent(id="agent-own")
    deal = _listing(seller, 1_000)
    settings.ENABLE_MARKETPLACE_OPTIMIZATION = False
    before = _ledger()

    calls = [
        own.client.get(reverse("optimization:deals")),
        own.client.get(reverse("optimization:agent-deals", args=["agent-own"])),
        own.client.post(
            reverse("optimization:agent-deals", args=["agent-own"]),
            {"resource_type": "AI_TOKENS", "amount": 1, "unit_price_usd": "0.000001"},
            format="json",
        ),
        own.client.post(
            reverse("optimization:deal-purchase", args=[deal.pk]),
            {"agent_id": "agent-own", "amount": 1},
            format="json",
        ),
    ]

    for response in calls:
        assert_error(response, 403, "feature_disabled")
    assert _ledger() == before
    assert marketplace_refresh(now=T0)["restocked"] == 0  # no platform deals while switched off


def test_agent_deals_need_collaboration_sharing(seller, buyer, settings):
    agent_deal = _listing(seller, 1_000)
    marketplace_refresh(now=T0)
    settings.ENABLE_COLLABORATION_SHARING = False

    with pytest.raises(LedgerError) as listing:
        _listing(seller, 10)
    with pytest.raises(LedgerError) as buying:
        deal_purchase(deal_id=agent_deal.pk, buyer=buyer, amount=1, actor="t", now=_at(1))

    assert listing.value.code == buying.value.code == "feature_disabled"
    platform = Deal.objects.filter(seller__isnull=True, resource_type_id="AI_TOKENS").get()
    assert deal_purchase(deal_id=platform.pk, buyer=buyer, amount=1, actor="t", now=_at(1)).amount == 1
    keyed = keyed_agent(id="looker")
    listed = keyed.client.get(reverse("optimization:deals"), {"resource_type": "AI_TOKENS"}).json()["results"]
    assert [deal["seller"] for deal in listed] == ["platform"]


# --- Refresh --------------------------------------------------------------------------------------------


def _fleet_usage(reference_data_agent: Agent, used: dict[str, int]) -> None:
    for code, amount in used.items():
        quota = quota_open(agent=reference_data_agent, resource_type_id=code, at=T0)
        Quota.objects.filter(pk=quota.pk).update(used=amount)


def test_discount_follows_fleet_utilization():
    assert discount_for(Decimal("0")) == discount_for(Decimal("49.99")) == Decimal("0.30")
    assert discount_for(Decimal("50")) == discount_for(Decimal("74.99")) == Decimal("0.20")
    assert discount_for(Decimal("75")) == discount_for(Decimal("250")) == Decimal("0.10")


def test_refresh_restocks_and_prices_platform_deals_exactly_once(reference_data):
    fleet = agent_create(agent_id="fleet", tier_code="PRO")
    # AI_TOKENS 40% used, COMPUTE_MS 60%, NETWORK_REQS 80%; the other two unused.
    _fleet_usage(fleet, {"AI_TOKENS": 400_000, "COMPUTE_MS": 2_160_000, "NETWORK_REQS": 8_000})

    first = marketplace_refresh(now=T0)

    assert first == {"expired": 0, "returned_units": 0, "restocked": 5, "repriced": 0}
    deals = {
        deal.resource_type_id: (deal.amount_left, deal.unit_price_usd, deal.expires_at)
        for deal in Deal.objects.all()
    }
    assert deals == {
        "COMPUTE_MS": (3_600_000, Decimal("0.000008"), PERIOD_END),  # 10% of ENTERPRISE, 20% off
        "AI_TOKENS": (1_000_000, Decimal("0.0000007"), PERIOD_END),  # 30% off
        "STORAGE_KB": (10_485_760, Decimal("0.0000007"), PERIOD_END),  # unused: 30% off
        "NETWORK_REQS": (10_000, Decimal("0.0009"), PERIOD_END),  # 10% off
        "SOLANA_LAMPORTS": (10_000_000, Decimal("0.0000007"), PERIOD_END),
    }
    assert marketplace_refresh(now=_at(60)) == {
        "expired": 0,
        "returned_units": 0,
        "restocked": 0,
        "repriced": 0,
    }

    Quota.objects.filter(agent=fleet, resource_type_id="AI_TOKENS").update(used=500_000)  # exactly 50%
    assert marketplace_refresh(now=_at(120))["repriced"] == 1
    assert Deal.objects.get(resource_type_id="AI_TOKENS").unit_price_usd == Decimal("0.0000008")
    assert Deal.objects.count() == 5


def test_refresh_expires_deals_and_returns_unsold_quota(seller, buyer):
    deal = _listing(seller, 300_000, expires_at=_at(3600))
    deal_purchase(deal_id=deal.pk, buyer=buyer, amount=100_000, actor="t", now=_at(60))
    kept = _listing(seller, 50_000, expires_at=_at(7 * 3600))

    first = marketplace_refresh(now=_at(7200))

    assert (first["expired"], first["returned_units"]) == (1, 200_000)
    deal.refresh_from_db()
    assert (deal.status, deal.closed_at, deal.amount_left) == ("expired", _at(7200), 200_000)
    seller_quota = _quota("seller")
    assert (seller_quota.limit, seller_quota.listed, seller_quota.available) == (900_000, 50_000, 850_000)
    assert Deal.objects.get(pk=kept.pk).status == "open"

    second = marketplace_refresh(now=_at(7300))
    assert second == {"expired": 0, "returned_units": 0, "restocked": 0, "repriced": 0}
    assert _quota("seller").listed == 50_000


def test_refresh_task_runs_the_refresh(reference_data):
    result = marketplace_refresh_task.apply().get()
    assert marketplace_refresh_task.name == "optimization.marketplace_refresh"
    assert result["restocked"] == 5


# --- Finding deals --------------------------------------------------------------------------------------


def test_deal_search_is_sorted_by_price_and_hides_sellers_from_agents(
    seller, reference_data, operator_client
):
    marketplace_refresh(now=T0)  # platform AI_TOKENS at 0.0000007
    cheap = _listing(seller, 1_000, Decimal("0.0000005"))
    _listing(seller, 1_000, Decimal("0.0000009"))
    gone = _listing(seller, 1_000, Decimal("0.0000001"))
    Deal.objects.filter(pk=gone.pk).update(expires_at=timezone.now() - dt.timedelta(seconds=1))
    sold_out = _listing(seller, 1_000, Decimal("0.0000002"))
    Deal.objects.filter(pk=sold_out.pk).update(status="sold_out", amount_left=0)
    looker = keyed_agent(id="looker")
    url = reverse("optimization:deals")

    results = looker.client.get(url, {"resource_type": "AI_TOKENS"}).json()["results"]

    assert [deal["unit_price_usd"] for deal in results] == [
        "0.000000500000",
        "0.000000700000",
        "0.000000900000",
    ]
    assert results[0]["id"] == str(cheap.pk)
    assert [deal["seller"] for deal in results] == ["agent", "platform", "agent"]
    assert {deal["seller_agent_id"] for deal in results} == {None}
    as_operator = operator_client.get(url, {"resource_type": "AI_TOKENS"}).json()["results"]
    assert [deal["seller_agent_id"] for deal in as_operator] == ["seller", None, "seller"]
    assert len(looker.client.get(url).json()["results"]) == 7  # every resource type
    assert_error(looker.client.get(url, {"resource_type": "GOLD"}), 400, "validation_error")
    assert_error(client_with_key(None).get(url), 401, "not_authenticated")


def test_agent_deals_cover_the_forecast_shortfall_below_list_price(reference_data):
    mid = PERIOD_START + (PERIOD_END - PERIOD_START) / 2  # half the period gone: usage projects to double
    short = agent_create(agent_id="short", tier_code="PRO")
    other = agent_create(agent_id="other", tier_code="PRO")
    _fleet_usage(short, {"AI_TOKENS": 600_000, "COMPUTE_MS": 100_000})
    marketplace_refresh(now=T0)  # platform deals, AI_TOKENS at 0.0000007
    own = _listing(short, 50_000, Decimal("0.0000001"))
    below = _listing(other, 1_000, Decimal("0.0000009"))
    _listing(other, 1_000, Decimal("0.0000012"))  # above the list price

    found = deals_for_agent(agent=short, now=mid)

    assert found["shortfalls"] == [
        {
            "resource_type": "AI_TOKENS",
            "limit": PRO_TOKENS,
            "listed": 50_000,
            "used": 600_000,
            "projected_usage": 1_200_000,
            "shortfall": 250_000,  # 1,200,000 projected against 1,000,000 - 50,000 listed
        }
    ]
    platform = Deal.objects.get(seller__isnull=True, resource_type_id="AI_TOKENS")
    assert [deal.pk for deal in found["deals"]] == [platform.pk, below.pk]
    assert own.pk not in {deal.pk for deal in found["deals"]}
    assert found["list_prices"] == {"AI_TOKENS": Decimal("0.000001")}


def test_agent_deals_endpoint_is_isolated(reference_data):
    own = keyed_agent(id="agent-own")
    keyed_agent(id="agent-other")
    response = own.client.get(reverse("optimization:agent-deals", args=["agent-own"]))
    assert response.status_code == 200
    assert set(response.json()) == {
        "agent_id",
        "period_start",
        "period_end",
        "shortfalls",
        "list_prices",
        "deals",
    }
    assert_error(own.client.get(reverse("optimization:agent-deals", args=["agent-other"])), 404, "not_found")


# --- Admin ----------------------------------------------------------------------------------------------


def test_admin_expire_action_gives_unsold_quota_back(seller, admin_client_logged_in):
    deal = _listing(seller, 50_000)
    response = admin_client_logged_in.post(
        reverse("admin:optimization_deal_changelist"),
        {"action": "expire_now", "_selected_action": [str(deal.pk)]},
        follow=True,
    )
    assert response.status_code == 200
    deal.refresh_from_db()
    assert deal.status == "expired"
    assert _quota("seller").listed == 0


def test_admin_marketplace_pages_render_read_only(seller, buyer, admin_client_logged_in):
    deal = _listing(seller, 50_000)
    purchase = deal_purchase(deal_id=deal.pk, buyer=buyer, amount=10, actor="t", now=_at(1))
    for name, args in (
        ("deal_changelist", []),
        ("deal_change", [deal.pk]),
        ("purchase_changelist", []),
        ("purchase_change", [purchase.pk]),
    ):
        assert admin_client_logged_in.get(reverse(f"admin:optimization_{name}", args=args)).status_code == 200
    assert admin_client_logged_in.get(reverse("admin:optimization_deal_add")).status_code == 403
    assert admin_client_logged_in.get(reverse("admin:optimization_purchase_add")).status_code == 403


# --- Concurrency on PostgreSQL --------------------------------------------------------------------------


def _racing_buyers(count: int) -> tuple[Agent, Deal]:
    reference_data_load()
    seller = agent_create(agent_id="seller", tier_code="PRO")
    early = agent_create(agent_id="early", tier_code="PRO")
    for i in range(count):
        agent_create(agent_id=f"buyer-{i:02d}", tier_code="PRO")
    deal = deal_list(agent=seller, resource_type_id="AI_TOKENS", amount=100, unit_price_usd=PRICE)
    deal_purchase(deal_id=deal.pk, buyer=early, amount=93, actor="t")  # 7 units left
    return seller, deal


def _buy(deal_id, buyer_id: str, amount: int):
    try:
        return deal_purchase(deal_id=deal_id, buyer=Agent.objects.get(pk=buyer_id), amount=amount, actor="t")
    except LedgerError as exc:
        return exc.code


@pytest.mark.django_db(transaction=True)
def test_forty_buyers_racing_for_the_last_units_get_each_unit_once():
    seller, deal = _racing_buyers(40)

    results = race(40, lambda i: _buy(deal.pk, f"buyer-{i:02d}", 1))

    won = [r for r in results if isinstance(r, Purchase)]
    assert len(won) == 7
    assert set(Counter(r for r in results if isinstance(r, str))) <= {"deal_not_open", "deal_insufficient"}
    deal.refresh_from_db()
    assert (deal.amount_left, deal.status) == (0, "sold_out")
    assert Purchase.objects.aggregate(total=Sum("amount"))["total"] == 100
    assert Purchase.objects.filter(buyer__id__startswith="buyer-").count() == 7
    seller_quota = _quota("seller")
    assert (seller_quota.limit, seller_quota.listed) == (PRO_TOKENS - 100, 0)
    assert Grant.objects.filter(quota=seller_quota).aggregate(total=Sum("amount"))["total"] == -100
    bought = Quota.objects.filter(agent__id__startswith="buyer-").aggregate(total=Sum("limit"))["total"]
    assert bought == 7 * (PRO_TOKENS + 1)  # only winners opened a quota, each with one more unit
    assert UsageLog.objects.filter(kind="purchase").aggregate(total=Sum("amount"))["total"] == 100


@pytest.mark.django_db(transaction=True)
def test_racing_asks_bigger_than_what_is_left_are_refused_whole():
    _, deal = _racing_buyers(40)

    results = race(40, lambda i: _buy(deal.pk, f"buyer-{i:02d}", 2))

    assert sum(isinstance(r, Purchase) for r in results) == 3  # 7 -> 5 -> 3 -> 1, then 2 never fits
    assert Counter(r for r in results if isinstance(r, str)) == {"deal_insufficient": 37}
    deal.refresh_from_db()
    assert (deal.amount_left, deal.status) == (1, "open")
    assert _quota("seller").listed == 1
    assert UsageLog.objects.filter(kind="purchase").count() == 4  # the early buyer and three winners


@pytest.mark.django_db(transaction=True)
def test_agents_buying_each_others_deals_at_once_do_not_deadlock():
    reference_data_load()
    left = agent_create(agent_id="left", tier_code="PRO")
    right = agent_create(agent_id="right", tier_code="PRO")
    deals = {
        "left": deal_list(agent=left, resource_type_id="AI_TOKENS", amount=100, unit_price_usd=PRICE),
        "right": deal_list(agent=right, resource_type_id="AI_TOKENS", amount=100, unit_price_usd=PRICE),
    }

    def buy(i):
        buyer, seller = ("left", "right") if i % 2 else ("right", "left")
        return _buy(deals[seller].pk, buyer, 10)

    results = race(20, buy)

    assert all(isinstance(r, Purchase) for r in results), results
    for agent_id in ("left", "right"):
        quota = _quota(agent_id)
        assert (quota.limit, quota.listed, quota.spent_usd) == (PRO_TOKENS, 0, Decimal("0.000080000000"))
    assert set(Deal.objects.values_list("status", flat=True)) == {"sold_out"}


@pytest.mark.django_db(transaction=True)
def test_refreshes_running_at_once_restock_once():
    reference_data_load()
    race(8, lambda i: marketplace_refresh())
    assert Deal.objects.filter(seller__isnull=True, status="open").count() == 5

"""Recommendations with exact savings, the optimizer that applies only the safe ones, and their API.

Histories are built in June 2025 and read at NOW = 11 June 00:00 UTC: a third of the 30-day period has
gone, so every projection is three times the usage so far. List prices: compute $0.00001/ms, AI tokens,
storage and lamports $0.000001, network $0.001. FREE costs $0 a month, PRO $10, ENTERPRISE $100.
"""

from __future__ import annotations

import datetime as dt
import sys
import types
from decimal import Decimal

import pytest
from django.urls import reverse
from django.utils import timezone

from allocation.keys import api_key_issue
from allocation.services import allocation_create
from ledger.budgets import agent_team_set, team_create
from ledger.errors import LedgerError
from ledger.models import Agent, Grant, Quota, ResourcePrice, ResourceType, TierQuota
from ledger.services import agent_create, quota_open
from optimization.models import Deal, ScalingEvent, ScalingPolicy
from optimization.services.executions import execution_record
from optimization.services.recommendations import agent_recommendations, optimization_run

pytest.register_assert_rewrite("tests.api_fixtures")

from tests.api_fixtures import assert_error, client_with_key  # noqa: E402

pytest_plugins = ["tests.api_fixtures"]

pytestmark = pytest.mark.django_db

UTC = dt.UTC
NOW = dt.datetime(2025, 6, 11, tzinfo=UTC)
EARLY = dt.datetime(2025, 6, 5, tzinfo=UTC)  # more than 24 hours before NOW: no recent burn
HOUR = dt.timedelta(hours=1)


def _summary(items: list[dict]) -> list[tuple]:
    return [(i["type"], i["resource_type"], i["priority"], i["expected_monthly_saving_usd"]) for i in items]


def _of_type(items: list[dict], kind: str) -> list[dict]:
    return [item for item in items if item["type"] == kind]


@pytest.fixture
def frozen_now(monkeypatch):
    monkeypatch.setattr(timezone, "now", lambda: NOW)
    return NOW


# --- Tier changes and unused quota ----------------------------------------------------------------------


def test_downgrade_when_a_cheaper_tier_covers_every_projection(reference_data):
    agent = agent_create(agent_id="lean", tier_code="PRO")
    allocation_create(agent=agent, resource_type_id="AI_TOKENS", amount=20_000, now=EARLY)

    items = agent_recommendations(agent=agent, now=NOW)

    assert _summary(items) == [
        ("downgrade_tier", None, "medium", Decimal("10.00")),  # PRO $10 -> FREE $0
        # Projections under half the limit: the units expected to go unused, at the list price.
        ("share_unused", "COMPUTE_MS", "low", Decimal("36.00")),  # 3,600,000 ms
        ("share_unused", "STORAGE_KB", "low", Decimal("10.48576")),  # 10,485,760 KB
        ("share_unused", "NETWORK_REQS", "low", Decimal("10.00")),  # 10,000 requests
        ("share_unused", "SOLANA_LAMPORTS", "low", Decimal("10.00")),  # 10,000,000 lamports
        ("share_unused", "AI_TOKENS", "low", Decimal("0.94")),  # 1,000,000 - 3 x 20,000
    ]
    downgrade = items[0]
    assert downgrade["action"] == {"tier": "FREE"}
    assert downgrade["evidence"]["projected_units"] == {"AI_TOKENS": 60_000}
    assert downgrade["evidence"]["target_limits"] == {"AI_TOKENS": 100_000}
    assert downgrade["evidence"]["elapsed_percent"] == Decimal("33.33")
    assert "60,000 of 100,000" in downgrade["rationale"]
    share_tokens = items[-1]
    assert share_tokens["action"] == {"resource_type": "AI_TOKENS", "amount": 940_000}
    assert share_tokens["evidence"]["unused_units"] == 940_000


def test_no_downgrade_when_a_projection_would_not_fit_the_cheaper_tier(reference_data):
    agent = agent_create(agent_id="mid", tier_code="PRO")
    allocation_create(agent=agent, resource_type_id="AI_TOKENS", amount=40_000, now=EARLY)  # 120,000 > FREE
    assert not _of_type(agent_recommendations(agent=agent, now=NOW), "downgrade_tier")


def test_upgrade_when_a_projection_exceeds_the_limit_is_high_when_it_runs_out_within_7_days(reference_data):
    agent = agent_create(agent_id="growing", tier_code="FREE")
    allocation_create(agent=agent, resource_type_id="AI_TOKENS", amount=40_000, now=NOW - 12 * HOUR)

    items = agent_recommendations(agent=agent, now=NOW)

    assert _summary(items) == [
        ("upgrade_tier", None, "high", Decimal("-10.00")),  # the cheapest tier that covers: PRO, $10 more
        ("share_unused", "COMPUTE_MS", "low", Decimal("1.80")),
        ("share_unused", "STORAGE_KB", "low", Decimal("1.048576")),
        ("share_unused", "NETWORK_REQS", "low", Decimal("1.00")),
        ("share_unused", "SOLANA_LAMPORTS", "low", Decimal("1.00")),
    ]
    upgrade = items[0]
    assert upgrade["action"] == {"tier": "PRO"}
    # 40,000 in the last 24 hours leaves the other 60,000 for 36 hours.
    assert upgrade["evidence"]["projected_exhaustion_at"] == dt.datetime(2025, 6, 12, 12, tzinfo=UTC)
    assert upgrade["evidence"]["projected_units"] == {"AI_TOKENS": 120_000}
    assert upgrade["evidence"]["current_limits"] == {"AI_TOKENS": 100_000}


def test_upgrade_is_medium_when_nothing_burns_now(reference_data):
    agent = agent_create(agent_id="growing-slowly", tier_code="FREE")
    allocation_create(agent=agent, resource_type_id="AI_TOKENS", amount=40_000, now=EARLY)

    (upgrade,) = _of_type(agent_recommendations(agent=agent, now=NOW), "upgrade_tier")

    assert upgrade["priority"] == "medium"
    assert upgrade["evidence"]["projected_exhaustion_at"] is None


def test_no_tier_recommendations_for_an_agent_with_its_own_limits(reference_data):
    agent = agent_create(agent_id="custom", tier_code="CUSTOM", custom_limits={"AI_TOKENS": 50_000})
    allocation_create(agent=agent, resource_type_id="AI_TOKENS", amount=40_000, now=EARLY)
    items = agent_recommendations(agent=agent, now=NOW)
    assert not [item for item in items if item["type"].endswith("_tier")]


def test_share_unused_is_left_out_when_sharing_is_switched_off(reference_data, settings):
    settings.ENABLE_COLLABORATION_SHARING = False
    agent = agent_create(agent_id="lean-alone", tier_code="PRO")
    allocation_create(agent=agent, resource_type_id="AI_TOKENS", amount=20_000, now=EARLY)
    assert _summary(agent_recommendations(agent=agent, now=NOW)) == [
        ("downgrade_tier", None, "medium", Decimal("10.00"))
    ]


# --- Deals ----------------------------------------------------------------------------------------------


def _deal(price: str, left: int, *, resource_type: str = "AI_TOKENS", **fields) -> Deal:
    fields.setdefault("expires_at", NOW + dt.timedelta(days=1))
    return Deal.objects.create(
        resource_type_id=resource_type,
        amount_total=max(left, 1),
        amount_left=left,
        unit_price_usd=Decimal(price),
        **fields,
    )


@pytest.fixture
def short_agent(reference_data) -> Agent:
    """A FREE agent projected 20,000 AI tokens short (120,000 against 100,000), running out in 36 hours."""
    agent = agent_create(agent_id="short", tier_code="FREE")
    allocation_create(agent=agent, resource_type_id="AI_TOKENS", amount=40_000, now=NOW - 12 * HOUR)
    return agent


def test_buy_deal_picks_the_open_deal_that_saves_the_most(short_agent):
    best = _deal("0.0000005", 15_000)  # 15,000 of the 20,000 short at half price: saves $0.0075
    _deal("0.0000001", 1_000)  # cheaper per unit, but only 1,000 left: saves $0.0009
    _deal("0.000002", 100_000)  # dearer than the list price
    _deal("0.0000001", 100_000, expires_at=NOW - HOUR)  # expired
    _deal("0.0000001", 100_000, status=Deal.Status.SOLD_OUT)
    _deal("0.0000001", 100_000, resource_type="COMPUTE_MS")  # not a resource the agent is short of
    own_quota = quota_open(agent=short_agent, resource_type_id="AI_TOKENS", at=NOW)
    _deal("0.0000001", 100_000, seller=short_agent, seller_quota=own_quota)  # its own deal
    seller = agent_create(agent_id="seller", tier_code="PRO")
    _deal(
        "0.0000004",
        5_000,
        seller=seller,
        seller_quota=quota_open(agent=seller, resource_type_id="AI_TOKENS", at=NOW),
    )  # saves 5,000 x 0.0000006 = $0.003

    items = agent_recommendations(agent=short_agent, now=NOW)

    assert _summary(items)[:2] == [
        ("buy_deal", "AI_TOKENS", "high", Decimal("0.0075")),
        ("upgrade_tier", None, "high", Decimal("-10.00")),
    ]
    deal = items[0]
    assert deal["action"] == {
        "deal_id": str(best.pk),
        "resource_type": "AI_TOKENS",
        "amount": 15_000,
        "unit_price_usd": Decimal("0.0000005"),
        "cost_usd": Decimal("0.0075"),
    }
    assert deal["evidence"]["shortfall"] == 20_000
    assert deal["evidence"]["projected_exhaustion_at"] == dt.datetime(2025, 6, 12, 12, tzinfo=UTC)


def test_buy_deal_covers_at_most_the_shortfall(short_agent):
    _deal("0.0000008", 500_000)
    (deal,) = _of_type(agent_recommendations(agent=short_agent, now=NOW), "buy_deal")
    assert deal["action"]["amount"] == 20_000
    assert deal["expected_monthly_saving_usd"] == Decimal("0.004")  # 20,000 x 0.0000002


def test_no_deal_recommendations_when_the_marketplace_is_switched_off(short_agent, settings):
    settings.ENABLE_MARKETPLACE_OPTIMIZATION = False
    _deal("0.0000005", 15_000)
    assert not _of_type(agent_recommendations(agent=short_agent, now=NOW), "buy_deal")


# --- When no tier covers -------------------------------------------------------------------------------


@pytest.fixture
def saturated(reference_data) -> Agent:
    """An ENTERPRISE agent projected at 225 % of its compute and AI-token limits, with nothing burning now.

    A third of the period has gone: 27,000,000 ms project to 81,000,000 against 36,000,000 (45,000,000
    short, $450 at $0.00001), 7,500,000 tokens to 22,500,000 against 10,000,000 (12,500,000 short, $12.50).
    """
    agent = agent_create(agent_id="saturated", tier_code="ENTERPRISE")
    allocation_create(agent=agent, resource_type_id="COMPUTE_MS", amount=27_000_000, now=EARLY)
    allocation_create(agent=agent, resource_type_id="AI_TOKENS", amount=7_500_000, now=EARLY)
    return agent


def test_the_top_tier_running_out_gets_grants_priced_at_the_list_price(saturated):
    items = agent_recommendations(agent=saturated, now=NOW)

    assert not _of_type(items, "upgrade_tier")  # nothing above ENTERPRISE
    assert [i for i in _summary(items) if i[0] == "grant_quota"] == [
        ("grant_quota", "AI_TOKENS", "medium", Decimal("-12.50")),
        ("grant_quota", "COMPUTE_MS", "medium", Decimal("-450.00")),
    ]
    compute = next(i for i in items if i["id"] == "grant_quota:COMPUTE_MS")
    assert compute["action"] == {
        "resource_type": "COMPUTE_MS",
        "amount": 45_000_000,
        "limit_after": 81_000_000,
        "unit_price_usd": Decimal("0.00001"),
        "cost_usd": Decimal("450.00"),
    }
    assert compute["evidence"]["shortfall"] == 45_000_000
    assert compute["evidence"]["projected_units"] == 81_000_000
    assert "45,000,000 short" in compute["rationale"] and "$450.00" in compute["rationale"]
    # A grant needs an operator: the optimizer never applies one.
    assert compute["safe"] is False
    # No team, no cheaper resource of the same unit, no deals: nothing else relieves the shortage.
    assert not [i for i in items if i["type"] in ("share_from_teammate", "cheaper_resource", "buy_deal")]


def test_grants_are_urgent_when_the_resource_runs_out_within_a_week(reference_data):
    agent = agent_create(agent_id="saturated-now", tier_code="ENTERPRISE")
    # 27,000,000 ms in the last 12 hours: the 9,000,000 left last 8 hours.
    allocation_create(agent=agent, resource_type_id="COMPUTE_MS", amount=27_000_000, now=NOW - 12 * HOUR)
    (grant,) = _of_type(agent_recommendations(agent=agent, now=NOW), "grant_quota")
    assert grant["priority"] == "high"
    assert grant["evidence"]["projected_exhaustion_at"] == NOW + 8 * HOUR


def test_a_team_mate_with_spare_quota_is_named_with_the_amount_to_share(saturated):
    team_create(id="search-team")
    agent_team_set(agent=saturated, team_id="search-team")
    saturated.refresh_from_db()
    # 1,000,000 ms project to 3,000,000: 33,000,000 of 36,000,000 expected to go unused.
    generous = agent_create(agent_id="generous", tier_code="ENTERPRISE")
    agent_team_set(agent=generous, team_id="search-team")
    allocation_create(agent=generous, resource_type_id="COMPUTE_MS", amount=1_000_000, now=EARLY)
    # Leaves less unused (18,000,000), so the more generous one is named.
    modest = agent_create(agent_id="modest", tier_code="ENTERPRISE")
    agent_team_set(agent=modest, team_id="search-team")
    allocation_create(agent=modest, resource_type_id="COMPUTE_MS", amount=6_000_000, now=EARLY)
    # Outside the team: not asked, however much it has.
    stranger = agent_create(agent_id="stranger", tier_code="ENTERPRISE")
    allocation_create(agent=stranger, resource_type_id="COMPUTE_MS", amount=1, now=EARLY)

    items = agent_recommendations(agent=saturated, now=NOW)

    shares = {item["resource_type"]: item for item in _of_type(items, "share_from_teammate")}
    share = shares["COMPUTE_MS"]
    assert share["action"] == {"from_agent": "generous", "resource_type": "COMPUTE_MS", "amount": 33_000_000}
    # 33,000,000 ms at $0.00001: the grant they spare.
    assert share["expected_monthly_saving_usd"] == Decimal("330.00")
    assert share["evidence"]["teammate_unused_units"] == 33_000_000
    assert "generous" in share["rationale"] and "33,000,000" in share["rationale"]
    assert share["safe"] is False
    # No team-mate has used AI tokens this period: each leaves its whole 10,000,000 (a tie: the first id).
    assert shares["AI_TOKENS"]["action"] == {
        "from_agent": "generous",
        "resource_type": "AI_TOKENS",
        "amount": 10_000_000,
    }
    assert shares["AI_TOKENS"]["expected_monthly_saving_usd"] == Decimal("10.00")
    # The grant is still offered for the whole shortfall.
    assert next(i for i in items if i["id"] == "grant_quota:COMPUTE_MS")["action"]["amount"] == 45_000_000


def test_a_team_mate_shares_at_most_the_shortfall_and_not_with_sharing_off(saturated, settings):
    team_create(id="pair")
    agent_team_set(agent=saturated, team_id="pair")
    saturated.refresh_from_db()
    idle = agent_create(agent_id="idle", tier_code="ENTERPRISE")
    agent_team_set(agent=idle, team_id="pair")
    allocation_create(agent=idle, resource_type_id="AI_TOKENS", amount=1, now=EARLY)  # 9,999,997 unused

    def shared() -> dict[str, tuple[int, Decimal]]:
        return {
            item["resource_type"]: (item["action"]["amount"], item["expected_monthly_saving_usd"])
            for item in _of_type(agent_recommendations(agent=saturated, now=NOW), "share_from_teammate")
        }

    assert shared() == {
        "AI_TOKENS": (9_999_997, Decimal("9.999997")),
        # Not used yet: its whole 36,000,000, less than the 45,000,000 short.
        "COMPUTE_MS": (36_000_000, Decimal("360.00")),
    }
    allocation_create(agent=idle, resource_type_id="COMPUTE_MS", amount=1, now=EARLY)
    assert shared()["COMPUTE_MS"] == (35_999_997, Decimal("359.99997"))

    Agent.objects.filter(pk="idle").update(status=Agent.Status.SUSPENDED)  # a suspended agent gives nothing
    assert shared() == {}
    Agent.objects.filter(pk="idle").update(status=Agent.Status.ACTIVE)
    settings.ENABLE_COLLABORATION_SHARING = False
    assert shared() == {}


def test_a_cheaper_resource_of_the_same_unit_is_recommended_with_its_saving(saturated):
    # A smaller model's tokens: counted in tokens too, at a fifth of the price, 20,000,000 a month.
    ResourceType.objects.create(code="AI_TOKENS_MINI", name="Small model tokens", unit="tokens")
    ResourcePrice.objects.create(
        resource_type_id="AI_TOKENS_MINI", unit_price_usd=Decimal("0.0000002"), effective_from=EARLY
    )
    TierQuota.objects.create(tier_id="ENTERPRISE", resource_type_id="AI_TOKENS_MINI", limit=20_000_000)

    (cheaper,) = _of_type(agent_recommendations(agent=saturated, now=NOW), "cheaper_resource")

    assert cheaper["resource_type"] == "AI_TOKENS"
    assert cheaper["action"] == {
        "from_resource_type": "AI_TOKENS",
        "to_resource_type": "AI_TOKENS_MINI",
        "amount": 12_500_000,
    }
    # 12,500,000 tokens x ($0.000001 - $0.0000002)
    assert cheaper["expected_monthly_saving_usd"] == Decimal("10.00")
    assert cheaper["priority"] == "medium"


def test_the_top_tier_running_out_can_buy_cheaper_deals(saturated):
    _deal("0.000005", 10_000_000, resource_type="COMPUTE_MS")
    (deal,) = _of_type(agent_recommendations(agent=saturated, now=NOW), "buy_deal")
    # 10,000,000 ms at half the list price
    assert deal["expected_monthly_saving_usd"] == Decimal("50.00")


def test_no_grant_when_a_dearer_tier_covers(short_agent):
    assert not _of_type(agent_recommendations(agent=short_agent, now=NOW), "grant_quota")


def test_the_hard_case_renders_dollar_effects_as_strings(saturated):
    _, raw_key = api_key_issue(agent=saturated)
    client = client_with_key(raw_key)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(timezone, "now", lambda: NOW)
        response = client.get(reverse("optimization:agent-recommendations", args=["saturated"]))
    assert response.status_code == 200, response.content
    grants = {i["id"]: i for i in response.json()["recommendations"] if i["type"] == "grant_quota"}
    assert grants["grant_quota:COMPUTE_MS"]["expected_monthly_saving_usd"] == "-450.000000000000"
    assert grants["grant_quota:COMPUTE_MS"]["action"]["cost_usd"] == "450.000000000000"


# --- Failed executions ----------------------------------------------------------------------------------


def _executions(agent: Agent, outcomes: list[tuple[str, bool]]) -> None:
    for i, (superpower, success) in enumerate(outcomes):
        execution_record(
            agent=agent,
            superpower=superpower,
            resources={"NETWORK_REQS": 5},  # $0.005 each
            duration_ms=100,
            success=success,
            now=EARLY + i * HOUR,
        )


def test_reduce_resource_when_more_than_10_percent_of_executions_fail(reference_data):
    agent = agent_create(agent_id="flaky", tier_code="PRO")
    _executions(agent, [("search", True)] * 8 + [("summarize", False), ("scrape", False)])

    (reduce,) = _of_type(agent_recommendations(agent=agent, now=NOW), "reduce_resource")

    # Two failed runs cost $0.01 in the first third of the month: $0.03 over a whole month.
    assert reduce["expected_monthly_saving_usd"] == Decimal("0.03")
    assert reduce["priority"] == "medium"
    assert reduce["evidence"]["error_rate_percent"] == Decimal("20.00")
    assert reduce["evidence"]["failed_cost_usd"] == Decimal("0.01")
    assert reduce["action"] == {
        "failed_executions": 2,
        "superpowers": [{"superpower": "scrape", "failures": 1}, {"superpower": "summarize", "failures": 1}],
    }


def test_no_reduce_resource_at_exactly_10_percent(reference_data):
    agent = agent_create(agent_id="steady", tier_code="PRO")
    _executions(agent, [("search", True)] * 9 + [("search", False)])
    assert not _of_type(agent_recommendations(agent=agent, now=NOW), "reduce_resource")


# --- Scaling --------------------------------------------------------------------------------------------


def _policy(**fields) -> ScalingPolicy:
    defaults = {"scale_up_threshold": Decimal("80"), "scale_down_threshold": Decimal("30"), "step": 2}
    if "tier_id" in fields:  # every tier has its default policy (reference data): this rewrites it
        tier = fields.pop("tier_id")
        return ScalingPolicy.objects.update_or_create(tier_id=tier, defaults={**defaults, **fields})[0]
    return ScalingPolicy.objects.create(**{**defaults, **fields})


def test_scale_up_when_utilization_is_above_the_agents_own_policy(reference_data):
    agent = agent_create(agent_id="hot", tier_code="PRO")
    allocation_create(agent=agent, resource_type_id="AI_TOKENS", amount=850_000, now=EARLY)  # 85 %
    _policy(agent=agent, max_instances=4)
    _policy(tier_id="PRO", scale_up_threshold=Decimal("90"))  # the agent's own policy wins

    (scale,) = _of_type(agent_recommendations(agent=agent, now=NOW), "scale_up")

    assert scale["priority"] == "high"
    assert scale["expected_monthly_saving_usd"] == Decimal("0")
    assert scale["action"] == {"direction": "up", "step": 2, "from_instances": 1, "to_instances": 3}
    assert scale["evidence"]["value_percent"] == Decimal("85.00")
    assert scale["evidence"]["max_instances"] == 4


def test_scale_up_stops_at_the_bound(reference_data):
    agent = agent_create(agent_id="hot-capped", tier_code="PRO")
    allocation_create(agent=agent, resource_type_id="AI_TOKENS", amount=850_000, now=EARLY)
    _policy(agent=agent, max_instances=2, step=5)
    (scale,) = _of_type(agent_recommendations(agent=agent, now=NOW), "scale_up")
    assert scale["action"]["to_instances"] == 2 and scale["action"]["step"] == 1

    Agent.objects.filter(pk=agent.pk).update(instance_count=2)
    agent.refresh_from_db()
    assert not _of_type(agent_recommendations(agent=agent, now=NOW), "scale_up")


def test_scale_down_when_utilization_is_below_the_tier_policy(reference_data):
    agent = agent_create(agent_id="cold", tier_code="PRO")
    Agent.objects.filter(pk=agent.pk).update(instance_count=3)
    agent.refresh_from_db()
    allocation_create(agent=agent, resource_type_id="AI_TOKENS", amount=1_000, now=EARLY)
    _policy(tier_id="PRO")

    (scale,) = _of_type(agent_recommendations(agent=agent, now=NOW), "scale_down")

    assert scale["priority"] == "high"
    assert scale["action"] == {"direction": "down", "step": 2, "from_instances": 3, "to_instances": 1}


def test_scaling_on_budget_utilization_and_not_with_auto_scaling_off(reference_data):
    agent = agent_create(agent_id="spender", tier_code="PRO", monthly_budget_usd=Decimal("10"))
    allocation_create(agent=agent, resource_type_id="COMPUTE_MS", amount=900_000, now=EARLY)  # $9: 90 %
    policy = _policy(agent=agent, metric="budget_utilization_percent")
    (scale,) = _of_type(agent_recommendations(agent=agent, now=NOW), "scale_up")
    assert scale["evidence"]["value_percent"] == Decimal("90.00")

    ScalingPolicy.objects.filter(pk=policy.pk).update(enabled=False)
    assert not [i for i in agent_recommendations(agent=agent, now=NOW) if i["type"].startswith("scale_")]


def test_no_scaling_recommendation_without_a_policy(reference_data):
    agent = agent_create(agent_id="unmanaged", tier_code="PRO")
    allocation_create(agent=agent, resource_type_id="AI_TOKENS", amount=850_000, now=EARLY)
    # The PRO tier's default policy (reference data) governs it: 85 % is past its 80 %.
    (scale,) = _of_type(agent_recommendations(agent=agent, now=NOW), "scale_up")
    assert scale["action"]["step"] == 1

    ScalingPolicy.objects.filter(tier_id="PRO").delete()
    assert not [i for i in agent_recommendations(agent=agent, now=NOW) if i["type"].startswith("scale_")]


# --- Optimize -------------------------------------------------------------------------------------------


@pytest.fixture
def purchases(monkeypatch) -> list[dict]:
    """A stand-in marketplace: records each ``deal_purchase`` call (the real one has its own tests)."""
    calls: list[dict] = []

    def deal_purchase(*, deal_id, buyer, amount, actor):
        calls.append({"deal_id": deal_id, "buyer": buyer.pk, "amount": amount, "actor": actor})
        return {"purchase_id": len(calls), "amount": amount}

    module = types.ModuleType("optimization.services.marketplace")
    module.deal_purchase = deal_purchase
    monkeypatch.setitem(sys.modules, "optimization.services.marketplace", module)
    return calls


@pytest.fixture
def optimizable(reference_data) -> tuple[Agent, Deal]:
    """A FREE agent with a $1 budget at 85 % of its AI tokens (spent $0.085), a scaling policy, and a deal.

    Its recommendations: buy the deal (high), upgrade to PRO (high), scale up (high), share the rest (low).
    """
    agent = agent_create(agent_id="opt", tier_code="FREE", monthly_budget_usd=Decimal("1"))
    allocation_create(agent=agent, resource_type_id="AI_TOKENS", amount=85_000, now=NOW - 12 * HOUR)
    _policy(agent=agent, step=1, max_instances=3)
    deal = _deal("0.0000005", 15_000)
    return agent, deal


def test_optimize_applies_only_the_safe_high_priority_items(optimizable, purchases):
    agent, deal = optimizable

    result = optimization_run(agent=agent, actor="ops", now=NOW)

    assert [(item["type"], item["resource_type"]) for item in result["applied"]] == [
        ("buy_deal", "AI_TOKENS"),
        ("scale_up", None),
    ]
    assert purchases == [{"deal_id": str(deal.pk), "buyer": "opt", "amount": 15_000, "actor": "ops"}]
    assert result["applied"][1]["result"]["before"] == 1
    assert result["applied"][1]["result"]["after"] == 2
    assert [(item["type"], item["reason"]) for item in result["skipped"]] == [
        ("upgrade_tier", "needs an operator"),
        ("share_unused", "needs an operator"),
        ("share_unused", "needs an operator"),
        ("share_unused", "needs an operator"),
        ("share_unused", "needs an operator"),
    ]
    assert result["instance_count"] == 2
    assert result["period_spend_usd"] == Decimal("0.0925")  # $0.085 + the $0.0075 purchase
    event = ScalingEvent.objects.get(agent=agent)
    assert (event.trigger, event.direction, event.actor, event.created_at) == ("optimize", "up", "ops", NOW)
    # Never a tier change: the tier and the limits are as they were.
    agent.refresh_from_db()
    assert agent.tier_id == "FREE"
    assert not Grant.objects.filter(quota__agent=agent).exists()


def test_optimize_skips_a_purchase_that_would_break_the_budget(optimizable, purchases):
    agent, _ = optimizable
    Agent.objects.filter(pk=agent.pk).update(monthly_budget_usd=Decimal("0.09"))
    agent.refresh_from_db()

    result = optimization_run(agent=agent, actor="ops", now=NOW)

    assert purchases == []
    (skipped,) = _of_type(result["skipped"], "buy_deal")
    assert "over the $0.09 budget" in skipped["reason"]
    assert [item["type"] for item in result["applied"]] == ["scale_up"]


def test_optimize_buys_nothing_for_an_agent_without_a_budget(optimizable, purchases):
    agent, _ = optimizable
    Agent.objects.filter(pk=agent.pk).update(monthly_budget_usd=None)
    agent.refresh_from_db()

    result = optimization_run(agent=agent, actor="ops", now=NOW)

    assert purchases == []
    assert _of_type(result["skipped"], "buy_deal")[0]["reason"].startswith("the agent has no monthly budget")


def test_optimize_reports_a_refused_purchase_and_applies_the_rest(optimizable, purchases):
    agent, _ = optimizable

    def refuse(**kwargs):
        raise LedgerError("sold out meanwhile", code="deal_not_open", status=409)

    sys.modules["optimization.services.marketplace"].deal_purchase = refuse
    result = optimization_run(agent=agent, actor="ops", now=NOW)

    (skipped,) = _of_type(result["skipped"], "buy_deal")
    assert skipped["reason"] == "the marketplace refused: deal_not_open: sold out meanwhile"
    assert [item["type"] for item in result["applied"]] == ["scale_up"]
    assert result["period_spend_usd"] == Decimal("0.085")


def test_optimize_does_not_apply_medium_priority_items(reference_data, purchases):
    agent = agent_create(agent_id="calm", tier_code="FREE", monthly_budget_usd=Decimal("5"))
    allocation_create(agent=agent, resource_type_id="AI_TOKENS", amount=40_000, now=EARLY)  # no recent burn
    _deal("0.0000005", 15_000)

    result = optimization_run(agent=agent, actor="ops", now=NOW)

    assert result["applied"] == []
    assert purchases == []
    (skipped,) = _of_type(result["skipped"], "buy_deal")
    assert skipped == {
        "id": "buy_deal:AI_TOKENS",
        "type": "buy_deal",
        "resource_type": "AI_TOKENS",
        "priority": "medium",
        "reason": "medium priority: only high-priority items are applied",
    }


def test_optimize_with_the_real_marketplace_buys_the_deal(optimizable, frozen_now):
    pytest.importorskip("optimization.services.marketplace")
    from optimization.models import Purchase

    agent, deal = optimizable
    result = optimization_run(agent=agent, actor="ops")

    assert [item["type"] for item in result["applied"]] == ["buy_deal", "scale_up"]
    purchase = Purchase.objects.get(buyer=agent)
    assert (purchase.deal_id, purchase.amount, purchase.cost_usd) == (deal.pk, 15_000, Decimal("0.0075"))
    quota = Quota.objects.get(agent=agent, resource_type_id="AI_TOKENS")
    assert quota.limit == 115_000


def test_each_item_has_an_id_and_says_whether_optimize_would_apply_it(optimizable):
    agent, _ = optimizable
    items = agent_recommendations(agent=agent, now=NOW)
    assert [(item["id"], item["safe"]) for item in items] == [
        ("buy_deal:AI_TOKENS", True),
        ("scale_up", True),
        ("upgrade_tier", False),
        ("share_unused:COMPUTE_MS", False),
        ("share_unused:STORAGE_KB", False),
        ("share_unused:NETWORK_REQS", False),
        ("share_unused:SOLANA_LAMPORTS", False),
    ]


def test_recommendation_apply_applies_one_safe_item_by_id(optimizable, purchases):
    from optimization.services.recommendations import recommendation_apply

    agent, _ = optimizable
    result = recommendation_apply(agent=agent, recommendation_id="scale_up", actor="user:ops", now=NOW)

    assert result["result"]["after"] == 2
    assert result["message"].startswith("Applied: ")
    assert purchases == []  # only the item asked for
    agent.refresh_from_db()
    assert agent.instance_count == 2


def test_recommendation_apply_refuses_unsafe_and_unknown_items(optimizable, purchases):
    from ledger.errors import Conflict, NotFound
    from optimization.services.recommendations import recommendation_apply

    agent, _ = optimizable
    with pytest.raises(Conflict) as refused:
        recommendation_apply(agent=agent, recommendation_id="upgrade_tier", actor="user:ops", now=NOW)
    assert refused.value.code == "not_safe"
    assert "needs an operator" in refused.value.message
    with pytest.raises(NotFound):
        recommendation_apply(agent=agent, recommendation_id="scale_down", actor="user:ops", now=NOW)
    agent.refresh_from_db()
    assert (agent.tier_id, agent.instance_count) == ("FREE", 1)


def test_recommendations_for_a_page_are_empty_when_analytics_is_off(optimizable, settings):
    from optimization.services.recommendations import recommendations_for

    assert len(recommendations_for(agent=optimizable[0], now=NOW)) == 7
    settings.ENABLE_PERFORMANCE_ANALYTICS = False
    assert recommendations_for(agent=optimizable[0], now=NOW) == []


# --- API ------------------------------------------------------------------------------------------------


@pytest.fixture
def opt_client(optimizable):
    _, raw_key = api_key_issue(agent=optimizable[0])
    return client_with_key(raw_key)


def test_recommendations_endpoint_ranks_and_renders_money_as_strings(opt_client, frozen_now):
    response = opt_client.get(reverse("optimization:agent-recommendations", args=["opt"]))

    assert response.status_code == 200, response.content
    body = response.json()
    assert body["count"] == 7
    first = body["recommendations"][0]
    assert first["type"] == "buy_deal"
    assert first["priority"] == "high"
    assert first["expected_monthly_saving_usd"] == "0.007500000000"
    assert first["action"]["amount"] == 15_000
    assert first["action"]["cost_usd"] == "0.007500000000"
    assert [item["type"] for item in body["recommendations"]][:3] == ["buy_deal", "scale_up", "upgrade_tier"]
    upgrade = body["recommendations"][2]
    assert upgrade["expected_monthly_saving_usd"] == "-10.000000000000"


def test_optimize_endpoint_applies_once_per_idempotency_key(opt_client, purchases, frozen_now):
    url = reverse("optimization:agent-optimize", args=["opt"])

    first = opt_client.post(url, {}, format="json", HTTP_IDEMPOTENCY_KEY="opt-1")
    second = opt_client.post(url, {}, format="json", HTTP_IDEMPOTENCY_KEY="opt-1")

    assert first.status_code == 200, first.content
    assert [item["type"] for item in first.json()["applied"]] == ["buy_deal", "scale_up"]
    assert second.json() == first.json()
    assert second["Idempotent-Replayed"] == "true"
    assert ScalingEvent.objects.filter(agent_id="opt").count() == 1
    assert len(purchases) == 1
    assert purchases[0]["actor"] == "agent:opt"


def test_optimize_endpoint_refuses_unknown_fields_and_other_agents(opt_client, agent_b, frozen_now):
    url = reverse("optimization:agent-optimize", args=["opt"])
    assert_error(opt_client.post(url, {"force": True}, format="json"), 400, "validation_error")
    assert_error(agent_b.client.post(url, {}, format="json"), 404, "not_found")
    assert not ScalingEvent.objects.exists()


def test_compat_recommendations_and_optimize_through_the_resources_endpoint(
    opt_client, purchases, frozen_now
):
    from allocation.api import compat
    from optimization.api.analytics import compat_metrics, compat_optimize, compat_recommendations

    # Through the real wiring: the optimization app registers these actions when it is ready.
    assert compat.COMPAT_GET_ACTIONS["metrics"] is compat_metrics
    assert compat.COMPAT_GET_ACTIONS["recommendations"] is compat_recommendations
    assert compat.COMPAT_POST_ACTIONS["optimize"] is compat_optimize
    url = reverse("api:resources")

    recommendations = opt_client.get(url, {"action": "recommendations", "agentId": "opt"})
    assert recommendations.status_code == 200, recommendations.content
    body = recommendations.json()
    assert body["agentId"] == "opt"
    assert body["recommendations"][0]["expectedMonthlySavingUSD"] == "0.007500000000"
    assert body["recommendations"][0]["action"]["dealId"]
    assert body["recommendations"][0]["evidence"]["projectedExhaustionAt"] == "2025-06-11T04:14:07Z"

    metrics = opt_client.get(url, {"action": "metrics", "agentId": "opt"})
    assert metrics.status_code == 200, metrics.content
    assert metrics.json()["cost"]["totalUSD"] == "0.085000000000"

    optimized = opt_client.post(url, {"action": "optimize", "agentId": "opt"}, format="json")
    assert optimized.status_code == 200, optimized.content
    assert optimized.json()["agentId"] == "opt"
    assert [item["type"] for item in optimized.json()["applied"]] == ["buy_deal", "scale_up"]
    assert optimized.json()["instanceCount"] == 2

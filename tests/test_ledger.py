"""The ledger: reference data, quota constraints, grants, tier changes and the data loaders."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
from django.core.management import CommandError, call_command
from django.db import IntegrityError, transaction
from django.db.models import F, Sum

from ledger.demo import DEMO_AGENTS, DEMO_DAYS, demo_data_load
from ledger.models import (
    Agent,
    Budget,
    Grant,
    OptimizationRule,
    Quota,
    ResourcePrice,
    ResourceType,
    Tier,
    TierQuota,
    UsageLog,
)
from ledger.money import usage_cost
from ledger.periods import month_bounds
from ledger.selectors import price_in_effect, prices_in_effect, quota_reconciliation
from ledger.services import (
    LedgerError,
    agent_change_tier,
    agent_create,
    quota_grant,
    quota_open,
    reference_data_load,
)
from tests.factories import AgentFactory

pytestmark = pytest.mark.django_db

EXPECTED_TIERS = {
    "FREE": (Decimal("0"), [180_000, 100_000, 1_048_576, 1_000, 1_000_000]),
    "PRO": (Decimal("10"), [3_600_000, 1_000_000, 10_485_760, 10_000, 10_000_000]),
    "ENTERPRISE": (Decimal("100"), [36_000_000, 10_000_000, 104_857_600, 100_000, 100_000_000]),
}
ORDER = ["COMPUTE_MS", "AI_TOKENS", "STORAGE_KB", "NETWORK_REQS", "SOLANA_LAMPORTS"]
EXPECTED_PRICES = {
    "COMPUTE_MS": Decimal("0.00001"),
    "AI_TOKENS": Decimal("0.000001"),
    "STORAGE_KB": Decimal("0.000001"),
    "NETWORK_REQS": Decimal("0.001"),
    "SOLANA_LAMPORTS": Decimal("0.000001"),
}


def test_seeded_tiers_equal_the_product_numbers(reference_data):
    for code, (price, limits) in EXPECTED_TIERS.items():
        tier = Tier.objects.get(code=code)
        assert tier.monthly_price_usd == price
        got = dict(TierQuota.objects.filter(tier=tier).values_list("resource_type_id", "limit"))
        assert got == dict(zip(ORDER, limits, strict=True))
    assert Tier.objects.filter(code="CUSTOM").exists()
    assert not TierQuota.objects.filter(tier_id="CUSTOM").exists()


def test_seeded_prices_equal_the_product_numbers(reference_data):
    assert set(ResourceType.objects.values_list("code", flat=True)) == set(ORDER)
    assert prices_in_effect() == EXPECTED_PRICES
    for price in prices_in_effect().values():
        assert isinstance(price, Decimal)


def test_seeded_rules_match_the_product_description(reference_data):
    high = OptimizationRule.objects.get(name="HighResourceUtilization")
    assert (high.metric, high.operator, high.threshold, high.duration_seconds) == (
        "resource_utilization_percent",
        ">",
        Decimal("80"),
        300,
    )
    assert (high.severity, high.action) == ("warning", "notify")
    budget = OptimizationRule.objects.get(name="BudgetExceeded")
    assert (budget.metric, budget.threshold, budget.duration_seconds) == (
        "budget_utilization_percent",
        90,
        60,
    )
    assert (budget.severity, budget.action) == ("critical", "throttle")


def test_reference_loader_is_idempotent_and_keeps_operator_edits(reference_data):
    counts = {model: model.objects.count() for model in (ResourceType, ResourcePrice, Tier, TierQuota)}
    TierQuota.objects.filter(tier_id="PRO", resource_type_id="AI_TOKENS").update(limit=1_234)
    created = reference_data_load()
    assert set(created.values()) == {0}
    assert {model: model.objects.count() for model in counts} == counts
    assert TierQuota.objects.get(tier_id="PRO", resource_type_id="AI_TOKENS").limit == 1_234


def test_new_price_applies_to_new_usage_only(reference_data):
    now = dt.datetime(2026, 11, 10, tzinfo=dt.UTC)
    ResourcePrice.objects.create(
        resource_type_id="AI_TOKENS", unit_price_usd=Decimal("0.000002"), effective_from=now
    )
    assert price_in_effect(resource_type_id="AI_TOKENS", at=now - dt.timedelta(seconds=1)) == Decimal(
        "0.000001"
    )
    assert price_in_effect(resource_type_id="AI_TOKENS", at=now) == Decimal("0.000002")
    assert prices_in_effect(at=now)["AI_TOKENS"] == Decimal("0.000002")


def test_usage_cost_is_exact_decimal():
    assert usage_cost(3_120, Decimal("0.000001")) == Decimal("0.003120000000")
    assert usage_cost(1, Decimal("0.00001")) == Decimal("0.000010000000")
    assert usage_cost(7, Decimal("0.001")) == Decimal("0.007")


def test_month_bounds_are_calendar_months_in_utc():
    start, end = month_bounds(dt.datetime(2026, 12, 31, 23, 59, tzinfo=dt.UTC))
    assert (start, end) == (dt.datetime(2026, 12, 1, tzinfo=dt.UTC), dt.datetime(2027, 1, 1, tzinfo=dt.UTC))
    eastern = dt.timezone(dt.timedelta(hours=-5))
    start, _ = month_bounds(dt.datetime(2026, 10, 31, 22, 0, tzinfo=eastern))  # 03:00 UTC on Nov 1
    assert start == dt.datetime(2026, 11, 1, tzinfo=dt.UTC)


def test_quota_open_uses_tier_limit_and_override(reference_data):
    agent = AgentFactory(tier=Tier.objects.get(code="FREE"))
    assert quota_open(agent=agent, resource_type_id="AI_TOKENS").limit == 100_000
    custom = agent_create(agent_id="custom-1", tier_code="CUSTOM", custom_limits={"AI_TOKENS": 42})
    quota = quota_open(agent=custom, resource_type_id="AI_TOKENS")
    assert (quota.base_limit, quota.limit, quota.used, quota.reserved) == (42, 42, 0, 0)
    assert quota_open(agent=custom, resource_type_id="COMPUTE_MS").limit == 0
    assert quota_open(agent=custom, resource_type_id="AI_TOKENS").pk == quota.pk


@pytest.mark.parametrize(
    "change",
    [
        {"used": F("limit") + 1},
        {"used": -1},
        {"reserved": -5},
        {"reserved": F("limit"), "used": 1},
        {"limit": -1},
    ],
    ids=[
        "used-over-limit",
        "negative-used",
        "negative-reserved",
        "used-plus-reserved-over",
        "negative-limit",
    ],
)
def test_database_constraints_refuse_overspend_on_postgres(reference_data, change):
    agent = AgentFactory()
    quota = quota_open(agent=agent, resource_type_id="AI_TOKENS")
    with pytest.raises(IntegrityError), transaction.atomic():
        # A raw UPDATE, as a buggy caller would write it: only the database stands in the way.
        Quota.objects.filter(pk=quota.pk).update(**change)
    quota.refresh_from_db()
    assert (quota.used, quota.reserved, quota.limit) == (0, 0, 1_000_000)


def test_usage_logs_table_is_readable_in_sql(reference_data):
    from django.db import connection

    demo_data_load()
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT resource_type_id, sum(amount), sum(cost_usd) FROM usage_logs WHERE agent_id = %s "
            "GROUP BY resource_type_id ORDER BY resource_type_id",
            ["agent-123"],
        )
        rows = cursor.fetchall()
    assert [row[0] for row in rows] == sorted(ORDER)
    assert all(isinstance(row[2], Decimal) and row[2] > 0 for row in rows)


def test_agents_have_no_pattern_index_twins(db):
    """Django's ``varchar_pattern_ops`` twins serve only ``LIKE 'prefix%'``, which no query of agents uses;
    a fleet-wide update of agents would write them all (migration ledger 0005)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'ledger_agent'")
        indexes = dict(cursor.fetchall())
    assert "ledger_agent_pkey" in indexes
    assert not [name for name, definition in indexes.items() if "varchar_pattern_ops" in definition]


def test_grant_raises_limit_and_is_recorded(reference_data):
    agent = AgentFactory()
    grant = quota_grant(
        agent=agent, resource_type_id="NETWORK_REQS", amount=500, reason=Grant.Reason.MANUAL, actor="ops"
    )
    quota = Quota.objects.get(pk=grant.quota_id)
    assert quota.limit == 10_500
    assert quota_reconciliation(quota=quota) == {"used": 0, "limit": 10_500, "spent_usd": 0}


def test_negative_grant_cannot_take_used_quota(reference_data):
    agent = AgentFactory(tier=Tier.objects.get(code="FREE"))
    quota = quota_open(agent=agent, resource_type_id="NETWORK_REQS")
    Quota.objects.filter(pk=quota.pk).update(used=900)
    with pytest.raises(LedgerError) as excinfo:
        quota_grant(
            agent=agent, resource_type_id="NETWORK_REQS", amount=-101, reason="share_out", actor="ops"
        )
    assert excinfo.value.code == "quota_exceeded"
    quota.refresh_from_db()
    assert quota.limit == 1_000
    assert not Grant.objects.exists()


@pytest.mark.parametrize("amount", [0, 1.5, True])
def test_grant_rejects_non_integer_or_zero_amounts(reference_data, amount):
    agent = AgentFactory()
    with pytest.raises(LedgerError):
        quota_grant(agent=agent, resource_type_id="AI_TOKENS", amount=amount, reason="manual", actor="ops")
    assert not Grant.objects.exists()


def test_tier_change_rebases_limits_and_never_cuts_below_usage(reference_data):
    agent = AgentFactory()  # PRO
    tokens = quota_open(agent=agent, resource_type_id="AI_TOKENS")
    Quota.objects.filter(pk=tokens.pk).update(used=300_000)
    quota_grant(agent=agent, resource_type_id="AI_TOKENS", amount=1_000, reason="manual", actor="ops")
    compute = quota_open(agent=agent, resource_type_id="COMPUTE_MS")

    agent_change_tier(agent=agent, tier=Tier.objects.get(code="FREE"), actor="ops")

    tokens.refresh_from_db()
    compute.refresh_from_db()
    assert (tokens.base_limit, tokens.limit) == (100_000, 300_000)  # floored at what was used
    assert compute.limit == 180_000
    assert Grant.objects.filter(quota=tokens, reason="tier_change").get().amount == 199_000
    assert quota_reconciliation(quota=tokens)["limit"] == tokens.limit
    assert Agent.objects.get(pk=agent.pk).tier_id == "FREE"


def test_demo_loader_is_idempotent_and_consistent(reference_data):
    first = demo_data_load()
    assert first == {"admin": 1, "agents": len(DEMO_AGENTS), "budgets": 3}
    counts = (Agent.objects.count(), UsageLog.objects.count(), Quota.objects.count(), Budget.objects.count())
    assert counts[1] > 500
    assert demo_data_load() == {"admin": 0, "agents": 0, "budgets": 0}
    assert (
        Agent.objects.count(),
        UsageLog.objects.count(),
        Quota.objects.count(),
        Budget.objects.count(),
    ) == counts
    # Each monthly budget counts the agent's spend this month, as its quota rows do.
    for budget in Budget.objects.filter(managed=True):
        assert budget.spent_usd == sum(
            Quota.objects.filter(agent=budget.agent, period_start=budget.window_start).values_list(
                "spent_usd", flat=True
            )
        )
    assert Budget.objects.filter(scope="team", spent_usd__gt=0).exists()
    for quota in Quota.objects.all():
        assert 0 <= quota.used <= quota.limit
        assert quota_reconciliation(quota=quota) == {
            "used": quota.used,
            "limit": quota.limit,
            "spent_usd": quota.spent_usd,
        }
    # Every row keeps the price it was charged at and its cost follows from it.
    sample = UsageLog.objects.first()
    assert sample.cost_usd == usage_cost(sample.amount, sample.unit_price_usd)
    assert UsageLog.objects.aggregate(total=Sum("cost_usd"))["total"] > 0


def test_management_commands_load_reference_and_demo_data_twice(db, capsys, settings):
    settings.DEBUG = True
    call_command("load_reference_data")
    call_command("load_demo_data")
    call_command("load_demo_data")
    out = capsys.readouterr().out
    assert "created: 0 admin, 0 agents" in out
    assert Agent.objects.count() == len(DEMO_AGENTS)


def test_demo_data_with_debug_off_needs_to_be_asked_for(db, settings, django_user_model):
    settings.DEBUG = False
    with pytest.raises(CommandError, match="admin / admin"):
        call_command("load_demo_data")
    assert not django_user_model.objects.exists() and not Agent.objects.exists()

    call_command("load_demo_data", "--allow-demo-login")
    assert django_user_model.objects.filter(username="admin", is_superuser=True).exists()


@pytest.mark.django_db(transaction=True)
def test_usage_rows_and_allocations_name_their_quotas_own_agent_and_resource_type():
    """One composite foreign key (ledger/schema.py) stands for the three single-column ones: a row naming
    a quota with another agent or resource type than the quota's own, or no such quota, is refused."""
    from allocation.models import Allocation

    reference_data_load()
    agent = agent_create(agent_id="owner", tier_code="PRO")
    agent_create(agent_id="other", tier_code="PRO")
    quota = quota_open(agent=agent, resource_type_id="AI_TOKENS")
    price = {"unit_price_usd": Decimal("0.000001"), "cost_usd": Decimal("0.000001")}
    rows = {
        UsageLog: {
            "amount": 1,
            "kind": UsageLog.Kind.ALLOCATION,
            "created_at": dt.datetime.now(dt.UTC),
            "period_start": quota.period_start,
        },
        Allocation: {"amount": 1, "status": Allocation.Status.COMMITTED},
    }
    right = {"agent_id": "owner", "resource_type_id": "AI_TOKENS", "quota_id": quota.pk}
    wrongs = [
        {"agent_id": "other"},
        {"resource_type_id": "COMPUTE_MS"},
        {"agent_id": "nobody"},
        {"quota_id": quota.pk + 1000},
    ]
    for model, fields in rows.items():
        with transaction.atomic():
            model.objects.create(**right, **price, **fields)
        for wrong in wrongs:
            with pytest.raises(IntegrityError, match="quota_identity"), transaction.atomic():
                model.objects.create(**{**right, **wrong}, **price, **fields)
        assert model.objects.count() == 1
    # A usage row's period is its quota's: another period is refused too.
    with pytest.raises(IntegrityError, match="quota_identity_period_fk"), transaction.atomic():
        UsageLog.objects.create(
            **right, **price, **{**rows[UsageLog], "period_start": quota.period_start - dt.timedelta(days=31)}
        )


@pytest.mark.parametrize(
    "now",
    [
        dt.datetime(2026, 12, 1, 0, 10, tzinfo=dt.UTC),  # ten minutes into the month
        dt.datetime(2026, 12, 2, 19, 0, tzinfo=dt.UTC),
        dt.datetime(2026, 11, 30, 23, 50, tzinfo=dt.UTC),  # the month's last minutes
    ],
)
def test_demo_current_period_holds_each_agents_share_on_any_day(reference_data, now):
    demo_data_load(now=now)
    start, _ = month_bounds(now)
    for agent_id, _, _, share, _ in DEMO_AGENTS:
        quotas = Quota.objects.filter(agent_id=agent_id, period_start=start)
        assert quotas.count() == 5
        for quota in quotas:
            assert quota.used == int(quota.limit * share), (agent_id, quota.resource_type_id)
            logged = UsageLog.objects.filter(quota=quota).aggregate(n=Sum("amount"), cost=Sum("cost_usd"))
            assert (logged["n"], logged["cost"]) == (quota.used, quota.spent_usd)
    assert not UsageLog.objects.filter(created_at__gte=now).exists()
    assert not UsageLog.objects.filter(created_at__lt=now - dt.timedelta(days=DEMO_DAYS)).exists()

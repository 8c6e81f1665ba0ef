"""Money at the month boundary: a usage row belongs to its quota's period, also when it is written after that
period ended (a settlement belongs to its hold's period). Cost, budgets, the dashboard and the reconciliation
all read the period that way, so they agree across a real boundary (a controlled clock: the services take
``now``)."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from pathlib import Path

import pytest
from django.db import connection
from django.db.models import Sum
from django.test.utils import CaptureQueriesContext

from allocation import services
from ledger.models import Grant, Quota, UsageLog
from ledger.selectors import RECONCILIATION_SQL
from optimization.dashboard.data import cost_chart
from optimization.selectors import budget_utilization
from tests.factories import AgentFactory

pytestmark = pytest.mark.django_db

NOV = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
DEC = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
BEFORE_MIDNIGHT = DEC - dt.timedelta(seconds=10)
AFTER_MIDNIGHT = DEC + dt.timedelta(seconds=10)
TOKEN = Decimal("0.000001")


def _spent(agent_id: str, period_start: dt.datetime) -> Decimal:
    total = Quota.objects.filter(agent_id=agent_id, period_start=period_start).aggregate(t=Sum("spent_usd"))
    return total["t"] or Decimal(0)


def _logged(agent_id: str, period_start: dt.datetime) -> Decimal:
    total = UsageLog.objects.filter(agent_id=agent_id, period_start=period_start).aggregate(t=Sum("cost_usd"))
    return total["t"] or Decimal(0)


def _quota(agent, resource_type: str, period_start: dt.datetime) -> Quota:
    return Quota.objects.get(agent=agent, resource_type_id=resource_type, period_start=period_start)


def _reconciliation() -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute(RECONCILIATION_SQL)
        return cursor.fetchall()


@pytest.fixture
def agent(reference_data):
    return AgentFactory(id="boundary", tier_id="PRO", monthly_budget_usd=Decimal("10"))


def test_a_hold_settled_after_midnight_belongs_to_its_period_everywhere(agent):
    hold = services.allocation_create(
        agent=agent, resource_type_id="AI_TOKENS", amount=5_000, hold=True, now=BEFORE_MIDNIGHT
    )
    services.allocation_create(agent=agent, resource_type_id="AI_TOKENS", amount=1_000, now=BEFORE_MIDNIGHT)
    services.allocation_create(agent=agent, resource_type_id="AI_TOKENS", amount=2_000, now=AFTER_MIDNIGHT)

    services.hold_settle(agent=agent, allocation_id=hold.pk, amount=3_000, now=AFTER_MIDNIGHT)

    settlement = UsageLog.objects.get(kind=UsageLog.Kind.SETTLEMENT)
    assert settlement.created_at == AFTER_MIDNIGHT
    assert settlement.period_start == NOV  # charged to the hold's period, dated when it was made
    november, december = _quota(agent, "AI_TOKENS", NOV), _quota(agent, "AI_TOKENS", DEC)
    assert (november.used, november.reserved, december.used) == (4_000, 0, 2_000)
    # The counters, the usage log by period, /cost and the budgets agree, month by month.
    for now, period_start, units in ((BEFORE_MIDNIGHT, NOV, 4_000), (AFTER_MIDNIGHT, DEC, 2_000)):
        assert _spent(agent.pk, period_start) == _logged(agent.pk, period_start) == units * TOKEN
        assert services.agent_cost(agent=agent, now=now)["total_usd"] == units * TOKEN
        assert budget_utilization(now=now)[agent.pk]["spent_usd"] == units * TOKEN
    assert _reconciliation() == []


def test_the_dashboard_chart_totals_what_the_period_was_charged(agent):
    # COMPUTE_MS at $0.00001: enough for the chart's cents to show.
    hold = services.allocation_create(
        agent=agent, resource_type_id="COMPUTE_MS", amount=300_000, hold=True, now=BEFORE_MIDNIGHT
    )
    services.hold_settle(agent=agent, allocation_id=hold.pk, amount=200_000, now=AFTER_MIDNIGHT)
    services.allocation_create(agent=agent, resource_type_id="COMPUTE_MS", amount=100_000, now=AFTER_MIDNIGHT)

    november = cost_chart(agent=agent, now=BEFORE_MIDNIGHT)
    december = cost_chart(agent=agent, now=AFTER_MIDNIGHT)

    assert Decimal(november["spent_usd"]) == _spent(agent.pk, NOV) == Decimal("2")
    assert Decimal(december["spent_usd"]) == _spent(agent.pk, DEC) == Decimal("1")
    compute = {series["name"]: series for series in november["series"]}["COMPUTE_MS"]
    assert compute["points"][-1] == "2.00"  # the settlement counts on November's last day
    assert _reconciliation() == []


def test_a_hold_expiring_after_midnight_gives_back_its_own_period(agent):
    services.allocation_create(
        agent=agent,
        resource_type_id="AI_TOKENS",
        amount=5_000,
        hold=True,
        hold_ttl_seconds=60,
        now=BEFORE_MIDNIGHT,
    )
    services.allocation_create(agent=agent, resource_type_id="AI_TOKENS", amount=1_000, now=AFTER_MIDNIGHT)

    assert services.holds_expire(now=AFTER_MIDNIGHT + dt.timedelta(minutes=5)) == 1

    november, december = _quota(agent, "AI_TOKENS", NOV), _quota(agent, "AI_TOKENS", DEC)
    assert (november.used, november.reserved) == (0, 0)
    assert (december.used, december.reserved) == (1_000, 0)
    assert not UsageLog.objects.filter(period_start=NOV).exists()
    assert _reconciliation() == []


def test_a_share_after_midnight_moves_the_new_periods_quota(agent):
    other = AgentFactory(id="boundary-2", tier_id="PRO")
    services.allocation_create(agent=agent, resource_type_id="AI_TOKENS", amount=1_000, now=BEFORE_MIDNIGHT)

    services.quota_share(
        source=agent,
        target_id=other.pk,
        resource_type_id="AI_TOKENS",
        amount=500,
        actor="t",
        now=AFTER_MIDNIGHT,
    )

    november = _quota(agent, "AI_TOKENS", NOV)
    assert (november.limit, november.used) == (november.base_limit, 1_000)
    assert _quota(agent, "AI_TOKENS", DEC).limit == november.base_limit - 500
    assert _quota(other, "AI_TOKENS", DEC).limit == november.base_limit + 500
    assert not Grant.objects.filter(quota__period_start=NOV).exists()


def test_the_readme_shows_the_reconciliation_query_the_tests_run():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert RECONCILIATION_SQL in readme


def test_a_quotas_reconciliation_counts_a_settlement_after_its_period_and_reads_only_its_time(agent):
    from ledger.selectors import quota_reconciliation

    hold = services.allocation_create(
        agent=agent, resource_type_id="COMPUTE_MS", amount=300_000, hold=True, now=BEFORE_MIDNIGHT
    )
    services.hold_settle(agent=agent, allocation_id=hold.pk, amount=200_000, now=AFTER_MIDNIGHT)
    november = _quota(agent, "COMPUTE_MS", NOV)

    with CaptureQueriesContext(connection) as queries:
        expected = quota_reconciliation(quota=november)

    assert (expected["used"], expected["spent_usd"]) == (november.used, november.spent_usd) == (200_000, 2)
    reads = [q["sql"] for q in queries.captured_queries if '"usage_logs"' in q["sql"]]
    assert reads and all('"usage_logs"."created_at" >= ' in sql for sql in reads)
    assert all('"usage_logs"."created_at" < ' in sql for sql in reads)

"""The fleet's usage rollups (``FleetUsageRollup``): every hour and day of the whole fleet equals the sum of
the agents' rollups of that bucket, after the first run, a backfill and incremental runs with new rows,
and a run that finds nothing new writes nothing. They are what the fleet page reads."""

from __future__ import annotations

import datetime as dt
import random
from decimal import Decimal

import pytest
from django.db.models import Sum

from optimization.models import FleetUsageRollup, UsageRollup
from optimization.services.rollups import usage_rollups_backfill, usage_rollups_update
from tests.test_rollups import HISTORY_START, JUNE, NOW, _random_history, _row
from tests.test_rollups import fleet as fleet  # noqa: F401  (the fixture: agents and their quotas)

pytestmark = pytest.mark.django_db


def _agents_summed() -> dict[tuple, tuple[int, Decimal, int]]:
    rows = (
        UsageRollup.objects.values("granularity", "bucket_start", "resource_type_id", "period_start")
        .annotate(units=Sum("units"), cost=Sum("cost_usd"), calls=Sum("calls"))
        .order_by()
    )
    return {
        (r["granularity"], r["bucket_start"], r["resource_type_id"], r["period_start"]): (
            r["units"],
            r["cost"],
            r["calls"],
        )
        for r in rows
    }


def _fleet() -> dict[tuple, tuple[int, Decimal, int]]:
    return {
        (r.granularity, r.bucket_start, r.resource_type_id, r.period_start): (r.units, r.cost_usd, r.calls)
        for r in FleetUsageRollup.objects.all()
    }


def test_the_fleet_rollups_are_the_sum_of_the_agents(fleet):  # noqa: F811
    _random_history(fleet, seed=11)
    usage_rollups_update(now=NOW)
    assert _fleet() == _agents_summed() and len(_fleet()) > 10

    usage_rollups_backfill(since=HISTORY_START, until=JUNE + dt.timedelta(days=1), now=NOW)
    summed = _agents_summed()
    assert _fleet() == summed
    assert {key[0] for key in summed} == {"hour", "day"}

    # New rows in the current hour, and one written late into an earlier hour of the day: the next run
    # brings the fleet's hour and day up to date.
    rng = random.Random(5)
    later = NOW + dt.timedelta(minutes=10)
    rows = [_row(fleet, agent_id="roll-a", code="AI_TOKENS", at=later, rng=rng)]
    rows.append(_row(fleet, agent_id="roll-b", code="COMPUTE_MS", at=NOW - dt.timedelta(hours=1), rng=rng))
    from ledger.models import UsageLog

    UsageLog.objects.bulk_create(rows)
    usage_rollups_update(now=later)
    assert _fleet() == _agents_summed()

    stamps = dict(FleetUsageRollup.objects.values_list("pk", "updated_at"))
    usage_rollups_update(now=later)
    assert dict(FleetUsageRollup.objects.values_list("pk", "updated_at")) == stamps

"""The sweeps read only the current period's quota rows: with many months kept, every fleet-wide read of
the quotas goes through the index that leads with the period, never a scan of the whole table."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from ledger.models import Quota
from optimization import fleet, selectors
from tests.factories import fleet_create

pytestmark = pytest.mark.django_db

MONTHS_KEPT = 36


def _keep_past_months(months: int) -> None:
    """Copy every quota row into each of the ``months`` months before it, in one statement."""
    columns = [f.column for f in Quota._meta.concrete_fields if not f.primary_key]
    shifted = {
        "period_start": "period_start - make_interval(months => g)",
        "period_end": "period_end - make_interval(months => g)",
    }
    select = ", ".join(shifted.get(column, f'q."{column}"') for column in columns)
    names = ", ".join(f'"{column}"' for column in columns)
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO quotas ({names}) SELECT {select} FROM quotas q, generate_series(1, %s) AS g",
            [months],
        )
        cursor.execute("ANALYZE quotas")


def _plans(run) -> list[str]:
    with CaptureQueriesContext(connection) as captured:
        run()
    reads = [query["sql"] for query in captured.captured_queries if "quotas" in query["sql"]]
    assert reads, "the sweep read no quota rows"
    plans = []
    with connection.cursor() as cursor:
        for sql in reads:
            cursor.execute(f"EXPLAIN {sql}")
            plans.append("\n".join(row[0] for row in cursor.fetchall()))
    return plans


@pytest.mark.parametrize(
    "sweep_read",
    [
        selectors.resource_utilization,
        selectors.max_resource_utilization,
        selectors.period_spend,
        fleet.fleet_utilization,
    ],
    ids=["resource_utilization", "max_resource_utilization", "period_spend", "fleet_utilization"],
)
def test_fleet_reads_of_the_quotas_use_the_period_index_not_a_scan_of_every_month(reference_data, sweep_read):
    fleet_create("kept", 300, at=timezone.now(), used=10)
    _keep_past_months(MONTHS_KEPT)
    assert Quota.objects.count() == 300 * (MONTHS_KEPT + 1)
    for plan in _plans(sweep_read):
        assert "quota_period_agent_idx" in plan, plan
        assert "Seq Scan on quotas" not in plan, plan

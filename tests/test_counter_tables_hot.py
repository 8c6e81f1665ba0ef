"""The rows every allocation updates in place (quota counters, budget totals) are updated as HOT updates:
the new version stays on its page and no index is written, because the tables keep room on each page."""

from __future__ import annotations

import pytest
from django.db import connection
from django.db.models import F
from django.utils import timezone

from ledger.models import Budget, Quota
from tests.factories import fleet_create

pytestmark = pytest.mark.django_db

AGENTS = 400  # several full pages of each table
EVERY = 10  # one row in ten updated, as a minute of allocations spread over a fleet would


def _hot_updates(table: str) -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_get_xact_tuples_hot_updated(%s::regclass)", [table])
        return cursor.fetchone()[0]


def _updates(table: str) -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_get_xact_tuples_updated(%s::regclass)", [table])
        return cursor.fetchone()[0]


@pytest.mark.parametrize("table", ["quotas", "ledger_budget"])
def test_counter_tables_leave_room_on_each_page(table):
    with connection.cursor() as cursor:
        cursor.execute("SELECT reloptions FROM pg_class WHERE oid = %s::regclass", [table])
        assert "fillfactor=80" in (cursor.fetchone()[0] or [])


def test_counter_updates_after_a_bulk_insert_are_hot(reference_data):
    fleet_create("hot", AGENTS, at=timezone.now(), budget="100")
    quota_ids = list(
        Quota.objects.filter(agent__id__startswith="hot-").order_by("pk").values_list("pk", flat=True)
    )
    budget_ids = list(
        Budget.objects.filter(agent__id__startswith="hot-").order_by("pk").values_list("pk", flat=True)
    )
    assert len(quota_ids) == len(budget_ids) == AGENTS
    before = {table: (_updates(table), _hot_updates(table)) for table in ("quotas", "ledger_budget")}

    Quota.objects.filter(pk__in=quota_ids[::EVERY]).update(
        used=F("used") + 1, reserved=F("reserved") + 1, spent_usd=F("spent_usd") + 1
    )
    Budget.objects.filter(pk__in=budget_ids[::EVERY]).update(
        spent_usd=F("spent_usd") + 1, reserved_usd=F("reserved_usd") + 1
    )

    for table in ("quotas", "ledger_budget"):
        updated = _updates(table) - before[table][0]
        hot = _hot_updates(table) - before[table][1]
        assert updated == AGENTS // EVERY
        assert hot == updated, f"{table}: {hot} of {updated} updates were HOT"

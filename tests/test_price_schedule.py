"""A price that must change at one moment on every node: created with an ``effective_from`` further ahead
than the reference cache's bound, it is in every process's snapshot before that moment, so every process
charges the old price until the moment and the new one from it, however stale its snapshot otherwise is
(docs/scaling.md)."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest

from ledger import reference_cache
from ledger.models import ResourcePrice
from ledger.reference_cache import unit_price

pytestmark = pytest.mark.django_db

NOW = dt.datetime(2026, 11, 10, 12, tzinfo=dt.UTC)
BOUND_SECONDS = 5


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch, settings):
    settings.REFERENCE_CACHE_SECONDS = BOUND_SECONDS
    fake = FakeClock()
    monkeypatch.setattr(reference_cache, "monotonic", fake)
    return fake


def saved_elsewhere(**fields) -> None:
    """Save a price without this process's signals, as another node's admin does."""
    ResourcePrice.objects.bulk_create([ResourcePrice(**fields)])


def test_a_price_scheduled_further_ahead_than_the_bound_switches_at_its_moment(reference_data, clock):
    old = unit_price("AI_TOKENS", NOW)
    assert old == Decimal("0.000001")
    switch_at = NOW + dt.timedelta(seconds=BOUND_SECONDS + 1)
    saved_elsewhere(
        resource_type_id="AI_TOKENS", unit_price_usd=Decimal("0.000004"), effective_from=switch_at
    )

    clock.now += BOUND_SECONDS  # the snapshot has been reloaded, before the switch
    assert unit_price("AI_TOKENS", switch_at - dt.timedelta(microseconds=1)) == old
    assert unit_price("AI_TOKENS", switch_at) == Decimal("0.000004")


def test_a_price_in_effect_at_once_is_charged_late_by_a_process_whose_snapshot_is_fresh(
    reference_data, clock
):
    # The other side: without the margin, a process charges the old price until its snapshot expires.
    assert unit_price("AI_TOKENS", NOW) == Decimal("0.000001")
    saved_elsewhere(resource_type_id="AI_TOKENS", unit_price_usd=Decimal("0.000004"), effective_from=NOW)

    clock.now += BOUND_SECONDS - 0.1
    assert unit_price("AI_TOKENS", NOW + dt.timedelta(seconds=1)) == Decimal("0.000001")
    clock.now += 0.1
    assert unit_price("AI_TOKENS", NOW + dt.timedelta(seconds=1)) == Decimal("0.000004")

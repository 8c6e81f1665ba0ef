"""The one per-process cache of reference data: resource type codes, list prices and tier limits.

Every allocation reads them, and they change only when an operator edits them, so each process keeps one
snapshot of the three tables and reads it without a query. The rule that bounds how stale it can be:

- **Every process** reloads its snapshot once it is older than ``REFERENCE_CACHE_SECONDS`` (5 by default).
  A change committed by any process (the admin, ``load_reference_data``, a shell) is seen by every other
  process at most that long after its commit, plus the few milliseconds a reload takes.
- **The process that saves or deletes** a resource type, price or tier limit drops its snapshot at once and
  again when the transaction commits (signals, connected in ``ledger.apps``), so it never reads its own
  change late, nor keeps a snapshot another of its threads read just before the commit.

With several web nodes this is the whole rule: nothing is sent between processes, so a node added or
restarted needs nothing but the database. docs/scaling.md says what the bound means to an operator (a price
that must change at one moment everywhere is created with an ``effective_from`` at least the bound ahead).

Checking the age is a clock read, not a query: the hot path pays nothing per allocation, and each process
pays one reload (three small queries) every few seconds while it is busy. Rows written without signals
(``QuerySet.update``, raw SQL) and rows a rolled-back transaction had shown to a reload are corrected
within the same bound.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from time import monotonic
from types import MappingProxyType

from django.conf import settings
from django.db import transaction

from ledger.models import ResourcePrice, ResourceType, TierQuota

DEFAULT_SECONDS = 5.0


@dataclass(frozen=True)
class ReferenceData:
    """One process's snapshot of the reference tables, read-only once built."""

    resource_type_codes: frozenset[str]
    prices: Mapping[str, tuple[tuple[dt.datetime, Decimal], ...]]  # code -> (from, price), newest first
    tier_limits: Mapping[str, Mapping[str, int]]  # tier -> resource type -> monthly limit
    expires_at: float  # on the ``monotonic`` clock

    def unit_price(self, resource_type_id: str, at: dt.datetime) -> Decimal | None:
        """The list price of ``resource_type_id`` in effect at ``at``; None if it had none yet."""
        for effective_from, price in self.prices.get(resource_type_id, ()):
            if effective_from <= at:
                return price
        return None


_EMPTY_LIMITS: Mapping[str, int] = MappingProxyType({})

_snapshot: ReferenceData | None = None
# Bumped by every clear: a reload that started before a clear must not install what it read, which may
# predate the change that caused the clear.
_generation = 0
_lock = threading.Lock()


def cache_seconds() -> float:
    """How long a snapshot is used: ``settings.REFERENCE_CACHE_SECONDS``, else the environment variable of
    that name, else 5 seconds."""
    value = getattr(settings, "REFERENCE_CACHE_SECONDS", None)
    if value is None:
        value = os.environ.get("REFERENCE_CACHE_SECONDS", DEFAULT_SECONDS)
    return float(value)


def reference() -> ReferenceData:
    """This process's snapshot, reloaded first if it is older than ``cache_seconds()``."""
    snapshot = _snapshot
    if snapshot is None or monotonic() >= snapshot.expires_at:
        snapshot = _load()
    return snapshot


def resource_type_codes() -> frozenset[str]:
    return reference().resource_type_codes


def unit_price(resource_type_id: str, at: dt.datetime) -> Decimal | None:
    return reference().unit_price(resource_type_id, at)


def tier_limits(tier_id: str) -> Mapping[str, int]:
    """The monthly limits of ``tier_id`` by resource type (read-only); empty for a tier without any."""
    return reference().tier_limits.get(tier_id, _EMPTY_LIMITS)


class _PriceTable:
    """``price_table.unit_price(code, at)``, the name the allocation engine reads prices by."""

    @staticmethod
    def unit_price(resource_type_id: str, at: dt.datetime) -> Decimal | None:
        return reference().unit_price(resource_type_id, at)


price_table = _PriceTable()


def reference_cache_clear() -> None:
    """Drop this process's snapshot: the next read reloads it."""
    global _snapshot, _generation
    with _lock:
        _generation += 1
        _snapshot = None


def reference_changed(*, using: str | None = None) -> None:
    """A reference row was saved or deleted in this process: drop the snapshot now and once more when the
    transaction commits (a no-op outside one)."""
    reference_cache_clear()
    transaction.on_commit(reference_cache_clear, using=using)


def _load() -> ReferenceData:
    global _snapshot
    generation = _generation
    started = monotonic()
    # Types before prices: a type saved with its first price, in one transaction, is never read without it.
    codes = frozenset(ResourceType.objects.order_by().values_list("code", flat=True))
    prices: dict[str, list[tuple[dt.datetime, Decimal]]] = {}
    for code, effective_from, price in ResourcePrice.objects.order_by(
        "resource_type_id", "-effective_from"
    ).values_list("resource_type_id", "effective_from", "unit_price_usd"):
        prices.setdefault(code, []).append((effective_from, price))
    limits: dict[str, dict[str, int]] = {}
    tier_rows = TierQuota.objects.order_by().values_list("tier_id", "resource_type_id", "limit")
    for tier_id, code, limit in tier_rows:
        limits.setdefault(tier_id, {})[code] = limit
    snapshot = ReferenceData(
        resource_type_codes=codes,
        prices=MappingProxyType({code: tuple(rows) for code, rows in prices.items()}),
        tier_limits=MappingProxyType({tier: MappingProxyType(rows) for tier, rows in limits.items()}),
        # Counted from before the queries: a change committed while they ran is within the bound.
        expires_at=started + cache_seconds(),
    )
    with _lock:
        if generation == _generation:
            _snapshot = snapshot
    return snapshot

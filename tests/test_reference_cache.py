"""The reference cache: reads cost no query, the saving process sees its change at once, and every other
process sees it within ``REFERENCE_CACHE_SECONDS``."""

from __future__ import annotations

import datetime as dt
import json
import os
import queue
import subprocess
import sys
import textwrap
import threading
import time
from decimal import Decimal
from pathlib import Path

import pytest
from django.db import connection, transaction

from ledger import reference_cache
from ledger.models import ResourcePrice, ResourceType, TierQuota
from ledger.reference_cache import (
    price_table,
    reference_cache_clear,
    resource_type_codes,
    tier_limits,
    unit_price,
)

NOW = dt.datetime(2026, 11, 10, 12, tzinfo=dt.UTC)
ROOT = Path(__file__).resolve().parent.parent


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch, settings):
    settings.REFERENCE_CACHE_SECONDS = 5
    fake = FakeClock()
    monkeypatch.setattr(reference_cache, "monotonic", fake)
    return fake


@pytest.mark.django_db
def test_reads_while_the_snapshot_is_fresh_cost_no_query(reference_data, django_assert_num_queries):
    resource_type_codes()
    with django_assert_num_queries(0):
        for _ in range(100):
            assert "AI_TOKENS" in resource_type_codes()
            assert price_table.unit_price("AI_TOKENS", NOW) == Decimal("0.000001")
            assert tier_limits("PRO")["AI_TOKENS"] == 1_000_000


@pytest.mark.django_db
def test_a_price_changed_elsewhere_is_seen_once_the_snapshot_is_older_than_the_bound(reference_data, clock):
    assert unit_price("AI_TOKENS", NOW) == Decimal("0.000001")
    # QuerySet.update sends no signal: to this process it is a change made by another one.
    ResourcePrice.objects.filter(resource_type_id="AI_TOKENS").update(unit_price_usd=Decimal("0.000003"))

    clock.now += 4.9
    assert unit_price("AI_TOKENS", NOW) == Decimal("0.000001")
    clock.now += 0.1
    assert unit_price("AI_TOKENS", NOW) == Decimal("0.000003")


@pytest.mark.django_db
def test_a_tier_limit_changed_elsewhere_is_seen_once_the_snapshot_is_older_than_the_bound(
    reference_data, clock
):
    assert tier_limits("FREE")["AI_TOKENS"] == 100_000
    TierQuota.objects.filter(tier_id="FREE", resource_type_id="AI_TOKENS").update(limit=7)
    clock.now += 4.9
    assert tier_limits("FREE")["AI_TOKENS"] == 100_000
    clock.now += 0.1
    assert tier_limits("FREE")["AI_TOKENS"] == 7


@pytest.mark.django_db
def test_the_saving_process_sees_its_own_change_at_once(reference_data, clock):
    assert "GPU_MS" not in resource_type_codes()
    assert unit_price("AI_TOKENS", NOW) == Decimal("0.000001")

    ResourceType.objects.create(code="GPU_MS", name="GPU", unit="milliseconds")
    ResourcePrice.objects.create(
        resource_type_id="GPU_MS", unit_price_usd=Decimal("0.0002"), effective_from=NOW
    )
    ResourcePrice.objects.create(
        resource_type_id="AI_TOKENS", unit_price_usd=Decimal("0.000002"), effective_from=NOW
    )
    TierQuota.objects.filter(tier_id="PRO", resource_type_id="AI_TOKENS").get().delete()

    # No time has passed: the signals dropped the snapshot.
    assert "GPU_MS" in resource_type_codes()
    assert unit_price("GPU_MS", NOW) == Decimal("0.0002")
    assert unit_price("GPU_MS", NOW - dt.timedelta(seconds=1)) is None
    assert unit_price("AI_TOKENS", NOW) == Decimal("0.000002")
    assert unit_price("AI_TOKENS", NOW - dt.timedelta(seconds=1)) == Decimal("0.000001")
    assert "AI_TOKENS" not in tier_limits("PRO")


@pytest.mark.django_db
def test_a_reload_that_raced_a_change_is_used_once_but_not_kept(reference_data, clock):
    """A reload that read the tables before a clear may hold what the clear was for: it must not become
    the snapshot, or the saving process would read its change late."""
    cleared = []

    def clear_during_the_reload(execute, sql, params, many, context):
        if not cleared:
            cleared.append(sql)
            reference_cache_clear()
        return execute(sql, params, many, context)

    with connection.execute_wrapper(clear_during_the_reload):
        resource_type_codes()
    assert cleared
    assert reference_cache._snapshot is None


# --- Two processes --------------------------------------------------------------------------------------

BOUND_SECONDS = 1.0
MARGIN_SECONDS = 1.0  # the other process's polling and scheduling on a busy machine, not the cache

# The other process: warm its cache, say so, then poll until the new code is accepted (known, with a price
# in effect) and report when, on the machine-wide monotonic clock, and how many queries its reads cost.
OTHER_PROCESS = textwrap.dedent(
    """
    import datetime as dt, json, sys, time

    import django

    django.setup()
    from django.db import connection

    from ledger.reference_cache import resource_type_codes, unit_price

    code, deadline = sys.argv[1], float(sys.argv[2])
    assert code not in resource_type_codes()
    queries = []
    reads = 0
    print(json.dumps({"ready": True}), flush=True)
    with connection.execute_wrapper(lambda execute, *args: queries.append(1) or execute(*args)):
        while time.monotonic() < deadline:
            reads += 1
            now = dt.datetime.now(dt.UTC)
            if code in resource_type_codes() and unit_price(code, now) is not None:
                print(json.dumps({"seen_at": time.monotonic(), "reads": reads, "queries": len(queries)}))
                sys.exit(0)
            time.sleep(0.01)
    print(json.dumps({"seen_at": None, "reads": reads, "queries": len(queries)}), flush=True)
    """
)


def _database_url() -> str:
    db = connection.settings_dict
    password = f":{db['PASSWORD']}" if db.get("PASSWORD") else ""
    return f"postgres://{db['USER']}{password}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


def _lines(stream) -> queue.Queue:
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _next_json(lines: queue.Queue, timeout: float) -> dict:
    line = lines.get(timeout=timeout)
    assert line is not None, "the other process ended without answering"
    return json.loads(line)


@pytest.mark.django_db(transaction=True)
def test_another_process_accepts_a_new_resource_type_within_the_bound(reference_data):
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "axiom_grid.settings",
        "DATABASE_URL": _database_url(),
        "REFERENCE_CACHE_SECONDS": str(BOUND_SECONDS),
        "PYTHONPATH": str(ROOT),
    }
    deadline = time.monotonic() + 120
    other = subprocess.Popen(
        [sys.executable, "-c", OTHER_PROCESS, "GPU_MS", str(deadline)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        lines = _lines(other.stdout)
        assert _next_json(lines, timeout=60) == {"ready": True}
        assert "GPU_MS" not in resource_type_codes()  # this process's snapshot is warm too

        # As the admin saves a new resource type with its first price.
        with transaction.atomic():
            ResourceType.objects.create(code="GPU_MS", name="GPU", unit="milliseconds")
            ResourcePrice.objects.create(
                resource_type_id="GPU_MS", unit_price_usd=Decimal("0.0002"), effective_from=NOW
            )
        committed_at = time.monotonic()
        assert "GPU_MS" in resource_type_codes()  # the saving process: at once

        seen = _next_json(lines, timeout=BOUND_SECONDS + 30)
        assert seen["seen_at"] is not None
        elapsed = seen["seen_at"] - committed_at
        assert elapsed <= BOUND_SECONDS + MARGIN_SECONDS
        # Its reads were served from the snapshot: a reload (three queries) per bound, not a query per read.
        assert seen["queries"] <= 3 * (elapsed / BOUND_SECONDS + 2)
        assert seen["reads"] > seen["queries"]
        other.wait(timeout=10)
    finally:
        if other.poll() is None:
            other.kill()
            other.wait()

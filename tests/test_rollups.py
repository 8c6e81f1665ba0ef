"""Usage rollups: equal to a direct aggregate of the usage log, kept up to date incrementally (only the
buckets new rows touch are written, a re-run writes nothing, a late row within the window is counted), and the
readers that use them (cost spikes, burn rates, the forecast's spend, the dashboard's cost chart) return
what they returned from raw rows alone."""

from __future__ import annotations

import datetime as dt
import random
import threading
from decimal import Decimal

import pytest
from django.core.management import CommandError, call_command
from django.db import connection, connections, transaction
from django.db.models import F, Q, Sum

from ledger.models import Quota, UsageLog
from ledger.periods import month_bounds
from ledger.services import quota_open
from optimization import selectors
from optimization.dashboard.data import _exhaustion, cost_chart
from optimization.models import UsageRollup, UsageRollupState
from optimization.rollups import STATE_NAME, UsageWindow, floor_day, floor_hour, usage_totals
from optimization.services.analytics import PeriodClock, agent_activity, burn_last_24h
from optimization.services.rollups import usage_rollups_backfill, usage_rollups_update
from tests.factories import AgentFactory

pytestmark = pytest.mark.django_db

UTC = dt.UTC
NOW = dt.datetime(2025, 6, 1, 14, 37, 12, 345678, tzinfo=UTC)
MAY = dt.datetime(2025, 5, 1, tzinfo=UTC)
JUNE = dt.datetime(2025, 6, 1, tzinfo=UTC)
HISTORY_START = dt.datetime(2025, 5, 26, tzinfo=UTC)
RESOURCES = ("AI_TOKENS", "COMPUTE_MS", "NETWORK_REQS")
AGENTS = ("roll-a", "roll-b", "roll-c")
CONSUMPTION = {str(kind) for kind in UsageLog.CONSUMPTION_KINDS}
KINDS = [str(kind) for kind in UsageLog.Kind]


@pytest.fixture
def fleet(reference_data):
    quotas = {}
    for agent_id in AGENTS:
        agent = AgentFactory(id=agent_id, tier_id="PRO")
        for code in RESOURCES:
            for period in (MAY, JUNE):
                quotas[agent_id, code, period] = quota_open(agent=agent, resource_type_id=code, at=period)
    return quotas


def _row(quotas, *, agent_id: str, code: str, at: dt.datetime, rng: random.Random, period=None) -> UsageLog:
    quota = quotas[agent_id, code, period or month_bounds(at)[0]]
    return UsageLog(
        agent_id=agent_id,
        resource_type_id=code,
        quota=quota,
        amount=rng.randrange(1, 10**6),
        unit_price_usd=Decimal("0.000001"),
        cost_usd=Decimal(rng.randrange(0, 10**15)) / 10**12,
        kind=rng.choice(KINDS),
        created_at=at,
        period_start=quota.period_start,
    )


def _random_history(quotas, *, seed: int, count: int = 900, until: dt.datetime = NOW) -> None:
    """Rows spread over the days before ``until``, on and around hour and day edges, some of them
    settlements after midnight charged to May."""
    rng = random.Random(seed)
    span = int((until - HISTORY_START).total_seconds() * 10**6)
    rows = []
    for _ in range(count):
        at = HISTORY_START + dt.timedelta(microseconds=rng.randrange(span))
        if rng.random() < 0.1:
            at = max(
                floor_hour(at) + rng.choice([dt.timedelta(0), -dt.timedelta(microseconds=1)]), HISTORY_START
            )
        agent_id, code = rng.choice(AGENTS), rng.choice(RESOURCES)
        rows.append(_row(quotas, agent_id=agent_id, code=code, at=at, rng=rng))
    for _ in range(count // 20):  # late settlements of May's holds, in the first hours of June
        at = JUNE + dt.timedelta(microseconds=rng.randrange(3 * 3600 * 10**6))
        row = _row(
            quotas, agent_id=rng.choice(AGENTS), code=rng.choice(RESOURCES), at=at, rng=rng, period=MAY
        )
        row.kind = UsageLog.Kind.SETTLEMENT
        rows.append(row)
    UsageLog.objects.bulk_create(rows)


def _direct(*, since: dt.datetime | None = None) -> dict[tuple, tuple[int, Decimal, int]]:
    """The rollups the usage log implies, computed in Python from every row (created at or after
    ``since``, a day's start)."""
    expected: dict[tuple, list] = {}
    rows = UsageLog.objects.all()
    if since is not None:
        rows = rows.filter(created_at__gte=since)
    for row in rows.values(
        "created_at", "agent_id", "resource_type_id", "period_start", "kind", "amount", "cost_usd"
    ):
        for granularity, bucket in (
            ("hour", floor_hour(row["created_at"])),
            ("day", floor_day(row["created_at"])),
        ):
            key = (granularity, bucket, row["agent_id"], row["resource_type_id"], row["period_start"])
            figures = expected.setdefault(key, [0, Decimal(0), 0])
            figures[0] += row["amount"] if row["kind"] in CONSUMPTION else 0
            figures[1] += row["cost_usd"]
            figures[2] += 1
    return {key: tuple(figures) for key, figures in expected.items()}


def _rolled(*, since: dt.datetime | None = None) -> dict[tuple, tuple[int, Decimal, int]]:
    rows = UsageRollup.objects.all()
    if since is not None:
        rows = rows.filter(bucket_start__gte=since)
    return {
        (r.granularity, r.bucket_start, r.agent_id, r.resource_type_id, r.period_start): (
            r.units,
            r.cost_usd,
            r.calls,
        )
        for r in rows
    }


def _stamps() -> dict[tuple, dt.datetime]:
    return {
        (r.granularity, r.bucket_start, r.agent_id, r.resource_type_id, r.period_start): r.updated_at
        for r in UsageRollup.objects.all()
    }


def _state() -> UsageRollupState:
    return UsageRollupState.objects.get(name=STATE_NAME)


# --- The rollups themselves -----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_rollups_equal_a_direct_aggregate_of_the_usage_log_over_random_data(fleet, seed):
    _random_history(fleet, seed=seed)

    first = usage_rollups_update(now=NOW)
    assert first["sealed_through"] == "2025-06-01T12:00:00+00:00"  # two hours before, on the hour
    # The first run covers the day the late window begins in: from there on, every bucket is exact.
    assert (_state().covered_from, _state().sealed_through) == (JUNE, dt.datetime(2025, 6, 1, 12, tzinfo=UTC))
    assert _rolled() == _direct(since=JUNE)

    usage_rollups_backfill(since=HISTORY_START, until=JUNE + dt.timedelta(days=1), now=NOW)
    assert _state().covered_from == HISTORY_START
    rolled = _rolled()
    assert rolled == _direct()
    assert len(rolled) > 500
    assert {key[0] for key in rolled} == {"hour", "day"}
    # Late settlements in June charged to May: their own buckets, apart from June's rows of the same hour.
    assert any(key[1] >= JUNE and key[4] == MAY for key in rolled)


def test_incremental_run_updates_exactly_the_buckets_its_new_rows_touch(fleet):
    _random_history(fleet, seed=7)
    usage_rollups_update(now=NOW)
    before = _stamps()
    rng = random.Random(8)
    new_rows = [
        _row(fleet, agent_id="roll-a", code="AI_TOKENS", at=NOW + dt.timedelta(minutes=1), rng=rng),
        _row(fleet, agent_id="roll-a", code="AI_TOKENS", at=NOW + dt.timedelta(minutes=2), rng=rng),
        # Late: committed now, timed in an hour a run has already counted but not sealed.
        _row(
            fleet,
            agent_id="roll-b",
            code="COMPUTE_MS",
            at=dt.datetime(2025, 6, 1, 13, 10, tzinfo=UTC),
            rng=rng,
        ),
        # Written with an old time (sealed hour, covered day): found by its id.
        _row(
            fleet,
            agent_id="roll-c",
            code="NETWORK_REQS",
            at=dt.datetime(2025, 6, 1, 3, 20, tzinfo=UTC),
            rng=rng,
        ),
    ]
    UsageLog.objects.bulk_create(new_rows)
    # Before the covered range: the backfill's, not the upkeep's.
    UsageLog.objects.bulk_create(
        [
            _row(
                fleet,
                agent_id="roll-c",
                code="AI_TOKENS",
                at=dt.datetime(2025, 5, 30, 8, tzinfo=UTC),
                rng=rng,
            )
        ]
    )

    run = usage_rollups_update(now=NOW + dt.timedelta(minutes=5))

    after = _stamps()
    changed = {key for key, stamp in after.items() if before.get(key) != stamp}
    touched = {
        (granularity, bucket(row.created_at), row.agent_id, row.resource_type_id, row.period_start)
        for row in new_rows
        for granularity, bucket in (("hour", floor_hour), ("day", floor_day))
    }
    assert changed == touched
    assert (run["hours_written"], run["days_written"]) == (3, 3)
    assert _rolled() == _direct(since=JUNE)
    assert not UsageRollup.objects.filter(bucket_start__lt=JUNE).exists()
    assert _state().last_usage_id == max(row.id for row in new_rows)


def test_a_second_run_writes_nothing(fleet):
    _random_history(fleet, seed=11)
    usage_rollups_update(now=NOW)
    usage_rollups_backfill(since=HISTORY_START, until=JUNE, now=NOW)
    before = _stamps()

    again = usage_rollups_update(now=NOW)
    backfill_again = usage_rollups_backfill(since=HISTORY_START, until=JUNE, now=NOW)

    assert (again["hours_written"], again["days_written"]) == (0, 0)
    assert (backfill_again["hours_written"], backfill_again["days_written"]) == (0, 0)
    assert backfill_again["chunks"] == 6
    assert _stamps() == before


def test_a_run_after_an_outage_catches_up_and_seals_every_hour_in_between(fleet):
    _random_history(fleet, seed=12, until=NOW + dt.timedelta(days=2))
    usage_rollups_update(now=NOW)
    later = NOW + dt.timedelta(days=2)

    run = usage_rollups_update(now=later)

    assert run["chunks"] == 51  # an hour a transaction: from June 1st, 12:00 to June 3rd, 15:00
    assert _state().sealed_through == floor_hour(later - dt.timedelta(hours=2))
    assert _rolled() == _direct(since=JUNE)


def test_a_run_out_of_time_seals_what_it_finished_and_the_next_goes_on(fleet):
    _random_history(fleet, seed=13, until=NOW + dt.timedelta(days=2))
    usage_rollups_update(now=NOW)
    later = NOW + dt.timedelta(days=2)

    first = usage_rollups_update(now=later, run_seconds=0)

    assert first["chunks"] == 1
    assert _state().sealed_through == dt.datetime(2025, 6, 1, 13, tzinfo=UTC)
    usage_rollups_update(now=later)
    assert _state().sealed_through == floor_hour(later - dt.timedelta(hours=2))
    assert _rolled() == _direct(since=JUNE)


@pytest.mark.django_db(transaction=True)
def test_a_row_committed_late_within_the_window_is_counted(fleet):
    """A row whose transaction is still open while a run counts its hour: readers count it as soon as it
    commits (its hour is read raw until sealed), and the next run puts it in the rollups."""
    rng = random.Random(21)
    UsageLog.objects.bulk_create(
        [
            _row(fleet, agent_id="roll-a", code="AI_TOKENS", at=NOW - dt.timedelta(minutes=m), rng=rng)
            for m in (5, 80)
        ]
    )
    late = _row(fleet, agent_id="roll-a", code="AI_TOKENS", at=NOW - dt.timedelta(minutes=70), rng=rng)
    inserted, release, failures = threading.Event(), threading.Event(), []

    def writer():
        try:
            with transaction.atomic():
                late.save()
                inserted.set()
                release.wait(30)
        except Exception as error:  # reported by the main thread
            failures.append(error)
            inserted.set()
        finally:
            connections.close_all()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert inserted.wait(30)
        usage_rollups_update(now=NOW)
        window = {"w": UsageWindow(NOW - dt.timedelta(hours=6), NOW)}
        without = usage_totals(windows=window, where="agent_id = 'roll-a'")["w", "roll-a"]
        assert _rolled() == _direct(since=JUNE)  # the late row is not visible yet
    finally:
        release.set()
        thread.join(30)
    assert not failures

    with_late = usage_totals(windows=window, where="agent_id = 'roll-a'")["w", "roll-a"]
    assert with_late.calls == without.calls + 1
    assert with_late.cost_usd == without.cost_usd + late.cost_usd
    assert _rolled() != _direct(since=JUNE)

    usage_rollups_update(now=NOW + dt.timedelta(minutes=5))
    assert _rolled() == _direct(since=JUNE)


def test_the_backfill_command_takes_dates_and_refuses_bad_ones(fleet):
    _random_history(fleet, seed=31)
    call_command("usage_rollups_backfill", "--since", "2025-05-26", "--until", "2025-06-02")
    # The command's upkeep ran at the real time: June 2025 is before its covered range, all backfilled.
    assert _rolled(since=HISTORY_START) == _direct()
    with pytest.raises(CommandError):
        call_command("usage_rollups_backfill", "--since", "2025-06-02", "--until", "2025-06-01")
    with pytest.raises(CommandError):
        call_command("usage_rollups_backfill", "--since", "June")


# --- Readers --------------------------------------------------------------------------------------------


def _old_cost_spike_ratio(*, now: dt.datetime) -> dict[str, dict]:
    """``cost_spike_ratio`` as it read raw rows before the rollups."""
    from ledger.money import cents, money_round

    hour_ago = now - dt.timedelta(hours=1)
    rows = (
        UsageLog.objects.filter(created_at__gte=hour_ago - dt.timedelta(hours=24), created_at__lt=now)
        .values("agent_id")
        .annotate(
            last_hour=Sum("cost_usd", filter=Q(created_at__gte=hour_ago)),
            baseline=Sum("cost_usd", filter=Q(created_at__lt=hour_ago)),
        )
        .order_by()
    )
    result = {}
    for row in rows:
        baseline = row["baseline"] or Decimal(0)
        if baseline <= 0:
            continue
        hourly = baseline / 24
        last_hour = row["last_hour"] or Decimal(0)
        result[row["agent_id"]] = {
            "last_hour_usd": last_hour,
            "baseline_hourly_usd": money_round(hourly),
            "ratio": cents(last_hour / hourly),
        }
    return result


MOMENTS = [
    NOW,
    NOW - dt.timedelta(hours=2, minutes=30),
    NOW + dt.timedelta(hours=3),
    dt.datetime(2025, 6, 1, 0, 20, tzinfo=UTC),
    dt.datetime(2025, 5, 31, 11, tzinfo=UTC),
    dt.datetime(2025, 5, 28, 23, 59, 59, 999999, tzinfo=UTC),
]


def _readings(quotas) -> dict:
    found = {}
    for moment in MOMENTS:
        found["spike", moment] = selectors.cost_spike_ratio(now=moment)
        found["spike-range", moment] = selectors.cost_spike_ratio(
            now=moment, agent_ids=selectors.AgentRange("roll-a", "roll-b")
        )
        found["spike-list", moment] = selectors.cost_spike_ratio(now=moment, agent_ids=["roll-c"])
        for agent_id in AGENTS:
            agent = quotas[agent_id, RESOURCES[0], JUNE].agent
            clock = PeriodClock.at(moment)
            found["burn", agent_id, moment] = burn_last_24h(agent=agent, now=moment)
            activity = agent_activity(agent=agent, since=moment - dt.timedelta(hours=24), clock=clock)
            found["forecast", agent_id, moment] = activity.forecast_spend_usd
            found["chart", agent_id, moment] = cost_chart(agent=agent, now=moment)
            for code in RESOURCES:
                quota = quotas[agent_id, code, month_bounds(moment)[0]]
                Quota.objects.filter(pk=quota.pk).update(limit=10**9)
                quota.refresh_from_db()
                found["exhaustion", agent_id, code, moment] = _exhaustion(quota, moment)
    return found


def test_readers_return_from_rollups_what_they_returned_from_raw_rows(fleet):
    _random_history(fleet, seed=41, count=1500)
    raw = _readings(fleet)
    for moment in MOMENTS:
        assert raw["spike", moment] == _old_cost_spike_ratio(now=moment)
    assert any(raw["spike", moment] for moment in MOMENTS)
    assert any(raw["burn", agent_id, NOW] for agent_id in AGENTS)

    usage_rollups_update(now=NOW)
    usage_rollups_backfill(since=HISTORY_START, until=JUNE, now=NOW)
    assert UsageRollup.objects.filter(granularity="day").count() > 20

    assert _readings(fleet) == raw


def test_readers_read_the_rollups_of_complete_hours_and_days(fleet):
    """A changed rollup (which no run would write) changes what the readers return: they read the rollups
    for what is complete, and not the raw rows."""
    _random_history(fleet, seed=51)
    usage_rollups_update(now=NOW)
    usage_rollups_backfill(since=HISTORY_START, until=JUNE, now=NOW)
    agent = fleet["roll-a", "AI_TOKENS", JUNE].agent
    spike = selectors.cost_spike_ratio(now=NOW)["roll-a"]
    chart = cost_chart(agent=agent, now=NOW)
    may_chart = cost_chart(agent=agent, now=dt.datetime(2025, 5, 31, 23, tzinfo=UTC))

    # An hour of the spike's baseline (sealed), and a whole day of May's chart.
    baseline_hour = UsageRollup.objects.filter(
        granularity="hour",
        agent_id="roll-a",
        bucket_start__gte=dt.datetime(2025, 5, 31, 14, tzinfo=UTC),
        bucket_start__lt=dt.datetime(2025, 6, 1, 12, tzinfo=UTC),
    ).first()
    UsageRollup.objects.filter(pk=baseline_hour.pk).update(cost_usd=F("cost_usd") + 1000)
    may_28th = UsageRollup.objects.filter(
        granularity="day",
        agent_id="roll-a",
        period_start=MAY,
        bucket_start=dt.datetime(2025, 5, 28, tzinfo=UTC),
    )
    assert may_28th.update(cost_usd=F("cost_usd") + 1000) >= 1

    assert selectors.cost_spike_ratio(now=NOW)["roll-a"]["baseline_hourly_usd"] > spike["baseline_hourly_usd"]
    assert cost_chart(agent=agent, now=dt.datetime(2025, 5, 31, 23, tzinfo=UTC)) != may_chart
    assert cost_chart(agent=agent, now=NOW) == chart  # June's chart does not read May 28th


def test_a_reader_is_one_statement_over_both_tables(fleet):
    from django.test.utils import CaptureQueriesContext

    _random_history(fleet, seed=61)
    usage_rollups_update(now=NOW)
    with CaptureQueriesContext(connection) as queries:
        selectors.cost_spike_ratio(now=NOW)
    assert len(queries) == 1
    sql = queries[0]["sql"]
    assert '"usage_rollups"' in sql and '"usage_logs"' in sql and '"usage_rollup_state"' in sql


def test_the_periodic_task_brings_the_rollups_up_to_date_at_the_real_time(fleet):
    from optimization.tasks.rollups import usage_rollups_update_task

    now = dt.datetime.now(UTC)
    agent = fleet["roll-a", "AI_TOKENS", JUNE].agent
    quotas = {
        ("roll-a", "AI_TOKENS", month_bounds(at)[0]): quota_open(
            agent=agent, resource_type_id="AI_TOKENS", at=at
        )
        for at in (now, now - dt.timedelta(minutes=90))
    }
    rng = random.Random(71)
    UsageLog.objects.bulk_create(
        [
            _row(quotas, agent_id="roll-a", code="AI_TOKENS", at=now - dt.timedelta(minutes=m), rng=rng)
            for m in (30, 90)
        ]
    )

    assert usage_rollups_update_task.apply().get()["hours_written"] == 2
    state = _state()
    assert now - dt.timedelta(hours=3) < state.sealed_through <= now - dt.timedelta(hours=2)
    assert _rolled(since=floor_day(now - dt.timedelta(hours=3))) == _direct(
        since=floor_day(now - dt.timedelta(hours=3))
    )
    assert usage_rollups_update_task.apply().get()["hours_written"] == 0


def test_the_backfill_repairs_a_day_whose_rollups_were_changed(fleet):
    _random_history(fleet, seed=81)
    usage_rollups_update(now=NOW)
    usage_rollups_backfill(since=HISTORY_START, until=JUNE, now=NOW)
    may_28th = dt.datetime(2025, 5, 28, tzinfo=UTC)
    assert (
        UsageRollup.objects.filter(
            bucket_start__gte=may_28th, bucket_start__lt=may_28th + dt.timedelta(days=1)
        ).update(cost_usd=F("cost_usd") + 1, calls=0)
        > 0
    )
    assert _rolled() != _direct()

    usage_rollups_backfill(since=may_28th, until=may_28th + dt.timedelta(days=1), now=NOW)

    assert _rolled() == _direct()

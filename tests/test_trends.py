"""Executions without a duration or an outcome, and the trends built on executions and spend: daily spend
against the daily budget, cost per successful task per day, degradation of the last hour against the 7
days before it, their API, their dashboard partial and their rule metrics.

Histories are built at fixed moments of June 2025, so every figure below can be worked out by hand.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
from django.db import connection
from django.template.loader import render_to_string
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from ledger.budgets import budget_create
from ledger.models import Agent, OptimizationRule
from ledger.partitions import partition_create
from ledger.rules_yaml import parse_rules
from ledger.services import agent_create
from optimization.models import Alert, Execution, UsageRollup
from optimization.selectors import duration_percentiles, execution_stats
from optimization.services.analytics import agent_metrics
from optimization.services.executions import execution_record
from optimization.services.recommendations import agent_recommendations
from optimization.services.rollups import usage_rollups_backfill
from optimization.services.rules import rules_evaluate
from optimization.services.trends import cost_per_successful_task, daily_spend, degradation

pytest.register_assert_rewrite("tests.api_fixtures")

from tests.api_fixtures import assert_error  # noqa: E402

pytest_plugins = ["tests.api_fixtures"]

pytestmark = pytest.mark.django_db

UTC = dt.UTC
T0 = dt.datetime(2025, 6, 15, 12, 0, tzinfo=UTC)
HOUR = dt.timedelta(hours=1)
MINUTE = dt.timedelta(minutes=1)
JUNE_10 = dt.date(2025, 6, 10)
TOKENS = {"AI_TOKENS": 1_000}  # $0.001 at the PRO tier's price


def _executions_url(agent_id: str) -> str:
    return reverse("optimization:executions", args=[agent_id])


def _run(agent: Agent, at: dt.datetime, *, success: bool | None = True, duration_ms: int | None = 100):
    return execution_record(
        agent=agent, superpower="search", resources=TOKENS, duration_ms=duration_ms, success=success, now=at
    )


def _executions(agent: Agent, moments_and_outcomes: list[tuple[dt.datetime, bool | None, int | None]]):
    """Execution rows only (no usage): for the execution metrics, which read executions alone."""
    Execution.objects.bulk_create(
        Execution(
            agent=agent,
            superpower="search",
            resources={},
            duration_ms=duration,
            success=success,
            cost_usd=Decimal(0),
            created_at=at,
        )
        for at, success, duration in moments_and_outcomes
    )


# --- Executions without a duration or an outcome --------------------------------------------------------


def test_an_execution_with_only_a_superpower_and_resources_is_recorded_with_no_duration_nor_outcome(agent_a):
    response = agent_a.client.post(
        _executions_url(agent_a.id), {"superpower": "search", "resources": TOKENS}, format="json"
    )

    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["duration_ms"], body["success"], body["output_units"]) == (None, None, 0)
    assert Decimal(body["cost_usd"]) == Decimal("0.001")
    execution = Execution.objects.get()
    assert (execution.duration_ms, execution.success) == (None, None)
    assert str(execution).endswith("(outcome unknown)")


def test_an_execution_accepts_explicit_nulls_and_still_refuses_bad_values(agent_a):
    body = {"superpower": "search", "resources": TOKENS, "duration_ms": None, "success": None}
    assert agent_a.client.post(_executions_url(agent_a.id), body, format="json").status_code == 201

    for bad in ({"duration_ms": -1}, {"duration_ms": "slow"}, {"success": "maybe"}):
        response = agent_a.client.post(_executions_url(agent_a.id), {**body, **bad}, format="json")
        details = assert_error(response, 400, "validation_error")
        assert set(details["fields"]) == set(bad)
    assert Execution.objects.count() == 1


def test_metrics_leave_missing_durations_out_of_latency_and_unknown_outcomes_out_of_rates(reference_data):
    agent = agent_create(agent_id="mixed", tier_code="PRO")
    _executions(
        agent,
        [
            (T0 - 10 * MINUTE, True, 100),
            (T0 - 9 * MINUTE, False, 300),
            (T0 - 8 * MINUTE, None, None),
            (T0 - 7 * MINUTE, None, 5_000),
            (T0 - 6 * MINUTE, True, None),
        ],
    )
    blank = agent_create(agent_id="blank", tier_code="PRO")
    _executions(blank, [(T0 - 5 * MINUTE, None, None)])

    stats = execution_stats(since=T0 - HOUR, until=T0)
    assert stats["mixed"]["executions"] == 5
    assert (stats["mixed"]["successes"], stats["mixed"]["failures"]) == (2, 1)
    assert stats["mixed"]["outcome_unknown"] == 2
    assert stats["mixed"]["error_rate_percent"] == Decimal("33.33")  # 1 of the 3 with a known outcome
    assert stats["mixed"]["throughput_per_hour"] == Decimal("5.00")
    assert (stats["blank"]["error_rate_percent"], stats["blank"]["throughput_per_hour"]) == (
        None,
        Decimal("1.00"),
    )

    percentiles = duration_percentiles(since=T0 - HOUR, until=T0)
    assert percentiles == {"mixed": {50: Decimal("300.00"), 95: Decimal("4530.00")}}  # 100, 300, 5000

    performance = agent_metrics(agent=agent, window_hours=1, now=T0)["performance"]
    assert (performance["executions"], performance["successes"], performance["failures"]) == (5, 2, 1)
    assert performance["error_rate_percent"] == Decimal("33.33")
    assert (performance["p50_duration_ms"], performance["p95_duration_ms"]) == (
        Decimal("300.00"),
        Decimal("4530.00"),
    )
    blank_performance = agent_metrics(agent=blank, window_hours=1, now=T0)["performance"]
    assert (blank_performance["executions"], blank_performance["p95_duration_ms"]) == (1, None)
    assert blank_performance["error_rate_percent"] is None


def test_the_failed_execution_recommendation_rates_failures_among_known_outcomes(reference_data):
    agent = agent_create(agent_id="unreported", tier_code="PRO")
    early = dt.datetime(2025, 6, 5, tzinfo=UTC)
    outcomes = [True, False] + [None] * 18
    for i, success in enumerate(outcomes):
        _run(agent, early + i * HOUR, success=success)

    items = agent_recommendations(agent=agent, now=dt.datetime(2025, 6, 11, tzinfo=UTC))

    (reduce,) = [item for item in items if item["type"] == "reduce_resource"]
    # 1 of the 2 known outcomes failed (50 %), not 1 of 20 executions (5 %, under the 10 % limit).
    assert reduce["evidence"]["error_rate_percent"] == Decimal("50.00")
    assert (reduce["evidence"]["executions"], reduce["evidence"]["failures"]) == (20, 1)
    assert reduce["rationale"].startswith("1 of 2 executions with a known outcome this period failed")


def test_a_monthly_partition_created_after_the_migration_takes_executions_without_outcome(reference_data):
    partition_create(table="optimization_execution", month=dt.datetime(2031, 3, 1, tzinfo=UTC))
    agent = agent_create(agent_id="later", tier_code="PRO")
    _executions(agent, [(dt.datetime(2031, 3, 5, tzinfo=UTC), None, None)])

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT tableoid::regclass::text, success, duration_ms FROM optimization_execution "
            "WHERE agent_id = 'later'"
        )
        assert cursor.fetchall() == [("optimization_execution_p203103", None, None)]


# --- Daily spend and cost per successful task -----------------------------------------------------------


@pytest.fixture
def three_days(reference_data) -> Agent:
    """June 10: three executions (two successes, one failure); June 11: one of unknown outcome; June 12:
    nothing. Each costs $0.001."""
    agent = agent_create(agent_id="trend", tier_code="PRO")
    _run(agent, dt.datetime(2025, 6, 10, 0, 0, tzinfo=UTC))
    _run(agent, dt.datetime(2025, 6, 10, 13, 0, tzinfo=UTC))
    _run(agent, dt.datetime(2025, 6, 10, 23, 59, 59, tzinfo=UTC), success=False)
    _run(agent, dt.datetime(2025, 6, 11, 8, 0, tzinfo=UTC), success=None, duration_ms=None)
    other = agent_create(agent_id="other", tier_code="PRO")
    _run(other, dt.datetime(2025, 6, 10, 9, 0, tzinfo=UTC))
    return agent


def test_daily_spend_is_zero_filled_and_has_no_budget_without_a_daily_one(three_days):
    budget_create(scope="agent", scope_id="trend", window="month", limit_usd="100")

    days = daily_spend(agent_id="trend", start=dt.date(2025, 6, 9), end=dt.date(2025, 6, 12))

    assert days == [
        {"day": dt.date(2025, 6, 9), "spend_usd": Decimal("0"), "budget_usd": None},
        {"day": dt.date(2025, 6, 10), "spend_usd": Decimal("0.003"), "budget_usd": None},
        {"day": dt.date(2025, 6, 11), "spend_usd": Decimal("0.001"), "budget_usd": None},
        {"day": dt.date(2025, 6, 12), "spend_usd": Decimal("0"), "budget_usd": None},
    ]


def test_daily_spend_carries_the_agents_daily_budget(three_days):
    budget_create(scope="agent", scope_id="trend", window="day", limit_usd="2.50")
    budget_create(scope="agent", scope_id="other", window="day", limit_usd="1")

    days = daily_spend(agent_id="trend", start=JUNE_10, end=JUNE_10)

    assert days == [{"day": JUNE_10, "spend_usd": Decimal("0.003"), "budget_usd": Decimal("2.50")}]


def test_daily_spend_reads_the_rollups_where_they_are_complete(three_days):
    before = daily_spend(agent_id="trend", start=JUNE_10, end=dt.date(2025, 6, 11))
    usage_rollups_backfill(
        since=dt.datetime(2025, 6, 1, tzinfo=UTC), until=dt.datetime(2025, 6, 16, tzinfo=UTC), now=T0
    )
    assert daily_spend(agent_id="trend", start=JUNE_10, end=dt.date(2025, 6, 11)) == before

    # The rollups are a cache of the usage log: changing one shows that the day is read from it.
    rolled = UsageRollup.objects.filter(
        agent_id="trend", granularity="day", bucket_start=dt.datetime(2025, 6, 10, tzinfo=UTC)
    )
    assert rolled.update(cost_usd=Decimal("7")) == 1
    days = daily_spend(agent_id="trend", start=JUNE_10, end=dt.date(2025, 6, 11))
    assert [day["spend_usd"] for day in days] == [Decimal("7"), Decimal("0.001")]


def test_cost_per_successful_task_per_day(three_days):
    days = cost_per_successful_task(agent_id="trend", start=JUNE_10, end=dt.date(2025, 6, 12))

    assert days == [
        {
            "day": JUNE_10,
            "cost_usd": Decimal("0.003"),
            "successes": 2,
            "cost_per_success_usd": Decimal("0.0015"),
        },
        # The execution of unknown outcome costs, but is no success.
        {
            "day": dt.date(2025, 6, 11),
            "cost_usd": Decimal("0.001"),
            "successes": 0,
            "cost_per_success_usd": None,
        },
        {"day": dt.date(2025, 6, 12), "cost_usd": Decimal("0"), "successes": 0, "cost_per_success_usd": None},
    ]


# --- Degradation ----------------------------------------------------------------------------------------


def _baseline(agent: Agent) -> None:
    """One execution an hour over the 7 days before the last hour (168): 8 failed, 152 succeeded, 8 of
    unknown outcome and no duration; every duration 100 ms. Error rate 5 %, p95 100 ms, 1 an hour."""
    moments = [T0 - HOUR - dt.timedelta(minutes=30) - i * HOUR for i in range(168)]
    outcomes = [False] * 8 + [True] * 152 + [None] * 8
    _executions(
        agent,
        [
            (at, success, None if success is None else 100)
            for at, success in zip(moments, outcomes, strict=True)
        ],
    )


def _bad_hour(agent: Agent) -> None:
    """Ten executions in the last hour, 400 ms each, three failed: p95 400 ms, error rate 30 %."""
    _executions(agent, [(T0 - (i + 1) * 5 * MINUTE, i >= 3, 400) for i in range(10)])


@pytest.fixture
def fleet(reference_data) -> dict[str, Agent]:
    """degraded: the usual week, then a bad hour; healthy: the usual week, then one usual execution; new:
    a bad hour and no week; quiet: the usual week and nothing in the last hour; idle: nothing at all."""
    agents = {
        name: agent_create(agent_id=name, tier_code="PRO")
        for name in ("degraded", "healthy", "new", "quiet", "idle")
    }
    for name in ("degraded", "healthy", "quiet"):
        _baseline(agents[name])
    _bad_hour(agents["degraded"])
    _bad_hour(agents["new"])
    _executions(agents["healthy"], [(T0 - 10 * MINUTE, True, 100)])
    # Outside both windows: a day before the baseline and at the current window's end (exclusive).
    _executions(agents["healthy"], [(T0 - HOUR - dt.timedelta(days=8), False, 90_000), (T0, False, 90_000)])
    return agents


def test_degradation_compares_the_last_hour_with_the_seven_days_before(fleet):
    assert degradation(agent_id="degraded", now=T0) == {
        "p95_duration_ms": {
            "current": Decimal("400.00"),
            "baseline": Decimal("100.00"),
            "ratio": Decimal("4.00"),
        },
        "error_rate": {"current": Decimal("30.00"), "baseline": Decimal("5.00"), "ratio": Decimal("6.00")},
        "throughput_per_hour": {
            "current": Decimal("10.00"),
            "baseline": Decimal("1.00"),
            "ratio": Decimal("10.00"),
        },
        "window_hours": 1,
        "baseline_days": 7,
    }
    healthy = degradation(agent_id="healthy", now=T0)
    assert [healthy[key]["ratio"] for key in ("p95_duration_ms", "error_rate", "throughput_per_hour")] == [
        Decimal("1.00"),
        Decimal("0.00"),
        Decimal("1.00"),
    ]


def test_degradation_without_a_baseline_or_without_a_current_hour_has_no_ratio(fleet):
    new = degradation(agent_id="new", now=T0)
    assert new["p95_duration_ms"] == {"current": Decimal("400.00"), "baseline": None, "ratio": None}
    assert new["error_rate"] == {"current": Decimal("30.00"), "baseline": None, "ratio": None}
    assert new["throughput_per_hour"] == {"current": Decimal("10.00"), "baseline": None, "ratio": None}

    quiet = degradation(agent_id="quiet", now=T0)
    assert quiet["p95_duration_ms"] == {"current": None, "baseline": Decimal("100.00"), "ratio": None}
    assert quiet["error_rate"] == {"current": None, "baseline": Decimal("5.00"), "ratio": None}
    # Nothing ran: a throughput of zero, against a known baseline.
    assert quiet["throughput_per_hour"] == {
        "current": Decimal("0.00"),
        "baseline": Decimal("1.00"),
        "ratio": Decimal("0.00"),
    }

    idle = degradation(agent_id="idle", now=T0)
    assert idle["throughput_per_hour"] == {"current": Decimal("0.00"), "baseline": None, "ratio": None}
    assert idle["p95_duration_ms"]["ratio"] is None and idle["error_rate"]["ratio"] is None


def test_degradation_ratios_are_of_the_exact_figures(reference_data):
    agent = agent_create(agent_id="rare", tier_code="PRO")
    _executions(agent, [(T0 - dt.timedelta(days=3), True, 100), (T0 - 30 * MINUTE, True, 100)])

    throughput = degradation(agent_id="rare", now=T0)["throughput_per_hour"]

    # One execution a week is 0.01 an hour to two places; one in the last hour is 168 times that.
    assert throughput == {"current": Decimal("1.00"), "baseline": Decimal("0.01"), "ratio": Decimal("168.00")}


def test_degradation_partial_renders_each_metric_with_its_level(fleet):
    html = render_to_string(
        "dashboard/_degradation.html", {"degradation": degradation(agent_id="degraded", now=T0)}
    )
    assert '<span class="badge critical">×4.00</span>' in html  # p95
    assert '<span class="badge critical">×6.00</span>' in html  # error rate
    assert "400.00 ms" in html and "30.00 %" in html and "10.00 / h" in html

    html = render_to_string(
        "dashboard/_degradation.html", {"degradation": degradation(agent_id="quiet", now=T0)}
    )
    assert html.count("no baseline") == 2
    assert '<span class="badge critical">×0.00</span>' in html  # throughput fell to nothing
    healthy = render_to_string(
        "dashboard/_degradation.html", {"degradation": degradation(agent_id="healthy", now=T0)}
    )
    assert "critical" not in healthy and "warning" not in healthy


# --- Rules ----------------------------------------------------------------------------------------------


def _only_rules(*specs: dict) -> None:
    OptimizationRule.objects.all().delete()
    base = {"duration_seconds": 0, "cooldown_seconds": 3600}
    for spec in specs:
        OptimizationRule.objects.create(**{**base, **spec})


BASELINE_RULES = (
    {"name": "slower", "metric": "p95_duration_vs_baseline", "operator": ">", "threshold": Decimal("1.5")},
    {"name": "failing", "metric": "error_rate_vs_baseline", "operator": ">", "threshold": 2},
    {"name": "busier", "metric": "throughput_vs_baseline", "operator": ">=", "threshold": 5},
    {"name": "stalled", "metric": "throughput_vs_baseline", "operator": "<", "threshold": Decimal("0.5")},
)


def test_baseline_rules_fire_on_a_degraded_agent_and_never_without_a_baseline(fleet):
    _only_rules(*BASELINE_RULES)

    result = rules_evaluate(now=T0)

    fired = {
        (alert.rule.name, alert.agent_id, alert.data["value"])
        for alert in Alert.objects.filter(kind="rule").select_related("rule")
    }
    assert fired == {
        ("slower", "degraded", "4.00"),
        ("failing", "degraded", "6.00"),
        ("busier", "degraded", "10.00"),
        ("stalled", "quiet", "0.00"),
    }
    assert result["fired"] == 4
    (alert,) = Alert.objects.filter(rule__name="slower")
    assert alert.title == "slower: p95_duration_vs_baseline is 4.00 (> 1.5)"


def test_baseline_metrics_read_executions_once_per_chunk_whatever_the_rules(fleet):
    _only_rules(*BASELINE_RULES)

    with CaptureQueriesContext(connection) as queries:
        result = rules_evaluate(now=T0, chunk_size=2)

    reads = [query["sql"] for query in queries if '"optimization_execution"' in query["sql"]]
    assert result["chunks"] == 3  # five agents, two a chunk
    assert len(reads) == 3, reads
    assert all("created_at >=" in sql for sql in reads)  # bounded by time: only the recent partitions
    assert result["fired"] == 4  # the same as evaluated in one chunk


def test_baseline_metrics_load_from_a_rule_file():
    (spec,) = parse_rules(
        "alerts:\n  - name: Slower\n    condition: p95_duration_vs_baseline > 1.5\n    duration: 10m\n"
    )
    assert (spec.metric, spec.operator, spec.threshold, spec.duration_seconds) == (
        "p95_duration_vs_baseline",
        ">",
        Decimal("1.5"),
        600,
    )


# --- API ------------------------------------------------------------------------------------------------


@pytest.fixture
def frozen_now(monkeypatch):
    monkeypatch.setattr(timezone, "now", lambda: T0)
    return T0


@pytest.fixture
def history(agent_a, frozen_now):
    """agent-a: two successes and a failure on June 1, a daily budget of $2.50, the degraded week."""
    agent = agent_a.agent
    _run(agent, dt.datetime(2025, 6, 1, 1, 0, tzinfo=UTC))
    _run(agent, dt.datetime(2025, 6, 1, 2, 0, tzinfo=UTC))
    _run(agent, dt.datetime(2025, 6, 1, 3, 0, tzinfo=UTC), success=False)
    budget_create(scope="agent", scope_id=agent.pk, window="day", limit_usd="2.50")
    _baseline(agent)
    _bad_hour(agent)
    return agent_a


def _url(name: str, agent_id: str = "agent-a") -> str:
    return reverse(f"optimization:{name}", args=[agent_id])


def test_daily_spend_endpoint(history):
    response = history.client.get(_url("agent-daily-spend"), {"start": "2025-05-31", "end": "2025-06-01"})

    assert response.status_code == 200, response.content
    body = response.json()
    assert (body["agent_id"], body["start"], body["end"]) == ("agent-a", "2025-05-31", "2025-06-01")
    assert [(day["day"], Decimal(day["spend_usd"]), Decimal(day["budget_usd"])) for day in body["days"]] == [
        ("2025-05-31", Decimal("0"), Decimal("2.50")),
        ("2025-06-01", Decimal("0.003"), Decimal("2.50")),
    ]


def test_cost_per_success_endpoint_defaults_to_the_last_30_days(history):
    response = history.client.get(_url("agent-cost-per-success"))

    assert response.status_code == 200, response.content
    body = response.json()
    assert (body["start"], body["end"]) == ("2025-05-17", "2025-06-15")
    assert len(body["days"]) == 30
    june_1 = next(day for day in body["days"] if day["day"] == "2025-06-01")
    assert set(june_1) == {"day", "cost_usd", "successes", "cost_per_success_usd"}
    assert (Decimal(june_1["cost_usd"]), june_1["successes"], Decimal(june_1["cost_per_success_usd"])) == (
        Decimal("0.003"),
        2,
        Decimal("0.0015"),
    )
    assert body["days"][0]["cost_per_success_usd"] is None


def test_degradation_endpoint(history):
    response = history.client.get(_url("agent-degradation"))

    assert response.status_code == 200, response.content
    assert response.json() == {
        "agent_id": "agent-a",
        "p95_duration_ms": {"current": "400.00", "baseline": "100.00", "ratio": "4.00"},
        "error_rate": {"current": "30.00", "baseline": "5.00", "ratio": "6.00"},
        "throughput_per_hour": {"current": "10.00", "baseline": "1.00", "ratio": "10.00"},
        "window_hours": 1,
        "baseline_days": 7,
    }


@pytest.mark.parametrize("name", ["agent-daily-spend", "agent-cost-per-success"])
@pytest.mark.parametrize(
    ("query", "status", "code"),
    [
        ({"start": "2025-06-10", "end": "2025-06-09"}, 400, "invalid_range"),
        ({"start": "2024-06-09", "end": "2025-06-10"}, 400, "invalid_range"),  # 366 days and one
        ({"end": "9999-12-31"}, 400, "invalid_range"),
        ({"start": "2025-13-01"}, 400, "validation_error"),
        ({"end": "yesterday"}, 400, "validation_error"),
        ({"since": "2025-06-01"}, 400, "validation_error"),
    ],
)
def test_trend_endpoints_refuse_bad_ranges(history, name, query, status, code):
    assert_error(history.client.get(_url(name), query), status, code)


@pytest.mark.parametrize("name", ["agent-daily-spend", "agent-cost-per-success"])
def test_trend_endpoints_take_up_to_366_days_and_the_first_days(history, name):
    body = history.client.get(_url(name), {"start": "2024-06-11", "end": "2025-06-11"}).json()
    assert len(body["days"]) == 366
    body = history.client.get(_url(name), {"end": "0001-01-02"}).json()
    assert [day["day"] for day in body["days"]] == ["0001-01-01", "0001-01-02"]


def test_trend_endpoints_are_isolated_per_agent_and_follow_the_analytics_switch(
    history, agent_b, operator_client, settings
):
    for name in ("agent-daily-spend", "agent-cost-per-success", "agent-degradation"):
        assert_error(agent_b.client.get(_url(name)), 404, "not_found")
        assert operator_client.get(_url(name)).status_code == 200
    settings.ENABLE_PERFORMANCE_ANALYTICS = False
    for name in ("agent-daily-spend", "agent-cost-per-success", "agent-degradation"):
        assert_error(history.client.get(_url(name)), 403, "feature_disabled")

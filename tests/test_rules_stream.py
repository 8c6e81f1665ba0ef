"""The rules evaluation streams through the fleet: chunks of agents by id, each in its own transaction.

Chunked or not it decides the same; a fixed number of queries per chunk; no lock outlives its chunk; a
crash loses only the chunk in flight; one evaluation at a time; and a rule's alert is one per episode of
its condition, sent out again (not repeated) while the episode lasts.
"""

from __future__ import annotations

import datetime as dt
import threading

import psycopg
import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from ledger.models import Agent, OptimizationRule, Quota
from ledger.periods import UTC
from ledger.services import agent_create, quota_open
from optimization.models import Alert, AlertDelivery, RuleState
from optimization.services import rules
from optimization.services.rules import rules_evaluate

T0 = dt.datetime(2025, 6, 15, 12, 0, tzinfo=UTC)
MINUTE = dt.timedelta(minutes=1)


def agent_at(agent_id: str, percent: int) -> None:
    """An agent of the PRO tier with ``percent`` of its 1,000,000 AI tokens used this period."""
    agent = Agent.objects.filter(pk=agent_id).first() or agent_create(agent_id=agent_id, tier_code="PRO")
    quota = quota_open(agent=agent, resource_type_id="AI_TOKENS", at=T0)
    Quota.objects.filter(pk=quota.pk).update(used=percent * 10_000)


def rules_only(*specs: dict) -> list[OptimizationRule]:
    OptimizationRule.objects.all().delete()
    base = {"operator": ">", "duration_seconds": 0, "cooldown_seconds": 3600}
    return [OptimizationRule.objects.create(**{**base, **spec}) for spec in specs]


NOTIFY = {"name": "hot", "metric": "resource_utilization_percent", "threshold": 80, "action": "notify"}
THROTTLE = {"name": "stop", "metric": "resource_utilization_percent", "threshold": 90, "action": "throttle"}

# Seven agents; their ids sort the same in any collation. Over 80%: a, c, e, g; over 90%: c, g.
FLEET = {
    "agent-a": 85,
    "agent-b": 10,
    "agent-c": 95,
    "agent-d": 50,
    "agent-e": 81,
    "agent-f": 0,
    "agent-g": 99,
}


def fleet() -> None:
    for agent_id, percent in FLEET.items():
        agent_at(agent_id, percent)


def outcome() -> tuple:
    states = sorted(RuleState.objects.values_list("rule__name", "agent_id", "subject", "last_fired_at"))
    alerts = sorted(Alert.objects.values_list("dedup_key", "title", "notifications"))
    statuses = sorted(Agent.objects.values_list("pk", "status", "status_reason"))
    return states, alerts, statuses


@pytest.mark.django_db
def test_chunks_of_two_decide_what_one_chunk_decides(reference_data):
    rules_only(NOTIFY, THROTTLE)
    fleet()
    whole = rules_evaluate(now=T0, chunk_size=1000)
    expected = outcome()
    assert (whole["chunks"], whole["alerts"], whole["throttled"]) == (1, 6, 2)

    RuleState.objects.all().delete()
    Alert.objects.all().delete()
    Agent.objects.update(status="active", status_reason="")
    chunked = rules_evaluate(now=T0, chunk_size=2)
    assert chunked["chunks"] == 4  # 2 + 2 + 2 + 1
    assert {key: chunked[key] for key in ("fired", "alerts", "throttled")} == {
        key: whole[key] for key in ("fired", "alerts", "throttled")
    }
    assert outcome() == expected


@pytest.mark.django_db
def test_an_evaluation_costs_the_same_queries_for_3_or_30_agents_in_a_chunk(reference_data):
    rules_only(NOTIFY, THROTTLE)

    def queries(agents: int, now: dt.datetime) -> int:
        for i in range(agents):
            agent_at(f"q{agents}-{i:03d}", 95)  # every one fires both rules
        with CaptureQueriesContext(connection) as captured:
            result = rules_evaluate(now=now, chunk_size=100)
        assert result["throttled"] == agents
        Agent.objects.all().delete()
        return len(captured)

    assert queries(3, T0) == queries(30, T0 + 2 * 60 * MINUTE)


@pytest.mark.django_db
def test_states_of_agents_that_are_gone_are_pruned_whichever_chunk_holds_their_id(reference_data):
    (rule,) = rules_only(NOTIFY | {"duration_seconds": 600})
    fleet()
    rules_evaluate(now=T0, chunk_size=2)
    orphans = ["aaa-before-all", "agent-b2-between", "zzz-after-all"]
    RuleState.objects.bulk_create(
        RuleState(rule_id=rule.pk, agent_id=agent_id, subject="AI_TOKENS", true_since=T0, last_value=90)
        for agent_id in orphans
    )
    rules_evaluate(now=T0 + MINUTE, chunk_size=2)
    assert set(RuleState.objects.values_list("agent_id", flat=True)) == {
        "agent-a",
        "agent-c",
        "agent-e",
        "agent-g",
    }


@pytest.mark.django_db
def test_an_evaluation_of_an_empty_fleet_prunes_every_state(reference_data):
    (rule,) = rules_only(NOTIFY)
    RuleState.objects.create(rule=rule, agent_id="gone", subject="", true_since=T0, last_value=1)
    assert rules_evaluate(now=T0)["chunks"] == 1
    assert not RuleState.objects.exists()


# --- One alert per episode -------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_rule_alerts_once_per_episode_and_sends_it_out_again_each_cooldown(reference_data, settings):
    settings.ALERT_EMAILS = ["ops@example.com"]
    rules_only(NOTIFY)
    agent_at("agent-a", 85)
    assert rules_evaluate(now=T0)["alerts"] == 1
    (alert,) = Alert.objects.all()
    (delivery,) = AlertDelivery.objects.filter(alert=alert)
    AlertDelivery.objects.filter(pk=delivery.pk).update(status="delivered", attempts=1, delivered_at=T0)

    agent_at("agent-a", 88)
    assert rules_evaluate(now=T0 + 30 * MINUTE)["fired"] == 0  # inside the cooldown
    result = rules_evaluate(now=T0 + 61 * MINUTE)
    assert (result["fired"], result["alerts"], result["renotified"]) == (1, 0, 1)
    (alert,) = Alert.objects.all()
    assert alert.notifications == 2
    assert alert.notified_at is not None
    assert alert.data["value"] == "88.00"
    assert " is 88.00 " in alert.title
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts) == ("pending", 0)  # sent out again, same delivery row
    assert AlertDelivery.objects.count() == 1

    # Acknowledged: quiet for the rest of the episode.
    Alert.objects.update(acknowledged_at=T0 + 62 * MINUTE, acknowledged_by="operator")
    result = rules_evaluate(now=T0 + 122 * MINUTE)
    assert (result["fired"], result["alerts"], result["renotified"]) == (1, 0, 0)
    assert Alert.objects.get().notifications == 2

    # The episode ends; the next one is a new alert.
    agent_at("agent-a", 10)
    rules_evaluate(now=T0 + 123 * MINUTE)
    agent_at("agent-a", 90)
    assert rules_evaluate(now=T0 + 124 * MINUTE)["alerts"] == 1
    assert sorted(Alert.objects.values_list("notifications", "acknowledged_at")) == [
        (1, None),
        (2, T0 + 62 * MINUTE),
    ]


@pytest.mark.django_db
def test_an_hour_of_a_fleet_over_its_threshold_is_one_alert_per_agent(reference_data):
    rules_only(NOTIFY | {"cooldown_seconds": 60})
    fleet()
    for minute in range(0, 61, 1):
        rules_evaluate(now=T0 + minute * MINUTE, chunk_size=3)
    assert Alert.objects.count() == 4
    assert set(Alert.objects.values_list("notifications", flat=True)) == {61}


# --- Transactions ---------------------------------------------------------------------------------------


def _other_connection() -> psycopg.Connection:
    settings = connection.settings_dict
    return psycopg.connect(
        host=settings["HOST"] or None,
        port=settings["PORT"] or None,
        user=settings["USER"],
        dbname=settings["NAME"],
        autocommit=True,
    )


@pytest.mark.django_db(transaction=True)
def test_no_lock_is_held_across_chunks(reference_data, monkeypatch):
    """While the evaluation is between chunks, another session updates a throttled agent of a chunk already
    done at once: the chunk's row locks went with its commit."""
    rules_only(THROTTLE)
    fleet()
    done_chunks: list[int] = []
    checked = threading.Event()
    seen: dict[str, object] = {}
    chunk_evaluate = rules._chunk_evaluate

    def between_chunks(*args, **kwargs):
        if done_chunks == [1]:  # the first chunk (agent-a, agent-b, agent-c) has committed
            with _other_connection() as other:
                other.execute("SET lock_timeout = '2s'")
                cursor = other.execute(
                    f"UPDATE {Agent._meta.db_table} SET status_reason = status_reason WHERE id = 'agent-c' "
                    "RETURNING status"
                )
                seen["status"] = cursor.fetchone()[0]
            checked.set()
        done_chunks.append(1)
        return chunk_evaluate(*args, **kwargs)

    monkeypatch.setattr(rules, "_chunk_evaluate", between_chunks)
    result = rules_evaluate(now=T0, chunk_size=3)
    assert checked.is_set()
    assert seen["status"] == "throttled"
    assert result["throttled"] == 2


@pytest.mark.django_db(transaction=True)
def test_a_crash_loses_only_the_chunk_in_flight_and_the_next_run_goes_on(reference_data, monkeypatch):
    rules_only(NOTIFY)
    fleet()
    chunk_evaluate = rules._chunk_evaluate
    calls = []

    def crash_on_the_third(*args, **kwargs):
        calls.append(1)
        result = chunk_evaluate(*args, **kwargs)
        if len(calls) == 3:
            raise RuntimeError("worker lost")
        return result

    monkeypatch.setattr(rules, "_chunk_evaluate", crash_on_the_third)
    with pytest.raises(RuntimeError):
        rules_evaluate(now=T0, chunk_size=2)
    # Chunks 1 and 2 (agent-a .. agent-d) committed; the third (agent-e, agent-f) rolled back.
    assert sorted(Alert.objects.values_list("agent_id", flat=True)) == ["agent-a", "agent-c"]

    monkeypatch.setattr(rules, "_chunk_evaluate", chunk_evaluate)
    result = rules_evaluate(now=T0 + MINUTE, chunk_size=2)
    assert result["alerts"] == 2  # agent-e and agent-g; agent-a and agent-c are in their cooldown
    assert sorted(Alert.objects.values_list("agent_id", "notifications")) == [
        ("agent-a", 1),
        ("agent-c", 1),
        ("agent-e", 1),
        ("agent-g", 1),
    ]


@pytest.mark.django_db(transaction=True)
def test_an_evaluation_that_finds_another_running_skips(reference_data):
    rules_only(NOTIFY)
    fleet()
    with _other_connection() as other:
        other.execute("SELECT pg_advisory_lock(%s)", [rules._EVALUATION_LOCK])
        result = rules_evaluate(now=T0)
        assert (result["skipped"], result["chunks"]) == (True, 0)
        assert not Alert.objects.exists()
        other.execute("SELECT pg_advisory_unlock(%s)", [rules._EVALUATION_LOCK])
    assert rules_evaluate(now=T0)["alerts"] == 4


def test_the_episode_key_is_written_alike_in_python_and_sql(db):
    rule = OptimizationRule(pk=7)
    since = dt.datetime(2025, 6, 15, 12, 0, 4, 250, tzinfo=UTC)
    assert rules._dedup_key(rule, "a", "AI_TOKENS", since) == "rule:7:a:AI_TOKENS:2025-06-15T12:00:04.000250"
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {rules._EPISODE_SQL} FROM (SELECT %s::timestamptz AS true_since) f", [since])
        assert cursor.fetchone()[0] == "2025-06-15T12:00:04.000250"

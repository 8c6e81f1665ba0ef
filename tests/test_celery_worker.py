"""The alert tasks through a real broker: a Celery worker started in this process consumes from Redis and
writes to PostgreSQL, and the budget sweep's after-commit enqueue delivers to a local webhook receiver.

Needs Redis (``REDIS_URL``): skipped without it, a failure under ``CI=true``.
"""

from __future__ import annotations

import json
import time
from decimal import Decimal

import pytest
from celery.contrib.testing.worker import start_worker
from celery.signals import task_postrun
from django.db import connections
from django.utils import timezone

from allocation.services import allocation_create
from axiom_grid.celery import app as celery_app
from ledger.budgets import agent_team_set, budget_create, budget_update, team_create
from ledger.errors import BudgetExceeded
from ledger.models import Budget, Quota
from ledger.services import agent_create, quota_open, reference_data_load
from optimization.models import Alert, AlertDelivery, AlertSettings, WebhookEndpoint
from optimization.tasks.alerts import alerts_deliver_task, budget_sweep_task, cost_spike_sweep_task
from tests.test_alerts import SECRET, WebhookReceiver, signature_of

pytestmark = [pytest.mark.redis, pytest.mark.django_db(transaction=True)]

RESULT_TIMEOUT = 30


def _close_worker_connections(**kwargs) -> None:
    # The worker thread opens its own database connection; closing it after each task keeps the test
    # database free to be flushed and dropped.
    connections.close_all()


@pytest.fixture
def worker(settings):
    settings.SECRET_KEY_IS_SET = True  # a worker refuses to start on the public key when DEBUG is off
    celery_app.control.purge()  # nothing left over from an earlier run is consumed
    task_postrun.connect(_close_worker_connections, weak=False)
    try:
        with start_worker(celery_app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
            yield celery_app
    finally:
        task_postrun.disconnect(_close_worker_connections)


@pytest.fixture
def over_budget_agent(db):
    reference_data_load()
    agent = agent_create(agent_id="through-broker", tier_code="PRO", monthly_budget_usd=Decimal("100"))
    quota = quota_open(agent=agent, resource_type_id="AI_TOKENS", at=timezone.now())
    Quota.objects.filter(pk=quota.pk).update(spent_usd=Decimal("92.50"))
    # The sweep reads the budget rows: the agent's monthly budget has spent the same.
    Budget.objects.filter(agent=agent, managed=True).update(spent_usd=Decimal("92.50"))
    return agent


def wait_for(condition, *, timeout: float = RESULT_TIMEOUT, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"not reached within {timeout} s")


def test_budget_sweep_runs_through_the_broker_and_creates_each_alert_once(worker, over_budget_agent):
    assert budget_sweep_task.delay().get(timeout=RESULT_TIMEOUT) == 3
    assert budget_sweep_task.delay().get(timeout=RESULT_TIMEOUT) == 0
    assert sorted(Alert.objects.values_list("data__threshold", flat=True)) == [50, 80, 90]
    assert set(Alert.objects.values_list("agent_id", "kind")) == {("through-broker", "budget")}
    assert cost_spike_sweep_task.delay().get(timeout=RESULT_TIMEOUT) == 0


def test_budget_alerts_reach_a_webhook_end_to_end_through_the_worker(worker, over_budget_agent):
    with WebhookReceiver(statuses=[500]) as receiver:  # the first request fails
        WebhookEndpoint.objects.create(agent=over_budget_agent, url=receiver.url, secret=SECRET)
        AlertSettings.objects.create(agent=over_budget_agent, email="owner@example.com")

        # The sweep's after-commit enqueue makes the worker deliver without waiting for the periodic task.
        assert budget_sweep_task.delay().get(timeout=RESULT_TIMEOUT) == 3
        wait_for(lambda: len(receiver.requests) >= 3)
        # Every attempt recorded (a claimed delivery already counts its attempt while its request is out):
        # the three emails and two of the webhook deliveries delivered.
        wait_for(lambda: AlertDelivery.objects.filter(status="delivered").count() == 5)

        # One webhook delivery failed with 500 and waits for its retry; deliver it once it is due.
        failed = AlertDelivery.objects.get(channel="webhook", status="pending")
        assert (failed.attempts, failed.last_status_code) == (1, 500)
        AlertDelivery.objects.filter(pk=failed.pk).update(next_attempt_at=timezone.now())
        assert alerts_deliver_task.delay().get(timeout=RESULT_TIMEOUT) == 1
        assert alerts_deliver_task.delay().get(timeout=RESULT_TIMEOUT) == 0

        assert len(receiver.requests) == 4
        assert all(
            request["headers"]["X-Axiom-Signature"] == signature_of(request) for request in receiver.requests
        )
        assert set(AlertDelivery.objects.values_list("channel", "status")) == {
            ("webhook", "delivered"),
            ("email", "delivered"),
        }
        assert AlertDelivery.objects.count() == 6


def test_a_team_budget_alert_and_its_resolution_reach_a_global_webhook_through_the_worker(worker, db):
    reference_data_load()
    team = team_create(id="research")
    agent = agent_create(agent_id="team-member", tier_code="PRO")
    agent_team_set(agent=agent, team_id=team.id)
    budget = budget_create(scope="team", scope_id=team.id, window="day", limit_usd="0.05")
    allocation_create(agent=agent, resource_type_id="COMPUTE_MS", amount=5_000)  # 5 cents: all of it
    with pytest.raises(BudgetExceeded):
        allocation_create(agent=agent, resource_type_id="COMPUTE_MS", amount=1_000)
    with WebhookReceiver() as receiver:
        WebhookEndpoint.objects.create(agent=None, url=receiver.url, secret=SECRET)
        assert budget_sweep_task.delay().get(timeout=RESULT_TIMEOUT) == 4  # 100%: four thresholds
        # Raising the limit enqueues the budget's resolved check at once: the worker sends it, not the sweep.
        budget_update(budget=budget, changes={"limit_usd": "1.00"})
        wait_for(lambda: Alert.objects.filter(kind="budget_resolved").exists())
        assert budget_sweep_task.delay().get(timeout=RESULT_TIMEOUT) == 0
        wait_for(lambda: len(receiver.requests) >= 5)
        bodies = [json.loads(request["body"]) for request in receiver.requests]
    assert sorted(body["kind"] for body in bodies) == ["budget"] * 4 + ["budget_resolved"]
    assert {(body["agent_id"], body["scope"], body["scope_id"]) for body in bodies} == {
        (None, "team", "research")
    }
    assert Budget.objects.get(pk=budget.pk).refused_at is None

"""Budgets and alerts: the budget sweep, cost spikes, signed webhook delivery with retries, email, the alert
API and admin, and the periodic tasks that must create nothing twice."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import re
import threading
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.core import mail
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from allocation.services import allocation_create
from ledger.models import Agent, Budget, Quota
from ledger.periods import UTC, month_bounds
from ledger.services import agent_create, quota_open
from optimization.models import Alert, AlertDelivery, AlertSettings, WebhookEndpoint
from optimization.services import alert_delivery
from optimization.services import alerts as alert_services
from optimization.services.alert_delivery import MAX_ATTEMPTS, alerts_deliver, delivery_backoff
from optimization.services.alerts import (
    FAN_OUT_BATCH_SIZE,
    alert_acknowledge,
    budget_sweep,
    cost_spike_sweep,
)
from optimization.services.rules import rules_evaluate
from optimization.tasks import alerts as alert_tasks
from optimization.webhooks import webhook_secret_key

pytest.register_assert_rewrite("tests.api_fixtures")
from tests.api_fixtures import assert_error  # noqa: E402
from tests.factories import fleet_create  # noqa: E402

pytestmark = pytest.mark.django_db
pytest_plugins = ["tests.api_fixtures"]

NOW = dt.datetime(2025, 6, 15, 12, 0, tzinfo=UTC)
SECRET = "whsec_dGVzdC1zZWNyZXQtb2YtdGhpcnR5LXR3by1ieXRlcyE="  # 32 bytes, as an endpoint's form saves it


# --- Helpers --------------------------------------------------------------------------------------------


def budget_agent(agent_id: str, *, budget: str | None = "100.00", spent: str = "0", at=NOW) -> Agent:
    """An agent whose period spend (``quotas.spent_usd``, and its monthly budget's ``spent_usd`` in the
    month of ``at``) is exactly ``spent`` dollars."""
    agent = agent_create(
        agent_id=agent_id, tier_code="PRO", monthly_budget_usd=Decimal(budget) if budget else None
    )
    quota = quota_open(agent=agent, resource_type_id="AI_TOKENS", at=at)
    Quota.objects.filter(pk=quota.pk).update(spent_usd=Decimal(spent))
    monthly_spend_set(agent, spent, at=at)
    return agent


def monthly_spend_set(agent: Agent, spent: str, *, at=NOW) -> None:
    """The agent's monthly (managed) budget in the month of ``at``, with ``spent`` dollars spent."""
    start, end = month_bounds(at)
    Budget.objects.filter(agent=agent, managed=True).update(
        window_start=start, window_end=end, spent_usd=Decimal(spent), rollover_usd=0
    )


def alert_keys(**filters) -> set[str]:
    return set(Alert.objects.filter(**filters).values_list("dedup_key", flat=True))


def budget_alerts(**filters) -> set[tuple[str, str, int]]:
    """(agent, window start, threshold) of each budget alert."""
    rows = Alert.objects.filter(kind="budget", **filters).values_list(
        "agent_id", "data__window_start", "data__threshold"
    )
    return {(agent_id, start[:7], threshold) for agent_id, start, threshold in rows}


class WebhookReceiver:
    """A local HTTP server that records every POST and answers with the planned statuses (then 200)."""

    def __init__(self, statuses: list[int] | None = None, *, max_requests: int = 100):
        self.statuses = list(statuses or [])
        self.requests: list[dict] = []
        self.max_requests = max_requests
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    receiver.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    over = len(receiver.requests) > receiver.max_requests
                    status = 429 if over else (receiver.statuses.pop(0) if receiver.statuses else 200)
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/axiom"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05})
        self.thread.daemon = True

    def __enter__(self) -> WebhookReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def receiver():
    with WebhookReceiver() as running:
        yield running


def signature_of(request: dict, secret: str = SECRET) -> str:
    """The legacy ``X-Axiom-Signature`` the request should carry (Standard Webhooks' is checked by the
    library, in tests/test_webhooks.py)."""
    timestamp = request["headers"]["X-Axiom-Timestamp"]
    message = f"{timestamp}.{request['body'].decode()}".encode()
    return "sha256=" + hmac.new(webhook_secret_key(secret), message, hashlib.sha256).hexdigest()


# --- Budget sweep ---------------------------------------------------------------------------------------


def test_budget_sweep_alerts_at_exactly_each_threshold_reached(reference_data):
    budget_agent("under", spent="49.99")
    budget_agent("half", spent="50.00")
    budget_agent("eighty", spent="80.00")
    budget_agent("ninety-nine", spent="99.99")
    budget_agent("over", spent="130.00")
    budget_agent("no-budget", budget=None, spent="1000.00")
    custom = budget_agent("custom", spent="30.00")
    AlertSettings.objects.create(agent=custom, budget_thresholds=[25, 75])

    assert budget_sweep(now=NOW) == 1 + 2 + 3 + 4 + 1

    assert budget_alerts() == {
        ("half", "2025-06", 50),
        ("eighty", "2025-06", 50),
        ("eighty", "2025-06", 80),
        ("ninety-nine", "2025-06", 50),
        ("ninety-nine", "2025-06", 80),
        ("ninety-nine", "2025-06", 90),
        ("over", "2025-06", 50),
        ("over", "2025-06", 80),
        ("over", "2025-06", 90),
        ("over", "2025-06", 100),
        ("custom", "2025-06", 25),
    }
    severities = dict(Alert.objects.filter(agent_id="over").values_list("data__threshold", "severity"))
    assert severities == {50: "info", 80: "warning", 90: "warning", 100: "critical"}
    budget = Budget.objects.get(agent_id="ninety-nine", managed=True)
    alert = Alert.objects.get(agent_id="ninety-nine", data__threshold=90)
    assert alert.dedup_key == f"budget:{budget.pk}:2025-06-01T00:00:00+00:00:90"
    assert alert.kind == "budget"
    assert alert.title == "Agent ninety-nine's monthly budget 90% reached"
    assert alert.data == {
        "budget_id": budget.pk,
        "scope": "agent",
        "scope_id": "ninety-nine",
        "window": "month",
        "window_start": "2025-06-01T00:00:00+00:00",
        "window_end": "2025-07-01T00:00:00+00:00",
        "mode": "hard",
        "limit_usd": "100.000000",
        "rollover_usd": "0.000000000000",
        "spent_usd": "99.990000000000",
        "reserved_usd": "0.000000000000",
        "threshold": 90,
        "percent": "99.99",
    }
    assert alert.message == (
        "Agent ninety-nine's monthly budget 90% reached: $99.99 of $100.00 spent (99.99%) in the window "
        "2025-06-01 00:00 to 2025-07-01 00:00 UTC."
    )


def test_budget_sweep_run_twice_creates_nothing_twice_and_alerts_again_next_period(reference_data):
    agent = budget_agent("twice", spent="85.00")
    assert budget_sweep(now=NOW) == 2
    assert budget_sweep(now=NOW + dt.timedelta(minutes=1)) == 0
    assert Alert.objects.count() == 2

    # More spend crosses the next threshold only.
    monthly_spend_set(agent, "91")
    assert budget_sweep(now=NOW + dt.timedelta(minutes=2)) == 1
    assert budget_alerts() == {("twice", "2025-06", t) for t in (50, 80, 90)}

    # A new month is a new window: the sweep rolls the budget, and its spend starts again.
    july = dt.datetime(2025, 7, 1, 0, 5, tzinfo=UTC)
    assert budget_sweep(now=july) == 0
    budget = Budget.objects.get(agent=agent, managed=True)
    assert (budget.window_start, budget.spent_usd) == (dt.datetime(2025, 7, 1, tzinfo=UTC), 0)
    Budget.objects.filter(pk=budget.pk).update(spent_usd=Decimal("50"))
    assert budget_sweep(now=july) == 1
    assert ("twice", "2025-07", 50) in budget_alerts()


def test_budget_sweep_ignores_invalid_threshold_settings_and_allows_opting_out(reference_data):
    quiet = budget_agent("quiet", spent="100")
    odd = budget_agent("odd", spent="100")
    AlertSettings.objects.create(agent=quiet, budget_thresholds=[])
    AlertSettings.objects.create(agent=odd, budget_thresholds=[0, "50", True, 60, 60, 2000])
    assert budget_sweep(now=NOW) == 1
    assert budget_alerts() == {("odd", "2025-06", 60)}


def test_budget_sweep_query_count_does_not_grow_with_agents(reference_data):
    WebhookEndpoint.objects.create(url="http://127.0.0.1:9/hook", secret=SECRET)  # a global webhook
    counts = []
    for count, prefix in ((10, "small"), (1000, "large")):
        Alert.objects.all().delete()
        Agent.objects.exclude(id__startswith=prefix).update(monthly_budget_usd=None)
        fleet_create(prefix, count, at=NOW, spent="95.00", budget="100.00")
        start, end = month_bounds(NOW)
        Budget.objects.filter(agent__id__startswith=prefix).update(
            window_start=start, window_end=end, spent_usd=Decimal("95.00")
        )
        with CaptureQueriesContext(connection) as ctx:
            assert budget_sweep(now=NOW) == 3 * count
        counts.append(len(ctx.captured_queries))
        # The sweep fans out one batch in its transaction; the periodic delivery task fans out the rest.
        assert AlertDelivery.objects.count() == min(3 * count, FAN_OUT_BATCH_SIZE)
        while alert_services.alerts_fan_out():
            pass
        assert AlertDelivery.objects.count() == 3 * count
    assert counts[0] == counts[1], counts


def test_budget_sweep_enqueues_delivery_after_commit_only_when_it_created_alerts(
    reference_data, django_capture_on_commit_callbacks, monkeypatch
):
    sent = []
    monkeypatch.setattr(alert_tasks.alerts_deliver_task, "delay", lambda: sent.append("deliver"))
    budget_agent("enqueued", spent="60")
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        assert budget_sweep(now=NOW) == 1
    assert len(callbacks) == 1
    assert sent == ["deliver"]
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        assert budget_sweep(now=NOW) == 0
    assert callbacks == []
    assert sent == ["deliver"]


def test_a_broker_that_is_down_loses_no_alert(
    reference_data, django_capture_on_commit_callbacks, monkeypatch
):
    def broker_down():
        raise ConnectionError("broker unreachable")

    monkeypatch.setattr(alert_tasks.alerts_deliver_task, "delay", broker_down)
    budget_agent("brokerless", spent="60")
    AlertSettings.objects.create(agent_id="brokerless", email="ops@example.com")
    with django_capture_on_commit_callbacks(execute=True):
        assert budget_sweep(now=NOW) == 1
    delivery = AlertDelivery.objects.get()
    assert delivery.status == "pending"
    assert alerts_deliver(now=NOW).delivered == 1  # the periodic task delivers it


# --- Cost spikes ----------------------------------------------------------------------------------------

SPIKE_NOW = dt.datetime(2025, 6, 15, 12, 55, tzinfo=UTC)


def _spend_history(agent_id: str, *, last_hour_requests: int) -> Agent:
    """$1 an hour for the 24 hours before the last hour, then ``last_hour_requests`` at $0.001 each."""
    agent = agent_create(agent_id=agent_id, tier_code="CUSTOM", custom_limits={"NETWORK_REQS": 10**9})
    for hour in range(24):
        allocation_create(
            agent=agent,
            resource_type_id="NETWORK_REQS",
            amount=1_000,
            now=SPIKE_NOW - dt.timedelta(hours=1, minutes=30) - dt.timedelta(hours=hour),
        )
    if last_hour_requests:
        allocation_create(
            agent=agent,
            resource_type_id="NETWORK_REQS",
            amount=last_hour_requests,
            now=SPIKE_NOW - dt.timedelta(minutes=20),
        )
    return agent


def test_cost_spike_alerts_at_three_times_the_baseline_once_per_hour(reference_data):
    _spend_history("spiking", last_hour_requests=3_000)  # $3.00 against $1.00 an hour
    _spend_history("busy", last_hour_requests=2_990)  # $2.99: 2.99x, below the threshold
    newcomer = agent_create(agent_id="newcomer", tier_code="PRO")
    allocation_create(agent=newcomer, resource_type_id="NETWORK_REQS", amount=5_000, now=SPIKE_NOW)

    assert cost_spike_sweep(now=SPIKE_NOW) == 1
    alert = Alert.objects.get()
    assert (alert.agent_id, alert.kind, alert.severity) == ("spiking", "cost_spike", "warning")
    assert alert.dedup_key == "cost_spike:spiking:2025-06-15T12"
    assert alert.data == {
        "ratio": "3.00",
        "ratio_threshold": "3",
        "last_hour_usd": "3.000000000000",
        "baseline_hourly_usd": "1.000000000000",
        "hour": "2025-06-15T12:00:00+00:00",
    }
    assert alert.message == (
        "Agent spiking spent $3.00 in the last hour, 3.00 times its average of $1.0000 an hour "
        "over the 24 hours before."
    )

    # The same hour again: nothing new. The next clock hour, with the spike still in the window: again.
    assert cost_spike_sweep(now=SPIKE_NOW + dt.timedelta(minutes=4)) == 0
    assert cost_spike_sweep(now=SPIKE_NOW + dt.timedelta(minutes=10)) == 1
    assert alert_keys() == {"cost_spike:spiking:2025-06-15T12", "cost_spike:spiking:2025-06-15T13"}
    # A lower threshold catches the busy agent too.
    assert cost_spike_sweep(now=SPIKE_NOW, ratio_threshold=Decimal("2.5")) == 1
    assert "cost_spike:busy:2025-06-15T12" in alert_keys()


def test_cost_spike_sweep_in_chunks_of_one_agent_alerts_as_in_one_chunk(reference_data):
    for agent_id in ("spike-a", "spike-b", "spike-c"):
        _spend_history(agent_id, last_hour_requests=3_000)
    _spend_history("calm", last_hour_requests=1_000)
    assert cost_spike_sweep(now=SPIKE_NOW, chunk_size=1) == 3
    assert alert_keys() == {f"cost_spike:spike-{x}:2025-06-15T12" for x in "abc"}
    assert cost_spike_sweep(now=SPIKE_NOW, chunk_size=2) == 0


# --- Delivery -------------------------------------------------------------------------------------------


def _alert_with_webhook(url: str, *, agent_id: str = "hooked") -> Alert:
    agent = budget_agent(agent_id, spent="50")
    WebhookEndpoint.objects.create(agent=agent, url=url, secret=SECRET)
    assert budget_sweep(now=NOW) == 1
    return Alert.objects.get(agent=agent)


def test_webhook_is_signed_retried_with_backoff_and_delivered_once(reference_data, receiver):
    receiver.statuses = [500]  # the first request fails, the second is accepted
    alert = _alert_with_webhook(receiver.url)
    delivery = AlertDelivery.objects.get()
    assert (delivery.channel, delivery.target, delivery.status) == ("webhook", receiver.url, "pending")

    assert alerts_deliver(now=NOW).delivered == 0
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts, delivery.last_status_code) == ("pending", 1, 500)
    assert delivery.last_error == "HTTP 500 Internal Server Error"
    assert delivery.next_attempt_at == NOW + dt.timedelta(seconds=30)

    assert alerts_deliver(now=NOW + dt.timedelta(seconds=29)).delivered == 0  # not due yet: nothing is sent
    assert len(receiver.requests) == 1

    assert alerts_deliver(now=NOW + dt.timedelta(seconds=30)).delivered == 1
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts, delivery.last_status_code) == ("delivered", 2, 200)
    assert delivery.delivered_at == NOW + dt.timedelta(seconds=30)
    assert delivery.next_attempt_at is None
    assert delivery.last_error == ""

    assert alerts_deliver(now=NOW + dt.timedelta(hours=2)).delivered == 0  # delivered once, never again
    assert len(receiver.requests) == 2
    for request in receiver.requests:
        assert request["path"] == "/hooks/axiom"
        assert request["headers"]["Content-Type"] == "application/json"
        assert request["headers"]["X-Axiom-Signature"] == signature_of(request)
        assert request["headers"]["X-Axiom-Signature"] != signature_of(request, secret="another-secret")
        assert abs(int(request["headers"]["X-Axiom-Timestamp"]) - timezone.now().timestamp()) < 60
    body = json.loads(receiver.requests[1]["body"])
    assert body == {
        "id": alert.pk,
        "agent_id": "hooked",
        "scope": "agent",
        "scope_id": "hooked",
        "kind": "budget",
        "severity": "info",
        "title": "Agent hooked's monthly budget 50% reached",
        "message": alert.message,
        "data": alert.data,
        "created_at": alert.created_at.isoformat(),
    }


def test_a_receiver_that_always_fails_ends_failed_after_the_maximum_attempts(reference_data):
    with WebhookReceiver(statuses=[503] * 20) as failing:
        _alert_with_webhook(failing.url)
        at = NOW
        waits = []
        for attempt in range(1, MAX_ATTEMPTS + 1):
            assert alerts_deliver(now=at).delivered == 0
            delivery = AlertDelivery.objects.get()
            assert delivery.attempts == attempt
            if attempt < MAX_ATTEMPTS:
                waits.append(delivery.next_attempt_at - at)
                at = delivery.next_attempt_at
        assert waits == [dt.timedelta(seconds=s) for s in (30, 60, 120, 240, 480)]
        assert (delivery.status, delivery.last_status_code, delivery.next_attempt_at) == ("failed", 503, None)
        assert alerts_deliver(now=at + dt.timedelta(days=1)).delivered == 0
        assert len(failing.requests) == MAX_ATTEMPTS


def test_backoff_doubles_from_thirty_seconds_and_is_capped_at_an_hour():
    assert [delivery_backoff(n).total_seconds() for n in range(1, 10)] == [
        30,
        60,
        120,
        240,
        480,
        960,
        1920,
        3600,
        3600,
    ]


def test_an_unreachable_receiver_records_the_error_without_a_status_code(reference_data):
    with WebhookReceiver() as closed:
        url = closed.url
    _alert_with_webhook(url)  # the server is shut down: connection refused
    assert alerts_deliver(now=NOW).delivered == 0
    delivery = AlertDelivery.objects.get()
    assert (delivery.attempts, delivery.last_status_code, delivery.status) == (1, None, "pending")
    assert "refused" in delivery.last_error.lower() or "error" in delivery.last_error.lower()


def test_a_stale_copy_of_a_delivery_cannot_send_the_same_attempt(reference_data, receiver):
    _alert_with_webhook(receiver.url)
    first = AlertDelivery.objects.select_related("alert", "webhook").get()
    second = AlertDelivery.objects.select_related("alert", "webhook").get()  # another worker's read
    assert alert_delivery._delivery_attempt(first, now=NOW) == "delivered"
    assert alert_delivery._delivery_attempt(second, now=NOW) is None
    assert len(receiver.requests) == 1
    assert AlertDelivery.objects.get().attempts == 1


def test_alerts_fan_out_to_agent_and_global_webhooks_and_emails(reference_data, settings, receiver):
    settings.ALERT_EMAILS = ["oncall@example.com"]
    agent = budget_agent("fanned", spent="50")
    other = budget_agent("other", spent="0")
    AlertSettings.objects.create(agent=agent, email="owner@example.com")
    WebhookEndpoint.objects.create(agent=agent, url=receiver.url, secret=SECRET)
    WebhookEndpoint.objects.create(agent=None, url=receiver.url + "/global", secret="global-secret-123")
    WebhookEndpoint.objects.create(agent=agent, url=receiver.url + "/off", secret=SECRET, enabled=False)
    WebhookEndpoint.objects.create(agent=other, url=receiver.url + "/other", secret=SECRET)

    assert budget_sweep(now=NOW) == 1
    assert set(AlertDelivery.objects.values_list("channel", "target")) == {
        ("webhook", receiver.url),
        ("webhook", receiver.url + "/global"),
        ("email", "owner@example.com"),
        ("email", "oncall@example.com"),
    }
    assert alerts_deliver(now=NOW).delivered == 4
    assert set(AlertDelivery.objects.values_list("status", flat=True)) == {"delivered"}
    assert sorted(message.to[0] for message in mail.outbox) == ["oncall@example.com", "owner@example.com"]
    assert mail.outbox[0].subject == "[Axiom info] fanned: Agent fanned's monthly budget 50% reached"
    assert "$50.00 of $100.00 spent (50.00%)" in mail.outbox[0].body
    by_path = {request["path"]: request for request in receiver.requests}
    assert set(by_path) == {"/hooks/axiom", "/hooks/axiom/global"}
    assert by_path["/hooks/axiom/global"]["headers"]["X-Axiom-Signature"] == signature_of(
        by_path["/hooks/axiom/global"], secret="global-secret-123"
    )


def test_alerts_created_elsewhere_are_fanned_out_by_the_periodic_delivery(reference_data):
    agent = budget_agent("scaled")
    AlertSettings.objects.create(agent=agent, email="owner@example.com")
    Alert.objects.create(
        agent=agent, kind="scaling", severity="info", title="Scaled up", message="1 -> 2", dedup_key="s:1"
    )
    assert alerts_deliver(now=NOW).delivered == 1
    assert [message.to for message in mail.outbox] == [["owner@example.com"]]
    assert Alert.objects.get().delivery_queued_at == NOW


def test_email_that_fails_is_retried(reference_data, settings):
    settings.EMAIL_BACKEND = "tests.test_alerts.FailingEmailBackend"
    agent = budget_agent("mailer", spent="50")
    AlertSettings.objects.create(agent=agent, email="owner@example.com")
    budget_sweep(now=NOW)
    assert alerts_deliver(now=NOW).delivered == 0
    delivery = AlertDelivery.objects.get()
    assert (delivery.status, delivery.attempts) == ("pending", 1)
    assert delivery.last_error == "OSError: SMTP server unreachable"
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    assert alerts_deliver(now=delivery.next_attempt_at).delivered == 1
    assert len(mail.outbox) == 1


class FailingEmailBackend:
    def __init__(self, *args, **kwargs):
        pass

    def send_messages(self, messages):
        raise OSError("SMTP server unreachable")


# --- Periodic tasks -------------------------------------------------------------------------------------


def test_every_periodic_alert_task_run_twice_creates_nothing_twice(reference_data, receiver):
    now = timezone.now()
    agent = budget_agent("periodic", spent="95", at=now)
    WebhookEndpoint.objects.create(agent=agent, url=receiver.url, secret=SECRET)
    AlertSettings.objects.create(agent=agent, email="owner@example.com")
    # Spend the last hour at ten times the baseline, so that the cost spike sweep has work too.
    custom = agent_create(agent_id="spiky", tier_code="CUSTOM", custom_limits={"NETWORK_REQS": 10**9})
    allocation_create(
        agent=custom, resource_type_id="NETWORK_REQS", amount=240, now=now - dt.timedelta(hours=3)
    )
    allocation_create(
        agent=custom, resource_type_id="NETWORK_REQS", amount=100, now=now - dt.timedelta(minutes=1)
    )

    assert alert_tasks.budget_sweep_task() == 3
    assert alert_tasks.budget_sweep_task() == 0
    assert alert_tasks.cost_spike_sweep_task() == 1
    assert alert_tasks.cost_spike_sweep_task() == 0
    first = alert_tasks.rules_evaluate_task()
    second = alert_tasks.rules_evaluate_task()
    assert first["alerts"] == second["alerts"] == 0  # the seed rules' durations have not passed
    assert alert_tasks.alerts_deliver_task() == 3 * 2  # a webhook and an email for each budget alert
    assert alert_tasks.alerts_deliver_task() == 0
    assert Alert.objects.count() == 4
    assert len(receiver.requests) == 3
    assert len(mail.outbox) == 3
    delivery = AlertDelivery.objects.filter(channel="email").first()
    assert alert_tasks.alert_delivery_task(delivery.pk) is None  # already delivered: nothing to do


def test_alert_tasks_have_the_scheduled_names():
    from optimization.schedules import SCHEDULES

    scheduled = {task for _, task, _, _ in SCHEDULES}
    names = {getattr(alert_tasks, name).name for name in alert_tasks.__all__}
    assert {
        "optimization.budget_sweep",
        "optimization.rules_evaluate",
        "optimization.cost_spike_sweep",
        "optimization.alerts_deliver",
    } <= scheduled & names
    assert "optimization.alert_delivery" in names
    assert alert_tasks.budget_sweep_task.acks_late is True


# --- API ------------------------------------------------------------------------------------------------


def _alerts_for(agent: Agent, count: int) -> list[Alert]:
    return [
        Alert.objects.create(
            agent=agent,
            kind="budget",
            severity="info",
            title=f"alert {i}",
            message="m",
            dedup_key=f"{agent}:{i}",
        )
        for i in range(count)
    ]


def test_api_lists_open_alerts_newest_first_and_filters_by_status(agent_a):
    alerts = _alerts_for(agent_a.agent, 3)
    alert_acknowledge(alert=alerts[0], actor="someone")
    url = reverse("optimization:alerts", args=[agent_a.id])

    response = agent_a.client.get(url)
    assert response.status_code == 200
    assert [row["id"] for row in response.json()["results"]] == [alerts[2].pk, alerts[1].pk]
    assert response.json()["results"][0]["status"] == "open"

    acknowledged = agent_a.client.get(url, {"status": "acknowledged"}).json()["results"]
    assert [(row["id"], row["acknowledged_by"]) for row in acknowledged] == [(alerts[0].pk, "someone")]
    everything = agent_a.client.get(url, {"status": "all", "page_size": 2}).json()
    assert [row["id"] for row in everything["results"]] == [alerts[2].pk, alerts[1].pk]
    assert everything["next"]
    assert [row["id"] for row in agent_a.client.get(everything["next"]).json()["results"]] == [alerts[0].pk]

    assert_error(agent_a.client.get(url, {"status": "closed"}), 400, "validation_error")


def test_api_acknowledge_is_idempotent_and_keeps_the_first_acknowledgement(agent_a, operator_client):
    (alert,) = _alerts_for(agent_a.agent, 1)
    url = reverse("optimization:alert-acknowledge", args=[agent_a.id, alert.pk])

    first = agent_a.client.post(url, {}, format="json")
    assert first.status_code == 200
    assert first.json()["status"] == "acknowledged"
    assert first.json()["acknowledged_by"] == f"agent:{agent_a.id}"
    again = operator_client.post(url, {}, format="json")
    assert again.status_code == 200
    assert again.json()["acknowledged_at"] == first.json()["acknowledged_at"]
    assert again.json()["acknowledged_by"] == f"agent:{agent_a.id}"
    assert agent_a.client.get(reverse("optimization:alerts", args=[agent_a.id])).json()["results"] == []
    assert_error(agent_a.client.post(url, {"note": "x"}, format="json"), 400, "validation_error")


def test_api_hides_another_agents_alerts(agent_a, agent_b):
    (alert,) = _alerts_for(agent_a.agent, 1)
    assert_error(agent_b.client.get(reverse("optimization:alerts", args=[agent_a.id])), 404, "not_found")
    steal = reverse("optimization:alert-acknowledge", args=[agent_a.id, alert.pk])
    assert_error(agent_b.client.post(steal, {}, format="json"), 404, "not_found")
    # Its own URL with the other agent's alert id: not found either.
    own = reverse("optimization:alert-acknowledge", args=[agent_b.id, alert.pk])
    assert_error(agent_b.client.post(own, {}, format="json"), 404, "not_found")
    alert.refresh_from_db()
    assert alert.acknowledged_at is None
    assert_error(
        agent_b.client.get(reverse("optimization:alert-settings", args=[agent_a.id])), 404, "not_found"
    )


def test_api_reads_and_changes_alert_settings(agent_a):
    url = reverse("optimization:alert-settings", args=[agent_a.id])
    assert agent_a.client.get(url).json() == {
        "agent_id": agent_a.id,
        "budget_thresholds": [50, 80, 90, 100],
        "email": "",
    }
    response = agent_a.client.put(
        url, {"budget_thresholds": [95, 25, 25], "email": "me@example.com"}, format="json"
    )
    assert response.status_code == 200
    assert response.json() == {
        "agent_id": agent_a.id,
        "budget_thresholds": [25, 95],
        "email": "me@example.com",
    }
    assert AlertSettings.objects.get(agent=agent_a.agent).budget_thresholds == [25, 95]

    for bad in (
        {"budget_thresholds": []},
        {"budget_thresholds": [0]},
        {"budget_thresholds": [1001]},
        {"budget_thresholds": ["50"]},
        {"email": "not-an-email"},
        {"colour": "red"},
    ):
        assert_error(agent_a.client.put(url, bad, format="json"), 400, "validation_error")
    assert AlertSettings.objects.get(agent=agent_a.agent).budget_thresholds == [25, 95]


# --- Admin ----------------------------------------------------------------------------------------------


def test_admin_pages_render_and_mask_webhook_secrets(reference_data, admin_client_logged_in):
    agent = budget_agent("admin-agent", spent="95")
    AlertSettings.objects.create(agent=agent, email="owner@example.com")
    WebhookEndpoint.objects.create(agent=agent, url="http://127.0.0.1:9/hook", secret="topsecret-value-42")
    budget_sweep(now=NOW)
    Quota.objects.filter(agent=agent, resource_type_id="AI_TOKENS").update(used=900_000)
    assert rules_evaluate(now=NOW)["conditions_true"] == 2  # two rule states to show
    for model in ("alert", "alertdelivery", "alertsettings", "webhookendpoint", "rulestate"):
        changelist = admin_client_logged_in.get(reverse(f"admin:optimization_{model}_changelist"))
        assert changelist.status_code == 200, model
        assert b"topsecret-value-42" not in changelist.content
    assert (
        b"to\xe2\x80\xa2"
        in admin_client_logged_in.get(reverse("admin:optimization_webhookendpoint_changelist")).content
    )
    alert = Alert.objects.first()
    assert (
        admin_client_logged_in.get(reverse("admin:optimization_alert_change", args=[alert.pk])).status_code
        == 200
    )
    assert admin_client_logged_in.get(reverse("admin:optimization_alert_add")).status_code == 403
    delivery = AlertDelivery.objects.first()
    page = admin_client_logged_in.get(reverse("admin:optimization_alertdelivery_change", args=[delivery.pk]))
    assert page.status_code == 200
    assert b'name="status"' not in page.content  # read-only


def test_admin_acknowledge_action_and_open_filter(reference_data, admin_client_logged_in, staff_user):
    agent = budget_agent("acked", spent="95")
    budget_sweep(now=NOW)
    alerts = list(Alert.objects.filter(agent=agent).order_by("pk"))
    alert_acknowledge(alert=alerts[0], actor="earlier")
    url = reverse("admin:optimization_alert_changelist")
    response = admin_client_logged_in.post(
        url, {"action": "acknowledge", "_selected_action": [a.pk for a in alerts]}, follow=True
    )
    assert response.status_code == 200
    assert "Acknowledged 2 alert(s)." in response.content.decode()
    assert dict(Alert.objects.values_list("pk", "acknowledged_by")) == {
        alerts[0].pk: "earlier",
        alerts[1].pk: staff_user.username,
        alerts[2].pk: staff_user.username,
    }
    assert admin_client_logged_in.get(url, {"open": "yes"}).context["cl"].result_count == 0
    assert admin_client_logged_in.get(url, {"open": "no"}).context["cl"].result_count == 3


def test_alert_changelist_makes_no_query_per_row(reference_data, admin_client_logged_in):
    url = reverse("admin:optimization_alert_changelist")
    agent = budget_agent("rows")
    _alerts_for(agent, 1)
    with CaptureQueriesContext(connection) as one_row:
        assert admin_client_logged_in.get(url).status_code == 200
    _alerts_for(budget_agent("more-rows"), 5)
    with CaptureQueriesContext(connection) as six_rows:
        assert admin_client_logged_in.get(url).status_code == 200
    assert len(six_rows) == len(one_row)


def test_admin_adds_a_webhook_endpoint_with_a_generated_secret_and_refuses_a_weak_one(
    reference_data, admin_client_logged_in
):
    agent = budget_agent("hooked-in-admin")
    url = reverse("admin:optimization_webhookendpoint_add")
    page = admin_client_logged_in.get(url).content.decode()
    generated = re.search(r'name="secret" value="(whsec_[^"]+)"', page).group(1)
    assert generated.startswith("whsec_") and len(webhook_secret_key(generated)) == 32
    form = {
        "agent": agent.pk,
        "url": "https://hooks.example.com/axiom",
        "secret": "s3cret-s3cret",
        "enabled": "on",
        "max_concurrent_requests": "4",
        "batch_size": "1",
    }
    refused = admin_client_logged_in.post(url, form)
    assert refused.status_code == 200
    assert "A secret starts with whsec_" in refused.content.decode()
    for bad, message in (("whsec_not base64!", "is base64"), ("whsec_c2hvcnQ=", "24 to 64 bytes")):
        assert message in admin_client_logged_in.post(url, {**form, "secret": bad}).content.decode()
    form["secret"] = generated
    too_many = admin_client_logged_in.post(url, {**form, "max_concurrent_requests": "33"})
    assert too_many.status_code == 200
    assert not WebhookEndpoint.objects.exists()

    response = admin_client_logged_in.post(url, {**form, "batch_size": "100"})
    assert response.status_code == 302, response.content[:2000]
    endpoint = WebhookEndpoint.objects.get()
    assert (endpoint.url, endpoint.secret, endpoint.max_concurrent_requests, endpoint.batch_size) == (
        "https://hooks.example.com/axiom",
        generated,
        4,
        100,
    )
    # The change page shows the secret, for the operator to give the receiver; the list only masks it.
    change = admin_client_logged_in.get(
        reverse("admin:optimization_webhookendpoint_change", args=[endpoint.pk])
    )
    assert generated in change.content.decode()
    listing = admin_client_logged_in.get(reverse("admin:optimization_webhookendpoint_changelist"))
    assert generated not in listing.content.decode()


def test_openapi_schema_describes_the_alert_paths(client):
    schema = client.get(reverse("schema"), {"format": "json"}).json()
    for path in (
        "/api/v1/agents/{agent_id}/alerts",
        "/api/v1/agents/{agent_id}/alerts/{alert_id}/acknowledge",
        "/api/v1/agents/{agent_id}/alert-settings",
    ):
        assert path in schema["paths"], path

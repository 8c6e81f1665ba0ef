"""Webhook delivery as a receiver sees it: Standard Webhooks headers that verify with the specification's
library, the same ``webhook-id`` on every attempt of a message (also after a worker is killed mid-send),
batches for endpoints that accept arrays, each endpoint's concurrency bound, and the rate of a large backlog.

The receivers are local HTTP servers started by each test.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import import_module
from pathlib import Path

import psycopg
import pytest
from django.apps import apps as django_apps
from django.db import connection
from django.utils import timezone
from standardwebhooks import Webhook, WebhookVerificationError

from ledger.models import Agent
from ledger.services import agent_create
from optimization.models import Alert, AlertDelivery, WebhookEndpoint
from optimization.services import alert_delivery
from optimization.services.alert_delivery import (
    DELIVERY_LOCK_KEY,
    FAILURES_BEFORE_PAUSE,
    DeliveryRun,
    alerts_deliver,
    batch_message_id,
    delivery_backoff,
    delivery_message_id,
)
from optimization.services.alerts import alerts_fan_out
from optimization.tasks import alerts as alert_tasks
from optimization.webhooks import (
    webhook_headers,
    webhook_secret_generate,
    webhook_secret_key,
    webhook_secret_validate,
)

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parent.parent
NOW = dt.datetime(2025, 6, 15, 12, 0, tzinfo=dt.UTC)
SECRET = "whsec_dGVzdC1zZWNyZXQtb2YtdGhpcnR5LXR3by1ieXRlcyE="


class Receiver:
    """A local HTTP/1.1 server (keep-alive, as real receivers are) that records every POST, answers with the
    planned statuses (then 200) after ``delay`` seconds, and counts the requests in flight per path. With
    ``hold`` set, the first request waits (at most 30 s) for ``release`` before answering."""

    def __init__(self, *, statuses: list[int] | None = None, delay: float = 0.0, hold: bool = False):
        self.statuses = list(statuses or [])
        self.delay = delay
        self.requests: list[dict] = []
        self.in_flight: Counter[str] = Counter()
        self.max_in_flight: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.held = threading.Event() if hold else None
        self.release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # The status line and the body are two writes: without this, Nagle's algorithm holds the second
            # until the client's delayed ACK (40 ms), a wait no real server makes.
            disable_nagle_algorithm = True

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    receiver.in_flight[self.path] += 1
                    receiver.max_in_flight[self.path] = max(
                        receiver.max_in_flight[self.path], receiver.in_flight[self.path]
                    )
                    receiver.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    first = len(receiver.requests) == 1
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                if receiver.held is not None and first:
                    receiver.held.set()
                    receiver.release.wait(timeout=30)
                elif receiver.delay:
                    time.sleep(receiver.delay)
                with receiver.lock:
                    receiver.in_flight[self.path] -= 1
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                except OSError:
                    pass  # the sender is gone (the killed worker)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05})
        self.thread.daemon = True

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def url(self, path: str = "/hooks") -> str:
        return self.base + path


class Deduplicating:
    """What a receiver does with at-least-once delivery: verify, then process each webhook-id once (each
    item's ``webhook_id`` for a batch)."""

    def __init__(self, secret: str):
        self.webhook = Webhook(secret)
        self.processed: list[int] = []
        self.seen: set[str] = set()

    def receive(self, request: dict) -> None:
        payload = self.webhook.verify(request["body"], request["headers"])
        items = payload if isinstance(payload, list) else [{**payload, "webhook_id": None}]
        for item in items:
            message_id = item["webhook_id"] or request["headers"]["webhook-id"]
            if message_id not in self.seen:
                self.seen.add(message_id)
                self.processed.append(item["id"])


@pytest.fixture
def agent(reference_data) -> Agent:
    return agent_create(agent_id="hooked", tier_code="PRO")


def _alerts(agent: Agent, count: int, *, prefix: str = "a") -> None:
    Alert.objects.bulk_create(
        Alert(
            agent=agent,
            kind=Alert.Kind.BUDGET,
            severity="info",
            title=f"Budget alert {i}",
            message=f"alert number {i}",
            data={"n": i},
            dedup_key=f"{prefix}:{agent.pk}:{i}",
        )
        for i in range(count)
    )


def _endpoint(url: str, **fields) -> WebhookEndpoint:
    return WebhookEndpoint.objects.create(url=url, secret=fields.pop("secret", SECRET), **fields)


# --- Signatures -----------------------------------------------------------------------------------------


def test_signature_matches_the_specifications_example():
    """The example of the specification's libraries: key, id, timestamp and body give this signature."""
    key = webhook_secret_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    headers = webhook_headers(
        key=key, message_id="msg_p5jXN8AQM9LWM0D4loKWxJek", body=b'{"test": 2432232314}', timestamp=1614265330
    )
    assert headers["webhook-id"] == "msg_p5jXN8AQM9LWM0D4loKWxJek"
    assert headers["webhook-timestamp"] == "1614265330"
    assert headers["webhook-signature"] == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    # The same by hand, as the specification states it.
    signed = b'msg_p5jXN8AQM9LWM0D4loKWxJek.1614265330.{"test": 2432232314}'
    assert (
        headers["webhook-signature"]
        == "v1,"
        + base64.b64encode(
            hmac.new(base64.b64decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"), signed, hashlib.sha256).digest()
        ).decode()
    )
    # The legacy pair, with the same key.
    assert headers["X-Axiom-Timestamp"] == "1614265330"
    assert headers["X-Axiom-Signature"] == (
        "sha256=" + hmac.new(key, b'1614265330.{"test": 2432232314}', hashlib.sha256).hexdigest()
    )


def test_secrets_are_generated_in_the_specifications_form_and_legacy_ones_keep_their_key():
    generated = webhook_secret_generate()
    webhook_secret_validate(generated)
    assert generated.startswith("whsec_") and len(webhook_secret_key(generated)) == 32
    assert generated != webhook_secret_generate()
    # A secret from before the prefix (or not base64 after it) is its own key.
    assert webhook_secret_key("global-secret-123") == b"global-secret-123"
    assert webhook_secret_key("whsec_not base64!") == b"whsec_not base64!"


def test_migration_re_encodes_stored_secrets_with_the_same_key():
    migration = import_module("optimization.migrations.0007_webhook_standard_signing_and_limits")
    legacy = _endpoint("http://127.0.0.1:9/a", secret="topsecret-value-42")
    prefixed = _endpoint("http://127.0.0.1:9/b", secret="whsec_looks-standard")
    migration.secrets_encode(django_apps, None)
    legacy.refresh_from_db()
    prefixed.refresh_from_db()
    # Every stored secret: even one that already looked like whsec_, whose key was its own text.
    assert webhook_secret_key(legacy.secret) == b"topsecret-value-42"
    assert webhook_secret_key(prefixed.secret) == b"whsec_looks-standard"
    migration.secrets_decode(django_apps, None)
    assert set(WebhookEndpoint.objects.values_list("secret", flat=True)) == {
        "topsecret-value-42",
        "whsec_looks-standard",
    }


# --- At least once, with a stable webhook-id ------------------------------------------------------------


def test_every_attempt_verifies_with_the_library_and_keeps_its_webhook_id(agent):
    _alerts(agent, 1)
    with Receiver(statuses=[500]) as receiver:
        _endpoint(receiver.url(), agent=agent)
        assert alerts_deliver(now=NOW).delivered == 0
        delivery = AlertDelivery.objects.get()
        assert (delivery.status, delivery.attempts, delivery.last_status_code) == ("pending", 1, 500)
        assert alerts_deliver(now=NOW + delivery_backoff(1)).delivered == 1

    first, second = receiver.requests
    assert (
        first["headers"]["webhook-id"] == second["headers"]["webhook-id"] == delivery_message_id(delivery.pk)
    )
    dedup = Deduplicating(SECRET)
    for request in receiver.requests:
        assert abs(int(request["headers"]["webhook-timestamp"]) - time.time()) < 60
        assert request["headers"]["webhook-signature"].startswith("v1,")
        dedup.receive(request)  # raises unless the signature verifies
        with pytest.raises(WebhookVerificationError):
            Webhook(webhook_secret_generate()).verify(request["body"], request["headers"])
        tampered = {**request["headers"], "webhook-id": "alert-delivery-0"}
        with pytest.raises(WebhookVerificationError):
            Webhook(SECRET).verify(request["body"], tampered)
    assert dedup.processed == [delivery.alert_id]  # the repeat is dropped by its webhook-id
    assert json.loads(second["body"])["id"] == delivery.alert_id


def test_a_legacy_secret_signs_with_its_own_bytes_in_both_schemes(agent):
    _alerts(agent, 1)
    with Receiver() as receiver:
        _endpoint(receiver.url(), agent=agent, secret="global-secret-123")
        assert alerts_deliver(now=NOW).delivered == 1
    (request,) = receiver.requests
    Webhook("whsec_" + base64.b64encode(b"global-secret-123").decode()).verify(
        request["body"], request["headers"]
    )
    timestamp = request["headers"]["X-Axiom-Timestamp"]
    expected = hmac.new(b"global-secret-123", timestamp.encode() + b"." + request["body"], hashlib.sha256)
    assert request["headers"]["X-Axiom-Signature"] == "sha256=" + expected.hexdigest()


WORKER = """
import django
django.setup()
from optimization.services.alert_delivery import alerts_deliver
alerts_deliver()
print("the run ended", flush=True)
"""


def _database_url() -> str:
    db = connection.settings_dict
    password = f":{db['PASSWORD']}" if db.get("PASSWORD") else ""
    return f"postgres://{db['USER']}{password}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


@pytest.mark.django_db(transaction=True)
def test_a_worker_killed_mid_send_is_redelivered_with_the_same_webhook_id(agent):
    """The issue's duplicate: a worker sends, is killed before it records the answer, and the claim's lease
    runs out. The alert goes out again, with the same webhook-id, so the receiver drops the repeat."""
    _alerts(agent, 1)
    with Receiver(hold=True) as receiver:
        _endpoint(receiver.url(), agent=agent)
        alerts_fan_out()
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "axiom_grid.settings",
            "DATABASE_URL": _database_url(),
            "PYTHONPATH": str(ROOT),
        }
        worker = subprocess.Popen([sys.executable, "-c", WORKER], cwd=ROOT, env=env, stdout=subprocess.PIPE)
        try:
            assert receiver.held.wait(timeout=60), "the worker never sent"
            worker.kill()  # mid-send: the request is in the receiver's hands, no answer recorded
            worker.wait(timeout=10)
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
        receiver.release.set()
        assert b"the run ended" not in worker.stdout.read()

        delivery = AlertDelivery.objects.get()
        assert (delivery.status, delivery.attempts, delivery.delivered_at) == ("pending", 1, None)
        lease_end = delivery.next_attempt_at
        assert alerts_deliver(now=lease_end - dt.timedelta(seconds=1)).requests == 0  # still leased
        # The killed worker's session (and its advisory lock) ends when PostgreSQL notices: a bounded wait.
        for _ in range(100):
            run = alerts_deliver(now=lease_end)
            if not run.busy:
                break
            time.sleep(0.1)
        assert run.delivered == 1

    first, second = receiver.requests
    assert (
        first["headers"]["webhook-id"] == second["headers"]["webhook-id"] == delivery_message_id(delivery.pk)
    )
    dedup = Deduplicating(SECRET)
    dedup.receive(first)
    dedup.receive(second)
    assert dedup.processed == [delivery.alert_id]
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts) == ("delivered", 2)


# --- Batches --------------------------------------------------------------------------------------------


def test_a_batch_endpoint_receives_arrays_signed_once_and_a_retried_batch_keeps_its_id(agent):
    _alerts(agent, 120)
    with Receiver(statuses=[503]) as receiver:
        _endpoint(receiver.url(), agent=agent, batch_size=50, max_concurrent_requests=1)  # in order
        run = alerts_deliver(now=NOW)
        assert (run.requests, run.delivered, run.failed_attempts) == (3, 70, 50)
        retry_at = NOW + delivery_backoff(1)
        assert alerts_deliver(now=retry_at).delivered == 50
        assert alerts_deliver(now=retry_at + dt.timedelta(hours=1)).requests == 0

    assert AlertDelivery.objects.filter(status="delivered").count() == 120
    sizes = sorted(len(json.loads(request["body"])) for request in receiver.requests)
    assert sizes == [20, 50, 50, 50]
    failed, retried = receiver.requests[0], receiver.requests[-1]
    # The first request got the 503; its 50 alerts went again together, under the same id.
    assert failed["headers"]["webhook-id"] == retried["headers"]["webhook-id"]
    assert failed["body"] == retried["body"]
    ids = {request["headers"]["webhook-id"] for request in receiver.requests}
    assert len(ids) == 3
    dedup = Deduplicating(SECRET)
    for request in receiver.requests:
        items = json.loads(request["body"])
        assert request["headers"]["webhook-id"] == batch_message_id(
            int(item["webhook_id"].removeprefix("alert-delivery-")) for item in items
        )
        dedup.receive(request)
    assert sorted(dedup.processed) == sorted(Alert.objects.values_list("pk", flat=True))


# --- Throughput and limits ------------------------------------------------------------------------------


def test_a_large_backlog_drains_within_each_endpoints_concurrency_bound(agent):
    """5,000 deliveries (2,500 alerts, two global endpoints of 4 concurrent requests each, receivers that
    take 5 ms an answer): every one delivered once, at most 4 requests in flight per endpoint. The rate is
    printed (``-s``), not asserted: it depends on the machine."""
    _alerts(agent, 2500)
    with Receiver(delay=0.005) as receiver:
        _endpoint(receiver.url("/one"), max_concurrent_requests=4)
        _endpoint(receiver.url("/two"), max_concurrent_requests=4)
        started = time.monotonic()
        runs = [alerts_deliver()]
        while runs[-1].more and len(runs) < 10:
            runs.append(alerts_deliver())
        elapsed = time.monotonic() - started

    delivered = sum(run.delivered for run in runs)
    assert delivered == 5000
    assert AlertDelivery.objects.filter(status="delivered", attempts=1).count() == 5000
    paths = Counter(request["path"] for request in receiver.requests)
    assert paths == {"/one": 2500, "/two": 2500}
    assert len({request["headers"]["webhook-id"] for request in receiver.requests}) == 5000
    assert 1 <= receiver.max_in_flight["/one"] <= 4
    assert 1 <= receiver.max_in_flight["/two"] <= 4
    print(
        f"\n5,000 deliveries in {elapsed:.1f} s over {len(runs)} run(s): "
        f"{delivered / elapsed * 60:,.0f} deliveries/minute; "
        f"most in flight per endpoint: {dict(receiver.max_in_flight)}"
    )


def test_an_endpoint_that_keeps_failing_is_left_for_the_next_run_without_spending_attempts(agent):
    _alerts(agent, 100)
    with Receiver(statuses=[503] * 1000) as failing, Receiver() as working:
        _endpoint(failing.url(), max_concurrent_requests=1)
        _endpoint(working.url())
        run = alerts_deliver(now=NOW)
    assert run.delivered == 100
    assert len(working.requests) == 100
    assert len(failing.requests) == FAILURES_BEFORE_PAUSE
    to_failing = AlertDelivery.objects.filter(target=failing.url())
    assert to_failing.filter(attempts=1).count() == FAILURES_BEFORE_PAUSE
    assert to_failing.filter(attempts=0, status="pending").count() == 100 - FAILURES_BEFORE_PAUSE
    assert run.more is False  # what is left is the paused endpoint's: the schedule retries it


def test_a_run_stops_at_its_limit_and_says_more_is_due(agent):
    _alerts(agent, 30)
    with Receiver() as receiver:
        _endpoint(receiver.url(), agent=agent)
        first = alerts_deliver(now=NOW, limit=10)
        assert (first.delivered, first.more) == (10, True)
        rest = alerts_deliver(now=NOW)
        assert (rest.delivered, rest.more) == (20, False)
    assert len(receiver.requests) == 30


def test_one_run_at_a_time_keeps_the_bound_across_workers(agent):
    _alerts(agent, 3)
    with Receiver() as receiver:
        _endpoint(receiver.url(), agent=agent)
        other = psycopg.connect(_database_url())
        try:
            other.execute("SELECT pg_advisory_lock(%s)", [DELIVERY_LOCK_KEY])  # another worker's run
            assert alerts_deliver(now=NOW) == DeliveryRun(busy=True)
            assert receiver.requests == []
            other.execute("SELECT pg_advisory_unlock(%s)", [DELIVERY_LOCK_KEY])
        finally:
            other.close()
        assert alerts_deliver(now=NOW).delivered == 3


def test_the_delivery_task_enqueues_the_next_run_while_a_backlog_remains(monkeypatch):
    runs = iter([DeliveryRun(delivered=7, more=True), DeliveryRun(delivered=2, more=False)])
    monkeypatch.setattr(alert_tasks, "alerts_deliver", lambda: next(runs))
    enqueued = []
    monkeypatch.setattr(
        alert_tasks.alerts_deliver_task, "apply_async", lambda **options: enqueued.append(options)
    )
    assert alert_tasks.alerts_deliver_task() == 7
    assert enqueued == [{"kwargs": {"chained": 1}, "countdown": 1}]
    assert alert_tasks.alerts_deliver_task(chained=1) == 2
    assert len(enqueued) == 1  # no backlog: the chain ends
    # A chain is bounded: the last run it allows enqueues nothing, whatever is left.
    monkeypatch.setattr(alert_tasks, "alerts_deliver", lambda: DeliveryRun(delivered=1, more=True))
    assert alert_tasks.alerts_deliver_task(chained=alert_tasks.DELIVERY_CHAIN_MAX) == 1
    assert len(enqueued) == 1


def test_claims_lease_from_the_time_they_are_taken():
    """A run's "now" moves on as it runs: a claim made a minute in leases from then, not from the start."""
    run = alert_delivery._Run(now=NOW, limit=1, time_budget=120)
    run.started -= 61.5
    assert run.clock() == NOW + dt.timedelta(seconds=61)
    assert timezone.is_aware(run.clock())

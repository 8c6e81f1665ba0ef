"""``AsyncGrid``: the asyncio client, with ``Grid``'s methods as coroutines. What each method sends and how
its answer is read, the retries and the errors are ``_core``'s; this class only sends the calls (httpx) and
sleeps between retries."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import AsyncIterator, Iterable, Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import httpx

from . import _core
from .errors import GridError
from .models import (
    Agent,
    AgentCreated,
    Alert,
    Allocation,
    BatchResult,
    Budget,
    Cost,
    Deal,
    Execution,
    Purchase,
    Quota,
    QuotaCheck,
    Run,
    Share,
    UsageRecord,
)

if TYPE_CHECKING:
    from .lease import AsyncLease

logger = logging.getLogger("axiom_grid_client")


class AsyncGrid:
    """An asyncio client of the grid for one API key (an agent's or an operator's); ``Grid``'s methods,
    awaited (``usage`` and ``usage_csv`` are async iterators, ``hold`` an async context manager).

    ``AsyncGrid(url, api_key, timeout=10.0, max_retries=3, backoff=0.2, max_backoff=5.0)``; pass ``transport``
    (an ``httpx.AsyncBaseTransport``) or a ready ``http_client`` (an ``httpx.AsyncClient``, whose base URL and
    headers the grid's replace) to change how requests are sent. Use it as an async context manager, or
    await ``close()``. One ``AsyncGrid`` serves every task of its event loop.
    """

    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        timeout: float = 10.0,
        max_retries: int = 3,
        backoff: float = 0.2,
        max_backoff: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
        http_client: httpx.AsyncClient | None = None,
    ):
        if not api_key:
            raise ValueError("an API key is needed (axg_...)")
        self.url = _core.base_url(url)
        self.retry = _core.RetryPolicy(max_retries=max_retries, backoff=backoff, max_backoff=max_backoff)
        if http_client is None:
            http_client = httpx.AsyncClient(timeout=timeout, transport=transport)
        http_client.base_url = self.url
        http_client.headers.update(_core.request_headers(api_key))
        self._http = http_client

    # --- The frame ---------------------------------------------------------------------------------------

    async def __aenter__(self) -> AsyncGrid:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> Any:
        """Send one call of the API and return its JSON; raise the typed ``GridError`` of a refusal.

        A POST carries ``idempotency_key`` or one made here, the same on each retry. Connection errors
        and 502/503/504 are retried (``max_retries`` times, backoff with jitter, ``Retry-After``); 4xx
        never are."""
        call = _core.Call(
            method, path, json=json, params=dict(params) if params else None, idempotency_key=idempotency_key
        )
        return await self._send(call)

    async def _send(self, call: _core.Call) -> Any:
        response = await self._respond(call)
        try:
            return _core.answer_body(response)
        finally:
            await response.aclose()

    async def _respond(self, call: _core.Call, *, stream: bool = False) -> httpx.Response:
        """The answer to ``call`` after the retries the policy allows (an error answer included)."""
        retry = 0
        while True:
            try:
                request = self._http.build_request(
                    call.method, call.path, params=call.params, content=call.content, headers=call.headers
                )
                response = await self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                delay = self.retry.delay(retry, error=exc)
                if delay is None:
                    raise _core.connection_error(exc, call, retry + 1) from exc
                logger.info("retrying %s %s in %.2f s after %s", call.method, call.path, delay, exc)
            else:
                delay = self.retry.delay(retry, response=response)
                if delay is None:
                    return response
                await response.aclose()
                logger.info(
                    "retrying %s %s in %.2f s after %s", call.method, call.path, delay, response.status_code
                )
            await asyncio.sleep(delay)
            retry += 1

    async def _call(self, call: _core.Call) -> Any:
        return call.parse(await self._send(call))

    async def _pages(self, call: _core.Call | None) -> AsyncIterator[Any]:
        while call is not None:
            body = await self._send(call)
            for item in _core.page_items(body):
                yield call.parse(item)
            call = _core.next_page(call, body)

    # --- Quotas and allocations --------------------------------------------------------------------------

    async def check(
        self, agent_id: str, resource_type: str, amount: int, *, run_id: str | None = None
    ) -> QuotaCheck:
        """Would ``amount`` be allocated now? Changes nothing."""
        return await self._call(_core.check(agent_id, resource_type, amount, run_id=run_id))

    async def allocate(
        self,
        agent_id: str,
        resource_type: str,
        amount: int,
        *,
        task_id: str | None = None,
        run_id: str | None = None,
        hold: bool = False,
        hold_ttl_seconds: int | None = None,
        idempotency_key: str | None = None,
    ) -> Allocation:
        """Take ``amount`` units: committed at once, or held (``hold=True``) until settled or released."""
        return await self._call(
            _core.allocate(
                agent_id,
                resource_type,
                amount,
                task_id=task_id,
                run_id=run_id,
                hold=hold,
                hold_ttl_seconds=hold_ttl_seconds,
                idempotency_key=idempotency_key,
            )
        )

    async def allocation(self, agent_id: str, allocation_id: str) -> Allocation:
        return await self._call(_core.allocation(agent_id, allocation_id))

    async def settle(self, agent_id: str, allocation_id: str, amount: int) -> Allocation:
        """Charge a hold what was actually used (less gives the rest back; more needs it available)."""
        return await self._call(_core.settle(agent_id, allocation_id, amount))

    async def release(self, agent_id: str, allocation_id: str) -> Allocation:
        """Give a hold back, uncharged."""
        return await self._call(_core.release(agent_id, allocation_id))

    def hold(
        self, agent_id: str, resource_type: str, amount: int, ttl: int | None = None, **options
    ) -> AsyncHold:
        """A hold as a context manager: taken on entry, settled on a normal exit with what the block
        reported (``h.report(n)``; the whole amount if it reported nothing), released if the block
        raises. ``options``: ``task_id``, ``run_id``, ``idempotency_key``."""
        return AsyncHold(self, _core.HoldState(agent_id, resource_type, amount, ttl, options))

    async def lease(
        self, agent_id: str, resource_type: str, amount: int, ttl: int | None = None, **options
    ) -> AsyncLease:
        """A lease: a hold counted down locally (``take(n)`` without a network call); see ``AsyncLease``."""
        from .lease import AsyncLease

        return await AsyncLease.open(self, agent_id, resource_type, amount, ttl=ttl, **options)

    async def share(self, agent_id: str, resource_type: str, amount: int, target_agent_id: str) -> Share:
        """Move unused quota to another agent."""
        return await self._call(_core.share(agent_id, resource_type, amount, target_agent_id))

    async def allocate_batch(self, agent_id: str, items: Iterable[Mapping[str, Any]]) -> list[BatchResult]:
        """Commit many allocations of one agent: ``items`` of ``{"resource_type", "amount", "task_id"?,
        "run_id"?, "idempotency_key"?, "metadata"?}``, sent in chunks of at most ``MAX_BATCH_ITEMS``.
        One result per item, in order; a refused item refuses nothing else."""
        calls = _core.allocate_batch(agent_id, items)
        return _core.batch_results(
            [await self._send(call) for call in calls], [len(c.json["items"]) for c in calls]
        )

    async def usage_batch(self, items: Iterable[Mapping[str, Any]]) -> list[BatchResult]:
        """``allocate_batch`` across agents (an operator's key): each item names its ``agent_id``."""
        calls = _core.usage_batch(items)
        return _core.batch_results(
            [await self._send(call) for call in calls], [len(c.json["items"]) for c in calls]
        )

    # --- Reading the ledger ------------------------------------------------------------------------------

    async def quotas(self, agent_id: str) -> list[Quota]:
        return await self._call(_core.quotas(agent_id))

    async def cost(self, agent_id: str) -> Cost:
        return await self._call(_core.cost(agent_id))

    async def budgets(self, agent_id: str) -> list[Budget]:
        return await self._call(_core.budgets(agent_id))

    def usage(
        self,
        agent_id: str,
        *,
        resource_type: str | None = None,
        since: dt.datetime | str | None = None,
        until: dt.datetime | str | None = None,
        page_size: int = _core.USAGE_PAGE_SIZE,
    ) -> AsyncIterator[UsageRecord]:
        """The usage log, newest first, page after page as the iteration goes (``since`` inclusive,
        ``until`` exclusive; ``page_size`` rows a request, at most 1,000)."""
        call = _core.usage(
            agent_id, resource_type=resource_type, since=since, until=until, page_size=page_size
        )
        return self._pages(call)

    async def usage_csv(
        self,
        agent_id: str | None,
        *,
        since: dt.datetime | str | None = None,
        until: dt.datetime | str | None = None,
        resource_type: str | None = None,
        fleet: bool = False,
    ) -> AsyncIterator[bytes]:
        """The usage log as CSV, streamed in chunks of bytes (``fleet=True``: every agent's, for an
        operator; ``agent_id`` then filters, or None for all). The request is sent when the iteration
        starts, and an error is raised there; the answer is never held in memory whole."""
        call = _core.usage_csv(agent_id, since=since, until=until, resource_type=resource_type, fleet=fleet)
        response = await self._respond(call, stream=True)
        try:
            if response.status_code >= 400:
                await response.aread()
                _core.answer_body(response)
            async for chunk in response.aiter_bytes():
                yield chunk
        finally:
            await response.aclose()

    async def alerts(self, agent_id: str | None, status: str = "open") -> list[Alert]:
        """The agent's alerts, newest first (``status``: open, acknowledged or all); ``agent_id=None``:
        every alert (an operator's key)."""
        return [alert async for alert in self._pages(_core.alerts(agent_id, status=status))]

    async def acknowledge_alert(self, agent_id: str | None, alert_id: int) -> Alert:
        return await self._call(_core.acknowledge_alert(agent_id, alert_id))

    # --- Executions, runs, the marketplace ---------------------------------------------------------------

    async def record_execution(
        self,
        agent_id: str,
        superpower: str,
        resources: Mapping[str, int],
        duration_ms: int | None = None,
        success: bool | None = None,
        output_units: int | None = None,
        run_id: str | None = None,
        *,
        task_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> Execution:
        """Take every resource of an execution (all or nothing) and record it. Without ``duration_ms`` it
        counts in cost, not in latency; without ``success`` its outcome is unknown (not in error rates)."""
        return await self._call(
            _core.record_execution(
                agent_id,
                superpower,
                resources,
                duration_ms,
                success,
                output_units=output_units,
                run_id=run_id,
                task_id=task_id,
                idempotency_key=idempotency_key,
            )
        )

    async def create_run(
        self, agent_id: str, run_id: str, limit_usd: Decimal | int | str, ttl_seconds: int | None = None
    ) -> Run:
        """A run with a dollar budget of its own; calls name it with ``run_id``."""
        return await self._call(_core.create_run(agent_id, run_id, limit_usd, ttl_seconds=ttl_seconds))

    async def deals(self, agent_id: str | None = None, resource_type: str | None = None) -> list[Deal]:
        """Open deals, cheapest first; with ``agent_id`` only those below list price for what that agent
        is forecast to run short of."""
        call = _core.deals(agent_id, resource_type=resource_type)
        if agent_id is not None:
            return await self._call(call)
        return [deal async for deal in self._pages(call)]

    async def sell(
        self,
        agent_id: str,
        resource_type: str,
        amount: int,
        unit_price_usd: Decimal | int | str,
        expires_at: dt.datetime | str | None = None,
    ) -> Deal:
        """List unused quota of this period for sale."""
        return await self._call(
            _core.sell(agent_id, resource_type, amount, unit_price_usd, expires_at=expires_at)
        )

    async def purchase(self, deal_id: str, agent_id: str, amount: int) -> Purchase:
        """Buy ``amount`` units of a deal for ``agent_id``, all or nothing."""
        return await self._call(_core.purchase(deal_id, agent_id, amount))

    # --- Agents (operator) -------------------------------------------------------------------------------

    async def create_agent(
        self,
        agent_id: str,
        tier: str,
        *,
        name: str | None = None,
        monthly_budget_usd: Decimal | int | str | None = None,
        custom_limits: Mapping[str, int] | None = None,
        metadata: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> AgentCreated:
        """Create an agent and its first key (``result.api_key``, shown only now)."""
        return await self._call(
            _core.create_agent(
                agent_id,
                tier,
                name=name,
                monthly_budget_usd=monthly_budget_usd,
                custom_limits=custom_limits,
                metadata=metadata,
                idempotency_key=idempotency_key,
            )
        )

    async def agent(self, agent_id: str) -> Agent:
        return await self._call(_core.agent(agent_id))


class AsyncHold:
    """``async with grid.hold(agent, "AI_TOKENS", 5000) as h: ...; h.report(3120)``: ``Hold``'s rules
    (settled with what was reported, the whole amount if nothing was; released on an exception)."""

    def __init__(self, grid: AsyncGrid, state: _core.HoldState):
        self._grid = grid
        self._progress = state

    @property
    def allocation(self) -> Allocation | None:
        return self._progress.allocation

    @property
    def id(self) -> str | None:
        return self._progress.allocation.id if self._progress.allocation is not None else None

    @property
    def used(self) -> int:
        return self._progress.used

    def report(self, amount: int) -> None:
        """Count ``amount`` more units as used by the block (no network call)."""
        self._progress.report(amount)

    async def settle(self, amount: int | None = None) -> Allocation:
        return self._progress.finish(await self._grid._call(self._progress.settle_call(amount)))

    async def release(self) -> Allocation:
        return self._progress.finish(await self._grid._call(self._progress.release_call()))

    async def __aenter__(self) -> AsyncHold:
        self._progress.allocation = await self._grid._call(self._progress.open_call())
        return self

    async def __aexit__(self, exc_type, exc, traceback) -> None:
        if self._progress.finished:
            return
        if exc_type is None:
            await self.settle()
            return
        try:
            await self.release()
        except GridError as error:  # the block's exception matters more; the hold expires at its TTL
            logger.warning("could not release hold %s after %r: %s", self.id, exc, error)

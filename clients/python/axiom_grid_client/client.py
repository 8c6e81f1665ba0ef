"""``Grid``: the synchronous client. What each method sends and how its answer is read, the retries and
the errors are ``_core``'s; this class only sends the calls (httpx) and sleeps between retries."""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Iterable, Iterator, Mapping
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
    from .lease import Lease

logger = logging.getLogger("axiom_grid_client")


class Grid:
    """A client of the grid for one API key (an agent's or an operator's).

    ``Grid(url, api_key, timeout=10.0, max_retries=3, backoff=0.2, max_backoff=5.0)``; pass ``transport``
    (an ``httpx.BaseTransport``) or a ready ``http_client`` (an ``httpx.Client``, whose base URL and
    headers the grid's replace) to change how requests are sent. Use it as a context manager, or call
    ``close()``. Thread-safe: one ``Grid`` may serve every thread of a process.
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
        transport: httpx.BaseTransport | None = None,
        http_client: httpx.Client | None = None,
    ):
        if not api_key:
            raise ValueError("an API key is needed (axg_...)")
        self.url = _core.base_url(url)
        self.retry = _core.RetryPolicy(max_retries=max_retries, backoff=backoff, max_backoff=max_backoff)
        if http_client is None:
            http_client = httpx.Client(timeout=timeout, transport=transport)
        http_client.base_url = self.url
        http_client.headers.update(_core.request_headers(api_key))
        self._http = http_client

    # --- The frame ---------------------------------------------------------------------------------------

    def __enter__(self) -> Grid:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(
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
        return self._send(call)

    def _send(self, call: _core.Call) -> Any:
        response = self._respond(call)
        try:
            return _core.answer_body(response)
        finally:
            response.close()

    def _respond(self, call: _core.Call, *, stream: bool = False) -> httpx.Response:
        """The answer to ``call`` after the retries the policy allows (an error answer included)."""
        retry = 0
        while True:
            try:
                request = self._http.build_request(
                    call.method, call.path, params=call.params, content=call.content, headers=call.headers
                )
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                delay = self.retry.delay(retry, error=exc)
                if delay is None:
                    raise _core.connection_error(exc, call, retry + 1) from exc
                logger.info("retrying %s %s in %.2f s after %s", call.method, call.path, delay, exc)
            else:
                delay = self.retry.delay(retry, response=response)
                if delay is None:
                    return response
                response.close()
                logger.info(
                    "retrying %s %s in %.2f s after %s", call.method, call.path, delay, response.status_code
                )
            time.sleep(delay)
            retry += 1

    def _call(self, call: _core.Call) -> Any:
        return call.parse(self._send(call))

    def _pages(self, call: _core.Call | None) -> Iterator[Any]:
        while call is not None:
            body = self._send(call)
            for item in _core.page_items(body):
                yield call.parse(item)
            call = _core.next_page(call, body)

    # --- Quotas and allocations --------------------------------------------------------------------------

    def check(
        self, agent_id: str, resource_type: str, amount: int, *, run_id: str | None = None
    ) -> QuotaCheck:
        """Would ``amount`` be allocated now? Changes nothing."""
        return self._call(_core.check(agent_id, resource_type, amount, run_id=run_id))

    def allocate(
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
        return self._call(
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

    def allocation(self, agent_id: str, allocation_id: str) -> Allocation:
        return self._call(_core.allocation(agent_id, allocation_id))

    def settle(self, agent_id: str, allocation_id: str, amount: int) -> Allocation:
        """Charge a hold what was actually used (less gives the rest back; more needs it available)."""
        return self._call(_core.settle(agent_id, allocation_id, amount))

    def release(self, agent_id: str, allocation_id: str) -> Allocation:
        """Give a hold back, uncharged."""
        return self._call(_core.release(agent_id, allocation_id))

    def hold(self, agent_id: str, resource_type: str, amount: int, ttl: int | None = None, **options) -> Hold:
        """A hold as a context manager: taken on entry, settled on a normal exit with what the block
        reported (``h.report(n)``; the whole amount if it reported nothing), released if the block
        raises. ``options``: ``task_id``, ``run_id``, ``idempotency_key``."""
        return Hold(self, _core.HoldState(agent_id, resource_type, amount, ttl, options))

    def lease(
        self, agent_id: str, resource_type: str, amount: int, ttl: int | None = None, **options
    ) -> Lease:
        """A lease: a hold counted down locally (``take(n)`` without a network call); see ``Lease``."""
        from .lease import Lease

        return Lease.open(self, agent_id, resource_type, amount, ttl=ttl, **options)

    def share(self, agent_id: str, resource_type: str, amount: int, target_agent_id: str) -> Share:
        """Move unused quota to another agent."""
        return self._call(_core.share(agent_id, resource_type, amount, target_agent_id))

    def allocate_batch(self, agent_id: str, items: Iterable[Mapping[str, Any]]) -> list[BatchResult]:
        """Commit many allocations of one agent: ``items`` of ``{"resource_type", "amount", "task_id"?,
        "run_id"?, "idempotency_key"?, "metadata"?}``, sent in chunks of at most ``MAX_BATCH_ITEMS``.
        One result per item, in order; a refused item refuses nothing else."""
        calls = _core.allocate_batch(agent_id, items)
        return _core.batch_results(
            [self._send(call) for call in calls], [len(c.json["items"]) for c in calls]
        )

    def usage_batch(self, items: Iterable[Mapping[str, Any]]) -> list[BatchResult]:
        """``allocate_batch`` across agents (an operator's key): each item names its ``agent_id``."""
        calls = _core.usage_batch(items)
        return _core.batch_results(
            [self._send(call) for call in calls], [len(c.json["items"]) for c in calls]
        )

    # --- Reading the ledger ------------------------------------------------------------------------------

    def quotas(self, agent_id: str) -> list[Quota]:
        return self._call(_core.quotas(agent_id))

    def cost(self, agent_id: str) -> Cost:
        return self._call(_core.cost(agent_id))

    def budgets(self, agent_id: str) -> list[Budget]:
        return self._call(_core.budgets(agent_id))

    def usage(
        self,
        agent_id: str,
        *,
        resource_type: str | None = None,
        since: dt.datetime | str | None = None,
        until: dt.datetime | str | None = None,
        page_size: int = _core.USAGE_PAGE_SIZE,
    ) -> Iterator[UsageRecord]:
        """The usage log, newest first, page after page as the iteration goes (``since`` inclusive,
        ``until`` exclusive; ``page_size`` rows a request, at most 1,000)."""
        call = _core.usage(
            agent_id, resource_type=resource_type, since=since, until=until, page_size=page_size
        )
        return self._pages(call)

    def usage_csv(
        self,
        agent_id: str | None,
        *,
        since: dt.datetime | str | None = None,
        until: dt.datetime | str | None = None,
        resource_type: str | None = None,
        fleet: bool = False,
    ) -> Iterator[bytes]:
        """The usage log as CSV, streamed in chunks of bytes (``fleet=True``: every agent's, for an
        operator; ``agent_id`` then filters, or None for all). The request is sent when the iteration
        starts, and an error is raised there; the answer is never held in memory whole."""
        call = _core.usage_csv(agent_id, since=since, until=until, resource_type=resource_type, fleet=fleet)
        response = self._respond(call, stream=True)
        try:
            if response.status_code >= 400:
                response.read()
                _core.answer_body(response)
            yield from response.iter_bytes()
        finally:
            response.close()

    def alerts(self, agent_id: str | None, status: str = "open") -> list[Alert]:
        """The agent's alerts, newest first (``status``: open, acknowledged or all); ``agent_id=None``:
        every alert (an operator's key)."""
        return list(self._pages(_core.alerts(agent_id, status=status)))

    def acknowledge_alert(self, agent_id: str | None, alert_id: int) -> Alert:
        return self._call(_core.acknowledge_alert(agent_id, alert_id))

    # --- Executions, runs, the marketplace ---------------------------------------------------------------

    def record_execution(
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
        return self._call(
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

    def create_run(
        self, agent_id: str, run_id: str, limit_usd: Decimal | int | str, ttl_seconds: int | None = None
    ) -> Run:
        """A run with a dollar budget of its own; calls name it with ``run_id``."""
        return self._call(_core.create_run(agent_id, run_id, limit_usd, ttl_seconds=ttl_seconds))

    def deals(self, agent_id: str | None = None, resource_type: str | None = None) -> list[Deal]:
        """Open deals, cheapest first; with ``agent_id`` only those below list price for what that agent
        is forecast to run short of."""
        call = _core.deals(agent_id, resource_type=resource_type)
        if agent_id is not None:
            return self._call(call)
        return list(self._pages(call))

    def sell(
        self,
        agent_id: str,
        resource_type: str,
        amount: int,
        unit_price_usd: Decimal | int | str,
        expires_at: dt.datetime | str | None = None,
    ) -> Deal:
        """List unused quota of this period for sale."""
        return self._call(_core.sell(agent_id, resource_type, amount, unit_price_usd, expires_at=expires_at))

    def purchase(self, deal_id: str, agent_id: str, amount: int) -> Purchase:
        """Buy ``amount`` units of a deal for ``agent_id``, all or nothing."""
        return self._call(_core.purchase(deal_id, agent_id, amount))

    # --- Agents (operator) -------------------------------------------------------------------------------

    def create_agent(
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
        return self._call(
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

    def agent(self, agent_id: str) -> Agent:
        return self._call(_core.agent(agent_id))


class Hold:
    """``with grid.hold(agent, "AI_TOKENS", 5000) as h: ...; h.report(3120)``.

    Entering takes the hold (``h.allocation``). Leaving normally settles it with the total the block
    reported (``report`` adds up), or with the whole held amount if it reported nothing; leaving by an
    exception releases it, uncharged, and lets the exception through. ``h.settle()`` / ``h.release()``
    end it early; leaving then does nothing more. After the block ``h.allocation`` is the settled or
    released allocation.
    """

    def __init__(self, grid: Grid, state: _core.HoldState):
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

    def settle(self, amount: int | None = None) -> Allocation:
        return self._progress.finish(self._grid._call(self._progress.settle_call(amount)))

    def release(self) -> Allocation:
        return self._progress.finish(self._grid._call(self._progress.release_call()))

    def __enter__(self) -> Hold:
        self._progress.allocation = self._grid._call(self._progress.open_call())
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if self._progress.finished:
            return
        if exc_type is None:
            self.settle()
            return
        try:
            self.release()
        except GridError as error:  # the block's exception matters more; the hold expires at its TTL
            logger.warning("could not release hold %s after %r: %s", self.id, exc, error)

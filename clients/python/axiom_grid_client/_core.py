"""Everything the sync and the async client share, none of it doing I/O.

``Grid`` and ``AsyncGrid`` only send what this module builds and hand back what it parses:

- **Calls.** Each SDK method is a function here returning a ``Call``: method, path, body, query, and how to
  read the answer (``parse``). Paths are built with each segment quoted.
- **Requests.** ``Call.headers`` gives a POST its ``Idempotency-Key`` (made here, a UUID4, unless the
  caller gave one); the same ``Call`` object, and so the same key, is sent again on every retry.
- **Answers.** ``answer_body`` returns the JSON of a 2xx and raises the typed error of anything else
  (``errors.error_class``), with ``details``, ``retry_after`` and ``request_id``.
- **Retries.** ``RetryPolicy.delay`` says whether and after how long to try again: on connection errors
  (nothing was answered) and 502/503/504, honouring ``Retry-After`` there, never on any 4xx (a 429 is a
  refusal, not an outage), at most ``max_retries`` times, with exponential backoff and full jitter.
- **Pages.** ``next_page`` turns a cursor-paginated answer into the call for the next page.
- **Batches.** ``batch_calls`` cuts items into chunks of at most ``MAX_BATCH_ITEMS`` (the server's limit)
  and ``batch_results`` puts the answers back together, indexed across chunks, in order.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import email.utils
import json as jsonlib
import random
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import httpx

from . import __version__
from .errors import GridConnectionError, GridError, GridTimeout, error_class
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

MAX_BATCH_ITEMS = 1_000  # the server's maximum items per batch request (the OpenAPI schema's maxItems)
USAGE_PAGE_SIZE = 1_000  # the server's largest page of the usage log
ALERT_PAGE_SIZE = 500
DEAL_PAGE_SIZE = 500
RETRY_STATUSES = frozenset({502, 503, 504})
USER_AGENT = f"axiom-grid-client/{__version__} (python; httpx {httpx.__version__})"
REQUEST_ID_HEADER = "X-Request-ID"


# --- Calls --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Call:
    """One HTTP call of the API, ready to send (and to send again, unchanged, on a retry)."""

    method: str
    path: str
    json: Any = None
    params: dict[str, Any] | None = None
    idempotency_key: str | None = None
    parse: Callable[[Any], Any] = lambda body: body
    accept: str = "application/json"
    # Sent as X-Request-ID on every attempt of the call, so the grid's log lines of a call and of its
    # retries are found together.
    request_id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self) -> None:
        self.method = self.method.upper()
        if self.method == "POST" and self.idempotency_key is None:
            self.idempotency_key = str(uuid.uuid4())
        if self.params:
            self.params = {key: _param(value) for key, value in self.params.items() if value is not None}

    @property
    def headers(self) -> dict[str, str]:
        headers = {"Accept": self.accept, REQUEST_ID_HEADER: self.request_id}
        if self.method in ("POST", "PUT", "PATCH"):
            headers["Content-Type"] = "application/json"
        if self.idempotency_key is not None:
            headers["Idempotency-Key"] = self.idempotency_key
        return headers

    @property
    def content(self) -> bytes | None:
        """The body as sent: JSON, with decimals as strings (never floats)."""
        if self.json is None:
            return b"{}" if self.method in ("POST", "PUT", "PATCH") else None
        return jsonlib.dumps(self.json, default=_json_default, separators=(",", ":")).encode()


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, dt.datetime):
        return iso(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def iso(value: dt.datetime | str) -> str:
    """A moment for the API: ISO 8601; a naive datetime is taken as UTC."""
    if isinstance(value, str):
        return value
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.isoformat()


def _param(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dt.datetime):
        return iso(value)
    return str(value)


def money(value: Decimal | int | str | float) -> str:
    """A dollar amount as the API takes it: a decimal string. A float is taken through its shortest repr
    (``0.1`` -> ``"0.1"``), never its binary expansion."""
    if isinstance(value, float):
        value = repr(value)
    return format(Decimal(str(value)), "f")


def segment(value: Any) -> str:
    """One path segment, quoted (an agent id may hold ``:`` or ``.``, never ``/``)."""
    return quote(str(value), safe="")


def agent_path(agent_id: str, *rest: Any) -> str:
    return "/".join(["/api/v1/agents", segment(agent_id), *(segment(part) for part in rest)])


def request_headers(api_key: str) -> dict[str, str]:
    """The headers of every request the client sends."""
    return {"Authorization": f"Bearer {api_key}", "User-Agent": USER_AGENT}


def base_url(url: str) -> str:
    url = url.strip()
    if not url:
        raise ValueError("the grid's URL is empty")
    if "://" not in url:
        raise ValueError(f"the grid's URL needs a scheme: {url!r} (e.g. http://127.0.0.1:8000)")
    return url.rstrip("/")


# --- Answers ------------------------------------------------------------------------------------------------


def retry_after_seconds(value: str | None, *, now: float | None = None) -> float | None:
    """A ``Retry-After`` header in seconds: delta-seconds or an HTTP date; None if absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    return max(0.0, moment.timestamp() - (time.time() if now is None else now))


def error_from_response(status: int, headers: Mapping[str, str], content: bytes) -> GridError:
    """The typed error of an answer that is not a success."""
    code = message = None
    details: dict[str, Any] = {}
    try:
        body = jsonlib.loads(content) if content else None
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error = body["error"]
        code = error.get("code") if isinstance(error.get("code"), str) else None
        message = error.get("message") if isinstance(error.get("message"), str) else None
        details = error.get("details") if isinstance(error.get("details"), dict) else {}
    if message is None:
        text = content[:200].decode(errors="replace").strip()
        message = f"HTTP {status}" + (f": {text}" if text else "")
    cls = error_class(code, status)
    return cls(
        message,
        code=code or cls.default_code,
        details=details,
        status=status,
        retry_after=retry_after_seconds(headers.get("Retry-After")),
        request_id=headers.get(REQUEST_ID_HEADER),
    )


def answer_body(response: httpx.Response) -> Any:
    """The JSON of a successful answer (None when it has no body); raises the typed error of any other."""
    if response.status_code >= 400:
        raise error_from_response(response.status_code, response.headers, response.content)
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError as exc:
        raise GridError(
            f"the grid answered {response.status_code} with a body that is not JSON",
            code="invalid_response",
            status=response.status_code,
            request_id=response.headers.get(REQUEST_ID_HEADER),
        ) from exc


def connection_error(exc: Exception, call: Call, attempts: int) -> GridConnectionError:
    cls = GridTimeout if isinstance(exc, httpx.TimeoutException) else GridConnectionError
    tries = f" after {attempts} attempts" if attempts > 1 else ""
    return cls(f"{call.method} {call.path}: {type(exc).__name__}: {exc}{tries}".rstrip(": "))


# --- Retries ------------------------------------------------------------------------------------------------

# Failures where the request may not have reached the grid, or its answer was lost on the way. A POST is
# safe to send again because it carries the same Idempotency-Key: the grid replays the first outcome. A
# read timeout is not retried: the grid may still be working, and the caller's ``timeout`` is its budget.
RETRYABLE_ERRORS: tuple[type[Exception], ...] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.RemoteProtocolError,
    httpx.ReadError,
    httpx.WriteError,
)


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """When to send a call again: ``max_retries`` more times at most (so ``max_retries + 1`` attempts),
    after ``random.uniform(0, min(max_backoff, backoff * 2**retry))`` seconds (exponential backoff, full
    jitter), or after the answer's ``Retry-After`` (at most ``max_backoff``) when it has one."""

    max_retries: int = 3
    backoff: float = 0.2
    max_backoff: float = 5.0

    def __post_init__(self) -> None:
        if self.max_retries < 0 or self.backoff < 0 or self.max_backoff < 0:
            raise ValueError("max_retries, backoff and max_backoff must not be negative")

    def _backoff(self, retry: int) -> float:
        return random.uniform(0.0, min(self.max_backoff, self.backoff * (2**retry)))

    def delay(
        self, retry: int, *, response: httpx.Response | None = None, error: Exception | None = None
    ) -> float | None:
        """Seconds to wait before retry number ``retry`` (0 for the first), or None: do not retry."""
        if retry >= self.max_retries:
            return None
        if error is not None:
            return self._backoff(retry) if isinstance(error, RETRYABLE_ERRORS) else None
        if response is None or response.status_code not in RETRY_STATUSES:
            return None
        retry_after = retry_after_seconds(response.headers.get("Retry-After"))
        if retry_after is not None:
            return min(retry_after, self.max_backoff)
        return self._backoff(retry)


def is_retryable_error(error: Exception) -> bool:
    return isinstance(error, RETRYABLE_ERRORS)


# --- Pages --------------------------------------------------------------------------------------------------


def next_page(call: Call, body: Any) -> Call | None:
    """The call for the page after ``body`` (a cursor-paginated answer), or None on the last page. The
    cursor is taken from the ``next`` link and sent to the same path, so a proxy's view of the host or
    scheme in that link does not matter."""
    link = body.get("next") if isinstance(body, dict) else None
    if not link:
        return None
    cursor = parse_qs(urlsplit(link).query).get("cursor")
    if not cursor:
        return None
    return Call(call.method, call.path, params={**(call.params or {}), "cursor": cursor[0]}, parse=call.parse)


def page_items(body: Any) -> list:
    if isinstance(body, dict):
        return body.get("results") or []
    return body or []


# --- Batches ------------------------------------------------------------------------------------------------


def chunks(items: Sequence[Any], size: int = MAX_BATCH_ITEMS) -> list[Sequence[Any]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def batch_calls(path: str, items: Iterable[Mapping[str, Any]], *, size: int = MAX_BATCH_ITEMS) -> list[Call]:
    """One POST per chunk of at most ``size`` items, each with its own Idempotency-Key."""
    listed = [dict(item) for item in items]
    if not listed:
        raise ValueError("a batch needs at least one item")
    return [Call("POST", path, json={"items": list(chunk)}) for chunk in chunks(listed, size)]


def batch_results(bodies: Iterable[Any], sizes: Iterable[int]) -> list[BatchResult]:
    """The results of every chunk, in order, each ``index`` counted across chunks."""
    results = []
    offset = 0
    for body, size in zip(bodies, sizes, strict=True):
        for result in body.get("results", []):
            results.append(BatchResult.from_dict({**result, "index": offset + int(result.get("index", 0))}))
        offset += size
    return results


# --- The API's calls ----------------------------------------------------------------------------------------


def _many(model):
    return lambda body: [model.from_dict(item) for item in (body or [])]


def check(agent_id: str, resource_type: str, amount: int, *, run_id: str | None = None) -> Call:
    body = {"resource_type": resource_type, "amount": amount}
    if run_id:
        body["run_id"] = run_id
    return Call("POST", agent_path(agent_id, "quota-checks"), json=body, parse=QuotaCheck.from_dict)


def allocate(
    agent_id: str,
    resource_type: str,
    amount: int,
    *,
    task_id: str | None = None,
    run_id: str | None = None,
    hold: bool = False,
    hold_ttl_seconds: int | None = None,
    idempotency_key: str | None = None,
) -> Call:
    body: dict[str, Any] = {"resource_type": resource_type, "amount": amount}
    if task_id:
        body["task_id"] = task_id
    if run_id:
        body["run_id"] = run_id
    if hold:
        body["hold"] = True
    if hold_ttl_seconds is not None:
        body["hold_ttl_seconds"] = int(hold_ttl_seconds)
    return Call(
        "POST",
        agent_path(agent_id, "allocations"),
        json=body,
        idempotency_key=idempotency_key,
        parse=Allocation.from_dict,
    )


def allocation(agent_id: str, allocation_id: str) -> Call:
    return Call("GET", agent_path(agent_id, "allocations", allocation_id), parse=Allocation.from_dict)


def settle(agent_id: str, allocation_id: str, amount: int, *, idempotency_key: str | None = None) -> Call:
    return Call(
        "POST",
        agent_path(agent_id, "allocations", allocation_id, "settle"),
        json={"amount": amount},
        idempotency_key=idempotency_key,
        parse=Allocation.from_dict,
    )


def release(agent_id: str, allocation_id: str, *, idempotency_key: str | None = None) -> Call:
    return Call(
        "POST",
        agent_path(agent_id, "allocations", allocation_id, "release"),
        json={},
        idempotency_key=idempotency_key,
        parse=Allocation.from_dict,
    )


def usage(
    agent_id: str,
    *,
    resource_type: str | None = None,
    since: dt.datetime | str | None = None,
    until: dt.datetime | str | None = None,
    page_size: int = USAGE_PAGE_SIZE,
) -> Call:
    params = {"resource_type": resource_type, "since": since, "until": until, "page_size": page_size}
    return Call("GET", agent_path(agent_id, "usage"), params=params, parse=UsageRecord.from_dict)


def usage_csv(
    agent_id: str | None,
    *,
    since: dt.datetime | str | None = None,
    until: dt.datetime | str | None = None,
    resource_type: str | None = None,
    fleet: bool = False,
) -> Call:
    """The CSV export, streamed: the agent's (``GET /api/v1/agents/{id}/usage.csv``) or, for an operator,
    the whole fleet's (``GET /api/v1/usage.csv``, optionally ``agent_id`` to filter)."""
    params = {"since": since, "until": until, "resource_type": resource_type}
    if fleet:
        params["agent_id"] = agent_id
        path = "/api/v1/usage.csv"
    else:
        if not agent_id:
            raise ValueError("usage_csv needs an agent id (or fleet=True)")
        path = agent_path(agent_id, "usage.csv")
    return Call("GET", path, params=params, accept="text/csv")


def cost(agent_id: str) -> Call:
    return Call("GET", agent_path(agent_id, "cost"), parse=Cost.from_dict)


def quotas(agent_id: str) -> Call:
    return Call("GET", agent_path(agent_id, "quotas"), parse=_many(Quota))


def budgets(agent_id: str) -> Call:
    return Call("GET", agent_path(agent_id, "budgets"), parse=_many(Budget))


def alerts(agent_id: str | None, *, status: str = "open") -> Call:
    """An agent's alerts, or with ``agent_id=None`` every alert (an operator's key)."""
    path = agent_path(agent_id, "alerts") if agent_id is not None else "/api/v1/alerts"
    return Call("GET", path, params={"status": status, "page_size": ALERT_PAGE_SIZE}, parse=Alert.from_dict)


def acknowledge_alert(agent_id: str | None, alert_id: int) -> Call:
    if agent_id is None:
        path = f"/api/v1/alerts/{segment(alert_id)}/acknowledge"
    else:
        path = agent_path(agent_id, "alerts", alert_id, "acknowledge")
    return Call("POST", path, json={}, parse=Alert.from_dict)


def record_execution(
    agent_id: str,
    superpower: str,
    resources: Mapping[str, int],
    duration_ms: int | None = None,
    success: bool | None = None,
    *,
    output_units: int | None = None,
    run_id: str | None = None,
    task_id: str | None = None,
    idempotency_key: str | None = None,
) -> Call:
    body: dict[str, Any] = {
        "superpower": superpower,
        "resources": dict(resources),
    }
    if duration_ms is not None:
        body["duration_ms"] = int(duration_ms)
    if success is not None:
        body["success"] = bool(success)
    if output_units is not None:
        body["output_units"] = int(output_units)
    if run_id:
        body["run_id"] = run_id
    if task_id:
        body["task_id"] = task_id
    return Call(
        "POST",
        agent_path(agent_id, "executions"),
        json=body,
        idempotency_key=idempotency_key,
        parse=Execution.from_dict,
    )


def share(agent_id: str, resource_type: str, amount: int, target_agent_id: str) -> Call:
    body = {"resource_type": resource_type, "amount": amount, "target_agent_id": target_agent_id}
    return Call("POST", agent_path(agent_id, "shares"), json=body, parse=Share.from_dict)


def deals(agent_id: str | None = None, *, resource_type: str | None = None) -> Call:
    """Open deals, cheapest first; with ``agent_id``, only the deals below list price for what that agent
    is forecast to run short of (``GET /api/v1/agents/{id}/deals``)."""
    if agent_id is None:
        params = {"resource_type": resource_type, "page_size": DEAL_PAGE_SIZE}
        return Call("GET", "/api/v1/marketplace/deals", params=params, parse=Deal.from_dict)

    def parse(body: Any) -> list[Deal]:
        found = [Deal.from_dict(item) for item in (body or {}).get("deals", [])]
        return [deal for deal in found if resource_type is None or deal.resource_type == resource_type]

    return Call("GET", agent_path(agent_id, "deals"), parse=parse)


def sell(
    agent_id: str,
    resource_type: str,
    amount: int,
    unit_price_usd: Decimal | int | str | float,
    *,
    expires_at: dt.datetime | str | None = None,
) -> Call:
    body: dict[str, Any] = {
        "resource_type": resource_type,
        "amount": amount,
        "unit_price_usd": money(unit_price_usd),
    }
    if expires_at is not None:
        body["expires_at"] = iso(expires_at)
    return Call("POST", agent_path(agent_id, "deals"), json=body, parse=Deal.from_dict)


def purchase(deal_id: str, agent_id: str, amount: int, *, idempotency_key: str | None = None) -> Call:
    return Call(
        "POST",
        f"/api/v1/marketplace/deals/{segment(deal_id)}/purchase",
        json={"agent_id": agent_id, "amount": amount},
        idempotency_key=idempotency_key,
        parse=Purchase.from_dict,
    )


def create_run(
    agent_id: str, run_id: str, limit_usd: Decimal | int | str | float, *, ttl_seconds: int | None = None
) -> Call:
    body: dict[str, Any] = {"run_id": run_id, "limit_usd": money(limit_usd)}
    if ttl_seconds is not None:
        body["ttl_seconds"] = int(ttl_seconds)
    return Call("POST", agent_path(agent_id, "runs"), json=body, parse=Run.from_dict)


def allocate_batch(agent_id: str, items: Iterable[Mapping[str, Any]]) -> list[Call]:
    return batch_calls(agent_path(agent_id, "allocations", "batch"), items)


def usage_batch(items: Iterable[Mapping[str, Any]]) -> list[Call]:
    return batch_calls("/api/v1/usage/batch", items)


def create_agent(
    agent_id: str,
    tier: str,
    *,
    name: str | None = None,
    monthly_budget_usd: Decimal | int | str | float | None = None,
    custom_limits: Mapping[str, int] | None = None,
    metadata: Mapping[str, Any] | None = None,
    idempotency_key: str | None = None,
) -> Call:
    body: dict[str, Any] = {"id": agent_id, "tier": tier}
    if name is not None:
        body["name"] = name
    if monthly_budget_usd is not None:
        body["monthly_budget_usd"] = money(monthly_budget_usd)
    if custom_limits:
        body["custom_limits"] = dict(custom_limits)
    if metadata:
        body["metadata"] = dict(metadata)
    return Call(
        "POST", "/api/v1/agents", json=body, idempotency_key=idempotency_key, parse=AgentCreated.from_dict
    )


def agent(agent_id: str) -> Call:
    return Call("GET", agent_path(agent_id), parse=Agent.from_dict)


# --- Holds --------------------------------------------------------------------------------------------------


class HoldState:
    """What a ``hold`` block knows: its allocation, what it reported, whether it has finished. The sync and
    async holds differ only in how they send the calls this builds."""

    def __init__(self, agent_id: str, resource_type: str, amount: int, ttl: int | None, options: dict):
        self.agent_id = agent_id
        self.resource_type = resource_type
        self.amount = amount
        self.ttl = ttl
        self.options = options
        self.allocation: Allocation | None = None
        self.reported: int | None = None
        self.finished = False

    def open_call(self) -> Call:
        return allocate(
            self.agent_id,
            self.resource_type,
            self.amount,
            hold=True,
            hold_ttl_seconds=self.ttl,
            **self.options,
        )

    def report(self, amount: int) -> None:
        if isinstance(amount, bool) or not isinstance(amount, int) or amount < 0:
            raise ValueError("report takes a whole number of units, 0 or more")
        self.reported = (self.reported or 0) + amount

    @property
    def used(self) -> int:
        """What the block reported so far; the whole hold if it reported nothing."""
        return self.amount if self.reported is None else self.reported

    def settle_call(self, amount: int | None = None) -> Call:
        self._ensure_open()
        return settle(self.agent_id, self.allocation.id, self.used if amount is None else amount)

    def release_call(self) -> Call:
        self._ensure_open()
        return release(self.agent_id, self.allocation.id)

    def _ensure_open(self) -> None:
        if self.allocation is None:
            raise RuntimeError("the hold is not taken yet: use it as a context manager")
        if self.finished:
            raise RuntimeError(f"the hold {self.allocation.id} was already settled or released")

    def finish(self, allocation: Allocation) -> Allocation:
        self.allocation = allocation
        self.finished = True
        return allocation

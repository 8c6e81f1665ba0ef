"""The grid's answers as typed, read-only dataclasses.

Field names are exactly the server's JSON names. Each model is built with ``Model.from_dict(data)``, which

- ignores fields it does not know (a newer server may send more: the client keeps working),
- converts money and other decimal strings to ``Decimal`` (never float), timestamps to aware ``datetime``
  (UTC) and UUIDs to ``str``,
- leaves a field the server did not send at its default (``None``, ``{}``, ``False``).

``model.raw`` is the JSON object it was built from, unchanged, for fields newer than this client.
``tests/test_client_schema.py`` holds every model to the OpenAPI component it mirrors.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import types
import typing
from decimal import Decimal
from typing import Any, ClassVar, TypeVar, Union

M = TypeVar("M", bound="Model")

_UTC = dt.timezone.utc
_FRACTION = re.compile(r"\.(\d+)")


def parse_datetime(value: Any) -> dt.datetime | None:
    """An ISO 8601 timestamp as an aware datetime (a naive one is taken as UTC); None stays None."""
    if value is None or isinstance(value, dt.datetime):
        return value
    text = str(value)
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError:
        # Python 3.10 reads only 3 or 6 digits of a fraction of a second: pad or cut to 6.
        text = _FRACTION.sub(lambda match: "." + match.group(1)[:6].ljust(6, "0"), text, count=1)
        parsed = dt.datetime.fromisoformat(text)
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=_UTC)


def parse_decimal(value: Any) -> Decimal | None:
    if value is None or isinstance(value, Decimal):
        return value
    return Decimal(str(value))


def _convert(hint: Any, value: Any) -> Any:
    """``value`` (from JSON) as the type ``hint`` names: the few shapes the models use."""
    if value is None:
        return None
    origin = typing.get_origin(hint)
    if origin is Union or origin is types.UnionType:
        options = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return _convert(options[0], value) if len(options) == 1 else value
    if origin is dict:
        _, value_hint = typing.get_args(hint)
        return {str(key): _convert(value_hint, item) for key, item in value.items()}
    if origin is list:
        (item_hint,) = typing.get_args(hint)
        return [_convert(item_hint, item) for item in value]
    if hint is Decimal:
        return parse_decimal(value)
    if hint is dt.datetime:
        return parse_datetime(value)
    if hint is str:
        return str(value)
    if isinstance(hint, type) and issubclass(hint, Model) and isinstance(value, dict):
        return hint.from_dict(value)
    return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class Model:
    """Base of the models: ``from_dict`` and ``raw``."""

    raw: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    _hints: ClassVar[dict[type, dict[str, Any]]] = {}

    @classmethod
    def fields(cls) -> list[str]:
        """The JSON fields this model reads (``raw`` aside)."""
        return [field.name for field in dataclasses.fields(cls) if field.name != "raw"]

    @classmethod
    def from_dict(cls: type[M], data: dict[str, Any]) -> M:
        hints = Model._hints.get(cls)
        if hints is None:
            hints = Model._hints[cls] = typing.get_type_hints(cls)
        values = {name: _convert(hints[name], data[name]) for name in cls.fields() if name in data}
        return cls(**values, raw=dict(data))


def _model(cls: type[M]) -> type[M]:
    return dataclasses.dataclass(frozen=True, kw_only=True)(cls)


# --- Allocations and quotas --------------------------------------------------------------------------------


@_model
class Allocation(Model):
    """A committed allocation, or a hold (``status`` ``held`` until settled, released or expired).
    ``allocated_amount`` is what it takes now: the settled amount once settled, else the amount asked."""

    id: str
    agent_id: str
    resource_type: str
    allocated_amount: int
    cost_usd: Decimal | None = None
    unit_price_usd: Decimal | None = None
    status: str = ""
    task_id: str = ""
    run_id: str = ""
    expires_at: dt.datetime | None = None
    settled_amount: int | None = None
    created_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    lease: bool = False

    @property
    def held(self) -> bool:
        return self.status == "held"


@_model
class QuotaCheck(Model):
    """The answer of a quota check: whether the amount would be allocated now, and what is available.
    ``reason`` is ``ok`` or why not (``quota_exceeded``, ``budget_exceeded`` with the budget in
    ``details``, ``agent_throttled``, ...). A check changes nothing."""

    allowed: bool
    available: int
    reason: str = ""
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


@_model
class Quota(Model):
    """One resource type's quota for the current period."""

    resource_type: str
    limit: int
    used: int = 0
    reserved: int = 0
    available: int = 0
    period_start: dt.datetime | None = None
    period_end: dt.datetime | None = None


@_model
class Cost(Model):
    """This period's spend: per resource type (``by_resource_type``), in total, and against the monthly
    budget."""

    agent_id: str
    period_start: dt.datetime | None = None
    period_end: dt.datetime | None = None
    by_resource_type: dict[str, Decimal] = dataclasses.field(default_factory=dict)
    total_usd: Decimal = Decimal("0")
    monthly_budget_usd: Decimal | None = None
    budget_utilization_percent: Decimal | None = None


@_model
class UsageRecord(Model):
    """One row of the usage log (``kind``: allocation, settlement, execution or purchase)."""

    id: int
    agent_id: str
    resource_type: str
    amount: int
    unit_price_usd: Decimal | None = None
    cost_usd: Decimal | None = None
    kind: str = ""
    task_id: str = ""
    idempotency_key: str = ""
    metadata: Any = None
    created_at: dt.datetime | None = None


@_model
class Share(Model):
    """Unused quota moved from one agent to another (as grants on both sides)."""

    resource_type: str
    amount: int
    source_agent_id: str
    target_agent_id: str
    source_available: int = 0


# --- Budgets and runs --------------------------------------------------------------------------------------


@_model
class Budget(Model):
    """A dollar budget that applies to an agent, with its current window's figures."""

    id: int
    scope: str
    scope_id: str
    agent_id: str | None = None
    run_id: str | None = None
    window: str = ""
    window_start: dt.datetime | None = None
    window_end: dt.datetime | None = None
    limit_usd: Decimal | None = None
    spent_usd: Decimal | None = None
    reserved_usd: Decimal | None = None
    rollover_usd: Decimal | None = None
    remaining_usd: Decimal | None = None
    mode: str = ""
    rollover_percent: int = 0
    thresholds: list[int] = dataclasses.field(default_factory=list)
    managed: bool = False
    expires_at: dt.datetime | None = None


@_model
class Run(Budget):
    """A run: one unit of an agent's work with a dollar budget of its own (scope ``run``, window ``total``),
    as ``POST .../runs`` answers it. Calls name it with ``run_id``."""


# --- Optimization ------------------------------------------------------------------------------------------


@_model
class Alert(Model):
    """An alert (budget thresholds, rules, cost spikes, scaling); ``status`` is ``open`` or
    ``acknowledged``."""

    id: int
    agent_id: str | None = None
    scope: str | None = None
    scope_id: str | None = None
    kind: str = ""
    severity: str = ""
    title: str = ""
    message: str = ""
    data: Any = None
    rule_id: int | None = None
    status: str = ""
    created_at: dt.datetime | None = None
    notifications: int = 1
    notified_at: dt.datetime | None = None
    acknowledged_at: dt.datetime | None = None
    acknowledged_by: str = ""


@_model
class Execution(Model):
    """A recorded superpower execution and what its resources cost."""

    id: int
    agent_id: str
    superpower: str
    resources: dict[str, int] = dataclasses.field(default_factory=dict)
    duration_ms: int | None = None  # None: not reported
    success: bool | None = None  # None: the outcome is unknown
    output_units: int | None = None
    cost_usd: Decimal | None = None
    task_id: str = ""
    created_at: dt.datetime | None = None


@_model
class Deal(Model):
    """A marketplace deal: units of a resource for sale at ``unit_price_usd``."""

    id: str
    resource_type: str
    amount_total: int = 0
    amount_left: int = 0
    unit_price_usd: Decimal | None = None
    seller: str = ""
    seller_agent_id: str | None = None
    status: str = ""
    expires_at: dt.datetime | None = None
    created_at: dt.datetime | None = None


@_model
class Purchase(Model):
    """Units bought from a deal."""

    id: int
    deal_id: str
    agent_id: str
    resource_type: str
    amount: int
    unit_price_usd: Decimal | None = None
    cost_usd: Decimal | None = None
    deal_amount_left: int = 0
    deal_status: str = ""
    created_at: dt.datetime | None = None


# --- Batches -----------------------------------------------------------------------------------------------


@_model
class BatchError(Model):
    """Why one item of a batch was refused: the error a single allocation would have answered."""

    code: str
    message: str = ""
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


@_model
class BatchResult(Model):
    """The result of one batch item: ``status`` 201 with its ``allocation``, or the status and ``error`` a
    single allocation would have been refused with. ``index`` is the item's position in the items given
    to the client (across chunks)."""

    index: int
    status: int
    allocation: Allocation | None = None
    error: BatchError | None = None
    replayed: bool = False

    @property
    def ok(self) -> bool:
        return self.allocation is not None and 200 <= self.status < 300


# --- Agents (operator) -------------------------------------------------------------------------------------


@_model
class Agent(Model):
    id: str
    name: str = ""
    tier: str = ""
    status: str = ""
    status_reason: str = ""
    monthly_budget_usd: Decimal | None = None
    team_id: str | None = None
    instance_count: int = 0
    min_instances: int = 0
    max_instances: int = 0
    custom_limits: dict[str, int] = dataclasses.field(default_factory=dict)
    metadata: Any = None
    created_at: dt.datetime | None = None
    updated_at: dt.datetime | None = None


@_model
class AgentCreated(Agent):
    """A new agent and its first key, shown only in this answer (``None`` when the creation was replayed
    under the same Idempotency-Key)."""

    api_key: str | None = None


MODELS: tuple[type[Model], ...] = (
    Allocation,
    QuotaCheck,
    Quota,
    Cost,
    UsageRecord,
    Share,
    Budget,
    Run,
    Alert,
    Execution,
    Deal,
    Purchase,
    BatchError,
    BatchResult,
    Agent,
    AgentCreated,
)

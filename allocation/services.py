"""The allocation engine: quota checks, allocations, holds, sharing and cost.

Quota is taken with one conditional UPDATE (``used + reserved + n <= limit``) whose row count says whether
it fitted, and the usage row is written in the same transaction. PostgreSQL serializes the writers on the
quota row, so no interleaving of concurrent allocations can overspend; the CHECK constraints on ``quotas``
back this up. A refused operation raises a ``LedgerError`` and writes nothing.

An allocation is the hot path: on PostgreSQL it is a single prepared statement (``allocation_write``), the
UPDATE and the INSERTs it feeds, atomic without a transaction of its own: one round trip.
"""

from __future__ import annotations

import datetime as dt
import functools
import uuid
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connection, connections, models, transaction
from django.db.models import F
from django.utils import timezone
from psycopg.types.numeric import Int4, Int8

from allocation.models import Allocation
from ledger.bulk import bulk_update_column
from ledger.errors import (
    AgentSuspended,
    AgentThrottled,
    Conflict,
    FeatureDisabled,
    LedgerError,
    NotFound,
    QuotaExceeded,
)
from ledger.ids import uuid7
from ledger.models import Agent, Grant, Quota, ResourceType, UsageLog
from ledger.money import COST_QUANTUM, percent, usage_cost
from ledger.periods import month_bounds
from ledger.selectors import price_table
from ledger.services import quota_open, quotas_open_all

MAX_AMOUNT = 2**53  # the largest whole number every JSON client can represent exactly
DEFAULT_HOLD_TTL = dt.timedelta(minutes=15)
MAX_HOLD_TTL = dt.timedelta(days=7)

_TAKE_USED_SQL = """
UPDATE quotas SET used = used + %s, spent_usd = spent_usd + %s, updated_at = %s
WHERE agent_id = %s AND resource_type_id = %s AND period_start = %s
  AND used + reserved + listed + %s <= limit_amount
RETURNING id
"""
_TAKE_RESERVED_SQL = """
UPDATE quotas SET reserved = reserved + %s, spent_usd = spent_usd + %s, updated_at = %s
WHERE agent_id = %s AND resource_type_id = %s AND period_start = %s
  AND used + reserved + listed + %s <= limit_amount
RETURNING id
"""


@dataclass(frozen=True)
class QuotaCheck:
    allowed: bool
    available: int
    reason: str


def _ensure_resource_type(resource_type_id: str) -> None:
    if resource_type_id not in resource_type_codes():
        raise LedgerError(f"unknown resource type {resource_type_id!r}", code="unknown_resource_type")


_resource_type_codes: frozenset[str] | None = None


def resource_type_codes() -> frozenset[str]:
    """The resource type codes; they are reference data that only a deploy changes, so cache them."""
    global _resource_type_codes
    if _resource_type_codes is None:
        _resource_type_codes = frozenset(ResourceType.objects.values_list("code", flat=True))
    return _resource_type_codes


def resource_type_codes_clear() -> None:
    global _resource_type_codes
    _resource_type_codes = None


def _ensure_amount(amount: int, *, allow_zero: bool = False) -> None:
    if not isinstance(amount, int) or isinstance(amount, bool):
        raise LedgerError("amount must be a whole number of units", code="invalid_amount")
    if amount < (0 if allow_zero else 1) or amount > MAX_AMOUNT:
        raise LedgerError(
            f"amount must be between {0 if allow_zero else 1} and 2^53",
            code="invalid_amount",
            details={"amount": amount},
        )


def _ensure_can_allocate(agent: Agent) -> None:
    if agent.status == Agent.Status.SUSPENDED:
        raise AgentSuspended(f"agent {agent.id} is suspended", details={"reason": agent.status_reason})
    if agent.status == Agent.Status.THROTTLED:
        raise AgentThrottled(
            f"agent {agent.id} is throttled: allocations are refused until it is lifted",
            details={"reason": agent.status_reason},
        )


def _unit_price(resource_type_id: str, at: dt.datetime) -> Decimal:
    price = price_table.unit_price(resource_type_id, at)
    if price is None:
        raise LedgerError(f"{resource_type_id} has no price in effect", code="no_price", status=409)
    return price


def _take(
    *, agent: Agent, resource_type_id: str, amount: int, cost: Decimal, hold: bool, now: dt.datetime
) -> int:
    """Take ``amount`` into ``used`` (or ``reserved`` for a hold) of the current period; return the quota id.

    The first allocation of a period finds no row, opens the period from the agent's base limit and tries
    once more. Raises ``QuotaExceeded`` when it does not fit.
    """
    period_start, _ = month_bounds(now)
    sql = _TAKE_RESERVED_SQL if hold else _TAKE_USED_SQL
    params = [
        amount,
        connection.ops.adapt_decimalfield_value(cost, 28, 12),
        connection.ops.adapt_datetimefield_value(now),
        agent.pk,
        resource_type_id,
        connection.ops.adapt_datetimefield_value(period_start),
        amount,
    ]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
        if row is None:
            quota = quota_open(agent=agent, resource_type_id=resource_type_id, at=now)
            cursor.execute(sql, params)
            row = cursor.fetchone()
            if row is None:
                raise _quota_exceeded(quota, requested=amount)
    return row[0]


def quota_check(*, agent: Agent, resource_type_id: str, amount: int) -> QuotaCheck:
    """Would ``amount`` fit now? Changes nothing (a throttled agent may still ask)."""
    _ensure_resource_type(resource_type_id)
    _ensure_amount(amount)
    start, _ = month_bounds(timezone.now())
    quota = Quota.objects.filter(agent=agent, resource_type_id=resource_type_id, period_start=start).first()
    if quota is None:
        from ledger.selectors import base_limits

        available = base_limits(agent=agent).get(resource_type_id, 0)
    else:
        available = max(quota.available, 0)
    if agent.status == Agent.Status.SUSPENDED:
        return QuotaCheck(False, available, "agent_suspended")
    if agent.status == Agent.Status.THROTTLED:
        return QuotaCheck(False, available, "agent_throttled")
    if amount > available:
        return QuotaCheck(False, available, "quota_exceeded")
    return QuotaCheck(True, available, "ok")


@dataclass(frozen=True)
class CompanionRow:
    """A row written together with an allocation, and only if the allocation is made: the request's audit
    record, the response stored under its Idempotency-Key. On PostgreSQL it is one more INSERT of the
    allocation's single statement, so a companion that fails (a duplicate key) undoes the allocation too."""

    model: type[models.Model]
    values: dict[str, object]


@dataclass(frozen=True)
class RequiredRow:
    """A row that must exist for an allocation to be made, checked by the very statement that makes it:
    the request's API key, still not revoked. ``filters`` are field equalities (None meaning IS NULL)."""

    model: type[models.Model]
    filters: dict[str, object]


class RequirementNotMet(LedgerError):
    code = "requirement_not_met"
    status = 409


@dataclass(frozen=True)
class AllocationDraft:
    """An allocation checked and priced but not written: ``allocation`` already has its id, price, cost and
    creation time, so a caller can shape its response before the statement that writes it."""

    allocation: Allocation
    now: dt.datetime
    kind: str
    idempotency_key: str
    metadata: dict | None


def allocation_prepare(
    *,
    agent: Agent,
    resource_type_id: str,
    amount: int,
    task_id: str = "",
    hold: bool = False,
    hold_ttl_seconds: int | None = None,
    idempotency_key: str = "",
    kind: str = UsageLog.Kind.ALLOCATION,
    metadata: dict | None = None,
    now: dt.datetime | None = None,
) -> AllocationDraft:
    """Check the request and price it; no query (prices are cached). ``allocation_write`` takes the quota.

    The agent's status is not read here: ``allocation_write`` checks it in the statement that takes the
    quota, so a throttle or suspension applies to the very next allocation, whatever copy of the agent the
    caller holds.
    """
    _ensure_resource_type(resource_type_id)
    _ensure_amount(amount)
    now = now or timezone.now()
    expires_at = None
    if hold:
        ttl = DEFAULT_HOLD_TTL if hold_ttl_seconds is None else dt.timedelta(seconds=hold_ttl_seconds)
        if not dt.timedelta(seconds=1) <= ttl <= MAX_HOLD_TTL:
            raise LedgerError("hold_ttl_seconds must be between 1 and 604800", code="invalid_hold_ttl")
        expires_at = now + ttl
    unit_price = _unit_price(resource_type_id, now)
    allocation = _allocation_new(
        agent,
        id=uuid7(),
        agent_id=agent.pk,
        resource_type_id=resource_type_id,
        amount=amount,
        unit_price_usd=unit_price,
        cost_usd=Decimal(0) if hold else usage_cost(amount, unit_price),
        status=Allocation.Status.HELD if hold else Allocation.Status.COMMITTED,
        task_id=task_id,
        expires_at=expires_at,
        created_at=timezone.now(),  # the wall clock, as auto_now_add would set it, even when ``now`` is given
    )
    return AllocationDraft(
        allocation=allocation, now=now, kind=kind, idempotency_key=idempotency_key, metadata=metadata
    )


@functools.cache
def _allocation_attnames() -> tuple[str, ...]:
    return tuple(field.attname for field in Allocation._meta.concrete_fields)


def _allocation_new(agent: Agent, **values) -> Allocation:
    """``Allocation(**values)`` with its agent cached, built positionally: Django's keyword path costs about
    12 microseconds more per allocation. A field not in ``values`` is None (they are all nullable)."""
    allocation = Allocation(*[values.get(name) for name in _allocation_attnames()])
    Allocation.agent.field.set_cached_value(allocation, agent)
    return allocation


def allocation_write(
    draft: AllocationDraft, *, also_write: Sequence[CompanionRow] = (), requires: Sequence[RequiredRow] = ()
) -> Allocation:
    """Take the quota and write the allocation, its usage row (unless it is a hold) and ``also_write``,
    provided every ``requires`` row exists (else ``RequirementNotMet``).

    On PostgreSQL that is one statement: a conditional UPDATE of the quota (which also requires the agent
    to be active) whose returned row feeds the INSERTs, so it is atomic on its own, needs no transaction
    and costs one round trip; inside a caller's transaction it simply joins it. No row back means the
    agent is not active, the period is not open yet (it is opened and the statement tried once more) or the
    quota would be exceeded; each raises its ``LedgerError`` and nothing is written. Elsewhere (SQLite) the
    same rows are written by one statement each in a transaction.
    """
    allocation = draft.allocation
    rows = [(Allocation, _allocation_values(allocation))]
    if allocation.status == Allocation.Status.COMMITTED:
        rows.append((UsageLog, _usage_values(draft)))
    companions = [(row.model, row.values) for row in also_write]
    db = connections[DEFAULT_DB_ALIAS]
    if db.vendor == "postgresql":
        quota_id = _write_in_one_statement(db, draft, rows=rows, companions=companions, requires=requires)
    else:
        quota_id = _write_in_steps(db, draft, rows=rows, companions=companions, requires=requires)
    allocation.quota_id = quota_id
    allocation._state.adding = False
    allocation._state.db = db.alias
    return allocation


def allocation_create(
    *,
    agent: Agent,
    resource_type_id: str,
    amount: int,
    task_id: str = "",
    hold: bool = False,
    hold_ttl_seconds: int | None = None,
    idempotency_key: str = "",
    kind: str = UsageLog.Kind.ALLOCATION,
    metadata: dict | None = None,
    now: dt.datetime | None = None,
    also_write: Sequence[CompanionRow] = (),
    requires: Sequence[RequiredRow] = (),
) -> Allocation:
    """Commit ``amount`` at once (usage row written) or hold it until settled, released or expired."""
    draft = allocation_prepare(
        agent=agent,
        resource_type_id=resource_type_id,
        amount=amount,
        task_id=task_id,
        hold=hold,
        hold_ttl_seconds=hold_ttl_seconds,
        idempotency_key=idempotency_key,
        kind=kind,
        metadata=metadata,
        now=now,
    )
    return allocation_write(draft, also_write=also_write, requires=requires)


def _allocation_values(allocation: Allocation) -> dict[str, object]:
    return {
        "id": allocation.id,
        "agent_id": allocation.agent_id,
        "resource_type_id": allocation.resource_type_id,
        "amount": allocation.amount,
        "unit_price_usd": allocation.unit_price_usd,
        "cost_usd": allocation.cost_usd,
        "status": allocation.status,
        "task_id": allocation.task_id,
        "expires_at": allocation.expires_at,
        "created_at": allocation.created_at,
    }


def _usage_values(draft: AllocationDraft) -> dict[str, object]:
    allocation = draft.allocation
    return {
        "agent_id": allocation.agent_id,
        "resource_type_id": allocation.resource_type_id,
        "amount": allocation.amount,
        "unit_price_usd": allocation.unit_price_usd,
        "cost_usd": allocation.cost_usd,
        "task_id": allocation.task_id,
        "kind": draft.kind,
        "idempotency_key": draft.idempotency_key,
        "metadata": {"allocation_id": str(allocation.pk), **(draft.metadata or {})},
        "created_at": draft.now,
    }


Rows = list[tuple[type[models.Model], dict[str, object]]]


@functools.cache
def _insert_layout(model: type[models.Model], names: tuple[str, ...]) -> tuple[tuple[str, ...], tuple]:
    opts = model._meta
    fields = tuple(opts.pk if name == "pk" else opts.get_field(name) for name in names)
    return tuple(field.column for field in fields), fields


# On PostgreSQL, ``get_db_prep_save`` hands psycopg a str, an aware datetime, a Decimal or a UUID as it was
# given, and wraps an int in its column's size (``Int8``). The hot path's preparers do the same without
# the dozen calls Django makes per field; every other field (a JSONField's dict, an IP address), every
# value of another type and every other database goes through ``get_db_prep_save``. A test compares the
# parameters with and without the shortcut.
_AS_GIVEN_ON_POSTGRESQL = {
    models.CharField: str,
    models.TextField: str,
    models.DateTimeField: dt.datetime,
    models.DecimalField: Decimal,
    models.UUIDField: uuid.UUID,
}
_INTEGER_SIZES = {
    models.IntegerField: Int4,
    models.BigIntegerField: Int8,
    models.PositiveBigIntegerField: Int8,
}


def _fast_preparer(field: models.Field, vendor: str):
    """``field.get_db_prep_save``, or a preparer that gives the same parameter for the hot path's values
    with fewer calls (``(value, db) -> parameter``)."""
    prepare = field.get_db_prep_save
    if vendor != "postgresql":
        return prepare
    target = field.target_field if isinstance(field, models.ForeignKey) else field
    given = _AS_GIVEN_ON_POSTGRESQL.get(type(target))
    if given is str:  # a str subclass too (a TextChoices member): CharField hands it over as it is
        return lambda value, db: value if value is None or isinstance(value, str) else prepare(value, db)
    if given is not None:
        return lambda value, db: value if value is None or type(value) is given else prepare(value, db)
    if type(field) in _INTEGER_SIZES:
        wrap = _INTEGER_SIZES[type(field)]
        return lambda value, db: wrap(value) if type(value) is int else prepare(value, db)
    return prepare


@functools.cache
def _preparers(model: type[models.Model], names: tuple[str, ...], vendor: str) -> tuple:
    _, fields = _insert_layout(model, names)
    return tuple(_fast_preparer(field, vendor) for field in fields)


def _columns_and_params(db, model: type[models.Model], values: dict[str, object]) -> tuple[tuple, list]:
    """The columns of ``values`` and their values as the database takes them (``get_db_prep_save``)."""
    names = tuple(values)
    columns, _ = _insert_layout(model, names)
    preparers = _preparers(model, names, db.vendor)
    params = [prepare(value, db) for prepare, value in zip(preparers, values.values(), strict=True)]
    return columns, params


_ONE_STATEMENT_TAKE = """WITH taken AS (
    UPDATE quotas SET {counter} = {counter} + %s, spent_usd = spent_usd + %s, updated_at = %s
    WHERE agent_id = %s AND resource_type_id = %s AND period_start = %s
      AND used + reserved + listed + %s <= limit_amount
      AND EXISTS (SELECT 1 FROM ledger_agent WHERE id = quotas.agent_id AND status = 'active'){also}
    RETURNING id
)"""
_one_statement_sql: dict[tuple, str] = {}


def _one_statement(
    db, draft: AllocationDraft, *, rows: Rows, companions: Rows, requires: Sequence[RequiredRow]
) -> tuple[str, list]:
    """The WITH statement: take the quota, then INSERT each row FROM what the UPDATE returned (so only if
    it matched). ``rows`` also get the quota id; ``companions`` do not. The SQL of each shape is built once.
    """
    allocation = draft.allocation
    hold = allocation.status == Allocation.Status.HELD
    period_start, _ = month_bounds(draft.now)
    params = [
        allocation.amount,
        db.ops.adapt_decimalfield_value(allocation.cost_usd, 28, 12),
        db.ops.adapt_datetimefield_value(draft.now),
        allocation.agent_id,
        allocation.resource_type_id,
        db.ops.adapt_datetimefield_value(period_start),
        allocation.amount,
    ]
    shape: list = [hold]
    for required in requires:
        columns, fields = _insert_layout(required.model, tuple(required.filters))
        shape.append(
            (required.model._meta.db_table, columns, tuple(v is None for v in required.filters.values()))
        )
        pairs = zip(fields, required.filters.values(), strict=True)
        params.extend(field.get_db_prep_value(value, db) for field, value in pairs if value is not None)
    conditions = len(shape)
    for with_quota, batch in ((True, rows), (False, companions)):
        for model, values in batch:
            columns, row_params = _columns_and_params(db, model, values)
            shape.append((model._meta.db_table, columns, with_quota))
            params.extend(row_params)
    key = tuple(shape)
    sql = _one_statement_sql.get(key)
    if sql is None:
        quote = db.ops.quote_name
        also = "".join(
            f"\n      AND EXISTS (SELECT 1 FROM {quote(table)} WHERE "
            + " AND ".join(
                f"{quote(column)} IS NULL" if is_null else f"{quote(column)} = %s"
                for column, is_null in zip(columns, nulls, strict=True)
            )
            + ")"
            for table, columns, nulls in shape[1:conditions]
        )
        ctes = [_ONE_STATEMENT_TAKE.format(counter="reserved" if hold else "used", also=also)]
        for index, (table, columns, with_quota) in enumerate(shape[conditions:]):
            names = ", ".join(quote(column) for column in columns) + (", quota_id" if with_quota else "")
            values = ", ".join(["%s"] * len(columns)) + (", taken.id" if with_quota else "")
            ctes.append(f"row_{index} AS (INSERT INTO {quote(table)} ({names}) SELECT {values} FROM taken)")
        sql = _one_statement_sql[key] = ",\n".join(ctes) + "\nSELECT id FROM taken"
    return sql, params


@contextmanager
def prepared_cursor():
    """A cursor for the few statements every request runs (the allocation, the API key lookup).

    On PostgreSQL it binds parameters on the server and prepares each statement on its first execution in
    a connection, so later executions skip parsing and planning (about a third of the server's time on
    the allocation statement). psycopg forgets its prepared statements after any rollback in the connection
    (a refused allocation) and prepares them again on their next use. The rest of the project keeps
    Django's client-side binding, under which some raw SQL (``generate_series(%s, %s)``) would not
    type-check. Queries are logged and errors translated as through ``connection.cursor()``. Needs
    ``prepare_threshold`` in the database OPTIONS (settings.py): without it psycopg prepares nothing.
    """
    db = connections[DEFAULT_DB_ALIAS]
    if db.vendor != "postgresql":
        with db.cursor() as cursor:
            yield cursor
        return
    db.close_if_health_check_failed()
    db.ensure_connection()
    db.validate_thread_sharing()
    raw = _kept_cursor(db)
    # Not closed on the way out (a CursorWrapper's ``with`` would): the next statement reuses it.
    yield db.make_debug_cursor(raw) if db.queries_logged else db.make_cursor(raw)


def _kept_cursor(db):
    """The connection's own preparing cursor, made once per psycopg connection and kept.

    A psycopg cursor learns which dumper each parameter type takes and keeps it; a new cursor per statement
    starts with a fresh copy of the adapters and looks up every dumper again, which cost about 0.1 ms of
    CPU per allocation (27 parameters), a third of the Python time of ``allocation_create``. Django's
    connections belong to one thread, and the statements run through here (one execute, one fetch) do not
    nest, so one cursor per connection is enough. A reconnection makes a new one.
    """
    kept = getattr(db, "_axiom_kept_cursor", None)
    if kept is None or kept.closed or kept.connection is not db.connection:
        kept = db._axiom_kept_cursor = _preparing_cursor_class()(db.connection)
    return kept


@functools.cache
def _preparing_cursor_class() -> type:
    from django.db.backends.postgresql.base import ServerBindingCursor

    class PreparingCursor(ServerBindingCursor):
        def execute(self, query, params=None, *, prepare=None, binary=None):
            return super().execute(query, params, prepare=True, binary=binary)

        def _convert_query(self, query, params=None):
            # Django's query log reads the query back from ``_query``, which psycopg 3.3 leaves unset when it
            # runs a prepared statement: set it, so that logs and CaptureQueriesContext show the SQL.
            converted = super()._convert_query(query, params)
            self._query = converted
            return converted

    return PreparingCursor


def _execute_returning(sql: str, params: list):
    """Run the hot path's statement and return its one row (or None).

    On PostgreSQL, when nothing watches the queries (no query log, no execution wrapper), it runs on the
    kept cursor directly, with the checks ``CursorWrapper.execute`` makes (a usable connection, no broken
    transaction) and its error translation, but without a wrapper object per statement and per call: a few
    microseconds on every allocation. Otherwise it goes through ``prepared_cursor()``, logged and wrapped.
    """
    db = connections[DEFAULT_DB_ALIAS]
    if db.vendor == "postgresql" and not db.queries_logged and not db.execute_wrappers:
        db.close_if_health_check_failed()
        db.ensure_connection()
        db.validate_thread_sharing()
        db.validate_no_broken_transaction()
        cursor = _kept_cursor(db)
        with db.wrap_database_errors:
            cursor.execute(sql, params)
            return cursor.fetchone()
    with prepared_cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchone()


def _write_in_one_statement(
    db, draft: AllocationDraft, *, rows: Rows, companions: Rows, requires: Sequence[RequiredRow]
) -> int:
    sql, params = _one_statement(db, draft, rows=rows, companions=companions, requires=requires)

    def attempt():
        if companions and db.in_atomic_block:
            # A companion may fail (a duplicate idempotency key) and the caller may want to go on with its
            # transaction: give the statement a savepoint. Outside a transaction it is its own.
            with transaction.atomic():
                return _execute_returning(sql, params)
        return _execute_returning(sql, params)

    row = attempt()
    if row is None:
        row = _after_no_row(draft, attempt, requires=requires)
    return row[0]


def _after_no_row(draft: AllocationDraft, attempt, *, requires: Sequence[RequiredRow]):
    """The statement took nothing: refused, or the first allocation of the period. Find out which.

    Reading needs no transaction, and the refusals (a revoked key, an inactive agent, an exceeded quota)
    raise without one: a rollback would also make psycopg forget its prepared statements. Only opening a
    new period writes, in a transaction that rolls it back if the allocation is refused even so.
    """
    allocation = draft.allocation
    _ensure_required(requires)
    agent = _agent_ready_to_allocate(allocation.agent_id)
    period_start, _ = month_bounds(draft.now)
    quota = Quota.objects.filter(
        agent_id=allocation.agent_id, resource_type_id=allocation.resource_type_id, period_start=period_start
    ).first()
    if quota is not None:
        if quota.available >= allocation.amount:  # freed, or opened, since the statement ran
            row = attempt()
            if row is not None:
                return row
            quota.refresh_from_db()
        raise _quota_exceeded(quota, requested=allocation.amount)
    with transaction.atomic():
        quota = quota_open(agent=agent, resource_type_id=allocation.resource_type_id, at=draft.now)
        row = attempt()
        if row is None:
            raise _quota_exceeded(quota, requested=allocation.amount)
    return row


def _write_in_steps(
    db, draft: AllocationDraft, *, rows: Rows, companions: Rows, requires: Sequence[RequiredRow]
) -> int:
    allocation = draft.allocation
    quote = db.ops.quote_name
    with transaction.atomic():
        _ensure_required(requires)
        agent = _agent_ready_to_allocate(allocation.agent_id)
        quota_id = _take(
            agent=agent,
            resource_type_id=allocation.resource_type_id,
            amount=allocation.amount,
            cost=allocation.cost_usd,
            hold=allocation.status == Allocation.Status.HELD,
            now=draft.now,
        )
        with db.cursor() as cursor:
            for with_quota, batch in ((True, rows), (False, companions)):
                for model, values in batch:
                    columns, params = _columns_and_params(db, model, values)
                    if with_quota:
                        columns, params = [*columns, "quota_id"], [*params, quota_id]
                    cursor.execute(
                        f"INSERT INTO {quote(model._meta.db_table)} "
                        f"({', '.join(quote(column) for column in columns)}) "
                        f"VALUES ({', '.join(['%s'] * len(columns))})",
                        params,
                    )
    return quota_id


def _ensure_required(requires: Sequence[RequiredRow]) -> None:
    for required in requires:
        if not required.model._base_manager.filter(**required.filters).exists():
            raise RequirementNotMet(
                f"a {required.model._meta.verbose_name} this allocation requires is gone",
                details={"requires": required.model._meta.label},
            )


def _agent_ready_to_allocate(agent_id: str) -> Agent:
    """The agent as the database has it now; raises unless it is active."""
    agent = Agent.objects.filter(pk=agent_id).first()
    if agent is None:
        raise NotFound(f"agent {agent_id!r} not found")
    _ensure_can_allocate(agent)
    return agent


def _quota_exceeded(quota: Quota, *, requested: int) -> QuotaExceeded:
    available = max(quota.available, 0)
    return QuotaExceeded(
        f"{requested:,} {quota.resource_type_id} requested, {available:,} available",
        details={"resource_type": quota.resource_type_id, "requested": requested, "available": available},
    )


def _usage_write(
    allocation: Allocation,
    *,
    amount: int,
    kind: str,
    idempotency_key: str,
    metadata: dict | None,
    at: dt.datetime,
) -> UsageLog:
    return UsageLog.objects.create(
        agent_id=allocation.agent_id,
        resource_type_id=allocation.resource_type_id,
        quota_id=allocation.quota_id,
        amount=amount,
        unit_price_usd=allocation.unit_price_usd,
        cost_usd=usage_cost(amount, allocation.unit_price_usd),
        task_id=allocation.task_id,
        kind=kind,
        idempotency_key=idempotency_key,
        metadata={"allocation_id": str(allocation.pk), **(metadata or {})},
        created_at=at,
    )


def _open_hold(
    *, agent: Agent, allocation_id, settling: bool = False, now: dt.datetime | None = None
) -> Allocation:
    allocation = Allocation.objects.filter(pk=allocation_id, agent=agent).first()
    if allocation is None:
        raise NotFound(f"allocation {allocation_id} not found")
    if (
        settling
        and allocation.status == Allocation.Status.HELD
        and allocation.expires_at <= (now or timezone.now())
    ):
        # Past its TTL a hold is as good as released, even before the sweep gets to it.
        raise Conflict(
            f"allocation {allocation_id} expired at {allocation.expires_at:%Y-%m-%d %H:%M:%S}Z",
            code="hold_not_open",
            details={"status": "expired"},
        )
    if allocation.status != Allocation.Status.HELD:
        raise Conflict(
            f"allocation {allocation_id} is {allocation.status}, not an open hold",
            code="hold_not_open",
            details={"status": allocation.status},
        )
    return allocation


def hold_settle(
    *, agent: Agent, allocation_id, amount: int, idempotency_key: str = "", now: dt.datetime | None = None
) -> Allocation:
    """Settle a hold at the ``amount`` actually used, charged at the price quoted when it was held.

    Less than the hold: the rest goes back. More: the difference must be available, else ``QuotaExceeded``
    and the hold stays as it was. The hold is claimed with a conditional UPDATE, so a settle racing a
    release or the expiry sweep takes effect at most once.
    """
    _ensure_amount(amount, allow_zero=True)
    now = now or timezone.now()
    allocation = _open_hold(agent=agent, allocation_id=allocation_id, settling=True, now=now)
    held = allocation.amount
    with transaction.atomic():
        claimed = Allocation.objects.filter(pk=allocation.pk, status=Allocation.Status.HELD).update(
            status=Allocation.Status.SETTLED,
            settled_amount=amount,
            cost_usd=usage_cost(amount, allocation.unit_price_usd),
            finished_at=now,
        )
        if not claimed:
            raise Conflict(f"allocation {allocation.pk} is no longer an open hold", code="hold_not_open")
        extra = amount - held
        updated = Quota.objects.filter(
            pk=allocation.quota_id, limit__gte=F("used") + F("reserved") + F("listed") + extra
        ).update(
            reserved=F("reserved") - held,
            used=F("used") + amount,
            spent_usd=F("spent_usd") + usage_cost(amount, allocation.unit_price_usd),
            updated_at=now,
        )
        if not updated:
            quota = Quota.objects.get(pk=allocation.quota_id)
            raise QuotaExceeded(
                f"settling {amount:,} needs {extra:,} more {allocation.resource_type_id} than held; "
                f"{max(quota.available, 0):,} available",
                details={
                    "resource_type": allocation.resource_type_id,
                    "requested": extra,
                    "available": max(quota.available, 0),
                    "held": held,
                },
            )
        if amount:
            _usage_write(
                allocation,
                amount=amount,
                kind=UsageLog.Kind.SETTLEMENT,
                idempotency_key=idempotency_key,
                metadata=None,
                at=now,
            )
    allocation.refresh_from_db()
    return allocation


def hold_release(*, agent: Agent, allocation_id, now: dt.datetime | None = None) -> Allocation:
    """Give an open hold back in full."""
    now = now or timezone.now()
    allocation = _open_hold(agent=agent, allocation_id=allocation_id)
    with transaction.atomic():
        claimed = Allocation.objects.filter(pk=allocation.pk, status=Allocation.Status.HELD).update(
            status=Allocation.Status.RELEASED, finished_at=now
        )
        if not claimed:
            raise Conflict(f"allocation {allocation.pk} is no longer an open hold", code="hold_not_open")
        Quota.objects.filter(pk=allocation.quota_id).update(
            reserved=F("reserved") - allocation.amount, updated_at=now
        )
    allocation.refresh_from_db()
    return allocation


def holds_expire(*, now: dt.datetime | None = None, batch_size: int = 5000) -> int:
    """Release every hold past its expiry. Set-based: a few queries per batch of holds, however many agents.

    Rows are locked with SKIP LOCKED, so a settle in flight keeps its hold and a second sweep running at the
    same time takes other rows; running it twice releases nothing twice.
    """
    now = now or timezone.now()
    expired_total = 0
    while True:
        with transaction.atomic():
            holds = list(
                Allocation.objects.select_for_update(skip_locked=True)
                .filter(status=Allocation.Status.HELD, expires_at__lte=now)
                .order_by("quota_id", "pk")
                .values_list("pk", "quota_id", "amount")[:batch_size]
            )
            if not holds:
                return expired_total
            Allocation.objects.filter(pk__in=[pk for pk, _, _ in holds]).update(
                status=Allocation.Status.EXPIRED, finished_at=now
            )
            per_quota: dict[int, int] = {}
            for _, quota_id, amount in holds:
                per_quota[quota_id] = per_quota.get(quota_id, 0) + amount
            bulk_update_column(
                model=Quota,
                field="reserved",
                values={pk: -total for pk, total in per_quota.items()},
                add=True,
                touch=now,
            )
            expired_total += len(holds)
        if len(holds) < batch_size:
            return expired_total


def quota_share(*, source: Agent, target: Agent, resource_type_id: str, amount: int, actor: str) -> dict:
    """Move unused quota of the current period from ``source`` to ``target``, as grants on both sides.

    Both quota rows are locked in primary-key order, so two agents sharing with each other at once cannot
    deadlock; the source can give only what it has available.
    """
    if not settings.ENABLE_COLLABORATION_SHARING:
        raise FeatureDisabled("resource sharing is switched off (ENABLE_COLLABORATION_SHARING)")
    _ensure_resource_type(resource_type_id)
    _ensure_amount(amount)
    if source.pk == target.pk:
        raise LedgerError("an agent cannot share with itself", code="invalid_target")
    if source.status == Agent.Status.SUSPENDED:
        raise AgentSuspended(f"agent {source.id} is suspended")
    if target.status == Agent.Status.SUSPENDED:
        raise LedgerError(f"target agent {target.id} is suspended", code="target_suspended", status=409)
    now = timezone.now()
    with transaction.atomic():
        # Open (insert) and lock the two periods in agent-id order: two agents sharing with each other at
        # once then wait for one another instead of deadlocking, also inside a caller's transaction.
        opened = {
            agent.pk: quota_open(agent=agent, resource_type_id=resource_type_id, at=now)
            for agent in sorted((source, target), key=lambda a: a.pk)
        }
        source_quota, target_quota = opened[source.pk], opened[target.pk]
        locked = {
            quota.pk: quota
            for quota in Quota.objects.select_for_update()
            .filter(pk__in=[source_quota.pk, target_quota.pk])
            .order_by("agent_id")
        }
        source_quota = locked[source_quota.pk]
        if amount > source_quota.available:
            raise QuotaExceeded(
                f"{source.id} has {max(source_quota.available, 0):,} {resource_type_id} unused, "
                f"{amount:,} asked",
                details={
                    "resource_type": resource_type_id,
                    "requested": amount,
                    "available": max(source_quota.available, 0),
                },
            )
        Quota.objects.filter(pk=source_quota.pk).update(limit=F("limit") - amount, updated_at=now)
        Quota.objects.filter(pk=target_quota.pk).update(limit=F("limit") + amount, updated_at=now)
        Grant.objects.bulk_create(
            [
                Grant(
                    quota_id=source_quota.pk,
                    amount=-amount,
                    reason=Grant.Reason.SHARE_OUT,
                    actor=actor,
                    counterparty_agent=target,
                ),
                Grant(
                    quota_id=target_quota.pk,
                    amount=amount,
                    reason=Grant.Reason.SHARE_IN,
                    actor=actor,
                    counterparty_agent=source,
                ),
            ]
        )
    return {
        "resource_type": resource_type_id,
        "amount": amount,
        "source_agent_id": source.id,
        "target_agent_id": target.id,
        "source_available": source_quota.available - amount,
    }


# --- Reading ---------------------------------------------------------------------------------------------


def agent_quotas(*, agent: Agent) -> list[Quota]:
    """The current period's quota of every resource type, opening the ones not used yet."""
    return quotas_open_all(agent=agent)


def agent_cost(*, agent: Agent, now: dt.datetime | None = None) -> dict:
    """This period's spend by resource type, the total, and how much of the monthly budget it is."""
    now = now or timezone.now()
    start, end = month_bounds(now)
    # The quota rows cache each period's spend (updated in the same statement as every charge), so this is
    # one indexed read of five rows instead of a scan of the period's usage log.
    by_type = dict(
        Quota.objects.filter(agent=agent, period_start=start).values_list("resource_type_id", "spent_usd")
    )
    ordered = list(ResourceType.objects.values_list("code", flat=True))
    zero = Decimal(0).quantize(COST_QUANTUM)
    spend = {code: by_type.get(code, zero).quantize(COST_QUANTUM) for code in ordered}
    total = sum(spend.values(), zero)
    budget = agent.monthly_budget_usd
    return {
        "agent_id": agent.id,
        "period_start": start,
        "period_end": end,
        "by_resource_type": spend,
        "total_usd": total,
        "monthly_budget_usd": budget,
        "budget_utilization_percent": percent(total, budget),
    }


__all__ = [
    "MAX_AMOUNT",
    "AllocationDraft",
    "CompanionRow",
    "QuotaCheck",
    "RequiredRow",
    "RequirementNotMet",
    "agent_cost",
    "agent_quotas",
    "allocation_create",
    "allocation_prepare",
    "allocation_write",
    "hold_release",
    "hold_settle",
    "holds_expire",
    "quota_check",
    "quota_share",
]

"""The allocation hot path's SQL: two PostgreSQL functions, created by migrations, and the calls to them.

What it buys: an allocation is one round trip. ``SELECT grid_allocate(...)`` checks the agent and the
caller's API key, writes the request's idempotency and audit records, the allocation and its usage row, and
takes the quota, atomically on its own (autocommit) or inside a caller's transaction. PL/pgSQL plans each
statement inside a function once per connection, and the call itself binds its parameters on the server
(``ledger.bulk.server_bound_cursor``), so psycopg prepares it after a few uses: no quoting of seventeen
values in Python and no parse or plan in PostgreSQL per allocation.

The order inside ``grid_allocate`` matters under load. The conditional UPDATE of the quota row comes last:
the row lock it takes is held until COMMIT, and every allocation of one agent and resource waits for it, so
nothing else is written while it is held. The idempotency record comes first: a duplicate request waits on
its unique index for the first one to commit, then fails there and is answered with the stored response,
before it has taken anything.

A refusal raises a PostgreSQL error with one of the ``GR...`` SQLSTATEs below; ``allocate`` turns it into
the grid's ``LedgerError``. Nothing is written then: the statement (or the savepoint around it) is undone.

When a function's text changes here, add a migration that runs ``FUNCTIONS_SQL`` again;
``tests/test_hot_path.py`` fails while the database's function differs from this text.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal

from django.core.serializers.json import DjangoJSONEncoder
from django.db import DatabaseError, connection, transaction

from ledger.bulk import server_bound_cursor
from ledger.errors import BudgetExceeded, LedgerError, NotFound, RunEnded, RunNotFound
from ledger.invariants import (
    AGENT_MAY_ALLOCATE_SQL,
    BUDGET_CARRY_SQL,
    QUOTA_AVAILABLE_SQL,
    agent_refusal,
    budget_room_sql,
    quota_fits_sql,
)
from ledger.periods import WINDOW_BOUNDS_SQL

AGENT_NOT_FOUND = "GR404"
AGENT_MAY_NOT_ALLOCATE = "GR403"
KEY_REVOKED = "GR401"
PERIOD_NOT_OPEN = "GR409"
QUOTA_EXCEEDED = "GR429"
BUDGET_EXCEEDED = "GR402"
RUN_NOT_FOUND = "GRR04"
RUN_ENDED = "GRR10"

# Budgets in the order every writer locks them: by ascending id, before any quota row. A writer that takes
# several budgets (an agent's, its team's, its organization's and its run's) and then a quota therefore
# never waits for a lock held by one that waits for its own.
BUDGETS_FUNCTION_SQL = f"""
CREATE OR REPLACE FUNCTION grid_budgets_apply(
    p_ids bigint[], p_now timestamptz, p_spend numeric, p_reserve numeric, p_release numeric
) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
    -- What the call adds to each budget's spent plus reserved: only an increase must fit.
    v_net numeric := p_spend + p_reserve - p_release;
    b record;
    w record;
    v_unused numeric;
BEGIN
    IF p_ids IS NULL OR cardinality(p_ids) = 0 THEN
        RETURN;
    END IF;
    FOR b IN
        SELECT id, scope, organization_id, team_id, agent_id, run_id, budget_window, mode, limit_usd,
               rollover_percent, window_start, window_end, spent_usd, reserved_usd, rollover_usd
        FROM ledger_budget WHERE id = ANY(p_ids) ORDER BY id FOR NO KEY UPDATE
    LOOP
        IF b.window_end IS NOT NULL AND p_now >= b.window_end THEN
            -- The window has ended: open the one containing now, with the rollover.
            w := grid_budget_window(b.budget_window, p_now);
            v_unused := CASE WHEN b.window_end = w.window_start
                             THEN {budget_room_sql("b")}
                             ELSE b.limit_usd - b.reserved_usd END;
            b.rollover_usd := {
    BUDGET_CARRY_SQL.format(unused="v_unused", limit="b.limit_usd", percent="b.rollover_percent")
};
            b.spent_usd := 0;
            b.window_start := w.window_start;
            b.window_end := w.window_end;
            UPDATE ledger_budget
            SET window_start = b.window_start, window_end = b.window_end, spent_usd = 0,
                rollover_usd = b.rollover_usd
            WHERE id = b.id;
        END IF;
        IF v_net > 0 AND b.mode = 'hard' AND {budget_room_sql("b")} < v_net THEN
            RAISE EXCEPTION USING ERRCODE = '{BUDGET_EXCEEDED}', MESSAGE = 'budget exceeded',
                DETAIL = jsonb_build_object(
                    'budget_id', b.id,
                    'scope', b.scope,
                    'scope_id', CASE b.scope WHEN 'organization' THEN b.organization_id
                                             WHEN 'team' THEN b.team_id
                                             WHEN 'run' THEN b.run_id
                                             ELSE b.agent_id END,
                    'window', b.budget_window,
                    'window_start', b.window_start,
                    'window_end', b.window_end,
                    'limit_usd', b.limit_usd,
                    'rollover_usd', b.rollover_usd,
                    'spent_usd', b.spent_usd,
                    'reserved_usd', b.reserved_usd,
                    'requested_usd', v_net
                )::text;
        END IF;
    END LOOP;
    UPDATE ledger_budget
    SET spent_usd = spent_usd + p_spend, reserved_usd = reserved_usd + p_reserve - p_release,
        updated_at = p_now
    WHERE id = ANY(p_ids);
END
$fn$;

CREATE OR REPLACE FUNCTION grid_scope_budgets(
    p_agent_id text, p_team text, p_organization text, p_run_id text, p_now timestamptz
) RETURNS bigint[]
LANGUAGE plpgsql STABLE AS $fn$
DECLARE
    v_ids bigint[];
    v_run_found boolean;
    v_run_ended boolean;
BEGIN
    -- Every budget a call by the agent (of team p_team in p_organization, naming run p_run_id or '' for
    -- none) must fit in, in lock order: one index lookup per scope.
    SELECT array_agg(b.id ORDER BY b.id) FILTER (WHERE b.scope <> 'run' OR b.expires_at > p_now),
           coalesce(bool_or(b.scope = 'run'), false),
           coalesce(bool_or(b.scope = 'run' AND b.expires_at <= p_now), false)
    INTO v_ids, v_run_found, v_run_ended
    FROM (
        SELECT id, scope, expires_at FROM ledger_budget WHERE scope = 'agent' AND agent_id = p_agent_id
        UNION ALL
        SELECT id, scope, expires_at FROM ledger_budget
        WHERE scope = 'run' AND agent_id = p_agent_id AND run_id = p_run_id AND p_run_id <> ''
        UNION ALL
        SELECT id, scope, expires_at FROM ledger_budget WHERE scope = 'team' AND team_id = p_team
        UNION ALL
        SELECT id, scope, expires_at FROM ledger_budget
        WHERE scope = 'organization' AND organization_id = p_organization
    ) AS b;
    IF p_run_id <> '' AND NOT v_run_found THEN
        RAISE EXCEPTION USING ERRCODE = '{RUN_NOT_FOUND}', MESSAGE = 'run not found', DETAIL = p_run_id;
    END IF;
    IF v_run_ended THEN
        RAISE EXCEPTION USING ERRCODE = '{RUN_ENDED}', MESSAGE = 'run ended', DETAIL = p_run_id;
    END IF;
    RETURN v_ids;
END
$fn$;

CREATE OR REPLACE FUNCTION grid_agent_budgets(p_agent_id text, p_run_id text, p_now timestamptz)
RETURNS bigint[]
LANGUAGE plpgsql STABLE AS $fn$
DECLARE
    v_team text;
    v_organization text;
BEGIN
    -- grid_scope_budgets for a caller that has not read the agent's team (grid_allocate has).
    SELECT a.team_id, t.organization_id INTO v_team, v_organization
    FROM ledger_agent a LEFT JOIN ledger_team t ON t.id = a.team_id
    WHERE a.id = p_agent_id;
    RETURN grid_scope_budgets(p_agent_id, v_team, v_organization, p_run_id, p_now);
END
$fn$;
"""

RECORD_FUNCTION_SQL = """
CREATE OR REPLACE FUNCTION grid_mutation_record(p_record jsonb) RETURNS void
LANGUAGE plpgsql AS $fn$
BEGIN
    -- The one writer of a request's idempotency record (the response to replay) and audit record.
    -- 'idempotency' is one record, or an array of them (a batch's items).
    IF p_record ? 'idempotency' THEN
        INSERT INTO allocation_idempotencyrecord
            (principal, agent_id, key, method, path, request_hash, response_status, response_body, created_at)
        SELECT principal, agent_id, key, method, path, request_hash, response_status, response_body,
               created_at
        FROM jsonb_populate_recordset(
            NULL::allocation_idempotencyrecord,
            CASE jsonb_typeof(p_record -> 'idempotency')
                WHEN 'array' THEN p_record -> 'idempotency'
                ELSE jsonb_build_array(p_record -> 'idempotency')
            END
        );
    END IF;
    IF p_record ? 'audit' THEN
        INSERT INTO allocation_auditrecord
            (actor, action, agent_id, method, path, request_body, idempotency_key, status_code, outcome,
             client_address, created_at)
        SELECT actor, action, agent_id, method, path, request_body, idempotency_key, status_code, outcome,
               client_address, created_at
        FROM jsonb_populate_record(NULL::allocation_auditrecord, p_record -> 'audit');
    END IF;
END
$fn$;
"""

ALLOCATE_FUNCTION_SQL = f"""
CREATE OR REPLACE FUNCTION grid_allocate(
    p_agent_id text,
    p_resource_type text,
    p_period_start timestamptz,
    p_amount bigint,
    p_hold boolean,
    p_now timestamptz,
    p_allocation_id uuid,
    p_unit_price numeric,
    p_cost numeric,
    p_task_id text,
    p_expires_at timestamptz,
    p_created_at timestamptz,
    p_usage_kind text,
    p_usage_key text,
    p_usage_metadata jsonb,
    p_api_key_id bigint,
    p_record jsonb,
    p_run_id text,
    p_quoted_cost numeric
) RETURNS bigint
LANGUAGE plpgsql AS $fn$
DECLARE
    v_status text;
    v_reason text;
    v_may_allocate boolean;
    v_quota bigint;
    v_available bigint;
    v_budgets bigint[];
    v_team text;
    v_organization text;
BEGIN
    SELECT status, status_reason, {AGENT_MAY_ALLOCATE_SQL}, team_id,
           (SELECT t.organization_id FROM ledger_team t WHERE t.id = ledger_agent.team_id)
    INTO v_status, v_reason, v_may_allocate, v_team, v_organization
    FROM ledger_agent WHERE id = p_agent_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = '{AGENT_NOT_FOUND}', MESSAGE = 'agent not found';
    END IF;
    IF NOT v_may_allocate THEN
        RAISE EXCEPTION USING ERRCODE = '{AGENT_MAY_NOT_ALLOCATE}', MESSAGE = v_status, DETAIL = v_reason;
    END IF;
    IF p_api_key_id IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM allocation_apikey WHERE id = p_api_key_id AND revoked_at IS NULL) THEN
        RAISE EXCEPTION USING ERRCODE = '{KEY_REVOKED}', MESSAGE = 'API key revoked';
    END IF;
    SELECT id INTO v_quota FROM quotas
    WHERE agent_id = p_agent_id AND resource_type_id = p_resource_type AND period_start = p_period_start;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = '{PERIOD_NOT_OPEN}', MESSAGE = 'quota period not open';
    END IF;
    v_budgets := grid_scope_budgets(p_agent_id, v_team, v_organization, p_run_id, p_now);

    -- Check the new rows' quota keys as each INSERT ends, not at COMMIT: not while the quota row is locked.
    SET CONSTRAINTS allocation_allocation_quota_identity_fk, usage_logs_quota_identity_period_fk IMMEDIATE;
    IF p_record IS NOT NULL THEN
        PERFORM grid_mutation_record(p_record);
    END IF;
    INSERT INTO allocation_allocation
        (id, agent_id, resource_type_id, quota_id, amount, unit_price_usd, cost_usd, status, task_id,
         expires_at, created_at, run_id, budget_ids)
    VALUES
        (p_allocation_id, p_agent_id, p_resource_type, v_quota, p_amount, p_unit_price, p_cost,
         CASE WHEN p_hold THEN 'held' ELSE 'committed' END, p_task_id, p_expires_at, p_created_at, p_run_id,
         coalesce(v_budgets, '{{}}'));
    IF NOT p_hold THEN
        INSERT INTO usage_logs
            (agent_id, resource_type_id, quota_id, amount, unit_price_usd, cost_usd, task_id, kind,
             idempotency_key, metadata, created_at, period_start)
        VALUES
            (p_agent_id, p_resource_type, v_quota, p_amount, p_unit_price, p_cost, p_task_id, p_usage_kind,
             p_usage_key, p_usage_metadata, p_now, p_period_start);
    END IF;

    -- Last, the locks held to COMMIT: the budgets (a hold reserves its quoted cost), then the quota.
    IF v_budgets IS NOT NULL THEN
        PERFORM grid_budgets_apply(
            v_budgets, p_now,
            CASE WHEN p_hold THEN 0 ELSE p_cost END, CASE WHEN p_hold THEN p_quoted_cost ELSE 0 END, 0
        );
    END IF;
    UPDATE quotas
    SET used = used + CASE WHEN p_hold THEN 0 ELSE p_amount END,
        reserved = reserved + CASE WHEN p_hold THEN p_amount ELSE 0 END,
        spent_usd = spent_usd + p_cost,
        updated_at = p_now
    WHERE id = v_quota AND agent_id = p_agent_id AND {quota_fits_sql("p_amount")};
    IF NOT FOUND THEN
        SELECT {QUOTA_AVAILABLE_SQL} INTO v_available
        FROM quotas WHERE id = v_quota AND agent_id = p_agent_id;
        RAISE EXCEPTION USING ERRCODE = '{QUOTA_EXCEEDED}', MESSAGE = 'quota exceeded',
            DETAIL = v_available::text;
    END IF;
    RETURN v_quota;
END
$fn$;
"""

FUNCTIONS_SQL = WINDOW_BOUNDS_SQL + RECORD_FUNCTION_SQL + BUDGETS_FUNCTION_SQL + ALLOCATE_FUNCTION_SQL
# The functions ``FUNCTIONS_SQL`` defines, by name and argument types (a test compares their text).
FUNCTION_SIGNATURES = {
    "grid_budget_window": "text, timestamptz",
    "grid_mutation_record": "jsonb",
    "grid_budgets_apply": "bigint[], timestamptz, numeric, numeric, numeric",
    "grid_scope_budgets": "text, text, text, text, timestamptz",
    "grid_agent_budgets": "text, text, timestamptz",
    "grid_allocate": "text, text, timestamptz, bigint, boolean, timestamptz, uuid, numeric, numeric, text, "
    "timestamptz, timestamptz, text, text, jsonb, bigint, jsonb, text, numeric",
}
# grid_allocate before budgets: a different signature is another function, so it is dropped by name.
PREVIOUS_ALLOCATE_DROP_SQL = """
DROP FUNCTION IF EXISTS grid_allocate(text, text, timestamptz, bigint, boolean, timestamptz, uuid, numeric,
    numeric, text, timestamptz, timestamptz, text, text, jsonb, bigint, jsonb);
"""
DROP_FUNCTIONS_SQL = "".join(
    f"DROP FUNCTION IF EXISTS {name}({arguments});\n" for name, arguments in FUNCTION_SIGNATURES.items()
)

_ALLOCATE_CALL = "SELECT grid_allocate(" + ", ".join(["%s"] * 19) + ")"
_BUDGETS_APPLY_CALL = "SELECT grid_budgets_apply(%s, %s, %s, %s, %s)"
_AGENT_BUDGETS_CALL = "SELECT grid_agent_budgets(%s, %s, %s)"
_RECORD_CALL = "SELECT grid_mutation_record(%s::jsonb)"

_JSON = DjangoJSONEncoder(separators=(",", ":"))


class KeyRevoked(LedgerError):
    code = "api_key_revoked"
    status = 401


class PeriodNotOpen(LedgerError):
    """The quota period has no row yet: open it (``ledger.services.quotas_open``) and try again."""

    code = "period_not_open"
    status = 409


class QuotaShort(LedgerError):
    """The quota has ``available`` units, fewer than asked; the caller words the refusal."""

    code = "quota_exceeded"
    status = 429

    def __init__(self, available: int):
        super().__init__("quota exceeded")
        self.available = available


@dataclass(frozen=True)
class AllocationRow:
    """Everything ``grid_allocate`` writes, in its parameters' order."""

    agent_id: str
    resource_type_id: str
    period_start: dt.datetime
    amount: int
    hold: bool
    now: dt.datetime
    allocation_id: object
    unit_price_usd: Decimal
    cost_usd: Decimal
    task_id: str
    expires_at: dt.datetime | None
    created_at: dt.datetime
    usage_kind: str
    usage_idempotency_key: str
    usage_metadata: dict
    api_key_id: int | None
    record: dict | None
    run_id: str = ""
    quoted_cost_usd: Decimal = Decimal(0)  # a hold's cost at its quoted price: what it reserves on budgets


def json_text(value) -> str:
    return _JSON.encode(value)


def allocate(row: AllocationRow) -> int:
    """Run ``grid_allocate`` for ``row``; the quota id, or the refusal as a ``LedgerError``.

    Inside a transaction it runs in a savepoint, so a refusal leaves the caller's transaction usable;
    in autocommit it is its own transaction.
    """
    params = [
        row.agent_id,
        row.resource_type_id,
        row.period_start,
        row.amount,
        row.hold,
        row.now,
        row.allocation_id,
        row.unit_price_usd,
        row.cost_usd,
        row.task_id,
        row.expires_at,
        row.created_at,
        row.usage_kind,
        row.usage_idempotency_key,
        json_text(row.usage_metadata),
        row.api_key_id,
        None if row.record is None else json_text(row.record),
        row.run_id,
        row.quoted_cost_usd,
    ]
    try:
        if connection.in_atomic_block:
            with transaction.atomic():
                return _fetch_one(_ALLOCATE_CALL, params, server_bound=True)
        return _fetch_one(_ALLOCATE_CALL, params, server_bound=True)
    except DatabaseError as exc:
        refusal = _refusal(exc, row)
        if refusal is None:
            raise
        raise refusal from exc


def budgets_apply(
    budget_ids: list[int],
    *,
    now: dt.datetime,
    spend: Decimal = Decimal(0),
    reserve: Decimal = Decimal(0),
    release: Decimal = Decimal(0),
) -> None:
    """Charge budgets outside an allocation (a settlement, a release, a purchase): lock them in id order,
    roll ended windows, and refuse with ``BudgetExceeded`` if what is added does not fit a hard one.
    Inside a transaction it runs in a savepoint; call it before locking any quota row."""
    if not budget_ids:
        return
    params = [list(budget_ids), now, spend, reserve, release]
    try:
        with transaction.atomic():
            _fetch_one(_BUDGETS_APPLY_CALL, params)
    except DatabaseError as exc:
        refusal = _budget_refusal(exc)
        if refusal is None:
            raise
        raise refusal from exc


def budgets_release(amounts: dict[int, Decimal], *, now: dt.datetime, also_lock: Iterable[int] = ()) -> None:
    """Give back what holds reserved (budget id -> dollars), many budgets at once: the expiry sweep's
    form of ``budgets_apply``. Locks the rows in id order first, like every writer of budgets, together
    with the rows ``also_lock`` names, which the caller charges next."""
    locked = sorted(set(amounts).union(also_lock))
    if not locked:
        return
    ids = sorted(amounts)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT id FROM ledger_budget WHERE id = ANY(%s) ORDER BY id FOR NO KEY UPDATE", [locked]
        )
        if not ids:
            return
        cursor.execute(
            "UPDATE ledger_budget AS b SET reserved_usd = b.reserved_usd - d.amount, updated_at = %s "
            "FROM unnest(%s::bigint[], %s::numeric[]) AS d(id, amount) WHERE b.id = d.id",
            [now, ids, [amounts[budget_id] for budget_id in ids]],
        )


def agent_budget_ids(agent_id: str, *, run_id: str = "", now: dt.datetime) -> list[int]:
    """The budgets a call by the agent (naming ``run_id``, if any) must fit in, in lock order; a run that
    does not exist or has ended refuses the call."""
    try:
        with transaction.atomic():
            return _fetch_one(_AGENT_BUDGETS_CALL, [agent_id, run_id, now]) or []
    except DatabaseError as exc:
        refusal = _budget_refusal(exc)
        if refusal is None:
            raise
        raise refusal from exc


def mutation_record_write(record: dict) -> None:
    """Write a request's idempotency and/or audit record (``{"idempotency": {...}, "audit": {...}}``;
    a batch gives its items' idempotency records as a list). A key stored before fails on its unique index
    (``IntegrityError``)."""
    _fetch_one(_RECORD_CALL, [json_text(record)])


def _fetch_one(sql: str, params: list, *, server_bound: bool = False):
    # The allocation's call binds its parameters on the server, so psycopg prepares it after a few uses
    # (``prepare_threshold``): no quoting of 17 values in Python, no parse and plan in PostgreSQL.
    with server_bound_cursor() if server_bound else connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchone()[0]


def _budget_refusal(exc: DatabaseError) -> LedgerError | None:
    diag = getattr(exc.__cause__, "diag", None)
    state = getattr(diag, "sqlstate", None)
    if state == BUDGET_EXCEEDED:
        return BudgetExceeded.from_detail(json.loads(diag.message_detail))
    if state == RUN_NOT_FOUND:
        return RunNotFound(diag.message_detail)
    if state == RUN_ENDED:
        return RunEnded(diag.message_detail)
    return None


def _refusal(exc: DatabaseError, row: AllocationRow) -> LedgerError | None:
    budget = _budget_refusal(exc)
    if budget is not None:
        return budget
    diag = getattr(exc.__cause__, "diag", None)
    state = getattr(diag, "sqlstate", None)
    if state == QUOTA_EXCEEDED:
        return QuotaShort(int(diag.message_detail))
    if state == PERIOD_NOT_OPEN:
        return PeriodNotOpen("quota period not open")
    if state == AGENT_MAY_NOT_ALLOCATE:
        return agent_refusal(
            agent_id=row.agent_id, status=diag.message_primary, reason=diag.message_detail or ""
        )
    if state == KEY_REVOKED:
        return KeyRevoked("invalid or revoked API key")
    if state == AGENT_NOT_FOUND:
        return NotFound(f"agent {row.agent_id!r} not found")
    return None


# --- Batches ------------------------------------------------------------------------------------------------
#
# A batch's rows go to PostgreSQL as one array per column (``unnest``), each array one text parameter (an
# array literal, ``text_array``) bound on the server: no JSON to build in Python nor to take apart in
# PostgreSQL, no placeholder per value, and no Python call per value (psycopg dumps a list element by
# element in Python). What every row of a batch shares (the time, the period, the status) is one parameter.
# Rows are inserted in quota order: each quota's rows land side by side in the indexes that lead with the
# agent.


def text_array(values: list[str]) -> str:
    """``values`` as a PostgreSQL array literal, every element quoted. One join when no value holds a double
    quote or a backslash (a batch's ids, keys and amounts), else each value escaped."""
    text = '","'.join(values)
    if text.count('"') != 2 * max(len(values) - 1, 0) or "\\" in text:
        text = '","'.join(value.replace("\\", "\\\\").replace('"', '\\"') for value in values)
    return '{"' + text + '"}' if values else "{}"


def int_array(values: list[int]) -> str:
    """``values`` (integers) as a PostgreSQL array literal."""
    return "{" + ",".join(map(str, values)) + "}"


_BATCH_ALLOCATIONS_SQL = """INSERT INTO "allocation_allocation"
    (id, agent_id, resource_type_id, quota_id, amount, unit_price_usd, cost_usd, task_id, run_id, budget_ids,
     status, created_at)
SELECT v.id::uuid, v.agent_id, v.resource_type_id, v.quota_id, v.amount, v.unit_price_usd::numeric,
       v.cost_usd::numeric, v.task_id, v.run_id, v.budget_ids::bigint[], 'committed', %(at)s
FROM unnest(%(ids)s::text[], %(agent_ids)s::text[], %(resource_type_ids)s::text[], %(quota_ids)s::bigint[],
            %(amounts)s::bigint[], %(unit_prices)s::text[], %(costs)s::text[], %(task_ids)s::text[],
            %(run_ids)s::text[], %(budget_ids)s::text[])
    AS v (id, agent_id, resource_type_id, quota_id, amount, unit_price_usd, cost_usd, task_id, run_id,
          budget_ids)
ORDER BY v.quota_id, v.id
"""

_BATCH_USAGE_SQL = """INSERT INTO "usage_logs"
    (agent_id, resource_type_id, quota_id, amount, unit_price_usd, cost_usd, task_id, idempotency_key,
     metadata, kind, created_at, period_start)
SELECT v.agent_id, v.resource_type_id, v.quota_id, v.amount, v.unit_price_usd::numeric, v.cost_usd::numeric,
       v.task_id, v.idempotency_key, v.metadata::jsonb || jsonb_build_object('allocation_id', v.id),
       'allocation', %(at)s, %(period_start)s
FROM unnest(%(ids)s::text[], %(agent_ids)s::text[], %(resource_type_ids)s::text[], %(quota_ids)s::bigint[],
            %(amounts)s::bigint[], %(unit_prices)s::text[], %(costs)s::text[], %(task_ids)s::text[],
            %(keys)s::text[], %(metadata)s::text[])
    AS v (id, agent_id, resource_type_id, quota_id, amount, unit_price_usd, cost_usd, task_id,
          idempotency_key, metadata)
ORDER BY v.quota_id, v.id
"""

# A batch item's stored result names its allocation only (``allocation.batch``); the body is read back on a
# replay. The same columns ``grid_mutation_record`` writes, for a thousand records without a JSON document.
_BATCH_ITEM_RECORDS_SQL = """INSERT INTO allocation_idempotencyrecord
    (principal, agent_id, key, method, path, request_hash, response_status, response_body, created_at)
SELECT %(principal)s, %(agent_id)s, v.key, 'POST', %(path)s, v.request_hash, 201,
       jsonb_build_object('allocation_id', v.allocation_id), %(at)s
FROM unnest(%(keys)s::text[], %(hashes)s::text[], %(allocation_ids)s::text[])
    AS v (key, request_hash, allocation_id)
"""


@dataclass
class BatchRows:
    """The accepted items of a batch, one list per column, in the items' order. Money as text (exact to the
    ledger's 12 places), ``budget_ids`` as PostgreSQL array literals, ``metadata`` as JSON object text."""

    ids: list[str]
    agent_ids: list[str]
    resource_type_ids: list[str]
    quota_ids: list[int]
    amounts: list[int]
    unit_prices: list[str]
    costs: list[str]
    task_ids: list[str]
    run_ids: list[str]
    budget_ids: list[str]
    keys: list[str]
    metadata: list[str]


def batch_rows_write(rows: BatchRows, *, at: dt.datetime, period_start: dt.datetime) -> None:
    """The allocations and the usage rows of a batch's accepted items: two statements, however many."""
    if not rows.ids:
        return
    columns = {
        "ids": text_array(rows.ids),
        "agent_ids": text_array(rows.agent_ids),
        "resource_type_ids": text_array(rows.resource_type_ids),
        "quota_ids": int_array(rows.quota_ids),
        "amounts": int_array(rows.amounts),
        "unit_prices": text_array(rows.unit_prices),
        "costs": text_array(rows.costs),
        "task_ids": text_array(rows.task_ids),
        "at": at,
    }
    allocations = {"run_ids": text_array(rows.run_ids), "budget_ids": text_array(rows.budget_ids)}
    usage = {
        "keys": text_array(rows.keys),
        "metadata": text_array(rows.metadata),
        "period_start": period_start,
    }
    with server_bound_cursor() as cursor:
        cursor.execute(_BATCH_ALLOCATIONS_SQL, {**columns, **allocations})
        cursor.execute(_BATCH_USAGE_SQL, {**columns, **usage})


def batch_item_records_write(
    *,
    principal: str,
    agent_id: str | None,
    path: str,
    keys: list[str],
    fingerprints: list[str],
    allocation_ids: list[str],
    at,
) -> None:
    """Store a batch's accepted items under their keys (full keys, ``item:`` included), in the order given:
    give them sorted, so that batches storing the same keys wait for each other in one order. A key stored
    before fails on its unique index (``IntegrityError``)."""
    if not keys:
        return
    with server_bound_cursor() as cursor:
        cursor.execute(
            _BATCH_ITEM_RECORDS_SQL,
            {
                "principal": principal,
                "agent_id": agent_id,
                "path": path,
                "at": at,
                "keys": text_array(keys),
                "hashes": text_array(fingerprints),
                "allocation_ids": text_array(allocation_ids),
            },
        )

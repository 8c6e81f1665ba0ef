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
from dataclasses import dataclass
from decimal import Decimal

from django.core.serializers.json import DjangoJSONEncoder
from django.db import DatabaseError, connection, transaction

from ledger.bulk import server_bound_cursor
from ledger.errors import LedgerError, NotFound
from ledger.invariants import (
    AGENT_MAY_ALLOCATE_SQL,
    QUOTA_AVAILABLE_SQL,
    agent_refusal,
    quota_fits_sql,
)

AGENT_NOT_FOUND = "GR404"
AGENT_MAY_NOT_ALLOCATE = "GR403"
KEY_REVOKED = "GR401"
PERIOD_NOT_OPEN = "GR409"
QUOTA_EXCEEDED = "GR429"

RECORD_FUNCTION_SQL = """
CREATE OR REPLACE FUNCTION grid_mutation_record(p_record jsonb) RETURNS void
LANGUAGE plpgsql AS $fn$
BEGIN
    -- The one writer of a request's idempotency record (the response to replay) and audit record.
    -- 'idempotency' is one record, or an array of them (a batch's items).
    IF p_record ? 'idempotency' THEN
        INSERT INTO allocation_idempotencyrecord
            (principal, key, method, path, request_hash, response_status, response_body, created_at)
        SELECT principal, key, method, path, request_hash, response_status, response_body, created_at
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
    p_record jsonb
) RETURNS bigint
LANGUAGE plpgsql AS $fn$
DECLARE
    v_status text;
    v_reason text;
    v_may_allocate boolean;
    v_quota bigint;
    v_available bigint;
BEGIN
    SELECT status, status_reason, {AGENT_MAY_ALLOCATE_SQL} INTO v_status, v_reason, v_may_allocate
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

    -- Check the new rows' quota keys as each INSERT ends, not at COMMIT: not while the quota row is locked.
    SET CONSTRAINTS allocation_allocation_quota_identity_fk, usage_logs_quota_identity_period_fk IMMEDIATE;
    IF p_record IS NOT NULL THEN
        PERFORM grid_mutation_record(p_record);
    END IF;
    INSERT INTO allocation_allocation
        (id, agent_id, resource_type_id, quota_id, amount, unit_price_usd, cost_usd, status, task_id,
         expires_at, created_at)
    VALUES
        (p_allocation_id, p_agent_id, p_resource_type, v_quota, p_amount, p_unit_price, p_cost,
         CASE WHEN p_hold THEN 'held' ELSE 'committed' END, p_task_id, p_expires_at, p_created_at);
    IF NOT p_hold THEN
        INSERT INTO usage_logs
            (agent_id, resource_type_id, quota_id, amount, unit_price_usd, cost_usd, task_id, kind,
             idempotency_key, metadata, created_at, period_start)
        VALUES
            (p_agent_id, p_resource_type, v_quota, p_amount, p_unit_price, p_cost, p_task_id, p_usage_kind,
             p_usage_key, p_usage_metadata, p_now, p_period_start);
    END IF;

    -- Last: the row lock is held from here to COMMIT.
    UPDATE quotas
    SET used = used + CASE WHEN p_hold THEN 0 ELSE p_amount END,
        reserved = reserved + CASE WHEN p_hold THEN p_amount ELSE 0 END,
        spent_usd = spent_usd + p_cost,
        updated_at = p_now
    WHERE id = v_quota AND {quota_fits_sql("p_amount")};
    IF NOT FOUND THEN
        SELECT {QUOTA_AVAILABLE_SQL} INTO v_available FROM quotas WHERE id = v_quota;
        RAISE EXCEPTION USING ERRCODE = '{QUOTA_EXCEEDED}', MESSAGE = 'quota exceeded',
            DETAIL = v_available::text;
    END IF;
    RETURN v_quota;
END
$fn$;
"""

FUNCTIONS_SQL = RECORD_FUNCTION_SQL + ALLOCATE_FUNCTION_SQL
DROP_FUNCTIONS_SQL = """
DROP FUNCTION IF EXISTS grid_allocate(text, text, timestamptz, bigint, boolean, timestamptz, uuid, numeric,
    numeric, text, timestamptz, timestamptz, text, text, jsonb, bigint, jsonb);
DROP FUNCTION IF EXISTS grid_mutation_record(jsonb);
"""

_ALLOCATE_CALL = "SELECT grid_allocate(" + ", ".join(["%s"] * 17) + ")"
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


def _refusal(exc: DatabaseError, row: AllocationRow) -> LedgerError | None:
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

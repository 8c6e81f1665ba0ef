"""The bench's own database and Redis database, and the SQL that fills them.

The database is derived from the environment's ``DATABASE_URL`` (same server and user, another name:
``axiom_bench`` or ``axiom_bench_quick``), so a bench never touches the development database or the
test databases. It is dropped and created anew at the start of every run, under an advisory lock that
makes two runs on the same database take turns. ``BENCH_DATABASE_URL`` overrides the derived URL; the
name must contain "bench", because the run drops it.

Bulk data is written with ``INSERT ... SELECT generate_series`` in the database itself.
"""

from __future__ import annotations

import os
import time
import zlib
from urllib.parse import urlsplit, urlunsplit

import psycopg
import psycopg.errors

DEFAULT_SERVER_URL = "postgres://postgres@127.0.0.1:5432/postgres"
POSTGRES_SCHEMES = {"postgres", "postgresql", "pgsql"}
LOCK_WAIT_SECONDS = 300


def _with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def bench_database_url(*, quick: bool) -> str:
    explicit = os.environ.get("BENCH_DATABASE_URL")
    if explicit:
        return explicit
    base = os.environ.get("DATABASE_URL", "")
    if urlsplit(base).scheme not in POSTGRES_SCHEMES:
        base = DEFAULT_SERVER_URL
    return _with_database(base, "axiom_bench_quick" if quick else "axiom_bench")


def database_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def bench_redis_url() -> str:
    """The Redis database the bench's processes use: ``BENCH_REDIS_URL`` (pick a database of its own there,
    ``redis://host:6379/11``), else the environment's ``REDIS_URL``, else the local one's database 0.
    Whichever it is, the bench writes and deletes only keys under ``redis_key_prefix``: it never empties a
    database."""
    return os.environ.get("BENCH_REDIS_URL") or os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"


def redis_key_prefix(database_url: str) -> str:
    """The prefix of every Redis key the bench's processes write (``REDIS_KEY_PREFIX``), named after its
    database: two benches, or a bench beside the service or the test suite, never share a key."""
    return f"axiom-bench:{database_name(database_url)}:"


def redis_forget(url: str, prefix: str) -> bool:
    """Delete the bench's own Redis keys (those under ``prefix``), nothing else. False when Redis is not
    reachable."""
    try:
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=2)
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])
        client.close()
        return True
    except Exception:
        return False


class DatabaseLock:
    """A session advisory lock on the server's maintenance database, one per bench database name."""

    def __init__(self, url: str):
        self.maintenance_url = _with_database(url, "postgres")
        self.key = zlib.crc32(f"axiom-bench:{database_name(url)}".encode())
        self.connection: psycopg.Connection | None = None

    def __enter__(self) -> DatabaseLock:
        self.connection = psycopg.connect(self.maintenance_url, autocommit=True, connect_timeout=10)
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        while not self.connection.execute("SELECT pg_try_advisory_lock(%s)", [self.key]).fetchone()[0]:
            if time.monotonic() > deadline:
                raise RuntimeError("another bench run holds the bench database; gave up waiting")
            time.sleep(1)
        return self

    def __exit__(self, *exc_info) -> None:
        if self.connection is not None:
            self.connection.close()  # ends the session, and with it the lock


def database_recreate(url: str) -> None:
    database_drop(url)
    with psycopg.connect(_with_database(url, "postgres"), autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'CREATE DATABASE "{database_name(url)}"')


def database_copy(url: str, *, suffix: str) -> str:
    """Copy the database ``url`` names, as it is, to ``<its name><suffix>`` on the same server (replacing
    one left by a killed run); returns the copy's URL. The source must have no other sessions. A file copy
    (``STRATEGY FILE_COPY``): the database's files as they are, without logging every page of them."""
    name = database_name(url) + suffix
    copy = _with_database(url, name)
    database_drop(copy)
    with psycopg.connect(_with_database(url, "postgres"), autocommit=True, connect_timeout=10) as conn:
        deadline = time.monotonic() + 60
        while True:
            try:
                conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{database_name(url)}" STRATEGY FILE_COPY')
                return copy
            except psycopg.errors.ObjectInUse:
                if time.monotonic() > deadline:
                    raise
                # The bench's own sessions (a thread's connection left open): the database is the bench's.
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = %s AND pid <> pg_backend_pid()",
                    [database_name(url)],
                )
                time.sleep(1)


def database_drop(url: str) -> None:
    """Drop the bench database ``url`` names, if it exists (only a name containing "bench")."""
    name = database_name(url)
    if "bench" not in name:
        raise RuntimeError(f"refusing to drop {name!r}: a bench database's name contains 'bench'")
    with psycopg.connect(_with_database(url, "postgres"), autocommit=True, connect_timeout=10) as conn:
        # FORCE: a server left over from a run that was killed may still hold connections. A session busy
        # in code that does not look at interrupts (a JIT compile) takes longer to go: try for a while.
        deadline = time.monotonic() + 120
        while True:
            try:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                return
            except psycopg.errors.ObjectInUse:
                if time.monotonic() > deadline:
                    raise
                time.sleep(2)


def server_facts(url: str) -> dict:
    with psycopg.connect(url, connect_timeout=10) as conn:
        version = conn.execute("SHOW server_version").fetchone()[0]
        settings = dict(
            conn.execute(
                "SELECT name, current_setting(name) FROM pg_settings WHERE name IN ('shared_buffers', "
                "'max_connections', 'synchronous_commit', 'work_mem', 'max_wal_size', 'jit')"
            ).fetchall()
        )
    return {"version": version, "settings": settings}


def deadlocks(cursor) -> int:
    cursor.execute("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
    return int(cursor.fetchone()[0])


# --- Sweep agents ---------------------------------------------------------------------------------------

SWEEP_PREFIX = "sw-"
SWEEP_HOLD_TASK = "bench-expiring-hold"

# Agent number g is agent 'sw-' || g, zero-padded to the number of digits of the fleet's size (%(width)s),
# so that the ids sort as the numbers do at any fleet size. Every statement below takes the numbers
# %(first)s .. %(last)s, so a fleet is grown in steps (the reference size first, then the rest) and each
# step is a handful of set-based statements, whatever its size: nothing is built in Python.
SWEEP_ID = "'sw-' || lpad(g::text, %(width)s, '0')"

# Which agents are which, by their number: FREE/PRO/ENTERPRISE in turn; one in ten (g % 10 = 5) has spent
# 95 % of its $100 monthly budget (the rest 0-59 %); one in 3,000 (g % 3000 = 2, all ENTERPRISE) runs at its
# maximum instance count, where scaling up means a vertical quota grant; one in twenty (g % 20 = 7) has an
# expiring hold.
SWEEP_TIER = "(ARRAY['FREE', 'PRO', 'ENTERPRISE'])[1 + g %% 3]"
SWEEP_AT_BOUND = "g %% 3000 = 2"
SWEEP_OVER_BUDGET = "g %% 10 = 5"
SWEEP_HOLDS = "g %% 20 = 7"
# What one quota row of agent g has spent: five rows make the agent's month.
SWEEP_QUOTA_SPENT = f"(CASE WHEN {SWEEP_OVER_BUDGET} THEN 19.00 ELSE (g %% 100) * 0.12 END)::numeric(28, 12)"
SWEEP_AT_BOUND_INSTANCES = 10

# The agents, without their per-row trigger (session_replication_role = replica): their managed monthly
# budgets are written by SWEEP_BUDGETS_SQL in one statement instead, as the trigger would write them.
SWEEP_AGENTS_SQL = f"""
INSERT INTO ledger_agent (id, name, tier_id, status, status_reason, monthly_budget_usd, instance_count,
                          min_instances, max_instances, metadata, created_at, updated_at)
SELECT {SWEEP_ID}, '', {SWEEP_TIER}, 'active', '', 100.00,
       CASE WHEN {SWEEP_AT_BOUND} THEN {SWEEP_AT_BOUND_INSTANCES} ELSE 1 END, 1, {SWEEP_AT_BOUND_INSTANCES},
       '{{}}'::jsonb, now(), now()
FROM generate_series(%(first)s, %(last)s) AS g
"""

# Every resource type's quota for the current period. Utilization is spread evenly over 0-99 % by a hash
# of (agent, resource type), so about a fifth of the rows are above 80 %.
SWEEP_QUOTAS_SQL = f"""
INSERT INTO quotas (agent_id, resource_type_id, period_start, period_end, base_limit, limit_amount, used,
                    reserved, listed, spent_usd, updated_at)
SELECT {SWEEP_ID}, tq.resource_type_id, %(start)s, %(end)s, tq.limit, tq.limit,
       tq.limit * (abs(hashtext({SWEEP_ID} || tq.resource_type_id)) %% 100) / 100, 0, 0,
       {SWEEP_QUOTA_SPENT}, now()
FROM generate_series(%(first)s, %(last)s) AS g
JOIN ledger_tierquota tq ON tq.tier_id = {SWEEP_TIER}
"""

# The agents' managed monthly budgets, as the agent trigger (ledger/budgets.py) writes them, with what
# their quota rows of this month have spent.
SWEEP_BUDGETS_SQL = f"""
INSERT INTO ledger_budget (scope, agent_id, run_id, budget_window, limit_usd, mode, rollover_percent,
                           thresholds, managed, window_start, window_end, spent_usd, reserved_usd,
                           rollover_usd, created_at, updated_at)
SELECT 'agent', {SWEEP_ID}, '', 'month', 100.00, 'hard', 0, '[50, 80, 90, 100]'::jsonb, true,
       w.window_start, w.window_end, {SWEEP_QUOTA_SPENT} * (SELECT count(*) FROM ledger_tierquota tq
                                                            WHERE tq.tier_id = {SWEEP_TIER}),
       0, 0, now(), now()
FROM generate_series(%(first)s, %(last)s) AS g
CROSS JOIN grid_budget_window('month', now()) AS w
"""

# Three usage rows per agent in the last day (what the cost-spike metric of the rules reads), on the
# agent's AI_TOKENS quota of this period (not before its start: on the first day of a month the day before
# is another period, which has no quota rows here).
SWEEP_USAGE_SQL = f"""
INSERT INTO usage_logs (agent_id, resource_type_id, quota_id, amount, unit_price_usd, cost_usd, task_id, kind,
                        idempotency_key, metadata, created_at, period_start)
SELECT q.agent_id, 'AI_TOKENS', q.id, 1000, 0.000001, 0.001, '', 'allocation', '', '{{}}'::jsonb,
       GREATEST(now() - make_interval(mins => (g * 7 + k * 480) %% 1440), %(start)s), q.period_start
FROM generate_series(%(first)s, %(last)s) AS g
JOIN quotas q ON q.agent_id = {SWEEP_ID} AND q.resource_type_id = 'AI_TOKENS' AND q.period_start = %(start)s
CROSS JOIN generate_series(0, 2) AS k
"""

# A version 7 UUID made an hour ago (the holds' created_at), as the grid's own ids are: the hold lands in its
# month's partition of allocations, which are partitioned by id (``ledger/partitions.py``).
_UUID7_HOUR_AGO_SQL = """encode(set_byte(
    overlay(uuid_send(gen_random_uuid())
            placing substring(int8send(
                floor(extract(epoch FROM now() - interval '1 hour') * 1000)::bigint) FROM 3)
            FROM 1 FOR 6),
    6, (get_byte(uuid_send(gen_random_uuid()), 6) & 15) | 112), 'hex')::uuid"""

# One hold of one AI token on one agent in twenty, written as already expired: SWEEP_HOLDS_ARM_SQL opens
# them (and reserves their quota) before each run of the expiry sweep, so every run has all of them to end.
SWEEP_HOLDS_SQL = f"""
INSERT INTO allocation_allocation (id, agent_id, resource_type_id, quota_id, amount, unit_price_usd, cost_usd,
                                   status, task_id, expires_at, created_at, finished_at, run_id, lease,
                                   budget_ids)
SELECT {_UUID7_HOUR_AGO_SQL}, q.agent_id, q.resource_type_id, q.id, 1, 0.000001, 0, 'expired',
       '{SWEEP_HOLD_TASK}', now() - interval '1 minute', now() - interval '1 hour', now(), '', false,
       '{{}}'::bigint[]
FROM generate_series(%(first)s, %(last)s) AS g
JOIN quotas q ON q.agent_id = {SWEEP_ID} AND q.resource_type_id = 'AI_TOKENS' AND q.period_start = %(start)s
WHERE {SWEEP_HOLDS}
"""

SWEEP_HOLDS_ARM_SQL = f"""
WITH armed AS (
    UPDATE allocation_allocation
    SET status = 'held', finished_at = NULL, expires_at = now() - interval '1 minute'
    WHERE task_id = '{SWEEP_HOLD_TASK}' AND status <> 'held'
    RETURNING quota_id, amount
)
UPDATE quotas q SET reserved = q.reserved + armed.amount FROM armed WHERE q.id = armed.quota_id
"""

# Between two sweeps: no alerts, rule states or scaling events, every agent back to its instance count.
SWEEP_RESET_SQL = f"""
TRUNCATE optimization_alertdelivery, optimization_alert, optimization_rulestate, optimization_scalingevent;
UPDATE ledger_agent a SET instance_count = s.instances, status = 'active', status_reason = ''
FROM (SELECT id, CASE WHEN substr(id, 4)::bigint % 3000 = 2 THEN {SWEEP_AT_BOUND_INSTANCES} ELSE 1 END
             AS instances
      FROM ledger_agent WHERE id LIKE 'sw-%') AS s
WHERE a.id = s.id AND (a.instance_count <> s.instances OR a.status <> 'active')
"""


def sweep_fleet_grow(cursor, *, first: int, last: int, width: int, start, end) -> None:
    """Agents ``first`` .. ``last`` of the sweep fleet with everything the sweeps read: agent rows, five
    quota rows each, a managed monthly budget, three usage rows and (one in twenty) a hold. One statement
    per table, in one transaction; the usage rows as a bulk load (``usage_bulk_insert``). The bench
    process's memory does not grow with the fleet: the rows are made in the database."""
    params = {"first": first, "last": last, "width": width, "start": start, "end": end}
    cursor.execute("SET LOCAL session_replication_role = replica")  # no per-row triggers: see above
    for statement in (SWEEP_AGENTS_SQL, SWEEP_QUOTAS_SQL, SWEEP_BUDGETS_SQL, SWEEP_HOLDS_SQL):
        cursor.execute(statement, params)
    cursor.execute(SWEEP_USAGE_SQL, params)


# --- Reading at scale -----------------------------------------------------------------------------------

READ_PREFIX = "rd-"
READ_AGENTS = 1000

READ_AGENTS_SQL = """
INSERT INTO ledger_agent (id, name, tier_id, status, status_reason, monthly_budget_usd, instance_count,
                          min_instances, max_instances, metadata, created_at, updated_at)
SELECT 'rd-' || lpad(g::text, 4, '0'), '', 'ENTERPRISE', 'active', '', 5000.00, 1, 1, 10, '{}'::jsonb,
       now(), now()
FROM generate_series(0, %(agents)s - 1) AS g
"""

# The quota rows of the read agents for every period the usage log covers (the last 30 days: this month
# and the one before), empty: READ_COUNTERS_SQL fills in the counters from the usage rows.
READ_QUOTAS_SQL = """
INSERT INTO quotas (agent_id, resource_type_id, period_start, period_end, base_limit, limit_amount, used,
                    reserved, listed, spent_usd, updated_at)
SELECT a.id, tq.resource_type_id, p.start, p.start + interval '1 month', tq.limit, tq.limit, 0, 0, 0, 0, now()
FROM ledger_agent a
JOIN ledger_tierquota tq ON tq.tier_id = a.tier_id
CROSS JOIN (VALUES (%(start)s::timestamptz), (%(start)s::timestamptz - interval '1 month')) AS p(start)
WHERE a.id LIKE 'rd-%%'
"""

# %(rows)s usage rows over the read agents (round robin, so each agent's rows are spread over the whole
# table, as they are when many agents write at once) and over the last 30 days, oldest first, each with
# the quota row of its period.
READ_USAGE_SQL = """
INSERT INTO usage_logs (agent_id, resource_type_id, quota_id, amount, unit_price_usd, cost_usd, task_id, kind,
                        idempotency_key, metadata, created_at, period_start)
SELECT r.agent_id, r.resource_type_id, q.id, r.amount, 0.000001, r.amount * 0.000001, '', 'allocation', '',
       '{}'::jsonb, r.created_at, q.period_start
FROM (
    SELECT g, 'rd-' || lpad((g %% %(agents)s)::text, 4, '0') AS agent_id,
           (ARRAY['COMPUTE_MS', 'AI_TOKENS', 'STORAGE_KB', 'NETWORK_REQS', 'SOLANA_LAMPORTS'])
               [1 + (g / 7) %% 5] AS resource_type_id,
           1 + g %% 1000 AS amount,
           %(now)s - make_interval(secs => 2592000.0 * (%(rows)s - g) / %(rows)s) AS created_at
    FROM generate_series(1, %(rows)s) AS g
) AS r
JOIN quotas q ON q.agent_id = r.agent_id AND q.resource_type_id = r.resource_type_id
             AND q.period_start = date_trunc('month', r.created_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
ORDER BY r.g
"""

# The counters of the read agents' quota rows, from their usage: what the metrics and the cost read.
READ_COUNTERS_SQL = """
UPDATE quotas q SET used = s.used, limit_amount = GREATEST(q.limit_amount, s.used),
                    base_limit = GREATEST(q.base_limit, s.used), spent_usd = s.spent
FROM (SELECT quota_id, SUM(amount) AS used, SUM(cost_usd) AS spent FROM usage_logs
      WHERE agent_id LIKE 'rd-%%' GROUP BY quota_id) AS s
WHERE q.id = s.quota_id
"""


def usage_bulk_insert(cursor, sql: str, params: dict) -> None:
    """Insert many usage rows the way a bulk load does: the secondary indexes dropped and built again
    afterwards, and the foreign-key triggers off (the rows are made to be valid). All in one transaction,
    so a run that dies half-way leaves the table, and its indexes, as they were."""
    cursor.execute(
        """
        SELECT i.indexname, i.indexdef FROM pg_indexes i
        WHERE i.tablename = 'usage_logs' AND i.schemaname = current_schema()
          AND i.indexname NOT IN (SELECT conname FROM pg_constraint
                                  WHERE conrelid = 'usage_logs'::regclass AND contype IN ('p', 'u', 'x'))
        """
    )
    indexes = cursor.fetchall()
    cursor.execute("SET LOCAL session_replication_role = replica")
    cursor.execute("SET LOCAL maintenance_work_mem = '1GB'")
    for name, _ in indexes:
        cursor.execute(f'DROP INDEX "{name}"')
    cursor.execute(sql, params)
    for _, definition in indexes:
        # The usage log is partitioned: its indexes are printed "ON ONLY" the parent, which would make an
        # empty index of the parent alone; without ONLY the index is built on every partition again.
        cursor.execute(definition.replace(" ON ONLY ", " ON ", 1))

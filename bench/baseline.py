"""The bare baseline: the least a quota-taking Django API can do on this stack.

A DRF view with no authentication, no permissions, no idempotency, no audit and no serializer: one
conditional UPDATE of a counter row and one INSERT of a usage row, in one transaction. It is served by its
own gunicorn (``bench.baseline_wsgi``) with no middleware at all (``bench.baseline_settings``), on the same
database settings and worker configuration as the grid's server. The distance between the two is what the
grid costs beyond the floor: its middleware, key check, idempotency, audit and bookkeeping. The tables are
created by the bench setup (``BASELINE_SCHEMA_SQL``), never by a migration.

``BaselineBatchView`` is the floor of batch ingestion (scenario 2, ``bench.ingest``): it parses the same JSON
body as ``POST /api/v1/usage/batch`` (with the project's JSON parser, as any DRF view here) and takes every
item in one set-based statement on the ledger's own tables: the items as arrays (``unnest``), the quota rows
of the current period they name locked in id order, one UPDATE of their ``used`` counters (each row's items
together, only if they all fit) and one INSERT of a usage row per item taken, into ``usage_logs`` with its
indexes and its foreign key. What the database must do for the usage rows, and nothing else: no key, no
price, no allocation row, no idempotency, no audit, no per-item result.
"""

from __future__ import annotations

from django.db import connection, transaction
from rest_framework.response import Response
from rest_framework.views import APIView

BASELINE_SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS bench_quota (
    id bigint PRIMARY KEY,
    used bigint NOT NULL DEFAULT 0,
    lim bigint NOT NULL,
    CHECK (used <= lim)
);
CREATE TABLE IF NOT EXISTS bench_usage (
    id bigserial PRIMARY KEY,
    quota_id bigint NOT NULL REFERENCES bench_quota (id),
    amount bigint NOT NULL CHECK (amount > 0),
    created_at timestamptz NOT NULL DEFAULT now()
);
"""

_BATCH_SQL = """
WITH items AS (
    SELECT * FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::text[])
        AS i (agent_id, resource_type_id, amount, idempotency_key)
), wanted AS MATERIALIZED (
    -- Rows locked in id order, as every writer of several quota rows does: batches over them queue.
    SELECT q.id, q.agent_id, q.resource_type_id, q.period_start, w.amount
    FROM quotas AS q
    JOIN (SELECT agent_id, resource_type_id, sum(amount) AS amount FROM items GROUP BY 1, 2) AS w
        USING (agent_id, resource_type_id)
    WHERE q.period_start = date_trunc('month', now(), 'UTC')
    ORDER BY q.id
    FOR NO KEY UPDATE OF q
), taken AS (
    UPDATE quotas AS q SET used = q.used + wanted.amount
    FROM wanted
    WHERE q.id = wanted.id AND q.used + q.reserved + q.listed + wanted.amount <= q.limit_amount
    RETURNING q.id, q.agent_id, q.resource_type_id, q.period_start
)
INSERT INTO usage_logs (agent_id, resource_type_id, quota_id, amount, unit_price_usd, cost_usd, task_id,
                        idempotency_key, metadata, kind, created_at, period_start)
SELECT taken.agent_id, taken.resource_type_id, taken.id, items.amount, 0, 0, '', items.idempotency_key,
       '{}', 'allocation', now(), taken.period_start
FROM items JOIN taken USING (agent_id, resource_type_id)
"""

_TAKE_SQL = "UPDATE bench_quota SET used = used + %s WHERE id = %s AND used + %s <= lim RETURNING used"
_USAGE_SQL = "INSERT INTO bench_usage (quota_id, amount) VALUES (%s, %s)"


class BaselineAllocateView(APIView):
    authentication_classes: list = []
    permission_classes: list = []

    def post(self, request, quota_id: int):
        amount = request.data.get("amount", 1) if isinstance(request.data, dict) else 1
        if isinstance(amount, bool) or not isinstance(amount, int) or amount < 1:
            return Response({"error": "amount must be a positive integer"}, status=400)
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(_TAKE_SQL, [amount, quota_id, amount])
            row = cursor.fetchone()
            if row is None:
                return Response({"error": "quota exceeded"}, status=409)
            cursor.execute(_USAGE_SQL, [quota_id, amount])
        return Response({"quota_id": quota_id, "amount": amount, "used": row[0]}, status=201)


class BaselineBatchView(APIView):
    authentication_classes: list = []
    permission_classes: list = []

    def post(self, request):
        items = request.data.get("items") if isinstance(request.data, dict) else None
        if not isinstance(items, list) or not 1 <= len(items) <= 1000:
            return Response({"error": "items must be a list of 1-1000 items"}, status=400)
        try:
            columns = (
                [item["agent_id"] for item in items],
                [item["resource_type"] for item in items],
                [item["amount"] for item in items],
                [item.get("idempotency_key", "") for item in items],
            )
        except (KeyError, TypeError, AttributeError):
            return Response({"error": "every item needs agent_id, resource_type and amount"}, status=400)
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(_BATCH_SQL, columns)
            accepted = cursor.rowcount
        summary = {"accepted": accepted, "refused": len(items) - accepted, "replayed": 0}
        return Response({"summary": summary}, status=200)

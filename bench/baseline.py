"""The bare baseline: the least a quota-taking Django API can do on this stack.

A DRF view with no authentication, no permissions, no idempotency, no audit and no serializer: one
conditional UPDATE of a counter row and one INSERT of a usage row, in one transaction. It is served by its
own gunicorn (``bench.baseline_wsgi``) with no middleware at all (``bench.baseline_settings``), on the same
database settings and worker configuration as the grid's server. The distance between the two is what the
grid costs beyond the floor: its middleware, key check, idempotency, audit and bookkeeping. The tables are
created by the bench setup (``BASELINE_SCHEMA_SQL``), never by a migration.
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

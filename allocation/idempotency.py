"""Idempotency keys: the same key with the same body replays the first response and charges once.

Most calls claim the key with ``INSERT ... ON CONFLICT DO NOTHING`` inside the request's transaction and
store the response at the end of it. The allocation hot path instead writes the record, response included,
in the one statement that makes the allocation (``idempotency_values``), without ``ON CONFLICT``: a
duplicate's statement fails on the unique index and is undone as a whole, and the duplicate then replays
the stored response (``idempotency_replay``). Either way a duplicate arriving while the first is still
running blocks on the unique index until the first commits; if the first rolled back (it was refused), the
duplicate takes the key and runs. Only successful responses are stored: a refused request leaves nothing
behind and may be retried.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass

from django.core.serializers.json import DjangoJSONEncoder
from django.db import connection
from django.utils import timezone

from allocation.models import IdempotencyRecord
from ledger.errors import Conflict, LedgerError

RETENTION = dt.timedelta(hours=24)
MAX_KEY_LENGTH = 255

_CLAIM_SQL = f"""
INSERT INTO {IdempotencyRecord._meta.db_table} (principal, key, method, path, request_hash, created_at)
VALUES (%s, %s, %s, %s, %s, %s)
ON CONFLICT (principal, key) DO NOTHING
RETURNING id
"""


@dataclass(frozen=True)
class Claim:
    record_id: int | None  # set when this request claimed the key and must run
    replay_status: int | None = None
    replay_body: dict | None = None


# One encoder for every fingerprint (a batch takes 1,000): ``json.dumps`` with options builds a new one each
# call. Canonical: sorted keys, no spaces; what JSON cannot hold as such (a Decimal, a date) as Django does.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=DjangoJSONEncoder().default)


def request_fingerprint(*, method: str, path: str, body) -> str:
    canonical = _CANONICAL.encode(body)
    return hashlib.sha256(f"{method}\n{path}\n{canonical}".encode()).hexdigest()


def idempotency_header(request) -> str | None:
    """The request's Idempotency-Key header. Read from ``META``: ``request.headers`` would first build a
    dict of every header of the request, for this one."""
    return request.META.get("HTTP_IDEMPOTENCY_KEY")


def validate_key(key: str) -> str:
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise LedgerError(
            f"Idempotency-Key must be 1-{MAX_KEY_LENGTH} printable characters", code="invalid_idempotency_key"
        )
    return key


def idempotency_claim(*, principal: str, key: str, method: str, path: str, body) -> Claim:
    """Claim ``key`` for this request (run it) or return the stored response to replay. In a transaction."""
    fingerprint = request_fingerprint(method=method, path=path, body=body)
    with connection.cursor() as cursor:
        cursor.execute(
            _CLAIM_SQL,
            [
                principal,
                key,
                method,
                path,
                fingerprint,
                connection.ops.adapt_datetimefield_value(timezone.now()),
            ],
        )
        row = cursor.fetchone()
    if row is not None:
        return Claim(record_id=row[0])
    record = IdempotencyRecord.objects.filter(principal=principal, key=key).first()
    if record is None:  # cleaned up between the two statements: treat as new
        return idempotency_claim(principal=principal, key=key, method=method, path=path, body=body)
    return _replay(record, fingerprint)


def idempotency_replay(*, principal: str, key: str, fingerprint: str) -> Claim | None:
    """The stored response to replay for ``key``, None if the key is free; raises if it was used for
    another request, or if that request is still running."""
    record = IdempotencyRecord.objects.filter(principal=principal, key=key).first()
    return None if record is None else _replay(record, fingerprint)


def _replay(record: IdempotencyRecord, fingerprint: str) -> Claim:
    if record.request_hash != fingerprint:
        raise LedgerError(
            "this Idempotency-Key was used with a different request",
            code="idempotency_key_reused",
            status=422,
        )
    if record.response_status is None:
        raise Conflict("a request with this Idempotency-Key is still running", code="idempotency_in_progress")
    return Claim(record_id=None, replay_status=record.response_status, replay_body=record.response_body)


def idempotency_values(
    *, principal: str, key: str, method: str, path: str, fingerprint: str, status: int, body
) -> dict[str, object]:
    """The field values of a record that stores ``body`` as the response to replay for ``key``, for a
    statement that writes it together with the change (see the module docstring)."""
    return {
        "principal": principal,
        "key": key,
        "method": method,
        "path": path,
        "request_hash": fingerprint,
        "response_status": status,
        "response_body": body,
        "created_at": timezone.now(),
    }


def idempotency_complete(*, record_id: int, status: int, body) -> None:
    IdempotencyRecord.objects.filter(pk=record_id).update(response_status=status, response_body=body)


def idempotency_cleanup(*, now: dt.datetime | None = None) -> int:
    """Forget keys older than the retention (24 hours). One DELETE, however many there are."""
    cutoff = (now or timezone.now()) - RETENTION
    deleted, _ = IdempotencyRecord.objects.filter(created_at__lt=cutoff).delete()
    return deleted

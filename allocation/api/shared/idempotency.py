"""Idempotency keys: the same key with the same body replays the first response and charges once.

The record (the response to replay) is written with the change, in the same transaction or the same
statement (``allocation.api.shared.mutation``), and its unique index on the key decides: a duplicate
arriving while the first is still running waits on the index until the first commits, then fails and
replays the stored response (``idempotency_replay``); if the first rolled back (it was refused), the
duplicate takes the key and runs. Only successful responses are stored: a refused request leaves nothing
behind and may be retried. Batch items keep their keys in the same table under the ``item:`` prefix.

Each caller has a key space of its own: an agent's keys are unique per agent (``agent_id, key``), an
operator's per operator (``principal, key``; ``agent_id`` is null), the two partial unique indexes of
``IdempotencyRecord``. ``key_scope`` names a caller's.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass

from django.core.serializers.json import DjangoJSONEncoder
from django.utils import timezone

from allocation.models import IdempotencyRecord
from ledger.errors import Conflict, LedgerError

RETENTION = dt.timedelta(hours=24)
MAX_KEY_LENGTH = 255
# The unique indexes that decide: one over agents' keys, one over operators'.
IDEMPOTENCY_UNIQUE = frozenset({"idempotency_agent_key", "idempotency_operator_key"})
_AGENT_PRINCIPAL = "agent:"


def principal_agent_id(principal: str) -> str | None:
    """The agent whose key space ``principal`` (an API key's ``owner_label``) is, None for an operator."""
    return principal[len(_AGENT_PRINCIPAL) :] if principal.startswith(_AGENT_PRINCIPAL) else None


@dataclass(frozen=True)
class KeyScope:
    """A caller's key space: the columns of its records' unique index, as a filter and as SQL."""

    principal: str

    @property
    def agent_id(self) -> str | None:
        return principal_agent_id(self.principal)

    def filter(self) -> dict[str, str | None]:
        agent_id = self.agent_id
        return (
            {"agent_id": agent_id}
            if agent_id is not None
            else {"agent_id": None, "principal": self.principal}
        )

    def sql(self) -> tuple[str, list[str]]:
        """A condition on the table's columns that its index for this caller answers, and its parameters."""
        agent_id = self.agent_id
        if agent_id is not None:
            return "agent_id = %s", [agent_id]
        return "agent_id IS NULL AND principal = %s", [self.principal]


def key_scope(principal: str) -> KeyScope:
    return KeyScope(principal)


@dataclass(frozen=True)
class Claim:
    replay_status: int
    replay_body: dict | None


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


def idempotency_replay(*, principal: str, key: str, fingerprint: str) -> Claim | None:
    """The stored response to replay for ``key``, None if the key is free; raises if it was used for
    another request, or if that request is still running."""
    record = IdempotencyRecord.objects.filter(**key_scope(principal).filter(), key=key).first()
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
    return Claim(replay_status=record.response_status, replay_body=record.response_body)


def idempotency_values(
    *,
    principal: str,
    key: str,
    method: str,
    path: str,
    fingerprint: str,
    status: int,
    body,
    at: dt.datetime | None = None,
) -> dict[str, object]:
    """The field values of a record that stores ``body`` as the response to replay for ``key``, for a
    statement that writes it together with the change (see the module docstring)."""
    return {
        "principal": principal,
        "agent_id": principal_agent_id(principal),
        "key": key,
        "method": method,
        "path": path,
        "request_hash": fingerprint,
        "response_status": status,
        "response_body": body,
        "created_at": at or timezone.now(),
    }


def idempotency_cleanup(*, now: dt.datetime | None = None, batch_size: int = 10_000) -> int:
    """Forget keys older than the retention (24 hours); returns how many.

    In batches of ``batch_size``, oldest first (the ``created_at`` index), one DELETE each in its own
    transaction: an hour of keys at a thousand calls a second is millions of rows, which one statement would
    delete in one long transaction (one burst of WAL, vacuum held back meanwhile). A crash keeps the batches
    done; the next run deletes the rest."""
    cutoff = (now or timezone.now()) - RETENTION
    deleted_total = 0
    while True:
        oldest = IdempotencyRecord.objects.filter(created_at__lt=cutoff).order_by("created_at")
        deleted, _ = IdempotencyRecord.objects.filter(pk__in=oldest.values("pk")[:batch_size]).delete()
        deleted_total += deleted
        if deleted < batch_size:
            return deleted_total

"""The one frame around every POST and PATCH: idempotency, one transaction, error shaping, the audit record.

``run_mutation`` runs a handler once per Idempotency-Key. On success the request's records (the response
stored under its key, and its audit record) are written by their one writer
(``allocation.sql.mutation_record_write``) in the same transaction as the change, so they commit together.

Idempotency is one mechanism: the record is written with the change, and its unique index on (principal,
key) decides. A duplicate that arrives while the first is running waits on that index, fails when the first
commits, and is answered with the stored response (``Idempotent-Replayed: true``); the same key with another
request is refused (422). A refused request writes nothing but its audit record and leaves its key free for
a retry.

A handler whose change is a single statement (the allocation) is called with the frame and passes
``frame.records(...)`` into that statement itself: no transaction of its own, one round trip. There the
record is the statement's first write, so a duplicate fails before it has taken anything; elsewhere the frame
looks the key up before running the handler, so a plain retry does not run it again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from django.db import transaction
from rest_framework import exceptions
from rest_framework.response import Response

from allocation.api.shared.audit import audit_record, audit_values
from allocation.api.shared.auth import principal_still_valid
from allocation.api.shared.errors import exception_response
from allocation.api.shared.idempotency import (
    idempotency_header,
    idempotency_replay,
    idempotency_values,
    request_fingerprint,
    validate_key,
)
from allocation.sql import KeyRevoked, mutation_record_write
from ledger.budgets import budget_mark_refused
from ledger.errors import BudgetExceeded, LedgerError


def _ensure_object(body) -> dict:
    if not isinstance(body, dict):
        raise LedgerError("the request body must be a JSON object", code="malformed_json")
    return body


@dataclass(frozen=True)
class MutationFrame:
    """The request as the frame read it, for a handler that writes the request's records itself."""

    request: object
    action: str
    agent_id: str
    body: dict
    idempotency_key: str | None
    fingerprint: str | None
    audited: bool
    secret_fields: tuple[str, ...]

    @property
    def api_key_id(self) -> int:
        """The caller's key: a statement that requires it unrevoked refuses a key revoked since it was
        authenticated (``CachedApiKeyAuthentication``)."""
        return self.request.user.api_key.pk

    def records(self, *, status: int, data: dict) -> dict | None:
        """The records of a success: the audit record, and under an Idempotency-Key the response to replay
        (``secret_fields`` of it, such as a new API key, shown once and stored as null)."""
        request, label = self.request, self.request.user.label
        records = {}
        if self.audited:
            records["audit"] = audit_values(
                request=request,
                actor=label,
                action=self.action,
                agent_id=self.agent_id,
                status_code=status,
                outcome="ok",
                body=self.body,
            )
        if self.idempotency_key is not None:
            stored = {**data, **dict.fromkeys(self.secret_fields)} if self.secret_fields else data
            records["idempotency"] = idempotency_values(
                principal=label,
                key=self.idempotency_key,
                method=request.method,
                path=request.get_full_path()[:500],
                fingerprint=self.fingerprint,
                status=status,
                body=stored,
            )
        return records or None


def run_mutation(
    request,
    *,
    action: str,
    agent_id: str,
    handler: Callable[..., tuple[int, dict]],
    audited: bool = True,
    secret_fields: tuple[str, ...] = (),
    one_statement: bool = False,
) -> Response:
    """Run ``handler(body) -> (status, data)`` once per idempotency key, atomically, and audit the outcome.

    With ``one_statement`` the handler is called as ``handler(body, frame)`` and writes its change and
    ``frame.records(...)`` in one statement of its own, outside any transaction of the frame.
    """
    principal = request.user
    body = key = fingerprint = None
    try:
        body = _ensure_object(request.data)  # a malformed body raises here and is answered like any other
        header = idempotency_header(request)
        if header is not None:
            key = validate_key(header)
            fingerprint = request_fingerprint(
                method=request.method, path=request.get_full_path()[:500], body=body
            )
        frame = MutationFrame(
            request=request,
            action=action,
            agent_id=agent_id,
            body=body,
            idempotency_key=key,
            fingerprint=fingerprint,
            audited=audited,
            secret_fields=secret_fields,
        )
        if one_statement:
            status, data = handler(body, frame)
        else:
            # A retry after the first has committed, the usual case, is answered without running again;
            # a duplicate racing the first one fails on the record's unique index below instead.
            claim = (
                None
                if key is None
                else idempotency_replay(principal=principal.label, key=key, fingerprint=fingerprint)
            )
            if claim is not None:
                return _replayed(claim)
            with transaction.atomic():
                status, data = handler(body)
                records = frame.records(status=status, data=data)
                if records is not None:
                    mutation_record_write(records)
        return Response(data, status=status)
    except Exception as exc:
        error = exc
    if (principal.from_cache or isinstance(error, KeyRevoked)) and not principal_still_valid(principal):
        return exception_response(exceptions.AuthenticationFailed("invalid or revoked API key"))
    if key is not None:
        # Was the key used before? Then this is a duplicate (replay it) or a reuse (refuse it), whatever
        # the attempt itself ran into: the record's unique index, a refusal, invalid input.
        try:
            claim = idempotency_replay(principal=principal.label, key=key, fingerprint=fingerprint)
        except LedgerError as exc:
            error = exc
        else:
            if claim is not None:
                return _replayed(claim)
    return _refused(request, error, action=action, agent_id=agent_id, body=body, audited=audited)


def _replayed(claim) -> Response:
    response = Response(claim.replay_body, status=claim.replay_status)
    response["Idempotent-Replayed"] = "true"
    return response


def _refused(request, exc: Exception, *, action: str, agent_id: str, body, audited: bool) -> Response:
    response = exception_response(exc)
    if response is None:
        raise exc
    if isinstance(exc, BudgetExceeded):
        # The refusal rolled back the request's transaction, and with it the service's note that the budget
        # refused: written again here, for the sweep's budget_resolved alert.
        budget_mark_refused(budget_id=exc.details["budget_id"])
    if audited:
        audit_record(
            request=request,
            actor=request.user.label,
            action=action,
            agent_id=agent_id,
            status_code=response.status_code,
            outcome=response.data["error"]["code"],
            body=body if isinstance(body, dict | list) else None,
        )
    return response

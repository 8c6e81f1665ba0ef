"""The frame around every POST and PATCH: idempotency, one transaction, error shaping and the audit record."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from django.db import transaction
from rest_framework import exceptions
from rest_framework.response import Response

from allocation.api.auth import principal_still_valid
from allocation.api.errors import exception_response
from allocation.audit import audit_record, audit_values
from allocation.idempotency import (
    idempotency_claim,
    idempotency_complete,
    idempotency_header,
    idempotency_replay,
    idempotency_values,
    request_fingerprint,
    validate_key,
)
from allocation.models import ApiKey, AuditRecord, IdempotencyRecord
from allocation.services import CompanionRow, RequiredRow, RequirementNotMet
from ledger.errors import LedgerError

Handler = Callable[[dict], tuple[int, dict]]


def _ensure_object(body) -> dict:
    if not isinstance(body, dict):
        raise LedgerError("the request body must be a JSON object", code="malformed_json")
    return body


def run_mutation(
    request,
    *,
    action: str,
    agent_id: str,
    handler: Handler,
    audited: bool = True,
    secret_fields: tuple[str, ...] = (),
) -> Response:
    """Run ``handler(body) -> (status, data)`` once per idempotency key, atomically, and audit the outcome.

    A success is audited in its own transaction, so the record and the change commit together; a refusal
    rolls everything back and is then audited on its own. ``secret_fields`` of the response (a new API key)
    are shown once and never stored: a replay answers them as null.
    """
    principal = request.user
    body = None
    try:
        body = request.data  # a malformed body raises here and is answered like any other error
        _ensure_object(body)
        key = idempotency_header(request)
        with transaction.atomic():
            claim = None
            if key is not None:
                claim = idempotency_claim(
                    principal=principal.label,
                    key=validate_key(key),
                    method=request.method,
                    path=request.get_full_path()[:500],
                    body=body,
                )
                if claim.record_id is None:
                    return _replayed(claim)
            status, data = handler(body)
            if claim is not None:
                stored = {**data, **dict.fromkeys(secret_fields)} if secret_fields else data
                idempotency_complete(record_id=claim.record_id, status=status, body=stored)
            if audited:
                audit_record(
                    request=request,
                    actor=principal.label,
                    action=action,
                    agent_id=agent_id,
                    status_code=status,
                    outcome="ok",
                    body=body,
                )
        return Response(data, status=status)
    except Exception as exc:
        return _refused(request, exc, action=action, agent_id=agent_id, body=body, audited=audited)


@dataclass(frozen=True)
class WriteFrame:
    """What ``run_single_write`` gives its handler: the request as read, and the rows that must be written
    in the same statement as the change."""

    request: object
    action: str
    agent_id: str
    body: dict
    idempotency_key: str | None
    fingerprint: str | None

    def requirements(self) -> list[RequiredRow]:
        """The request's API key must still be active when the change is written: with it in the statement,
        a revocation applies to the very next request even to a key ``CachedApiKeyAuthentication`` knew."""
        return [RequiredRow(ApiKey, {"pk": self.request.user.api_key.pk, "revoked_at": None})]

    def companions(self, *, status: int, data: dict) -> list[CompanionRow]:
        """The audit record of the success and, under an Idempotency-Key, the response to replay."""
        request, label = self.request, self.request.user.label
        rows = [
            CompanionRow(
                AuditRecord,
                audit_values(
                    request=request,
                    actor=label,
                    action=self.action,
                    agent_id=self.agent_id,
                    status_code=status,
                    outcome="ok",
                    body=self.body,
                ),
            )
        ]
        if self.idempotency_key is not None:
            rows.append(
                CompanionRow(
                    IdempotencyRecord,
                    idempotency_values(
                        principal=label,
                        key=self.idempotency_key,
                        method=request.method,
                        path=request.get_full_path()[:500],
                        fingerprint=self.fingerprint,
                        status=status,
                        body=data,
                    ),
                )
            )
        return rows


def run_single_write(
    request, *, action: str, agent_id: str, handler: Callable[[dict, WriteFrame], tuple[int, dict]]
) -> Response:
    """``run_mutation`` for a handler whose change is one statement: the hot path of allocations.

    The handler passes ``frame.companions(status=..., data=...)`` and ``frame.requirements()`` to the
    service that writes its change, so the audit record and the stored response go into that same
    statement, which also requires the API key to be still active: no transaction, no claim ahead of the
    work, one round trip. The outcome is the same as ``run_mutation``'s: a success is audited with it; a
    duplicate's statement fails on the idempotency key's unique index and is undone, and the stored
    response is replayed (not audited again); a refusal writes nothing but its audit record, and under a
    key that was already used answers as ``run_mutation`` would (the replay, or the key's reuse). A key
    revoked since it was authenticated (``CachedApiKeyAuthentication``) is answered 401, not audited.
    """
    principal = request.user
    body = None
    key = fingerprint = None
    try:
        body = request.data
        _ensure_object(body)
        header = idempotency_header(request)
        if header is not None:
            key = validate_key(header)
            fingerprint = request_fingerprint(
                method=request.method, path=request.get_full_path()[:500], body=body
            )
        frame = WriteFrame(
            request=request,
            action=action,
            agent_id=agent_id,
            body=body,
            idempotency_key=key,
            fingerprint=fingerprint,
        )
        status, data = handler(body, frame)
        return Response(data, status=status)
    except Exception as exc:
        error = exc
    recheck_key = principal.from_cache or isinstance(error, RequirementNotMet)
    if recheck_key and not principal_still_valid(principal):
        return exception_response(exceptions.AuthenticationFailed("invalid or revoked API key"))
    if key is not None:
        # Was the key used before? Then this is a duplicate (replay it) or a reuse (refuse it), whatever
        # the attempt itself ran into: a unique violation, a refusal, invalid input.
        try:
            claim = idempotency_replay(principal=principal.label, key=key, fingerprint=fingerprint)
        except LedgerError as exc:
            error = exc
        else:
            if claim is not None:
                return _replayed(claim)
    return _refused(request, error, action=action, agent_id=agent_id, body=body, audited=True)


def _replayed(claim) -> Response:
    response = Response(claim.replay_body, status=claim.replay_status)
    response["Idempotent-Replayed"] = "true"
    return response


def _refused(request, exc: Exception, *, action: str, agent_id: str, body, audited: bool) -> Response:
    response = exception_response(exc)
    if response is None:
        raise exc
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

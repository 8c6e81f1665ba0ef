"""The frame around every POST and PATCH: idempotency, one transaction, error shaping and the audit record."""

from __future__ import annotations

from collections.abc import Callable

from django.db import transaction
from rest_framework.response import Response

from allocation.api.errors import exception_response
from allocation.audit import audit_record
from allocation.idempotency import idempotency_claim, idempotency_complete, validate_key

Handler = Callable[[dict], tuple[int, dict]]


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
        if not isinstance(body, dict):
            from ledger.errors import LedgerError

            raise LedgerError("the request body must be a JSON object", code="malformed_json")
        key = request.headers.get("Idempotency-Key")
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
                    response = Response(claim.replay_body, status=claim.replay_status)
                    response["Idempotent-Replayed"] = "true"
                    return response
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
        response = exception_response(exc)
        if response is None:
            raise
        if audited:
            audit_record(
                request=request,
                actor=principal.label,
                action=action,
                agent_id=agent_id,
                status_code=response.status_code,
                outcome=response.data["error"]["code"],
                body=body if isinstance(body, dict | list) else None,
            )
        return response

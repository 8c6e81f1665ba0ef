"""The audit trail of state-changing calls: what a record holds (``audit_values``) and writing one alone."""

from __future__ import annotations

import json

from django.utils import timezone

from allocation.sql import mutation_record_write

MAX_BODY_CHARS = 4000


def _client_address(request) -> str | None:
    # REMOTE_ADDR only: X-Forwarded-For is set by clients too; a proxy in front should rewrite REMOTE_ADDR.
    return request.META.get("REMOTE_ADDR") or None


def audit_values(
    *, request, actor: str, action: str, agent_id: str, status_code: int, outcome: str, body
) -> dict[str, object]:
    """The field values of the audit record of ``request``, for ``audit_record`` or for a statement that
    writes the record together with the change it audits."""
    if body is not None:
        text = json.dumps(body, default=str)
        if len(text) > MAX_BODY_CHARS or "\\u0000" in text:
            # PostgreSQL's jsonb refuses NUL characters; keep such a body (and a huge one) as text.
            body = {"truncated": text[:MAX_BODY_CHARS].replace("\\u0000", "")}
    return {
        "actor": actor,
        "action": action,
        "agent_id": agent_id[:64],
        "method": request.method,
        "path": request.path[:500],
        "request_body": body,
        "idempotency_key": (request.META.get("HTTP_IDEMPOTENCY_KEY") or "")[:255],
        "status_code": status_code,
        "outcome": outcome[:100],
        "client_address": _client_address(request),
        "created_at": timezone.now(),
    }


def audit_record(
    *, request, actor: str, action: str, agent_id: str, status_code: int, outcome: str, body
) -> None:
    """Write the audit record of ``request`` on its own, through the one writer of request records."""
    mutation_record_write(
        {
            "audit": audit_values(
                request=request,
                actor=actor,
                action=action,
                agent_id=agent_id,
                status_code=status_code,
                outcome=outcome,
                body=body,
            )
        }
    )

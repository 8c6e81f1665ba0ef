"""An allocation and a usage row as the API shows them, built without a serializer: the hot paths (a single
allocation, each item of a batch) answer with ``allocation_body`` and keep it as the response an
idempotency key replays; the usage listing renders its page of up to 1,000 rows with ``usage_body``.

``AllocationOut`` and ``UsageOut`` (allocation/api/serializers.py) document the shapes, and
``AllocationOut`` renders allocations everywhere else; tests hold each pair to the same output.
"""

from __future__ import annotations

import datetime as dt
from decimal import ROUND_HALF_EVEN, Decimal

from django.utils import timezone

from allocation.models import Allocation
from ledger.models import COST, UNIT_PRICE

_COST_QUANTUM = Decimal(1).scaleb(-COST["decimal_places"])
_PRICE_QUANTUM = Decimal(1).scaleb(-UNIT_PRICE["decimal_places"])


def iso_datetime(value: dt.datetime | None) -> str | None:
    """A datetime as DRF renders it: ISO 8601 in the current time zone, 'Z' for UTC."""
    if value is None:
        return None
    text = timezone.localtime(value).isoformat()
    return text.removesuffix("+00:00") + "Z" if text.endswith("+00:00") else text


def decimal_text(value: Decimal, quantum: Decimal) -> str:
    """A decimal as DRF's ``DecimalField`` renders it: to the field's places, as a string."""
    return f"{Decimal(value).quantize(quantum, rounding=ROUND_HALF_EVEN):f}"


def allocation_body(allocation: Allocation) -> dict:
    """What ``AllocationOut(allocation).data`` gives."""
    settled = allocation.settled_amount
    return {
        "id": str(allocation.id),
        "agent_id": allocation.agent_id,
        "resource_type": allocation.resource_type_id,
        "allocated_amount": settled if settled is not None else allocation.amount,
        "cost_usd": decimal_text(allocation.cost_usd, _COST_QUANTUM),
        "unit_price_usd": decimal_text(allocation.unit_price_usd, _PRICE_QUANTUM),
        "status": str(allocation.status),
        "task_id": allocation.task_id,
        "run_id": allocation.run_id,
        "expires_at": iso_datetime(allocation.expires_at),
        "settled_amount": settled,
        "created_at": iso_datetime(allocation.created_at),
        "finished_at": iso_datetime(allocation.finished_at),
        "lease": allocation.lease,
    }


# The columns ``usage_body`` reads: the usage listing fetches only these, as dicts (no model instances).
USAGE_COLUMNS = (
    "id",
    "agent_id",
    "resource_type_id",
    "amount",
    "unit_price_usd",
    "cost_usd",
    "kind",
    "task_id",
    "idempotency_key",
    "metadata",
    "created_at",
)


def usage_body(row: dict) -> dict:
    """What ``UsageOut(usage_log).data`` gives, from a ``values(*USAGE_COLUMNS)`` row."""
    return {
        "id": row["id"],
        "agent_id": row["agent_id"],
        "resource_type": row["resource_type_id"],
        "amount": row["amount"],
        "unit_price_usd": decimal_text(row["unit_price_usd"], _PRICE_QUANTUM),
        "cost_usd": decimal_text(row["cost_usd"], _COST_QUANTUM),
        "kind": row["kind"],
        "task_id": row["task_id"],
        "idempotency_key": row["idempotency_key"],
        "metadata": row["metadata"],
        "created_at": iso_datetime(row["created_at"]),
    }

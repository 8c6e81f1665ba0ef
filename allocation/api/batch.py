"""Batch allocation routes: up to 1,000 committed allocations in one call, each item with its own result.

``POST /api/v1/agents/{id}/allocations/batch`` takes items of one agent (its key, or an operator's);
``POST /api/v1/usage/batch`` is for operators and takes items across agents, each naming its ``agent_id``.
The answer is 200 with one result per item, in order, and a summary: an invalid or refused item refuses
nothing else. Each item is charged to its agent's budgets (the agent's, its team's, its organization's, and
the run it names with ``run_id``): one that a hard budget has no room for is answered 429
``budget_exceeded`` with the budget's figures, as a single allocation would be. A malformed body, or fewer
than 1 or more than 1,000 items, refuses the whole request. Holds are not supported in a batch: items are
committed at once.

Items are validated here with the single endpoint's fields; the rules live in ``allocation.batch``. A body
whose items are all plainly valid (the usual batch) is read and checked by msgspec in one pass over the bytes
(``BatchJSONParser``), and the answer is written by orjson: no serializer, and no Python call per field of
an item. Anything else (an invalid or unusual item, a body the project's parser would refuse) goes through
the project's parser and the serializers, item by item, exactly as before: the fast path only ever accepts
what the serializers accept, with the same data (a test holds the two together).
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Annotated

import msgspec
import orjson
from django.urls import path
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.exceptions import ParseError
from rest_framework.renderers import JSONRenderer
from rest_framework.utils.encoders import JSONEncoder
from rest_framework.views import APIView

from allocation.api.serializers import (
    RUN_ID,
    AllocationOut,
    AmountField,
    ResourceTypeField,
    StrictSerializer,
    plain_text,
)
from allocation.api.shared import converters  # noqa: F401  (registers <agent_id:...>)
from allocation.api.shared.audit import audit_record
from allocation.api.shared.auth import ApiKeyAuthentication, IsAuthenticatedPrincipal, IsOperator, agent_for
from allocation.api.shared.errors import exception_response
from allocation.api.shared.idempotency import request_fingerprint
from allocation.api.shared.mutation import run_mutation
from allocation.api.shared.parsers import GridJSONParser, body_check
from allocation.batch import MAX_BATCH_ITEMS, MAX_ITEM_KEY_LENGTH, BatchItem, allocations_batch_create
from ledger.errors import LedgerError
from ledger.invariants import MAX_AMOUNT, amount_is_valid
from ledger.reference_cache import resource_type_codes

MAX_METADATA_CHARS = 4000
AUDITED_AGENT_IDS = 100


class BatchItemsField(serializers.ListField):
    """The items, any JSON values: they are checked one by one below, so that an invalid item refuses only
    itself. ``item`` is the serializer of a valid item, for the API schema."""

    def __init__(self, *, item: type[serializers.Serializer] | None = None, **kwargs):
        self.item = item
        super().__init__(min_length=1, max_length=MAX_BATCH_ITEMS, **kwargs)


class BatchIn(StrictSerializer):
    items = BatchItemsField()


def _printable(value: str) -> None:
    if not value.isprintable():
        raise serializers.ValidationError("must be printable characters")


def _metadata_ok(value: dict) -> bool:
    text = json.dumps(value)
    return len(text) <= MAX_METADATA_CHARS and "\\u0000" not in text  # jsonb refuses NUL characters


class BatchItemIn(StrictSerializer):
    resource_type = ResourceTypeField()
    amount = AmountField()
    task_id = serializers.CharField(max_length=200, required=False, allow_blank=True, default="")
    run_id = serializers.CharField(
        **RUN_ID, help_text="A run of the item's agent (POST .../runs): its budget applies too."
    )
    idempotency_key = serializers.CharField(
        max_length=MAX_ITEM_KEY_LENGTH, required=False, trim_whitespace=False, validators=[_printable]
    )
    metadata = serializers.DictField(required=False, default=dict)

    def to_internal_value(self, data):
        if isinstance(data, dict) and ("hold" in data or "hold_ttl_seconds" in data):
            raise serializers.ValidationError(
                {"hold": ["holds are not supported in a batch: POST .../allocations takes a hold"]}
            )
        return super().to_internal_value(data)

    def validate_metadata(self, value: dict) -> dict:
        if not _metadata_ok(value):
            raise serializers.ValidationError(
                f"must be at most {MAX_METADATA_CHARS} characters as JSON, without NUL characters"
            )
        return value


class UsageBatchItemIn(BatchItemIn):
    agent_id = serializers.CharField(max_length=64)


class AllocationBatchIn(BatchIn):
    """The request body of the agent route, for the API schema."""

    items = BatchItemsField(item=BatchItemIn)


class UsageBatchIn(BatchIn):
    """The request body of the operator route, for the API schema."""

    items = BatchItemsField(item=UsageBatchItemIn)


class BatchErrorOut(serializers.Serializer):
    code = serializers.CharField()
    message = serializers.CharField()
    details = serializers.DictField()


class BatchResultOut(serializers.Serializer):
    index = serializers.IntegerField()
    status = serializers.IntegerField(
        help_text="201, or the status a single allocation would be refused with"
    )
    allocation = AllocationOut(required=False, help_text="When the item was accepted (or replayed).")
    error = BatchErrorOut(required=False, help_text="When the item was refused.")
    replayed = serializers.BooleanField(required=False, help_text="The stored result of an item key.")


class BatchSummaryOut(serializers.Serializer):
    accepted = serializers.IntegerField()
    refused = serializers.IntegerField()
    replayed = serializers.IntegerField()


class BatchOut(serializers.Serializer):
    results = BatchResultOut(many=True)
    summary = BatchSummaryOut()


_ITEM_FIELDS = frozenset(BatchItemIn._declared_fields)
_USAGE_ITEM_FIELDS = frozenset(UsageBatchItemIn._declared_fields)


def _key_plain(value) -> bool:
    return bool(value) and plain_text(value, MAX_ITEM_KEY_LENGTH)


def _item_fast(raw, *, with_agent: bool) -> dict | None:
    """The validated item for a plainly valid ``raw`` item, else None and the serializer says what is wrong.

    DRF runs a few dozen calls per field; at 1,000 items that is most of a batch's time. This accepts only
    what ``BatchItemIn`` (``UsageBatchItemIn``) accepts and returns the same data, so anything unusual
    (and every invalid item) still goes through the serializer; a test holds the two together.
    """
    if type(raw) is not dict or not raw.keys() <= (_USAGE_ITEM_FIELDS if with_agent else _ITEM_FIELDS):
        return None
    resource_type = raw.get("resource_type")
    amount = raw.get("amount")
    task_id = raw.get("task_id", "")
    run_id = raw.get("run_id", "")
    metadata = raw.get("metadata", {})
    agent_id = raw.get("agent_id") if with_agent else None
    if (
        type(resource_type) is not str
        or resource_type not in resource_type_codes()
        or type(amount) is not int
        or not amount_is_valid(amount)
        or not plain_text(task_id, 200)
        or not plain_text(run_id, 200)
        or ("idempotency_key" in raw and not _key_plain(raw["idempotency_key"]))
        or (with_agent and not (agent_id and plain_text(agent_id, 64)))
        or type(metadata) is not dict
        or (metadata and not _metadata_ok(metadata))
    ):
        return None
    data = {
        "resource_type": resource_type,
        "amount": amount,
        "task_id": task_id,
        "run_id": run_id,
        "metadata": metadata,
    }
    if "idempotency_key" in raw:
        data["idempotency_key"] = raw["idempotency_key"]
    if with_agent:
        data["agent_id"] = agent_id
    return data


# --- The fast path: msgspec reads and checks the whole body at once -----------------------------------------

_ItemText = Annotated[str, msgspec.Meta(max_length=200)]


class _FastItem(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """An item as ``BatchItemIn`` takes it, in the shapes msgspec can check alone (types, lengths, bounds);
    what it cannot (printable text, a known resource type, metadata) ``_items_fast`` checks after."""

    resource_type: str
    amount: Annotated[int, msgspec.Meta(ge=1, le=MAX_AMOUNT)]  # an int: true, 1.0 and "1" are refused
    task_id: _ItemText = ""
    run_id: _ItemText = ""
    idempotency_key: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ITEM_KEY_LENGTH)] = ""
    metadata: dict = msgspec.field(default_factory=dict)


class _FastUsageItem(_FastItem, kw_only=True):
    agent_id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


class _FastBody(msgspec.Struct, forbid_unknown_fields=True):
    items: Annotated[list[_FastItem], msgspec.Meta(min_length=1, max_length=MAX_BATCH_ITEMS)]


class _FastUsageBody(msgspec.Struct, forbid_unknown_fields=True):
    items: Annotated[list[_FastUsageItem], msgspec.Meta(min_length=1, max_length=MAX_BATCH_ITEMS)]


_DECODERS = {False: msgspec.json.Decoder(_FastBody), True: msgspec.json.Decoder(_FastUsageBody)}
_PLAIN_DECODER = msgspec.json.Decoder()
# Metadata is the only part of a fast body nested deeper than its item: at this depth (body, items, item).
_METADATA_DEPTH = 3


class ParsedBatch(dict):
    """A batch body as ``BatchJSONParser`` read it: the same dict the project's parser gives, and its items
    as checked by msgspec (``typed``), or None when the body is not plainly valid."""

    typed: _FastBody | _FastUsageBody | None = None


class BatchJSONParser(GridJSONParser):
    """The project's JSON parser, with a fast path for a plainly valid batch body.

    msgspec refuses what the project's parser refuses (unpaired surrogates, numbers out of range, NaN),
    except NUL characters and nesting; a body with either, or anything msgspec's shapes refuse, is read by
    the project's parser, which answers it as before. The dict is msgspec's own reading of the same bytes:
    for a body both accept they read the same values (integers of any size, duplicate keys: the last)."""

    def parse(self, stream, media_type=None, parser_context=None):
        raw = stream.read()
        with_agent = getattr((parser_context or {}).get("view"), "items_name_agents", False)
        if b"\\u0000" not in raw:
            try:
                typed = _DECODERS[with_agent].decode(raw)
            except (msgspec.DecodeError, msgspec.ValidationError):
                typed = None
            if typed is not None and _nesting_ok(typed):
                body = ParsedBatch(_PLAIN_DECODER.decode(raw))
                body.typed = typed
                return body
        return super().parse(io.BytesIO(raw), media_type, parser_context)


def _nesting_ok(typed) -> bool:
    """No metadata nested deeper than the project's parser allows (``body_check``, at its depth)."""
    try:
        for item in typed.items:
            if item.metadata:
                body_check(_nested(item.metadata, _METADATA_DEPTH))
    except ParseError:
        return False
    return True


def _nested(value, depth: int):
    for _ in range(depth):
        value = [value]
    return value


_FINGERPRINT_ENCODER = msgspec.json.Encoder(order="sorted")


def _items_fast(request, body, agent_id: str | None) -> list[BatchItem] | None:
    """The items of a body ``BatchJSONParser`` found plainly valid, checked for what msgspec could not
    check; None when any item is not plainly valid (the serializers then read every item).

    Text fields must be what the CharFields accept unchanged (``plain_text``): printable, nothing to trim.
    Checked for all items at once: joined, they are printable if each one is, and a field that starts or
    ends with a space shows as a space beside a separator."""
    typed = getattr(body, "typed", None)
    if typed is None:
        return None
    fast_items = typed.items
    with_agent = agent_id is None
    resource_types = [item.resource_type for item in fast_items]
    if not set(resource_types) <= resource_type_codes():
        return None
    agent_ids = [item.agent_id for item in fast_items] if with_agent else [agent_id] * len(fast_items)
    task_ids = [item.task_id for item in fast_items]
    run_ids = [item.run_id for item in fast_items]
    keys = [item.idempotency_key for item in fast_items]
    texts = (agent_ids if with_agent else []) + task_ids + run_ids + keys
    if not "|".join(texts).isprintable():
        return None
    joined = "\n" + "\n".join(texts) + "\n"  # printable text has no newline of its own
    if "\n " in joined or " \n" in joined:
        return None
    if not all(_metadata_ok(item.metadata) for item in fast_items if item.metadata):
        return None
    ascii_only = joined.isascii() and "".join(set(resource_types)).isascii()
    fingerprints = _fingerprints(request, body["items"], keys, fast_items, ascii_only=ascii_only)
    return [
        BatchItem(agent, resource_type, item.amount, task, run, item.metadata, key, fingerprint)
        for agent, resource_type, item, task, run, key, fingerprint in zip(
            agent_ids, resource_types, fast_items, task_ids, run_ids, keys, fingerprints, strict=True
        )
    ]


def _fingerprints(request, raw_items: list, keys: list[str], fast_items, *, ascii_only: bool) -> list[str]:
    """``request_fingerprint`` of each keyed item as sent ("" for an item without a key).

    For an item of printable ASCII text and integers, msgspec's sorted, compact JSON is byte for byte the
    canonical text of ``request_fingerprint`` (which escapes everything else): encoded by msgspec. An item
    with metadata, or a batch with other text, is encoded by ``request_fingerprint`` itself."""
    path = request.path
    prefix = f"POST\n{path}\n".encode()
    encode = _FINGERPRINT_ENCODER.encode
    sha256 = hashlib.sha256
    return [
        ""
        if not key
        else sha256(prefix + encode(raw)).hexdigest()
        if ascii_only and not item.metadata
        else request_fingerprint(method="POST", path=path, body=raw)
        for raw, key, item in zip(raw_items, keys, fast_items, strict=True)
    ]


def _items_read(request, body: dict, item_serializer: BatchItemIn, agent_id: str | None) -> list[BatchItem]:
    """Each raw item as a ``BatchItem``, an invalid one carrying its 400 (and its key, if that is valid)."""
    fast = _items_fast(request, body, agent_id)
    if fast is not None:
        return fast
    raw_items = BatchIn(data=body)
    raw_items.is_valid(raise_exception=True)
    key_field = item_serializer.fields["idempotency_key"]
    items = []
    for raw in raw_items.validated_data["items"]:
        key = ""
        fingerprint = ""
        if isinstance(raw, dict) and "idempotency_key" in raw:
            # The key is read first and on its own: like the Idempotency-Key of a single request, a key
            # used before with another item answers 422 even when this item is invalid.
            key = raw["idempotency_key"]
            if not _key_plain(key):
                try:
                    key = key_field.run_validation(key)
                except serializers.ValidationError:
                    key = ""
            if key:
                fingerprint = request_fingerprint(method="POST", path=request.path, body=raw)
        try:
            data = _item_fast(raw, with_agent=agent_id is None) or item_serializer.run_validation(raw)
        except serializers.ValidationError as exc:
            error = exception_response(exc).data["error"]
            items.append(
                BatchItem(
                    agent_id=agent_id or "",
                    idempotency_key=key,
                    fingerprint=fingerprint,
                    error=LedgerError(error["message"], code=error["code"], details=error["details"]),
                )
            )
            continue
        items.append(
            BatchItem(
                agent_id=agent_id or data["agent_id"],
                resource_type_id=data["resource_type"],
                amount=data["amount"],
                task_id=data["task_id"],
                run_id=data["run_id"],
                metadata=data["metadata"],
                idempotency_key=key,
                fingerprint=fingerprint,
            )
        )
    return items


def _batch_run(request, *, action: str, agent_id: str, item_serializer: BatchItemIn, resolve_agent):
    """The frame of both routes: ``run_mutation`` (request-level Idempotency-Key, one transaction), and one
    audit record with the counts rather than the (up to 1,000 items) body."""

    def handle(body):
        agent = resolve_agent()
        items = _items_read(request, body, item_serializer, agent.pk if agent else None)
        outcome = allocations_batch_create(
            items=items, principal=request.user.label, path=request.path[:500], agent=agent
        )
        audit_record(
            request=request,
            actor=request.user.label,
            action=action,
            agent_id=agent_id,
            status_code=200,
            outcome="ok",
            body={
                "items": len(items),
                **outcome.summary,
                "agent_ids": outcome.agent_ids[:AUDITED_AGENT_IDS],
            },
        )
        return 200, {"results": outcome.results, "summary": outcome.summary}

    response = run_mutation(request, action=action, agent_id=agent_id, handler=handle, audited=False)
    if response.status_code >= 400:  # refused as a whole, and rolled back: audited on its own
        items = request.data.get("items") if isinstance(request.data, dict) else None
        audit_record(
            request=request,
            actor=request.user.label,
            action=action,
            agent_id=agent_id,
            status_code=response.status_code,
            outcome=response.data["error"]["code"],
            body={"items": len(items) if isinstance(items, list) else None},
        )
    return response


_DRF_ENCODER = JSONEncoder()


class BatchJSONRenderer(JSONRenderer):
    """DRF's JSON renderer, written by orjson: an answer of 1,000 results took DRF's encoder longer than the
    rest of the request. Same JSON (what orjson cannot write, DRF's encoder writes: lazy text, decimals);
    DRF's renderer itself for what orjson refuses (an integer beyond 64 bits)."""

    def render(self, data, accepted_media_type=None, renderer_context=None):
        if data is None:
            return b""
        try:
            return orjson.dumps(data, default=_DRF_ENCODER.default)
        except TypeError:
            return super().render(data, accepted_media_type, renderer_context)


class _BatchView(APIView):
    authentication_classes = [ApiKeyAuthentication]
    permission_classes = [IsAuthenticatedPrincipal]
    parser_classes = [BatchJSONParser]
    renderer_classes = [BatchJSONRenderer]
    items_name_agents = False  # do the items name their agent (the operators' route)?


class AllocationBatchView(_BatchView):
    @extend_schema(
        request=AllocationBatchIn,
        responses={200: BatchOut},
        summary="Commit up to 1,000 allocations of an agent",
    )
    def post(self, request, agent_id):
        return _batch_run(
            request,
            action="allocation.batch",
            agent_id=agent_id,
            item_serializer=BatchItemIn(),
            resolve_agent=lambda: agent_for(request.user, agent_id),
        )


class UsageBatchView(_BatchView):
    permission_classes = [IsOperator]
    items_name_agents = True

    @extend_schema(
        request=UsageBatchIn,
        responses={200: BatchOut},
        summary="Commit up to 1,000 allocations across agents",
    )
    def post(self, request):
        return _batch_run(
            request,
            action="usage.batch",
            agent_id="",
            item_serializer=UsageBatchItemIn(),
            resolve_agent=lambda: None,
        )


urlpatterns = [
    path(
        "v1/agents/<agent_id:agent_id>/allocations/batch",
        AllocationBatchView.as_view(),
        name="allocations-batch",
    ),
    path("v1/usage/batch", UsageBatchView.as_view(), name="usage-batch"),
]

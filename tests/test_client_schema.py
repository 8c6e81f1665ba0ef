"""The Python client's models cannot drift from the server: every dataclass in ``axiom_grid_client.models``
has exactly the fields of the OpenAPI component it mirrors (a field the server sends that the model lacks
fails as surely as a field the model invents), with the matching types (decimal strings as ``Decimal``,
date-times as ``datetime``, integers, booleans, nested models), and the client's batch chunk is the
server's maximum."""

from __future__ import annotations

import dataclasses
import datetime as dt
import types
import typing
from decimal import Decimal

import pytest
from axiom_grid_client import MAX_BATCH_ITEMS, models
from drf_spectacular.generators import SchemaGenerator

# Each model and the component of the answer it is built from.
COMPONENTS: dict[type[models.Model], str] = {
    models.Allocation: "AllocationOut",
    models.QuotaCheck: "QuotaCheckOut",
    models.Quota: "QuotaOut",
    models.Cost: "CostOut",
    models.UsageRecord: "UsageOut",
    models.Share: "ShareOut",
    models.Budget: "BudgetOut",
    models.Run: "BudgetOut",
    models.Alert: "AlertOut",
    models.Execution: "ExecutionOut",
    models.Deal: "DealOut",
    models.Purchase: "PurchaseOut",
    models.BatchError: "BatchErrorOut",
    models.BatchResult: "BatchResultOut",
    models.Agent: "AgentOut",
    models.AgentCreated: "AgentCreatedOut",
}


@pytest.fixture(scope="module")
def schema(django_db_setup, django_db_blocker) -> dict:
    """The schema ``/api/schema/`` serves (generating it reads the resource types' choices)."""
    with django_db_blocker.unblock():
        return SchemaGenerator().get_schema(request=None, public=True)


def _resolve(schema: dict, node: dict) -> dict:
    if "allOf" in node and len(node["allOf"]) == 1:
        node = node["allOf"][0]
    while "$ref" in node:
        node = schema["components"]["schemas"][node["$ref"].rsplit("/", 1)[1]]
    return node


def _component(schema: dict, name: str) -> dict:
    return schema["components"]["schemas"][name]


def _plain(hint):
    """The type a hint names, without ``| None``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if len(options) == 1:
            return options[0]
    return hint


def _type_mismatch(schema: dict, hint, prop: dict) -> str | None:
    """Why the model's ``hint`` cannot hold what ``prop`` describes; None if it can."""
    hint = _plain(hint)
    prop = _resolve(schema, prop)
    kind, form = prop.get("type"), prop.get("format")
    origin = typing.get_origin(hint)
    if isinstance(hint, type) and issubclass(hint, models.Model):
        return None if "properties" in prop else f"{hint.__name__} for a non-object"
    if hint is typing.Any or (kind is None and "enum" not in prop and "properties" not in prop):
        return None  # any JSON
    if form == "decimal":
        return None if hint is Decimal else "a decimal string must be Decimal"
    if form == "date-time":
        return None if hint is dt.datetime else "a date-time must be datetime"
    if kind == "integer":
        return None if hint is int else "an integer must be int"
    if kind == "boolean":
        return None if hint is bool else "a boolean must be bool"
    if kind == "string" or "enum" in prop:
        return None if hint is str else "a string must be str"
    if kind == "array":
        return None if origin is list else "an array must be a list"
    if kind == "object":
        if origin is not dict:
            return "an object must be a dict"
        value_hint = typing.get_args(hint)[1]
        values = prop.get("additionalProperties")
        if isinstance(values, dict) and values:
            return _type_mismatch(schema, value_hint, values)
        return None
    return f"no rule for {prop}"


def test_every_model_mirrors_a_component():
    assert set(COMPONENTS) == set(models.MODELS)


@pytest.mark.parametrize("model", list(COMPONENTS), ids=lambda model: model.__name__)
def test_model_fields_are_the_components_fields_with_matching_types(schema, model):
    component = _component(schema, COMPONENTS[model])
    properties = component["properties"]
    fields = set(model.fields())
    assert not fields - set(properties), f"{model.__name__} has fields the server does not send"
    assert not set(properties) - fields, f"{model.__name__} lacks fields the server sends"

    hints = typing.get_type_hints(model)
    mismatches = {
        name: why
        for name, prop in properties.items()
        if (why := _type_mismatch(schema, hints[name], prop)) is not None
    }
    assert not mismatches, f"{model.__name__}: {mismatches}"

    # A field the server may leave out, or send as null, has a default in the model.
    defaults = {field.name for field in dataclasses.fields(model) if field.default is not dataclasses.MISSING}
    defaults |= {f.name for f in dataclasses.fields(model) if f.default_factory is not dataclasses.MISSING}
    required = set(component.get("required", []))
    nullable = {name for name, prop in properties.items() if _resolve(schema, prop).get("nullable")}
    assert not (set(properties) - required - defaults), "an optional field needs a default"
    assert not (nullable - defaults), "a nullable field needs a default"


def test_an_unknown_field_is_ignored_and_kept_in_raw():
    data = {"allowed": True, "available": 5, "reason": "ok", "new_field": [1]}
    check = models.QuotaCheck.from_dict(data)
    assert (check.allowed, check.available, check.details) == (True, 5, {})
    assert check.raw == data


@pytest.mark.parametrize("route", ["AllocationBatchIn", "UsageBatchIn"])
def test_the_client_chunks_batches_at_the_servers_maximum(schema, route):
    assert _component(schema, route)["properties"]["items"]["maxItems"] == MAX_BATCH_ITEMS

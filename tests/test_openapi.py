"""The OpenAPI schema: valid with no warning, and it says what the server does (security, errors, pages,
strict bodies)."""

from __future__ import annotations

import json

import pytest
from django.core.management import call_command
from drf_spectacular.drainage import GENERATOR_STATS

pytestmark = pytest.mark.django_db

METHODS = {"get", "post", "put", "patch", "delete"}
MUTATIONS = {"post", "put", "patch"}


@pytest.fixture
def schema(reference_data, tmp_path) -> dict:
    """The schema as ``manage.py spectacular --validate --fail-on-warn`` writes it: that command raises on
    any warning or error, and validates the result against the OpenAPI 3.0 specification."""
    GENERATOR_STATS.reset()
    path = tmp_path / "openapi.json"
    call_command(
        "spectacular", "--validate", "--fail-on-warn", "--format", "openapi-json", "--file", str(path)
    )
    assert not GENERATOR_STATS  # no warning and no error
    return json.loads(path.read_text())


def _operations(schema: dict):
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            if method in METHODS:
                yield f"{method.upper()} {path}", method, operation


def _resolve(schema: dict, node: dict) -> dict:
    while "$ref" in node:
        node = schema["components"]["schemas"][node["$ref"].rsplit("/", 1)[1]]
    return node


def test_every_operation_carries_the_bearer_key(schema):
    assert schema["components"]["securitySchemes"] == {
        "ApiKey": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer axg_..."}
    }
    for name, _, operation in _operations(schema):
        assert operation.get("security") == [{"ApiKey": []}], name


def test_the_allocation_hot_path_is_documented_with_its_key(schema):
    operation = schema["paths"]["/api/v1/agents/{agent_id}/allocations"]["post"]

    assert operation["security"] == [{"ApiKey": []}]
    assert {"401", "403", "404", "429"} <= set(operation["responses"])


def test_every_operation_documents_its_errors_in_the_one_error_shape(schema):
    error = schema["components"]["schemas"]["Error"]
    assert error["required"] == ["error"]
    assert error["properties"]["error"]["required"] == ["code", "message", "details"]
    for name, method, operation in _operations(schema):
        responses = operation["responses"]
        errors = {status for status in responses if status >= "400"}
        expected = {"401", "503"} | ({"400", "409", "413", "415", "422"} if method in MUTATIONS else set())
        assert expected <= errors, name
        for status in errors:
            body = responses[status]["content"]["application/json"]["schema"]
            assert body == {"$ref": "#/components/schemas/Error"}, (name, status)
        assert responses["401"]["headers"]["WWW-Authenticate"]["required"] is True
        if "{" in name:
            assert "404" in errors, name


def test_error_responses_name_their_codes(schema):
    responses = schema["paths"]["/api/v1/agents/{agent_id}/allocations"]["post"]["responses"]

    assert "`quota_exceeded`" in responses["429"]["description"]
    assert "`agent_throttled`" in responses["429"]["description"]
    assert responses["429"]["headers"]["Retry-After"]["required"] is True
    assert "`agent_suspended`" in responses["403"]["description"]
    assert "`idempotency_key_reused`" in responses["422"]["description"]


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/agents/{agent_id}/alerts",
        "/api/v1/agents/{agent_id}/scaling-events",
        "/api/v1/agents/{agent_id}/usage",
        "/api/v1/marketplace/deals",
    ],
)
def test_cursor_paginated_lists_declare_their_page(schema, path):
    operation = schema["paths"][path]["get"]
    page = _resolve(schema, operation["responses"]["200"]["content"]["application/json"]["schema"])

    assert page["type"] == "object"
    assert set(page["properties"]) == {"next", "previous", "results"}
    assert page["properties"]["results"]["type"] == "array"
    parameters = {parameter["name"]: parameter for parameter in operation["parameters"]}
    assert {"cursor", "page_size"} <= set(parameters)
    assert parameters["page_size"]["schema"]["minimum"] == 1


def test_strict_request_bodies_refuse_unknown_fields(schema):
    for name, method, operation in _operations(schema):
        if method not in MUTATIONS or name == "POST /api/resources":  # the compat endpoint ignores extras
            continue
        body = _resolve(schema, operation["requestBody"]["content"]["application/json"]["schema"])
        assert body["additionalProperties"] is False, name


def test_request_constraints_are_declared(schema):
    components = schema["components"]["schemas"]
    allocation = components["AllocationIn"]["properties"]
    assert allocation["amount"] == {
        "type": "integer",
        "format": "int64",
        "minimum": 1,
        "maximum": 2**53,
    }
    assert _resolve(schema, allocation["resource_type"]["allOf"][0])["enum"] == sorted(
        ["AI_TOKENS", "COMPUTE_MS", "NETWORK_REQS", "SOLANA_LAMPORTS", "STORAGE_KB"]
    )
    assert allocation["task_id"]["maxLength"] == 200
    assert allocation["hold_ttl_seconds"]["maximum"] == 7 * 86400
    budget = components["AgentCreateIn"]["properties"]["monthly_budget_usd"]
    assert budget["pattern"] == r"^(?:\d{1,18}(?:\.\d{0,2})?|\.\d{1,2})$"
    execution = components["ExecutionIn"]["properties"]["resources"]
    assert execution["additionalProperties"] is False and execution["minProperties"] == 1
    key = schema["paths"]["/api/v1/agents/{agent_id}/allocations"]["post"]["parameters"][-1]
    assert (key["name"], key["in"], key["schema"]["maxLength"]) == ("Idempotency-Key", "header", 255)


def test_swagger_ui_keeps_the_key_for_try_it_out(settings, client):
    assert settings.SPECTACULAR_SETTINGS["SWAGGER_UI_SETTINGS"]["persistAuthorization"] is True

    response = client.get("/api/docs/")

    assert response.status_code == 200
    assert b"persistAuthorization" in response.content

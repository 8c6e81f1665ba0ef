"""OpenAPI descriptions for the pieces drf-spectacular cannot guess: bearer keys and integer amounts."""

from __future__ import annotations

from drf_spectacular.extensions import OpenApiAuthenticationExtension, OpenApiSerializerFieldExtension
from drf_spectacular.plumbing import build_basic_type
from drf_spectacular.types import OpenApiTypes

from ledger.invariants import MAX_AMOUNT


class ApiKeyScheme(OpenApiAuthenticationExtension):
    target_class = "allocation.api.shared.auth.ApiKeyAuthentication"
    name = "ApiKey"

    def get_security_definition(self, auto_schema):
        return {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer axg_..."}


class AmountFieldSchema(OpenApiSerializerFieldExtension):
    target_class = "allocation.api.serializers.AmountField"

    def map_serializer_field(self, auto_schema, direction):
        schema = build_basic_type(OpenApiTypes.INT64)
        schema.update({"minimum": self.target.min_value, "maximum": MAX_AMOUNT})
        return schema

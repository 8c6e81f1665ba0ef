"""The OpenAPI schema tells what the server does: drf-spectacular's ``AutoSchema`` plus what it cannot guess.

* **Keys**: every view authenticates with ``ApiKeyAuthentication`` or a subclass of it (the allocation hot
  path's ``CachedApiKeyAuthentication``), so every operation carries the ``ApiKey`` bearer requirement.
* **Errors**: every operation lists the error responses it can give, each with the one error body
  (component ``Error``) and the codes that status stands for. ``GridAutoSchema`` derives the common ones from
  the view (authentication, operator permission, path and query parameters, pagination, and the mutation
  frame every POST, PUT and PATCH runs through); a view adds its domain errors with ``@errors(...)``.
* **Request constraints**: a ``StrictSerializer`` refuses unknown keys, so its schema says
  ``additionalProperties: false``; amounts are JSON integers from 1 (or 0) to 2^53; resource types and tiers
  are enums of the reference data the server validates against, read when the schema is generated.
"""

from __future__ import annotations

from collections.abc import Callable

from django.db import DatabaseError
from drf_spectacular.drainage import set_override
from drf_spectacular.extensions import OpenApiAuthenticationExtension, OpenApiSerializerFieldExtension
from drf_spectacular.openapi import AutoSchema
from drf_spectacular.plumbing import ResolvedComponent, build_basic_type, get_class
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import PolymorphicProxySerializer
from rest_framework import exceptions, serializers
from rest_framework.pagination import BasePagination

from allocation.api.shared.errors import API_EXCEPTION_CODES
from ledger.errors import Conflict, LedgerError
from ledger.invariants import MAX_AMOUNT

ERROR_COMPONENT = "Error"
ERROR_SCHEMA = {
    "type": "object",
    "description": "The one error body of the API.",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "code": {"type": "string", "description": "Machine-readable, e.g. `quota_exceeded`."},
                "message": {"type": "string", "description": "For people; may change."},
                "details": {
                    "type": "object",
                    "additionalProperties": {},
                    "description": "What the code needs: `fields` for `validation_error` (field name -> "
                    "list of `{code, message}`), `requested` and `available` for `quota_exceeded`, ...",
                },
            },
            "required": ["code", "message", "details"],
        }
    },
    "required": ["error"],
}
MUTATION_METHODS = frozenset({"POST", "PUT", "PATCH"})
ENUM_LIMIT = 200  # reference data with more values than this is described as a plain string


def _drf(exception_class: type[exceptions.APIException]) -> tuple[str, int]:
    return API_EXCEPTION_CODES[exception_class], exception_class.status_code


# Every operation authenticates with a bearer key.
AUTH_ERRORS = dict([_drf(exceptions.NotAuthenticated), _drf(exceptions.AuthenticationFailed)])
# What the mutation frame (``allocation.api.shared.mutation``) and the JSON parser answer for any POST, PUT
# or PATCH: a body that is not a JSON object or is invalid, an Idempotency-Key that is malformed, reused
# with another request or still running, and a body over the upload limit (``errors.exception_response``).
MUTATION_ERRORS = {
    "validation_error": 400,
    "malformed_json": 400,
    "invalid_idempotency_key": LedgerError.status,
    "idempotency_in_progress": Conflict.status,
    "idempotency_key_reused": 422,
    "payload_too_large": 413,
    **dict([_drf(exceptions.UnsupportedMediaType)]),
}
NOT_FOUND = dict([_drf(exceptions.NotFound)])
# Any request while the database is unreachable (errors.exception_response).
UNAVAILABLE = {"service_unavailable": 503}
RETRY_AFTER = {
    "Retry-After": {
        "schema": {"type": "integer", "minimum": 1},
        "required": True,
        "description": "Seconds after which trying again may succeed",
    }
}
WWW_AUTHENTICATE = {"WWW-Authenticate": {"schema": {"type": "string", "enum": ["Bearer"]}, "required": True}}


def errors(*kinds: type[LedgerError], **codes: type[LedgerError] | int) -> Callable:
    """Declare the domain errors a view method can answer, beyond those ``GridAutoSchema`` derives.

    ``kinds`` are error classes (their code and status); ``codes`` name a code raised with another class
    or status: ``@errors(QuotaExceeded, hold_not_open=Conflict, invalid_target=400)``.
    """
    declared = {kind.code: kind.status for kind in kinds}
    declared.update({code: kind if isinstance(kind, int) else kind.status for code, kind in codes.items()})

    def decorate(method):
        method.grid_errors = {**getattr(method, "grid_errors", {}), **declared}
        return method

    return decorate


class GridAutoSchema(AutoSchema):
    """``DEFAULT_SCHEMA_CLASS``: drf-spectacular's schema, with error responses, strict bodies and the
    Idempotency-Key header."""

    def error_codes(self) -> dict[str, int]:
        """The error codes this operation can answer, with their statuses."""
        from allocation.api.shared.auth import IsOperator

        codes: dict[str, int] = {}
        if self.view.get_authenticators():
            codes.update(AUTH_ERRORS)
        if any(isinstance(permission, IsOperator) for permission in self.view.get_permissions()):
            codes.update(dict([_drf(exceptions.PermissionDenied)]))
        parameters = self._get_parameters()
        if any(parameter["in"] == "path" for parameter in parameters) or self._paginated():
            codes.update(NOT_FOUND)  # an unknown (or another agent's) object; an invalid page or cursor
        if self.method in MUTATION_METHODS:
            codes.update(MUTATION_ERRORS)
        elif any(parameter["in"] == "query" for parameter in parameters):
            codes["validation_error"] = 400
        handler = getattr(self.view, self.method.lower(), None)
        codes.update(getattr(handler, "grid_errors", {}))
        codes.update(UNAVAILABLE)
        return codes

    def _paginated(self) -> bool:
        paginator = self._get_paginator()
        return isinstance(paginator, BasePagination) and self._is_list_view()

    def _get_response_bodies(self, direction="response"):
        responses = super()._get_response_bodies(direction)
        if direction != "response":
            return responses
        ref = self._error_ref()
        by_status: dict[int, list[str]] = {}
        for code, status in self.error_codes().items():
            by_status.setdefault(status, []).append(code)
        for status, codes in sorted(by_status.items()):
            response = {
                "description": "Error code " + ", ".join(f"`{code}`" for code in sorted(codes)) + ".",
                "content": {"application/json": {"schema": ref}},
            }
            if status == exceptions.NotAuthenticated.status_code:
                response["headers"] = WWW_AUTHENTICATE
            elif status in (429, 503):
                response["headers"] = RETRY_AFTER
            responses.setdefault(str(status), response)
        return responses

    def _error_ref(self) -> dict:
        component = ResolvedComponent(
            name=ERROR_COMPONENT, type=ResolvedComponent.SCHEMA, object=ERROR_COMPONENT, schema=ERROR_SCHEMA
        )
        self.registry.register_on_missing(component)
        return component.ref

    def _get_parameters(self):
        parameters = super()._get_parameters()
        if self.method in MUTATION_METHODS:
            from allocation.api.shared.idempotency import MAX_KEY_LENGTH

            parameters.append(
                {
                    "in": "header",
                    "name": "Idempotency-Key",
                    # What validate_key accepts: 1-255 printable characters (a header is Latin-1 text,
                    # whose unprintable characters are the controls, NBSP and the soft hyphen).
                    "schema": {
                        "type": "string",
                        "minLength": 1,
                        "maxLength": MAX_KEY_LENGTH,
                        "pattern": r"^[^\x00-\x1f\x7f-\xa0\xad]+$",
                    },
                    "description": "Printable characters. The same key with the same request replays the "
                    "first successful response (header `Idempotent-Replayed: true`) and charges once; "
                    "with another request it is refused (422 `idempotency_key_reused`). Kept 24 hours.",
                }
            )
        return parameters

    def _get_request_for_media_type(self, serializer, direction="request"):
        schema, required = super()._get_request_for_media_type(serializer, direction)
        if isinstance(serializer, PolymorphicProxySerializer):
            # drf-spectacular calls such a body optional; it is required when every variant requires a field.
            required = all(
                self.resolve_serializer(variant, direction).schema.get("required")
                for variant in _variants(serializer)
            )
        return schema, required

    def _map_serializer_field(self, field, direction, bypass_extensions=False):
        schema = super()._map_serializer_field(field, direction, bypass_extensions)
        if isinstance(field, serializers.DecimalField) and "pattern" in schema:
            schema["pattern"] = decimal_pattern(field)
        return schema

    def _map_serializer(self, serializer, direction, bypass_extensions=False):
        from allocation.api.serializers import StrictSerializer

        schema = super()._map_serializer(serializer, direction, bypass_extensions)
        if isinstance(serializer, StrictSerializer) or (
            isinstance(serializer, type) and issubclass(serializer, StrictSerializer)
        ):
            schema["additionalProperties"] = False  # StrictSerializer refuses keys it does not know
        return schema


def _variants(proxy: PolymorphicProxySerializer) -> list:
    variants = proxy.serializers
    return list(variants.values()) if isinstance(variants, dict) else list(variants)


def decimal_pattern(field: serializers.DecimalField) -> str:
    """The decimal strings ``field`` accepts: at least one digit, at most its whole digits and places, and
    a sign only when it takes negative values (drf-spectacular's pattern also matches "", "-" and ".")."""
    sign = "" if field.min_value is not None and field.min_value >= 0 else "-?"
    whole, places = field.max_whole_digits, field.decimal_places
    if places:
        return rf"^{sign}(?:\d{{1,{whole}}}(?:\.\d{{0,{places}}})?|\.\d{{1,{places}}})$"
    return rf"^{sign}\d{{1,{whole}}}$"


class ApiKeyScheme(OpenApiAuthenticationExtension):
    target_class = "allocation.api.shared.auth.ApiKeyAuthentication"
    match_subclasses = True  # CachedApiKeyAuthentication reads the same header
    name = "ApiKey"

    def get_security_definition(self, auto_schema):
        # One scheme for the class and its subclasses: their components are the same, not a name clash.
        set_override(get_class(self.target), "suppress_collision_warning", True)
        return {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer axg_..."}


class AmountFieldSchema(OpenApiSerializerFieldExtension):
    target_class = "allocation.api.serializers.AmountField"

    def map_serializer_field(self, auto_schema, direction):
        schema = build_basic_type(OpenApiTypes.INT64)
        schema.update({"minimum": self.target.min_value, "maximum": MAX_AMOUNT})
        return schema


def _resource_type_codes() -> list[str]:
    from ledger.reference_cache import resource_type_codes

    try:
        return sorted(resource_type_codes())
    except DatabaseError:  # a schema generated without a database describes a plain string
        return []


class ResourceTypeFieldSchema(OpenApiSerializerFieldExtension):
    target_class = "allocation.api.serializers.ResourceTypeField"
    match_subclasses = True

    def map_serializer_field(self, auto_schema, direction):
        schema = auto_schema._map_serializer_field(self.target, direction, bypass_extensions=True)
        codes = _resource_type_codes()
        if codes:
            schema["enum"] = codes
            schema.pop("minLength", None)
        return schema


class ResourceAmountsFieldSchema(OpenApiSerializerFieldExtension):
    """An object keyed by resource type: each known type may appear, with an amount; nothing else."""

    target_class = "allocation.api.serializers.ResourceAmountsField"
    match_subclasses = True

    def map_serializer_field(self, auto_schema, direction):
        schema = auto_schema._map_serializer_field(self.target, direction, bypass_extensions=True)
        codes = _resource_type_codes()
        if codes and direction == "request":
            amount = auto_schema._map_serializer_field(self.target.child, direction)
            schema["properties"] = dict.fromkeys(codes, amount)
            schema["additionalProperties"] = False
            if not self.target.allow_empty:
                schema["minProperties"] = 1
        return schema


class BatchItemsFieldSchema(OpenApiSerializerFieldExtension):
    """A batch's items: a valid item is ``item``; any other JSON value is refused by itself, in its result
    (status 400), so the request as a whole still answers 200."""

    target_class = "allocation.api.batch.BatchItemsField"

    def map_serializer_field(self, auto_schema, direction):
        schema = auto_schema._map_serializer_field(self.target, direction, bypass_extensions=True)
        if self.target.item is not None:
            item = auto_schema.resolve_serializer(self.target.item, direction).ref
            schema["items"] = {
                "anyOf": [item, {}],
                "description": f"An item as {self.target.item.__name__}; any other value is refused in its "
                "result, not with the request.",
            }
        return schema


class SlugRelatedFieldSchema(OpenApiSerializerFieldExtension):
    """A slug of a row (a tier code): the enum of the slugs there are, when there are few."""

    target_class = serializers.SlugRelatedField
    match_subclasses = True

    def map_serializer_field(self, auto_schema, direction):
        schema = auto_schema._map_serializer_field(self.target, direction, bypass_extensions=True)
        queryset = self.target.get_queryset() if direction == "request" else None
        if queryset is None:
            return schema
        try:
            slugs = sorted(queryset.values_list(self.target.slug_field, flat=True)[: ENUM_LIMIT + 1])
        except DatabaseError:
            return schema
        if 0 < len(slugs) <= ENUM_LIMIT:
            schema["enum"] = slugs
        return schema

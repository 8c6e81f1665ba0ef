"""Every API error has one shape: ``{"error": {"code", "message", "details"}}``."""

from __future__ import annotations

import logging
import math
import time

from django.conf import settings
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import RequestDataTooBig
from django.db import InterfaceError, OperationalError
from django.http import Http404, JsonResponse
from django.utils import timezone
from rest_framework import exceptions
from rest_framework.response import Response

from ledger.errors import LedgerError

logger = logging.getLogger(__name__)

API_EXCEPTION_CODES = {
    exceptions.ParseError: "malformed_json",
    exceptions.UnsupportedMediaType: "unsupported_media_type",
    exceptions.NotAuthenticated: "not_authenticated",
    exceptions.AuthenticationFailed: "invalid_api_key",
    exceptions.PermissionDenied: "forbidden",
    exceptions.NotFound: "not_found",
    exceptions.MethodNotAllowed: "method_not_allowed",
    exceptions.NotAcceptable: "not_acceptable",
    exceptions.Throttled: "rate_limited",
}


def error_body(code: str, message: str, details: dict | None = None) -> dict:
    return {"error": {"code": code, "message": message, "details": details or {}}}


def _field_errors(detail) -> dict:
    if isinstance(detail, dict):
        return {str(key): _field_errors(value) for key, value in detail.items()}
    if isinstance(detail, list):
        if all(isinstance(item, exceptions.ErrorDetail) for item in detail):
            return [{"code": item.code, "message": str(item)} for item in detail]  # type: ignore[return-value]
        return [_field_errors(item) for item in detail]  # type: ignore[return-value]
    return [{"code": getattr(detail, "code", "invalid"), "message": str(detail)}]  # type: ignore[return-value]


# While the database is unreachable every request fails alike: answer 503 with a hint to come back, and
# log the outage once a minute per process instead of one traceback per request.
DATABASE_RETRY_AFTER_SECONDS = 5
OUTAGE_LOG_INTERVAL_SECONDS = 60.0
_outage_logged_at: float | None = None


def _database_unavailable(exc: Exception) -> Response:
    global _outage_logged_at
    now = time.monotonic()
    if _outage_logged_at is None or now - _outage_logged_at >= OUTAGE_LOG_INTERVAL_SECONDS:
        _outage_logged_at = now
        logger.error(
            "database unavailable, answering 503 (logged once a minute while it lasts): %s",
            str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
        )
    response = Response(
        error_body("service_unavailable", "the database is unavailable; try again shortly"), status=503
    )
    response["Retry-After"] = str(DATABASE_RETRY_AFTER_SECONDS)
    return response


def exception_response(exc: Exception) -> Response | None:
    """The error response for ``exc``, or None for an exception that is not ours to shape."""
    if isinstance(exc, OperationalError | InterfaceError):
        # Unreachable, restarting, or a connection lost mid-request: nothing was committed, try again.
        return _database_unavailable(exc)
    if isinstance(exc, LedgerError):
        response = Response(error_body(exc.code, exc.message, exc.details), status=exc.status)
        retry_after = exc.retry_after
        if exc.retry_at is not None:
            retry_after = max(1, math.ceil((exc.retry_at - timezone.now()).total_seconds()))
        if retry_after is not None:
            response["Retry-After"] = str(retry_after)
        return response
    if isinstance(exc, Http404):
        return Response(error_body("not_found", "not found"), status=404)
    if isinstance(exc, RequestDataTooBig):
        return Response(
            error_body(
                "payload_too_large",
                f"the request body is larger than {settings.DATA_UPLOAD_MAX_MEMORY_SIZE:,} bytes",
            ),
            status=413,
        )
    if isinstance(exc, DjangoPermissionDenied):
        return Response(error_body("forbidden", "permission denied"), status=403)
    if isinstance(exc, exceptions.ValidationError):
        fields = _field_errors(exc.detail)
        if not isinstance(fields, dict):
            fields = {"non_field_errors": fields}
        first = next(iter(fields.items()), None)
        message = "invalid request"
        if first and isinstance(first[1], list) and first[1] and isinstance(first[1][0], dict):
            message = f"{first[0]}: {first[1][0]['message']}"
        return Response(error_body("validation_error", message, {"fields": fields}), status=400)
    if isinstance(exc, exceptions.APIException):
        code = next((code for cls, code in API_EXCEPTION_CODES.items() if isinstance(exc, cls)), None)
        code = code or getattr(exc, "default_code", "error")
        response = Response(error_body(code, str(exc.detail)), status=exc.status_code)
        if isinstance(exc, exceptions.NotAuthenticated | exceptions.AuthenticationFailed):
            response["WWW-Authenticate"] = "Bearer"
        return response
    return None


def exception_handler(exc, context):
    """DRF's EXCEPTION_HANDLER: known errors get their code; anything else a logged 500 in the same shape."""
    response = exception_response(exc)
    if response is None:
        logger.exception("unhandled error in %s", context.get("view").__class__.__name__, exc_info=exc)
        response = Response(error_body("internal_error", "internal error"), status=500)
    return response


def json_404(request, exception=None):
    return JsonResponse(error_body("not_found", f"no route for {request.path}"), status=404)


def json_500(request):
    return JsonResponse(error_body("internal_error", "internal error"), status=500)

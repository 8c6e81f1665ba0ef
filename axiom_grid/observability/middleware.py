"""The first middleware: each request's id and its HTTP metrics.

The request id is the caller's ``X-Request-ID`` when it is a plain token (``logs.request_id_from``), else a
new one; it is set for every log line of the request and echoed in the response's ``X-Request-ID``, so a
client's report, the access log and the service's lines can be matched.

Requests are counted by route, the URL pattern that matched (``request.resolver_match.route``), so the
number of series is the number of routes whatever the paths: ``unmatched`` stands for every path that
matched none (a 404, a static file). The time measured is Django's own, middleware included: for a
streamed response, the time to its first byte.
"""

from __future__ import annotations

import time

from django.conf import settings
from django.http import HttpRequest

from axiom_grid.observability.logs import REQUEST_ID_HEADER, request_id_from, request_id_var
from axiom_grid.observability.metrics import HTTP_REQUEST_SECONDS, HTTP_REQUESTS

UNMATCHED_ROUTE = "unmatched"
# Any other method is counted as "other": a label's values must stay few whatever clients send.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_REQUEST_ID_META = "HTTP_" + REQUEST_ID_HEADER.upper().replace("-", "_")


class RequestObservabilityMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response
        self.static_prefix = "/" + settings.STATIC_URL.lstrip("/")

    def __call__(self, request: HttpRequest):
        started = time.perf_counter()
        request_id = request_id_from(request.META.get(_REQUEST_ID_META))
        # Also on the request: Django logs a 4xx or 5xx answer after the middleware has returned.
        request.request_id = request_id
        token = request_id_var.set(request_id)
        try:
            response = self.get_response(request)
        finally:
            request_id_var.reset(token)
        response[REQUEST_ID_HEADER] = request_id
        route = self.route(request)
        method = request.method if request.method in METHODS else "other"
        HTTP_REQUESTS.labels(route, method, response.status_code).inc()
        HTTP_REQUEST_SECONDS.labels(route, method).observe(time.perf_counter() - started)
        return response

    def route(self, request: HttpRequest) -> str:
        match = getattr(request, "resolver_match", None)
        if match is not None and match.route:
            return match.route
        if request.path_info.startswith(self.static_prefix):
            return "static"
        return UNMATCHED_ROUTE

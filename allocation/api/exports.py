"""Usage exports as CSV, streamed.

* ``GET /api/v1/agents/{id}/usage.csv?since=&until=&resource_type=``: one agent's usage rows, to its own
  key or an operator's (another agent's key gets 404, as on every agent route).
* ``GET /api/v1/usage.csv?since=&until=&agent_id=&resource_type=``: the fleet's, to an operator key.

Both answer ``text/csv`` as an attachment, oldest row first, header row always. ``since`` is inclusive and
``until`` exclusive (ISO 8601; a time without an offset is UTC); without ``until`` an export ends at the
moment it begins, without ``since`` it starts at the beginning of the month in which it ends
(``allocation.exports.usage_export_range``). Everything that can refuse a request (the key, the agent,
the query) is checked, and the first chunk read, before the first byte is sent: a refusal is a JSON error,
never a cut-off file. The rest of the rows are read chunk by chunk while the client downloads.
"""

from __future__ import annotations

import itertools

from django.http import StreamingHttpResponse
from django.urls import path
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.negotiation import BaseContentNegotiation

from allocation import exports
from allocation.api.serializers import ResourceTypeField, StrictSerializer
from allocation.api.shared import converters  # noqa: F401  (registers <agent_id:...>)
from allocation.api.shared.auth import IsOperator
from allocation.api.shared.views import AgentScopedView, GridAPIView, valid
from ledger.models import agent_id_validator


class UsageExportQuery(StrictSerializer):
    resource_type = ResourceTypeField(required=False)
    since = serializers.DateTimeField(
        required=False,
        help_text="ISO 8601, inclusive. Default: the start of the month (UTC) the export ends in",
    )
    until = serializers.DateTimeField(
        required=False, help_text="ISO 8601, exclusive. Default, and at most: the moment the export begins"
    )


class FleetUsageExportQuery(UsageExportQuery):
    agent_id = serializers.CharField(
        required=False, max_length=64, validators=[agent_id_validator], help_text="Only this agent's rows"
    )


class JsonErrorsNegotiation(BaseContentNegotiation):
    """The export answers CSV whatever the Accept header says, and its errors answer JSON: DRF renders only
    the errors, so JSON is the one renderer chosen, and a client asking for ``text/csv`` is not refused
    with 406."""

    def select_parser(self, request, parsers):
        return parsers[0] if parsers else None

    def select_renderer(self, request, renderers, format_suffix=None):
        return renderers[0], renderers[0].media_type


CSV_DESCRIPTION = (
    "CSV (RFC 4180, UTF-8), oldest row first, with a header row: "
    + ", ".join(f"`{column}`" for column in exports.USAGE_CSV_HEADER)
    + ". Money as decimal strings, times in UTC ending in `Z`; `period_start` is the quota period the row "
    "is charged to, `allocation_id` comes from the row's metadata, `metadata` is JSON. A cell of `task_id`, "
    "`allocation_id` or `idempotency_key` that a spreadsheet would read as a formula starts with `'`."
)
CSV_RESPONSE = {(200, "text/csv"): OpenApiResponse(OpenApiTypes.STR, description=CSV_DESCRIPTION)}
CONTENT_DISPOSITION = OpenApiParameter(
    "Content-Disposition",
    OpenApiTypes.STR,
    OpenApiParameter.HEADER,
    required=True,
    response=[200],
    description='`attachment; filename="usage-<agent or fleet>-<since>-<until>.csv"`',
)


class UsageExportView:
    """What both exports do once the caller may see the rows: validate the query, fix the range, stream."""

    content_negotiation_class = JsonErrorsNegotiation
    query_class: type[UsageExportQuery] = UsageExportQuery

    def export(self, request, *, agent_id: str | None = None) -> StreamingHttpResponse:
        query = valid(self.query_class, request.query_params.dict())
        agent_id = agent_id or query.get("agent_id")
        since, until = exports.usage_export_range(
            since=query.get("since"), until=query.get("until"), now=timezone.now()
        )
        if request.method == "HEAD":
            chunks = iter(())
        else:
            chunks = exports.usage_export_csv(
                since=since,
                until=until,
                agent_id=agent_id,
                resource_type_id=query.get("resource_type"),
            )
            # The header and the first chunk are read here, inside the view: a database that fails now
            # answers a JSON 503 instead of a file that stops after its headers.
            chunks = itertools.chain([next(chunks)], chunks)
        response = StreamingHttpResponse(chunks, content_type="text/csv; charset=utf-8")
        filename = exports.usage_export_filename(scope=agent_id or "fleet", since=since, until=until)
        response["Content-Disposition"] = f'attachment; filename="{filename}"'
        response["X-Accel-Buffering"] = "no"  # a proxy in front (nginx) passes chunks on as they come
        return response


class AgentUsageExportView(UsageExportView, AgentScopedView):
    @extend_schema(
        operation_id="api_v1_agents_usage_csv_retrieve",  # the generated one would carry the path's '.'
        summary="Export an agent's usage as CSV",
        description="The agent's usage rows in [since, until), streamed as a CSV attachment.",
        parameters=[UsageExportQuery, CONTENT_DISPOSITION],
        responses=CSV_RESPONSE,
    )
    def get(self, request, agent_id):
        agent = self.agent()  # another agent's key: 404 before the query is even read
        return self.export(request, agent_id=agent.pk)


class FleetUsageExportView(UsageExportView, GridAPIView):
    permission_classes = [IsOperator]
    query_class = FleetUsageExportQuery

    @extend_schema(
        operation_id="api_v1_usage_csv_retrieve",
        summary="Export the fleet's usage as CSV (operator)",
        description="Every agent's usage rows in [since, until), or one agent's with `agent_id`, streamed "
        "as a CSV attachment.",
        parameters=[FleetUsageExportQuery, CONTENT_DISPOSITION],
        responses=CSV_RESPONSE,
    )
    def get(self, request):
        return self.export(request)


# ``usage.csv`` cannot be read as an agent id by ``v1/agents/<agent_id>``: a path parameter matches one
# segment only, and ``v1/usage/batch`` has another second segment.
urlpatterns = [
    path("v1/agents/<agent_id:agent_id>/usage.csv", AgentUsageExportView.as_view(), name="usage-export"),
    path("v1/usage.csv", FleetUsageExportView.as_view(), name="fleet-usage-export"),
]

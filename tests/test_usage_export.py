"""Usage exports as CSV: the rows are the ledger's, in order, filtered; another agent's key meets 404; bad
input is a JSON 400 before any byte of CSV; the file is streamed and read from the log in keyset chunks."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import re

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from allocation import services
from allocation.exports import USAGE_CSV_HEADER
from ledger.models import UsageLog
from ledger.periods import month_bounds

pytest.register_assert_rewrite("tests.api_fixtures")
from tests.api_fixtures import assert_error, client_with_key  # noqa: E402

# The agent_a, agent_b and operator_client fixtures.
pytest_plugins = ["tests.api_fixtures"]

pytestmark = pytest.mark.django_db

MARCH = dt.datetime(2025, 3, 1, tzinfo=dt.UTC)
APRIL = dt.datetime(2025, 4, 1, tzinfo=dt.UTC)
MARCH_RANGE = {"since": "2025-03-01T00:00:00Z", "until": "2025-04-01T00:00:00Z"}


def _usage(keyed, at: dt.datetime, resource_type: str = "AI_TOKENS", amount: int = 10, **options) -> UsageLog:
    allocation = services.allocation_create(
        agent=keyed.agent, resource_type_id=resource_type, amount=amount, now=at, **options
    )
    return UsageLog.objects.get(metadata__allocation_id=str(allocation.pk))


def _export_url(agent_id: str) -> str:
    return reverse("api:usage-export", args=[agent_id])


def _rows(response) -> list[dict]:
    """The CSV of a streamed 200, read back: the header must be the documented one."""
    assert response.status_code == 200, response.content[:500] if not response.streaming else ""
    assert response.streaming
    text = b"".join(response.streaming_content).decode()
    reader = csv.DictReader(io.StringIO(text, newline=""))
    assert tuple(reader.fieldnames or ()) == USAGE_CSV_HEADER
    return list(reader)


def _utc(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def _expected(usage: UsageLog) -> dict:
    """A ledger row as the export must show it, built from the model, not from the export's own code."""
    usage.refresh_from_db()
    return {
        "created_at": _utc(usage.created_at),
        "agent_id": usage.agent_id,
        "resource_type": usage.resource_type_id,
        "kind": usage.kind,
        "amount": str(usage.amount),
        "unit_price_usd": str(usage.unit_price_usd),
        "cost_usd": str(usage.cost_usd),
        "period_start": _utc(usage.period_start),
        "task_id": usage.task_id,
        "allocation_id": usage.metadata["allocation_id"],
        "idempotency_key": usage.idempotency_key,
        "metadata": json.dumps(usage.metadata, separators=(",", ":")),
        "id": str(usage.pk),
    }


# --- What is in the file ----------------------------------------------------------------------------------


def test_agent_export_is_the_ledgers_rows_in_the_range_oldest_first(agent_a, agent_b):
    before = _usage(agent_a, MARCH - dt.timedelta(seconds=1))
    late = _usage(agent_a, MARCH + dt.timedelta(days=20, microseconds=250), task_id="render-42")
    early = _usage(agent_a, MARCH, amount=1234, resource_type="COMPUTE_MS", metadata={"step": "plan"})
    last = _usage(agent_a, APRIL - dt.timedelta(microseconds=1))
    after = _usage(agent_a, APRIL)
    _usage(agent_b, MARCH + dt.timedelta(days=1))

    rows = _rows(agent_a.client.get(_export_url(agent_a.id), MARCH_RANGE))

    assert rows == [_expected(early), _expected(late), _expected(last)]
    assert rows[0]["cost_usd"] == "0.012340000000" and rows[0]["period_start"] == "2025-03-01T00:00:00Z"
    assert rows[1]["created_at"] == "2025-03-21T00:00:00.000250Z"
    assert {before.pk, after.pk}.isdisjoint(int(row["id"]) for row in rows)


def test_a_settled_hold_shows_its_settlement_with_its_allocation(agent_a):
    hold = services.allocation_create(
        agent=agent_a.agent, resource_type_id="AI_TOKENS", amount=500, hold=True, now=MARCH
    )
    services.hold_settle(
        agent=agent_a.agent, allocation_id=hold.pk, amount=300, now=MARCH + dt.timedelta(minutes=5)
    )

    (row,) = _rows(agent_a.client.get(_export_url(agent_a.id), MARCH_RANGE))

    assert (row["kind"], row["amount"], row["allocation_id"]) == ("settlement", "300", str(hold.pk))


def test_rows_at_the_same_instant_are_ordered_by_id(agent_a):
    ids = [_usage(agent_a, MARCH + dt.timedelta(hours=1)).pk for _ in range(4)]

    rows = _rows(agent_a.client.get(_export_url(agent_a.id), MARCH_RANGE))

    assert [int(row["id"]) for row in rows] == sorted(ids)


def test_export_is_filtered_by_resource_type(agent_a):
    tokens = _usage(agent_a, MARCH + dt.timedelta(hours=1))
    _usage(agent_a, MARCH + dt.timedelta(hours=2), resource_type="COMPUTE_MS")

    rows = _rows(agent_a.client.get(_export_url(agent_a.id), {**MARCH_RANGE, "resource_type": "AI_TOKENS"}))

    assert [int(row["id"]) for row in rows] == [tokens.pk]


def test_an_empty_range_is_the_header_alone(agent_a):
    _usage(agent_a, MARCH + dt.timedelta(hours=1))

    response = agent_a.client.get(_export_url(agent_a.id), {"since": "2025-05-01", "until": "2025-04-01"})

    assert _rows(response) == []


def test_text_an_agent_wrote_never_reads_as_a_spreadsheet_formula(agent_a):
    _usage(agent_a, MARCH, task_id='=HYPERLINK("http://evil")', idempotency_key="+1-2", metadata={"n": "=1"})

    (row,) = _rows(agent_a.client.get(_export_url(agent_a.id), MARCH_RANGE))

    assert row["task_id"] == '\'=HYPERLINK("http://evil")'
    assert row["idempotency_key"] == "'+1-2"
    assert row["metadata"].startswith("{")


# --- The range when since or until is missing ------------------------------------------------------------


def test_without_since_and_until_the_export_is_the_current_month_so_far(agent_a):
    start, _ = month_bounds(timezone.now())
    this_month = _usage(agent_a, start)
    _usage(agent_a, start - dt.timedelta(seconds=1))

    response = agent_a.client.get(_export_url(agent_a.id))

    assert [int(row["id"]) for row in _rows(response)] == [this_month.pk]
    filename = response["Content-Disposition"].removeprefix('attachment; filename="').removesuffix('"')
    assert filename.startswith(f"usage-agent-a-{start:%Y%m%d}T000000Z-")


def test_until_alone_exports_the_month_it_closes(agent_a):
    march = _usage(agent_a, APRIL - dt.timedelta(hours=1))
    _usage(agent_a, MARCH - dt.timedelta(hours=1))
    _usage(agent_a, APRIL)

    response = agent_a.client.get(_export_url(agent_a.id), {"until": "2025-04-01T00:00:00Z"})

    assert [int(row["id"]) for row in _rows(response)] == [march.pk]
    assert response["Content-Disposition"] == (
        'attachment; filename="usage-agent-a-20250301T000000Z-20250401T000000Z.csv"'
    )


def test_an_until_in_the_future_ends_at_the_moment_the_export_begins(agent_a):
    now = timezone.now()
    past = _usage(agent_a, now - dt.timedelta(seconds=5))
    _usage(agent_a, now + dt.timedelta(minutes=5))

    response = agent_a.client.get(
        _export_url(agent_a.id),
        {"since": _utc(now - dt.timedelta(minutes=1)), "until": _utc(now + dt.timedelta(days=1))},
    )

    assert [int(row["id"]) for row in _rows(response)] == [past.pk]


# --- Who may read it --------------------------------------------------------------------------------------


def test_another_agents_key_meets_404_as_for_an_agent_that_does_not_exist(agent_a, agent_b):
    _usage(agent_b, MARCH)

    response = agent_a.client.get(_export_url(agent_b.id), MARCH_RANGE)
    ghost = agent_a.client.get(_export_url("agent-ghost"), MARCH_RANGE)

    assert not response.streaming
    assert_error(response, 404, "not_found")
    assert response.json()["error"]["message"].replace(agent_b.id, "X") == ghost.json()["error"][
        "message"
    ].replace("agent-ghost", "X")


def test_another_agents_key_with_a_bad_query_still_meets_404(agent_a, agent_b):
    response = agent_a.client.get(_export_url(agent_b.id), {"since": "not a time"})

    assert_error(response, 404, "not_found")


def test_an_operator_exports_any_agent(agent_b, operator_client):
    usage = _usage(agent_b, MARCH)

    rows = _rows(operator_client.get(_export_url(agent_b.id), MARCH_RANGE))

    assert rows == [_expected(usage)]


@pytest.mark.parametrize("url", [_export_url("agent-a"), "/api/v1/usage.csv"])
def test_without_a_key_the_export_is_401_and_no_file(agent_a, url):
    response = client_with_key(None).get(url, MARCH_RANGE)

    assert not response.streaming
    assert_error(response, 401, "not_authenticated")


# --- The operator's fleet export --------------------------------------------------------------------------


def test_the_fleet_export_has_every_agents_rows_in_time_order(agent_a, agent_b, operator_client):
    first = _usage(agent_b, MARCH + dt.timedelta(hours=1))
    second = _usage(agent_a, MARCH + dt.timedelta(hours=2), resource_type="COMPUTE_MS")
    third = _usage(agent_b, MARCH + dt.timedelta(hours=3))
    _usage(agent_a, APRIL)

    response = operator_client.get(reverse("api:fleet-usage-export"), MARCH_RANGE)

    assert _rows(response) == [_expected(first), _expected(second), _expected(third)]
    assert response["Content-Disposition"] == (
        'attachment; filename="usage-fleet-20250301T000000Z-20250401T000000Z.csv"'
    )


def test_the_fleet_export_is_filtered_by_agent_and_resource_type(agent_a, agent_b, operator_client):
    wanted = _usage(agent_b, MARCH + dt.timedelta(hours=1))
    _usage(agent_b, MARCH + dt.timedelta(hours=2), resource_type="COMPUTE_MS")
    _usage(agent_a, MARCH + dt.timedelta(hours=3))
    url = reverse("api:fleet-usage-export")

    by_agent = _rows(operator_client.get(url, {**MARCH_RANGE, "agent_id": agent_b.id}))
    both = operator_client.get(url, {**MARCH_RANGE, "agent_id": agent_b.id, "resource_type": "AI_TOKENS"})
    nobody = _rows(operator_client.get(url, {**MARCH_RANGE, "agent_id": "agent-ghost"}))

    assert {row["agent_id"] for row in by_agent} == {agent_b.id} and len(by_agent) == 2
    assert [int(row["id"]) for row in _rows(both)] == [wanted.pk]
    assert 'filename="usage-agent-b-' in both["Content-Disposition"]
    assert nobody == []


def test_an_agent_key_cannot_export_the_fleet(agent_a):
    response = agent_a.client.get(reverse("api:fleet-usage-export"), MARCH_RANGE)

    assert not response.streaming
    assert_error(response, 403, "forbidden")


# --- Bad input: a JSON 400, never a 500 or a partial file -------------------------------------------------


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"since": "yesterday"}, "since"),
        ({"until": "2025-02-30T00:00:00Z"}, "until"),
        ({"since": "0001-01-01T00:00:00+01:00"}, "since"),
        ({"until": ""}, "until"),
        ({"resource_type": "GOLD"}, "resource_type"),
        ({"from": "2025-03-01"}, "from"),
    ],
)
def test_a_bad_query_is_a_json_400_before_any_csv(agent_a, operator_client, query, field):
    for client, url in [
        (agent_a.client, _export_url(agent_a.id)),
        (operator_client, reverse("api:fleet-usage-export")),
    ]:
        response = client.get(url, query, HTTP_ACCEPT="text/csv")

        assert not response.streaming
        assert response["Content-Type"] == "application/json"
        details = assert_error(response, 400, "validation_error")
        assert field in details["fields"]


@pytest.mark.parametrize("agent_id", ["-leading-dash", "x" * 65, "has space"])
def test_the_fleet_export_refuses_what_cannot_be_an_agent_id(operator_client, agent_id):
    response = operator_client.get(reverse("api:fleet-usage-export"), {"agent_id": agent_id})

    assert "agent_id" in assert_error(response, 400, "validation_error")["fields"]


# --- Streaming, in chunks ---------------------------------------------------------------------------------


def _usage_queries(queries) -> list[str]:
    return [query["sql"] for query in queries if 'FROM "usage_logs"' in query["sql"]]


def _order_and_limit(sql: str) -> tuple[list[str], int]:
    """The columns a SELECT orders by (ascending; Django may name them by position) and its LIMIT."""
    selected = [
        column.rsplit(" AS ", 1)[-1].strip('"')
        for column in sql.removeprefix("SELECT ").split(" FROM ", 1)[0].split(", ")
    ]
    match = re.search(r"ORDER BY (.+) LIMIT (\d+)$", sql.strip())
    assert match, sql
    keys = [key.removesuffix(" ASC") for key in match[1].split(", ")]
    named = [selected[int(key) - 1] if key.isdigit() else key.rsplit(".", 1)[-1].strip('"') for key in keys]
    return named, int(match[2])


def test_the_file_is_streamed_as_a_csv_attachment(agent_a):
    _usage(agent_a, MARCH)

    response = agent_a.client.get(_export_url(agent_a.id), MARCH_RANGE, HTTP_ACCEPT="text/csv")

    assert response.streaming
    assert response["Content-Type"] == "text/csv; charset=utf-8"
    assert response["Content-Disposition"].startswith('attachment; filename="usage-agent-a-')
    assert not response.has_header("Content-Length")
    assert len(_rows(response)) == 1


@pytest.mark.parametrize(("rows", "chunk_size", "queries"), [(10, 3, 4), (9, 3, 4), (10, 1000, 1)])
def test_a_big_export_is_read_in_keyset_chunks_while_it_streams(agent_a, settings, rows, chunk_size, queries):
    settings.USAGE_EXPORT_CHUNK_ROWS = chunk_size
    # Half of the rows share one instant, so that chunks also end in the middle of equal times.
    created = [_usage(agent_a, MARCH + dt.timedelta(hours=min(i, rows // 2))).pk for i in range(rows)]

    with CaptureQueriesContext(connection) as at_answer:
        response = agent_a.client.get(_export_url(agent_a.id), MARCH_RANGE)
    with CaptureQueriesContext(connection) as while_streaming:
        exported = _rows(response)

    assert [int(row["id"]) for row in exported] == created  # each row once, in order
    assert len(_usage_queries(at_answer.captured_queries)) == 1  # only the first chunk before answering
    chunk_queries = _usage_queries(at_answer.captured_queries) + _usage_queries(
        while_streaming.captured_queries
    )
    assert len(chunk_queries) == queries
    # Ordered by time and then id: rows of one instant may otherwise come in any order, and a keyset that
    # resumes after the last id seen would skip some.
    assert all(_order_and_limit(sql) == (["created_at", "id"], chunk_size) for sql in chunk_queries)


def test_a_head_request_reads_no_rows(agent_a):
    _usage(agent_a, MARCH)

    with CaptureQueriesContext(connection) as queries:
        response = agent_a.client.head(_export_url(agent_a.id), MARCH_RANGE)

    assert response.status_code == 200
    assert response["Content-Disposition"].startswith("attachment;")
    assert _usage_queries(queries.captured_queries) == []


# --- The schema -------------------------------------------------------------------------------------------


def test_the_schema_documents_both_exports_as_csv(reference_data):
    schema = client_with_key(None).get(reverse("schema"), {"format": "json"}).json()

    for path, query in [
        ("/api/v1/agents/{agent_id}/usage.csv", {"since", "until", "resource_type"}),
        ("/api/v1/usage.csv", {"since", "until", "resource_type", "agent_id"}),
    ]:
        operation = schema["paths"][path]["get"]
        ok = operation["responses"]["200"]
        assert set(ok["content"]) == {"text/csv"}, path
        assert ok["content"]["text/csv"]["schema"]["type"] == "string"
        assert ok["headers"]["Content-Disposition"]["required"] is True
        assert {p["name"] for p in operation["parameters"] if p["in"] == "query"} == query
        assert operation["responses"]["400"]["content"]["application/json"]
        assert "." not in operation["operationId"]
    assert "403" in schema["paths"]["/api/v1/usage.csv"]["get"]["responses"]
    assert "404" in schema["paths"]["/api/v1/agents/{agent_id}/usage.csv"]["get"]["responses"]

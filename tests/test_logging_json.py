"""JSON log lines (``LOG_FORMAT=json``) and the request id: taken from ``X-Request-ID`` when it is a plain
token, made otherwise, in every line of its request and in the response; a task's id in its lines.

In this process the lines are caught by a handler built as ``settings.LOGGING`` builds the console's (its
context filter and its JSON formatter); the last tests run gunicorn with ``LOG_FORMAT=json`` and read what
it writes.
"""

from __future__ import annotations

import datetime as dt
import http.client
import io
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from django.conf import settings
from django.http import HttpResponse
from django.urls import include, path
from django.utils.module_loading import import_string

from axiom_grid.observability.logs import request_id_var
from bench.server import free_port
from ledger.periodic import LOCK_NAMESPACE, periodic_lock_key
from tests.live_grid import SECRET_KEY, suite_database_url

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parent.parent
NEW_ID = re.compile(r"[0-9a-f]{32}")
view_logger = logging.getLogger("tests.logging_view")


def conflict_view(request):
    view_logger.info("inside the view")
    return HttpResponse("taken", status=409)  # django.request logs a 4xx after the middleware returned


urlpatterns = [path("logging-probe", conflict_view), path("", include("axiom_grid.urls"))]


class Captured:
    def __init__(self, stream: io.StringIO):
        self.stream = stream

    def lines(self) -> list[dict]:
        return [json.loads(line) for line in self.stream.getvalue().splitlines()]


@pytest.fixture
def captured() -> Iterator[Captured]:
    """What is logged meanwhile, as the console handler of ``settings.LOGGING`` writes it in JSON."""
    config = settings.LOGGING
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    for name in config["handlers"]["console"]["filters"]:
        handler.addFilter(import_string(config["filters"][name]["()"])())
    handler.setFormatter(import_string(config["formatters"]["json"]["()"])())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)  # as the settings set it: an in-process Celery worker may have raised it
    try:
        yield Captured(stream)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


# --- The formatter --------------------------------------------------------------------------------------


def test_a_line_is_one_json_object_with_utc_time_level_logger_message_and_exception(captured):
    logger = logging.getLogger("tests.json")
    logger.info("plain %s", "text")
    try:
        raise ValueError("broken\nacross lines")
    except ValueError:
        logger.exception("it failed")
    info, failure = captured.lines()

    assert info["message"] == "plain text"
    assert (info["level"], info["logger"]) == ("INFO", "tests.json")
    assert info["time"].endswith("Z")
    stamp = dt.datetime.fromisoformat(info["time"].replace("Z", "+00:00"))
    assert stamp.utcoffset() == dt.timedelta(0)
    assert abs((dt.datetime.now(dt.UTC) - stamp).total_seconds()) < 60
    assert "request_id" not in info and "task_id" not in info and "exception" not in info
    assert failure["level"] == "ERROR"
    assert "Traceback" in failure["exception"] and "ValueError: broken\nacross lines" in failure["exception"]


def test_the_settings_use_the_json_formatter_only_when_asked():
    def console(log_format: str) -> dict:
        probe = subprocess.run(
            [sys.executable, "-c", "from django.conf import settings; print(settings.LOGGING['handlers'])"],
            cwd=ROOT,
            env={**os.environ, "DJANGO_SETTINGS_MODULE": "axiom_grid.settings", "LOG_FORMAT": log_format},
            capture_output=True,
            text=True,
            timeout=60,
        )
        return probe

    assert "'formatter': 'json'" in console("json").stdout
    assert "'formatter'" not in console("").stdout  # plain text stays the default
    refused = console("xml")
    assert refused.returncode != 0 and "LOG_FORMAT must be text or json" in refused.stderr


# --- The request id -------------------------------------------------------------------------------------


@pytest.mark.urls("tests.test_logging_json")
def test_every_line_of_a_request_carries_its_id_and_the_response_echoes_it(client, captured):
    response = client.get("/logging-probe", HTTP_X_REQUEST_ID="abc123")
    logging.getLogger("tests.json").info("after the request")

    assert response.status_code == 409
    assert response["X-Request-ID"] == "abc123"
    inside, conflict, after = captured.lines()
    assert (inside["logger"], inside["request_id"]) == ("tests.logging_view", "abc123")
    assert (conflict["logger"], conflict["message"]) == ("django.request", "Conflict: /logging-probe")
    assert conflict["request_id"] == "abc123"
    assert "request_id" not in after
    assert request_id_var.get() is None


@pytest.mark.urls("tests.test_logging_json")
@pytest.mark.parametrize(
    "header",
    ["two words", "x" * 129, "tab\there", "caf\u00e9", ""],
    ids=["space", "too-long", "control", "not-ascii", "empty"],
)
def test_a_request_id_that_is_not_a_plain_token_is_replaced_by_a_new_one(client, captured, header):
    response = client.get("/logging-probe", HTTP_X_REQUEST_ID=header)
    made = response["X-Request-ID"]
    assert NEW_ID.fullmatch(made)
    assert {line["request_id"] for line in captured.lines()} == {made}


def test_a_request_without_an_id_gets_a_new_one_each_time(client):
    first, second = client.get("/healthz")["X-Request-ID"], client.get("/healthz")["X-Request-ID"]
    assert NEW_ID.fullmatch(first) and NEW_ID.fullmatch(second) and first != second
    longest = "a" * 128
    assert client.get("/healthz", HTTP_X_REQUEST_ID=longest)["X-Request-ID"] == longest


# --- Tasks ----------------------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_tasks_lines_carry_its_task_id(captured, reference_data):
    from allocation.tasks import holds_expire_task

    with psycopg.connect(suite_database_url(), autocommit=True) as other_run:
        # Another run holds the lock: the task logs that it skips, in its own context.
        other_run.execute(
            "SELECT pg_advisory_lock(%s, %s)", [LOCK_NAMESPACE, periodic_lock_key("allocation.holds_expire")]
        )
        holds_expire_task.apply(task_id="task-abc")
    logging.getLogger("tests.json").info("after the task")

    *during, after = captured.lines()
    assert [line["logger"] for line in during] == ["ledger.periodic", "celery.app.trace"]  # skipped, done
    assert {line["task_id"] for line in during} == {"task-abc"}
    assert "task_id" not in after


# --- gunicorn -------------------------------------------------------------------------------------------


def _wait_ready(port: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, "gunicorn exited"
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/healthz")
            if connection.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError("gunicorn did not answer in 60 s")


def _get(port: int, url: str, request_id: str | None) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("GET", url, headers={"X-Request-ID": request_id} if request_id is not None else {})
    response = connection.getresponse()
    response.read()
    connection.close()
    return response.status, response.getheader("X-Request-ID")


def test_gunicorn_with_log_format_json_writes_only_json_lines_carrying_the_request_id(tmp_path):
    port = free_port()
    out, err = tmp_path / "stdout.log", tmp_path / "stderr.log"
    environment = {
        **os.environ,
        "DATABASE_URL": suite_database_url(),
        "SECRET_KEY": SECRET_KEY,
        "DEBUG": "false",
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "INFO",
    }
    command = [
        *(sys.executable, "-m", "gunicorn", "axiom_grid.wsgi:application"),
        *("--bind", f"127.0.0.1:{port}", "--workers", "2", "--worker-class", "gthread", "--threads", "2"),
        *("--access-logfile", "-", "--no-control-socket"),
    ]
    with out.open("w") as stdout, err.open("w") as stderr:
        server = subprocess.Popen(
            command, cwd=ROOT, env=environment, stdout=stdout, stderr=stderr, start_new_session=True
        )
        try:
            _wait_ready(port, server)
            assert _get(port, "/no/such/page", "abc123") == (404, "abc123")
            status, made = _get(port, "/no/such/page", "not a plain token")
            assert status == 404 and NEW_ID.fullmatch(made)
        finally:
            server.terminate()
            server.wait(timeout=30)

    written = out.read_text().splitlines() + err.read_text().splitlines()
    records = [json.loads(line) for line in written]  # every line is JSON, or this raises
    assert {"gunicorn.error", "gunicorn.access", "django.request"} <= {record["logger"] for record in records}
    not_found = [record for record in records if record["logger"] == "django.request"]
    assert [record["request_id"] for record in not_found] == ["abc123", made]
    assert all(record["message"] == "Not Found: /no/such/page" for record in not_found)
    access = [record for record in records if record["logger"] == "gunicorn.access"]
    by_id = {record.get("request_id"): record["http"] for record in access}
    assert by_id["abc123"] == {
        "method": "GET",
        "path": "/no/such/page",
        "status": "404",
        "duration_seconds": by_id["abc123"]["duration_seconds"],
    }
    assert by_id[made]["status"] == "404"

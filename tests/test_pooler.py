"""A transaction-mode pooler in front of PostgreSQL: ``DATABASE_POOLER=transaction`` turns server-side
preparation and server-side cursors off, and the grid still allocates and takes batches, with the batches'
arrays still bound in binary (``%b``), and leaves no prepared statement in its session.

A pooler in transaction mode hands each transaction to whichever server connection is free, so a statement
prepared in one of them is missing from the next (PgBouncer before 1.21, or ``max_prepared_statements = 0``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.db import connection
from django.urls import reverse

from allocation.keys import api_key_issue
from ledger.models import Quota, UsageLog
from ledger.services import agent_create
from tests.api_fixtures import client_with_key

ROOT = Path(__file__).resolve().parent.parent
PREPARE_THRESHOLD = 5  # psycopg prepares a statement on its 5th run in a connection (the default setting)

PROBE = (
    "import json, django; from django.conf import settings; django.setup(); "
    "db = settings.DATABASES['default']; "
    "print(json.dumps({'options': db.get('OPTIONS', {}), "
    "'server_side_cursors_disabled': db.get('DISABLE_SERVER_SIDE_CURSORS', False)}))"
)


def settings_with(tmp_path, **env: str) -> subprocess.CompletedProcess:
    """Import the settings in a fresh interpreter with ``env`` added to a clean environment."""
    clean = {k: v for k, v in os.environ.items() if k not in {"DATABASE_POOLER", "DEBUG"}}
    clean.update(DJANGO_SETTINGS_MODULE="axiom_grid.settings", AXIOM_VAR_DIR=str(tmp_path / "var"), **env)
    return subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=clean, capture_output=True, text=True)


def database_settings(tmp_path, **env: str) -> dict:
    result = settings_with(tmp_path, **env)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_without_a_pooler_statements_are_prepared_and_cursors_are_server_side(tmp_path):
    got = database_settings(tmp_path)
    assert got == {"options": {"prepare_threshold": PREPARE_THRESHOLD}, "server_side_cursors_disabled": False}
    assert database_settings(tmp_path, DATABASE_POOLER="session") == got


def test_a_transaction_pooler_turns_preparation_and_server_side_cursors_off(tmp_path):
    got = database_settings(tmp_path, DATABASE_POOLER="transaction")
    assert got == {"options": {"prepare_threshold": None}, "server_side_cursors_disabled": True}


def test_a_pooler_that_keeps_prepared_statements_keeps_preparation_only(tmp_path):
    got = database_settings(tmp_path, DATABASE_POOLER="Transaction-Prepared")
    assert got == {"options": {"prepare_threshold": PREPARE_THRESHOLD}, "server_side_cursors_disabled": True}


def test_an_unknown_pooler_mode_refuses_to_start(tmp_path):
    result = settings_with(tmp_path, DATABASE_POOLER="statement")
    assert result.returncode != 0
    assert "DATABASE_POOLER must be one of" in result.stderr


# --- The grid on a connection configured as for a transaction pooler ------------------------------------


@pytest.fixture
def connection_options(monkeypatch, tmp_path):
    """``use(pooler)``: reconnect this process's connection with the database OPTIONS that the settings
    give for ``DATABASE_POOLER=pooler``; the suite's own options are back afterwards."""

    def use(pooler: str) -> None:
        options = database_settings(tmp_path, DATABASE_POOLER=pooler)["options"]
        for name, value in options.items():
            monkeypatch.setitem(connection.settings_dict["OPTIONS"], name, value)
        connection.close()  # the next query connects with the new options

    yield use
    monkeypatch.undo()
    connection.close()


def prepared_statements() -> list[str]:
    """The statements prepared in this process's session (``pg_prepared_statements`` is per session)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement FROM pg_prepared_statements")
        return [statement for (statement,) in cursor.fetchall()]


def allocate_and_batch(agent_id: str) -> None:
    """Ten single allocations and three batches of four through the API, each over the threshold at which
    psycopg would prepare the statements it repeats."""
    agent = agent_create(agent_id=agent_id, tier_code="PRO")
    _, raw_key = api_key_issue(agent=agent)
    client = client_with_key(raw_key)
    for number in range(10):
        response = client.post(
            reverse("api:allocations", args=[agent_id]),
            {"resource_type": "AI_TOKENS", "amount": 10, "task_id": f"single-{number}"},
            format="json",
        )
        assert response.status_code == 201, response.content[:500]
    for batch in range(3):
        items = [
            {"resource_type": "AI_TOKENS", "amount": 5, "idempotency_key": f"batch-{batch}-{item}"}
            for item in range(4)
        ]
        response = client.post(
            reverse("api:allocations-batch", args=[agent_id]), {"items": items}, format="json"
        )
        assert response.status_code == 200, response.content[:500]
        assert [result["status"] for result in response.json()["results"]] == [201] * 4
    quota = Quota.objects.get(agent_id=agent_id, resource_type_id="AI_TOKENS")
    assert quota.used == 10 * 10 + 3 * 4 * 5
    assert UsageLog.objects.filter(agent_id=agent_id).count() == 10 + 3 * 4


@pytest.mark.django_db(transaction=True)
def test_with_a_transaction_pooler_allocations_and_batches_go_through_without_preparing(
    reference_data, connection_options
):
    connection_options("transaction")
    allocate_and_batch("behind-a-pooler")
    assert connection.connection.prepare_threshold is None
    assert prepared_statements() == []


@pytest.mark.django_db(transaction=True)
def test_without_a_pooler_the_same_work_prepares_its_repeated_statements(reference_data, connection_options):
    # The other side of the test above: the same work does prepare statements when preparation is on.
    connection_options("session")
    allocate_and_batch("direct")
    assert connection.connection.prepare_threshold == PREPARE_THRESHOLD
    assert any("grid_allocate" in statement for statement in prepared_statements())

"""The ``grid`` command (the client package's console script) run as a user runs it: the installed script,
in a subprocess, against a live grid (gunicorn on the suite's test database). Tables by default, the
server's JSON with ``--json``, and exit codes 0 (done), 2 (refused) and 1 (any other error, no traceback).
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest

from ledger.models import Quota

pytestmark = pytest.mark.django_db(transaction=True)

GRID = Path(sys.executable).with_name("grid")


@dataclass
class Ran:
    code: int
    out: str
    err: str

    def json(self):
        return json.loads(self.out)


def grid(*args: str, url: str | None = None, key: str | None = None, **env: str) -> Ran:
    environment = {k: v for k, v in os.environ.items() if k not in ("GRID_URL", "GRID_API_KEY")}
    if url is not None:
        environment["GRID_URL"] = url
    if key is not None:
        environment["GRID_API_KEY"] = key
    environment.update(env)
    done = subprocess.run(
        [str(GRID), *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return Ran(done.returncode, done.stdout, done.stderr)


@pytest.fixture
def agent(agent_with_key):
    return agent_with_key("PRO", monthly_budget_usd=Decimal("20.00"))


@pytest.fixture
def run(grid_server, agent):
    """``grid`` configured for ``agent`` by GRID_URL and GRID_API_KEY."""
    return lambda *args, **env: grid(*args, url=grid_server, key=agent.api_key, **env)


def _lines(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines() if line.strip()]


def test_the_console_script_is_installed():
    assert GRID.exists(), f"no {GRID}: is clients/python installed (make setup)?"
    ran = grid("--version")
    assert ran.code == 0 and ran.out.startswith("grid ")


def test_quotas_as_a_table_and_as_json(run, agent):
    run("allocate", agent.id, "AI_TOKENS", "123456")
    ran = run("quotas", agent.id)
    assert ran.code == 0, ran.err
    header, *rows = ran.out.splitlines()
    assert header.split() == ["RESOURCE", "LIMIT", "USED", "RESERVED", "AVAILABLE", "USED", "%"]
    tokens = next(line for line in rows if line.startswith("AI_TOKENS"))
    assert tokens.split() == ["AI_TOKENS", "1,000,000", "123,456", "0", "876,544", "12.3%"]
    # Aligned: each number ends where its header ends.
    assert tokens.index("876,544") + len("876,544") == header.index("AVAILABLE") + len("AVAILABLE")
    assert "period " in ran.out

    ran = run("quotas", agent.id, "--json")
    assert ran.code == 0
    by_type = {quota["resource_type"]: quota for quota in ran.json()}
    assert by_type["AI_TOKENS"]["used"] == 123_456 and by_type["AI_TOKENS"]["limit"] == 1_000_000


def test_allocate_hold_settle_release(run, agent):
    ran = run("allocate", agent.id, "AI_TOKENS", "5,000", "--task-id", "cli-task")
    assert ran.code == 0, ran.err
    shown = dict(line.split(None, 1) for line in ran.out.splitlines() if " " in line)
    assert (shown["status"].strip(), shown["amount"].strip(), shown["task"].strip()) == (
        "committed",
        "5,000",
        "cli-task",
    )
    assert shown["cost"].strip() == "$0.005"

    held = run("--json", "allocate", agent.id, "AI_TOKENS", "1000", "--hold", "--ttl", "120").json()
    assert held["status"] == "held" and held["expires_at"]
    settled = run("settle", agent.id, held["id"], "600", "--json").json()
    assert (settled["status"], settled["allocated_amount"]) == ("settled", 600)

    other = run("allocate", agent.id, "AI_TOKENS", "10", "--hold", "--json").json()
    ran = run("release", agent.id, other["id"])
    assert ran.code == 0 and "released" in ran.out
    quota = Quota.objects.get(agent_id=agent.id, resource_type_id="AI_TOKENS")
    assert (quota.used, quota.reserved) == (5_600, 0)

    ran = run("release", agent.id, other["id"])  # not open any more: an error, not a refusal
    assert ran.code == 1 and "hold_not_open" in ran.err and ran.out == ""

    ran = run("allocate", agent.id, "AI_TOKENS", "10", "--ttl", "60")
    assert ran.code == 1 and "--hold" in ran.err


def test_refusals_exit_2_and_say_why(grid_server, agent_with_key):
    small = agent_with_key("CUSTOM", custom_limits={"AI_TOKENS": 100})
    ran = grid("allocate", small.id, "AI_TOKENS", "150", url=grid_server, key=small.api_key)
    assert ran.code == 2 and "quota_exceeded" in ran.err and "HTTP 429" in ran.err and ran.out == ""

    ran = grid("--json", "allocate", small.id, "AI_TOKENS", "150", url=grid_server, key=small.api_key)
    assert ran.code == 2
    error = ran.json()["error"]
    assert (error["code"], error["details"]["available"], error["details"]["requested"]) == (
        "quota_exceeded",
        100,
        150,
    )

    ran = grid("check", small.id, "AI_TOKENS", "150", url=grid_server, key=small.api_key)
    assert ran.code == 2 and "not allowed (quota_exceeded)" in ran.out and "100 available" in ran.out
    ran = grid("check", small.id, "AI_TOKENS", "100", "--json", url=grid_server, key=small.api_key)
    assert ran.code == 0 and ran.json() == {"allowed": True, "available": 100, "reason": "ok"}


def test_errors_exit_1_with_the_message_on_stderr(grid_server, run, agent):
    ran = run("settle", agent.id, "00000000-0000-0000-0000-000000000000", "5")
    assert ran.code == 1 and "not_found" in ran.err and "HTTP 404" in ran.err
    ran = run("allocate", agent.id, "NO_SUCH_TYPE", "5")
    assert ran.code == 1 and "validation_error" in ran.err
    ran = grid("quotas", agent.id, url=grid_server, key="axg_" + "n" * 43)
    assert ran.code == 1 and "invalid_api_key" in ran.err
    ran = run("allocate", agent.id, "AI_TOKENS", "many")
    assert ran.code == 1 and "not a whole number" in ran.err
    ran = run("teleport", agent.id)
    assert ran.code == 1 and "invalid choice" in ran.err


def test_missing_configuration_is_a_clear_error(grid_server, agent):
    ran = grid("quotas", agent.id, key=agent.api_key)
    assert ran.code == 1 and "GRID_URL" in ran.err and "--url" in ran.err
    ran = grid("quotas", agent.id, url=grid_server)
    assert ran.code == 1 and "GRID_API_KEY" in ran.err
    ran = grid("--url", grid_server, "--api-key", agent.api_key, "quotas", agent.id)  # flags instead
    assert ran.code == 0 and "AI_TOKENS" in ran.out
    ran = grid("quotas", agent.id, url="127.0.0.1:8000", key=agent.api_key)
    assert ran.code == 1 and "scheme" in ran.err


def test_usage_table_json_and_csv(run, agent):
    for n in range(1, 4):
        run("allocate", agent.id, "AI_TOKENS", str(n * 1000), "--task-id", f"u{n}")
    ran = run("usage", agent.id, "--since", "2000-01-01", "--until", "2999-01-01")
    assert ran.code == 0, ran.err
    header, *rows = _lines(ran.out)
    assert header == ["TIME", "KIND", "RESOURCE", "AMOUNT", "COST", "TASK"]
    assert [(row[3], row[4], row[5], row[6]) for row in rows] == [
        ("AI_TOKENS", "3,000", "$0.003", "u3"),
        ("AI_TOKENS", "2,000", "$0.002", "u2"),
        ("AI_TOKENS", "1,000", "$0.001", "u1"),
    ]

    ran = run("usage", agent.id, "--limit", "2")
    assert len(_lines(ran.out)) == 1 + 2 + 1 and "--limit" in ran.out.splitlines()[-1]

    records = run("usage", agent.id, "--json", "--limit", "0").json()
    assert [record["amount"] for record in records] == [3000, 2000, 1000]

    ran = run("usage", agent.id, "--csv", "--since", "2000-01-01")
    assert ran.code == 0, ran.err
    exported = list(csv.DictReader(io.StringIO(ran.out)))
    assert [(row["task_id"], row["amount"]) for row in exported] == [
        ("u1", "1000"),
        ("u2", "2000"),
        ("u3", "3000"),
    ]

    ran = run("usage", agent.id, "--since", "last tuesday")
    assert ran.code == 1 and "ISO 8601" in ran.err


def test_cost_budgets_and_alerts(run, agent):
    from optimization.models import Alert

    run("allocate", agent.id, "NETWORK_REQS", "1500")
    run("allocate", agent.id, "AI_TOKENS", "20000")
    ran = run("cost", agent.id)
    assert ran.code == 0, ran.err
    rows = {line.split()[0]: line.split()[1] for line in ran.out.splitlines()[1:] if line.strip()}
    assert (rows["NETWORK_REQS"], rows["AI_TOKENS"], rows["TOTAL"]) == ("$1.50", "$0.02", "$1.52")
    assert "monthly budget $20.00" in ran.out
    assert Decimal(run("cost", agent.id, "--json").json()["total_usd"]) == Decimal("1.52")

    ran = run("budgets", agent.id)
    assert ran.code == 0
    header, row = ran.out.splitlines()
    assert header.split()[:5] == ["ID", "SCOPE", "SCOPE", "ID", "WINDOW"]
    assert row.split()[1:8] == ["agent", agent.id, "month", "hard", "$20.00", "$1.52", "$0.00"]
    [budget] = run("budgets", agent.id, "--json").json()
    assert Decimal(budget["remaining_usd"]) == Decimal("18.48")

    assert run("alerts", agent.id).out.strip() == "no alerts"
    Alert.objects.create(
        agent_id=agent.id,
        kind="rule",
        severity="critical",
        title="Spend is up",
        message="m",
        dedup_key="cli-1",
    )
    ran = run("alerts", agent.id)
    assert ran.code == 0
    header, row = ran.out.splitlines()
    assert row.split()[3:] == ["critical", "rule", "open", "Spend", "is", "up"]
    assert run("alerts", agent.id, "--status", "acknowledged").out.strip() == "no alerts"
    assert [alert["title"] for alert in run("alerts", agent.id, "--json").json()] == ["Spend is up"]

"""The examples in examples/ run as a user runs them: a separate process, against a live grid."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ledger.models import Quota

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.django_db(transaction=True)


def test_the_agent_loop_example_checks_holds_settles_and_leases(grid_server, agent_with_key):
    agent = agent_with_key("PRO")
    completed = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "agent_loop.py"), agent.id],
        env={**os.environ, "GRID_URL": grid_server, "GRID_API_KEY": agent.api_key},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    assert sum("tokens, $" in line for line in lines) == 3, completed.stdout
    assert sum(line.endswith("200 requests settled") for line in lines) == 3, completed.stdout
    used = dict(Quota.objects.filter(agent_id=agent.id).values_list("resource_type_id", "used"))
    assert used["NETWORK_REQS"] == 600
    assert 3 * 800 <= used["AI_TOKENS"] <= 3 * 3200
    assert Quota.objects.filter(agent_id=agent.id, reserved__gt=0).count() == 0

"""With several workers on one Redis broker, a task must end before the broker hands its message to another
worker. Tasks are acknowledged when they end (``acks_late``); Redis gives an unacknowledged message to another
worker once it is older than the transport's ``visibility_timeout``. So every task's hard time limit must be
below that timeout, or a long run could be running twice, on two workers (docs/scaling.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The settings read with a Redis broker (nothing connects to it here) and every task the worker registers.
PROBE = """
import json, django
django.setup()
from django.conf import settings
from axiom_grid.celery import app
app.loader.import_default_modules()
default = app.conf.task_time_limit
tasks = {
    name: {"time_limit": task.time_limit or default, "acks_late": bool(task.acks_late)}
    for name, task in app.tasks.items() if not name.startswith("celery.")
}
print(json.dumps({
    "visibility_timeout": settings.CELERY_BROKER_TRANSPORT_OPTIONS.get("visibility_timeout"),
    "prefetch_multiplier": settings.CELERY_WORKER_PREFETCH_MULTIPLIER,
    "tasks": tasks,
}))
"""


def worker_configuration(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "REDIS_KEY_PREFIX"}}
    env.update(
        DJANGO_SETTINGS_MODULE="axiom_grid.settings",
        AXIOM_VAR_DIR=str(tmp_path / "var"),
        REDIS_URL="redis://127.0.0.1:6379/0",
    )
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_task_ends_before_the_broker_would_hand_it_to_another_worker(tmp_path):
    got = worker_configuration(tmp_path)
    visibility_timeout = got["visibility_timeout"]
    assert visibility_timeout, "the Redis transport needs a visibility timeout"
    assert len(got["tasks"]) >= 10, sorted(got["tasks"])
    unbounded = sorted(name for name, task in got["tasks"].items() if not task["time_limit"])
    assert not unbounded, f"tasks without a time limit could outlive the visibility timeout: {unbounded}"
    too_long = {
        name: task["time_limit"]
        for name, task in got["tasks"].items()
        if task["time_limit"] >= visibility_timeout
    }
    assert not too_long, f"time limits not below the visibility timeout ({visibility_timeout} s): {too_long}"


def test_a_worker_holds_one_unacknowledged_message_per_process(tmp_path):
    """A late acknowledgement with a prefetch of one: a worker reserves no message it is not running, so a
    second worker takes the next one instead of waiting behind it."""
    got = worker_configuration(tmp_path)
    assert got["prefetch_multiplier"] == 1
    assert all(task["acks_late"] for task in got["tasks"].values()), got["tasks"]

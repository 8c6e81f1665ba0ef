"""The allocation engine's periodic tasks, installed by ``manage.py setup_periodic_tasks``."""

from __future__ import annotations

# (schedule name, task name, every N seconds, description)
SCHEDULES = [
    ("Expire holds", "allocation.holds_expire", 60, "Release holds past their TTL"),
    ("Clean idempotency keys", "allocation.idempotency_cleanup", 3600, "Forget keys older than 24 hours"),
]

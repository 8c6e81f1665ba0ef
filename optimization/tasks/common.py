"""Options shared by every periodic task: late acks, requeue on worker loss, time limits."""

from __future__ import annotations

TASK_OPTIONS = {"acks_late": True, "reject_on_worker_lost": True, "time_limit": 300, "soft_time_limit": 240}

"""The ledger's periodic tasks, installed by ``manage.py setup_periodic_tasks``."""

from __future__ import annotations

# (schedule name, task name, every N seconds, description)
SCHEDULES = [
    (
        "Partitions and retention",
        "ledger.partitions_maintain",
        3600,
        "Create the coming months' partitions; drop, dump or delete what is past its retention",
    ),
]

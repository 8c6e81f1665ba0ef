"""The optimization app's periodic tasks, installed by ``manage.py setup_periodic_tasks``."""

from __future__ import annotations

# (schedule name, task name, every N seconds, description)
SCHEDULES = [
    (
        "Budget alert sweep",
        "optimization.budget_sweep",
        60,
        "Budget thresholds once a window; resolved when a budget that refused has room",
    ),
    ("Rule evaluation", "optimization.rules_evaluate", 60, "Evaluate optimization rules and act on them"),
    ("Cost spike detection", "optimization.cost_spike_sweep", 300, "Last hour's spend against the baseline"),
    (
        "Alert delivery",
        "optimization.alerts_deliver",
        60,
        "Deliver pending and retry failed alert deliveries",
    ),
    ("Auto-scaling evaluation", "optimization.scaling_evaluate", 300, "Scale agents on their policies"),
    ("Marketplace refresh", "optimization.marketplace_refresh", 900, "Expire, reprice and restock deals"),
    (
        "Fleet utilization metrics",
        "optimization.fleet_utilization",
        300,
        "Quota and budget utilization distributions for /metrics",
    ),
    (
        "Usage rollups",
        "optimization.usage_rollups_update",
        300,
        "Hourly and daily usage and spend per agent and resource type, from the usage log",
    ),
]

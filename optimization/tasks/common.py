"""Options shared by every periodic task: late acks, requeue on worker loss, time limits."""

from __future__ import annotations

TASK_OPTIONS = {"acks_late": True, "reject_on_worker_lost": True, "time_limit": 300, "soft_time_limit": 240}

# The fleet sweeps (rules, auto-scaling, budgets, cost spikes) work in chunks of agents, each chunk its own
# short transaction: a long run holds no lock and loses at most the chunk in flight, so it may take as long
# as a large fleet needs (about 5 minutes for auto-scaling at a million agents on a small machine). A tick
# sent while a run is under way skips (``ledger.periodic``). Below the broker's visibility timeout (1 h).
SWEEP_TASK_OPTIONS = {**TASK_OPTIONS, "time_limit": 1800, "soft_time_limit": 1700}

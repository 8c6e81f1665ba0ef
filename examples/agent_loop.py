"""A small agent loop on the Axiom Energy Grid, with the Python client (``pip install ./clients/python``).

Each task asks the grid before it spends: is there room (``check``), hold what the task may need (``hold``),
do the work, settle what it really used (leaving the ``with`` block; an exception releases the hold
instead). The hot inner loop of a task, which checks once per tool call, takes from a lease: the checks are
answered on the client, exactly, without a network call each.

Run it against ``make run``, with a key of the agent (``.venv/bin/python manage.py issue_api_key --agent
agent-123`` prints one):

    GRID_URL=http://127.0.0.1:8000 GRID_API_KEY=axg_... python examples/agent_loop.py agent-123
"""

from __future__ import annotations

import os
import random
import sys

from axiom_grid_client import BudgetExceeded, Grid, QuotaExceeded


def call_the_model(prompt: str) -> int:
    """Stands in for an LLM call: returns the tokens it used."""
    return 800 + random.randint(0, 2400)


def crawl_step(url: str) -> None:
    """Stands in for one cheap tool call, one network request each."""


def run_task(grid: Grid, agent_id: str, task: str) -> None:
    check = grid.check(agent_id, "AI_TOKENS", 4000)
    if not check.allowed:
        print(f"{task}: skipped, {check.reason} ({check.available:,} tokens available)")
        return

    # Hold the most the task may use; settle what it used. The hold is released if the block raises.
    with grid.hold(agent_id, "AI_TOKENS", 4000, ttl=300, task_id=task) as hold:
        used = call_the_model(f"plan {task}")
        hold.report(used)
    print(f"{task}: used {used:,} tokens, ${hold.allocation.cost_usd} charged")

    # A hot loop: 200 network requests, each checked locally against a lease of 100.
    with grid.lease(agent_id, "NETWORK_REQS", 100, ttl=120, task_id=task) as lease:
        for page in range(200):
            if not lease.take(1):
                try:
                    lease.renew()  # settles what was taken and holds 100 more
                except (QuotaExceeded, BudgetExceeded) as refused:
                    print(f"{task}: stopped crawling after {page} pages: {refused.message}")
                    break
                lease.take(1)
            crawl_step(f"https://example.invalid/{task}/{page}")
    print(f"{task}: {lease.taken} requests settled")


def main() -> int:
    agent_id = sys.argv[1] if len(sys.argv) > 1 else "agent-123"
    with Grid(os.environ.get("GRID_URL", "http://127.0.0.1:8000"), os.environ["GRID_API_KEY"]) as grid:
        for number in range(3):
            try:
                run_task(grid, agent_id, f"task-{number}")
            except (QuotaExceeded, BudgetExceeded) as refused:
                print(f"task-{number}: refused: {refused.message}")
        cost = grid.cost(agent_id)
        print(f"this period: ${cost.total_usd} spent")
    return 0


if __name__ == "__main__":
    sys.exit(main())

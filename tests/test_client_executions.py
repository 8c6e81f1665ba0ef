"""The Python client records an execution with only its superpower and resources, as the product's signature
has it, and reads back an execution whose duration and outcome were not reported."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest
from axiom_grid_client import AsyncGrid, Grid

from optimization.models import Execution

pytestmark = pytest.mark.django_db(transaction=True)


def test_the_client_records_an_execution_without_duration_or_outcome(grid_server, agent_with_key):
    agent = agent_with_key("PRO")
    with Grid(grid_server, agent.api_key) as grid:
        execution = grid.record_execution(agent.id, "summarize", {"AI_TOKENS": 500})

    assert (execution.duration_ms, execution.success, execution.output_units) == (None, None, 0)
    assert execution.cost_usd == Decimal("0.0005")
    row = Execution.objects.get(pk=execution.id)
    assert (row.duration_ms, row.success) == (None, None)


def test_the_async_client_still_sends_a_duration_and_an_outcome(grid_server, agent_with_key):
    agent = agent_with_key("PRO")

    async def record():
        async with AsyncGrid(grid_server, agent.api_key) as grid:
            return await grid.record_execution(agent.id, "s", {"COMPUTE_MS": 100}, 5, False)

    execution = asyncio.run(record())
    assert (execution.duration_ms, execution.success, execution.output_units) == (5, False, 0)

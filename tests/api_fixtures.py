"""Fixtures and helpers shared by the API tests: agents with keys, authenticated clients, ledger snapshots."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from rest_framework.test import APIClient

from allocation.keys import api_key_issue, operator_key_issue
from allocation.models import Allocation, ApiKey, IdempotencyRecord
from ledger.models import Agent, AgentLimitOverride, Grant, Quota, UsageLog
from tests.factories import AgentFactory

RESOURCE_CODES = ["COMPUTE_MS", "AI_TOKENS", "STORAGE_KB", "NETWORK_REQS", "SOLANA_LAMPORTS"]
PRO_AI_TOKENS = 1_000_000  # the PRO tier's monthly AI_TOKENS limit


@dataclass
class KeyedAgent:
    """An agent, its raw API key and a client that sends it."""

    agent: Agent
    api_key: ApiKey
    raw_key: str
    client: APIClient

    @property
    def id(self) -> str:
        return self.agent.id


def client_with_key(raw_key: str | None) -> APIClient:
    client = APIClient()
    if raw_key is not None:
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw_key}")
    return client


def keyed_agent(**factory_kwargs) -> KeyedAgent:
    agent = AgentFactory(**factory_kwargs)
    api_key, raw_key = api_key_issue(agent=agent)
    return KeyedAgent(agent=agent, api_key=api_key, raw_key=raw_key, client=client_with_key(raw_key))


@pytest.fixture
def agent_a(reference_data) -> KeyedAgent:
    return keyed_agent(id="agent-a")


@pytest.fixture
def agent_b(reference_data) -> KeyedAgent:
    return keyed_agent(id="agent-b")


@pytest.fixture
def operator_client(reference_data) -> APIClient:
    _, raw_key = operator_key_issue(username="ops")
    return client_with_key(raw_key)


def ledger_snapshot() -> dict:
    """Everything an API call could write to the ledger, in a comparable form (audit records excluded)."""
    return {
        "agents": sorted(
            Agent.objects.values_list(
                "id", "tier_id", "status", "monthly_budget_usd", "name", "min_instances", "max_instances"
            )
        ),
        "overrides": sorted(AgentLimitOverride.objects.values_list("agent_id", "resource_type_id", "limit")),
        "quotas": sorted(
            Quota.objects.values_list(
                "agent_id", "resource_type_id", "period_start", "base_limit", "limit", "used", "reserved"
            )
        ),
        "usage_logs": sorted(UsageLog.objects.values_list("id", "agent_id", "amount", "cost_usd")),
        "allocations": sorted(
            (str(pk), agent_id, amount, status, settled_amount)
            for pk, agent_id, amount, status, settled_amount in Allocation.objects.values_list(
                "pk", "agent_id", "amount", "status", "settled_amount"
            )
        ),
        "grants": sorted(Grant.objects.values_list("id", "quota_id", "amount", "reason")),
        "idempotency_records": IdempotencyRecord.objects.count(),
        "api_keys": ApiKey.objects.count(),
    }


def assert_error(response, status: int, code: str) -> dict:
    """Assert the one error shape, status and code; return the error's details."""
    assert response.status_code == status, (response.status_code, response.content[:500])
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert isinstance(body["error"]["details"], dict)
    return body["error"]["details"]

"""Faults answered right: while the database cannot be reached, the API answers 503 with Retry-After and
logs the outage once, not once per request; nothing half-written is left when it comes back."""

from __future__ import annotations

import logging
import socket

import pytest
from django.db import connection
from django.urls import reverse

from allocation.api.shared import errors
from ledger.models import Quota, UsageLog

pytest_plugins = ["tests.api_fixtures"]


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens once the probe is closed


@pytest.fixture
def database_unreachable():
    """Point this process's connection at a loopback port where nothing listens, as when PostgreSQL is
    down; put it back afterwards."""
    saved = dict(connection.settings_dict)
    errors._outage_logged_at = None

    def cut():
        connection.close()
        connection.settings_dict.update(HOST="127.0.0.1", PORT=str(_closed_port()))

    yield cut
    connection.close()
    connection.settings_dict.clear()
    connection.settings_dict.update(saved)
    errors._outage_logged_at = None


@pytest.mark.django_db(transaction=True)
def test_an_outage_is_503_with_retry_after_and_logged_once(agent_a, database_unreachable, caplog):
    url = reverse("api:allocations", args=[agent_a.id])
    body = {"resource_type": "AI_TOKENS", "amount": 5}
    assert agent_a.client.post(url, body, format="json").status_code == 201
    database_unreachable()

    with caplog.at_level(logging.INFO):
        answers = [agent_a.client.post(url, body, format="json") for _ in range(20)]
        answers.append(agent_a.client.get(reverse("api:quotas", args=[agent_a.id])))

    for response in answers:
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "service_unavailable"
        assert response["Retry-After"] == str(errors.DATABASE_RETRY_AFTER_SECONDS)
    errors_logged = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors_logged) == 1, [record.getMessage() for record in errors_logged]
    assert "database unavailable" in errors_logged[0].getMessage()


@pytest.mark.django_db(transaction=True)
def test_after_an_outage_the_ledger_holds_only_what_was_acknowledged(agent_a, database_unreachable):
    url = reverse("api:allocations", args=[agent_a.id])
    body = {"resource_type": "AI_TOKENS", "amount": 5}
    assert agent_a.client.post(url, body, format="json", HTTP_IDEMPOTENCY_KEY="before").status_code == 201
    saved = dict(connection.settings_dict)
    database_unreachable()
    refused = agent_a.client.post(url, body, format="json", HTTP_IDEMPOTENCY_KEY="during")
    connection.close()
    connection.settings_dict.update(saved)

    retried = agent_a.client.post(url, body, format="json", HTTP_IDEMPOTENCY_KEY="during")

    assert refused.status_code == 503
    assert retried.status_code == 201 and "Idempotent-Replayed" not in retried
    assert Quota.objects.get(agent_id=agent_a.id, resource_type_id="AI_TOKENS").used == 10
    assert UsageLog.objects.filter(agent_id=agent_a.id).count() == 2

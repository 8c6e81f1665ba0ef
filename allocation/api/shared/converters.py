"""The ``agent_id`` path converter: a path segment that cannot be an agent id is no route (404), so a
malformed id (a NUL byte, 65 characters) never reaches a query."""

from __future__ import annotations

from django.urls import register_converter

from ledger.models import AGENT_ID_PATTERN


class AgentIdConverter:
    regex = AGENT_ID_PATTERN

    def to_python(self, value: str) -> str:
        return value

    def to_url(self, value: str) -> str:
        return value


register_converter(AgentIdConverter, "agent_id")

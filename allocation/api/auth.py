"""Bearer API key authentication and the per-agent isolation rule."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from django.utils import timezone
from rest_framework import authentication, exceptions, permissions

from allocation.keys import KEY_PREFIX, key_hash
from allocation.models import ApiKey
from ledger.errors import NotFound
from ledger.models import Agent

LAST_USED_RESOLUTION = dt.timedelta(minutes=1)


@dataclass
class Principal:
    """Who is calling: an agent (acts on itself only) or an operator (acts on every agent)."""

    api_key: ApiKey
    agent: Agent | None
    user: object | None

    is_authenticated = True
    is_anonymous = False

    @property
    def is_operator(self) -> bool:
        return self.user is not None

    @property
    def label(self) -> str:
        return self.api_key.owner_label

    @property
    def username(self) -> str:
        return self.label


class ApiKeyAuthentication(authentication.BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request):
        header = authentication.get_authorization_header(request).decode("latin-1")
        if not header:
            return None
        scheme, _, raw_key = header.partition(" ")
        if scheme != self.keyword or not raw_key.strip():
            raise exceptions.AuthenticationFailed("use 'Authorization: Bearer <api key>'")
        raw_key = raw_key.strip()
        if not raw_key.startswith(KEY_PREFIX) or len(raw_key) > 200:
            raise exceptions.AuthenticationFailed("invalid API key")
        api_key = (
            ApiKey.objects.active().select_related("agent", "user").filter(key_hash=key_hash(raw_key)).first()
        )
        if api_key is None or (api_key.user_id and not (api_key.user.is_active and api_key.user.is_staff)):
            raise exceptions.AuthenticationFailed("invalid or revoked API key")
        now = timezone.now()
        # Record use at a minute's resolution: one extra UPDATE a minute per key, not one per request.
        if api_key.last_used_at is None or now - api_key.last_used_at > LAST_USED_RESOLUTION:
            ApiKey.objects.filter(pk=api_key.pk).update(last_used_at=now)
        principal = Principal(api_key=api_key, agent=api_key.agent, user=api_key.user)
        return principal, api_key

    def authenticate_header(self, request) -> str:
        return self.keyword


class IsOperator(permissions.BasePermission):
    message = "this call needs an operator key"

    def has_permission(self, request, view) -> bool:
        return bool(getattr(request.user, "is_operator", False))


class IsAuthenticatedPrincipal(permissions.BasePermission):
    def has_permission(self, request, view) -> bool:
        return isinstance(request.user, Principal)


def agent_for(principal: Principal, agent_id: str) -> Agent:
    """The agent ``agent_id`` as ``principal`` may see it. Another agent's id answers 404, as if it did not
    exist, so a key cannot even learn which agents there are."""
    if principal.agent is not None:
        if principal.agent.pk != agent_id:
            raise NotFound(f"agent {agent_id!r} not found")
        return principal.agent
    agent = Agent.objects.select_related("tier").filter(pk=agent_id).first()
    if agent is None:
        raise NotFound(f"agent {agent_id!r} not found")
    return agent

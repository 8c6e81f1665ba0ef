"""Bearer API key authentication and the per-agent isolation rule."""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass

from django.db import DEFAULT_DB_ALIAS
from django.utils import timezone
from rest_framework import authentication, exceptions, permissions

from allocation.keys import KEY_PREFIX, key_hash
from allocation.models import ApiKey
from ledger.errors import NotFound
from ledger.models import Agent

LAST_USED_RESOLUTION = dt.timedelta(minutes=1)
KEY_CACHE_SECONDS = 60.0  # see _AgentKeyCache: nothing that can change is trusted from the cache


@dataclass
class Principal:
    """Who is calling: an agent (acts on itself only) or an operator (acts on every agent).

    ``from_cache``: authenticated from ``CachedApiKeyAuthentication``'s cache, so ``agent`` is a reference
    whose fields load on access, and the key is checked again by the statement the request makes.
    """

    api_key: ApiKey
    agent: Agent | None
    user: object | None
    key_hash: str = ""
    from_cache: bool = False

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
        hashed = self._key_hash(request)
        if hashed is None:
            return None
        api_key = key_lookup(hashed)
        if api_key is None:
            raise exceptions.AuthenticationFailed("invalid or revoked API key")
        return self._principal(api_key, hashed), api_key

    def _key_hash(self, request) -> str | None:
        header = authentication.get_authorization_header(request).decode("latin-1")
        if not header:
            return None
        scheme, _, raw_key = header.partition(" ")
        if scheme != self.keyword or not raw_key.strip():
            raise exceptions.AuthenticationFailed("use 'Authorization: Bearer <api key>'")
        raw_key = raw_key.strip()
        if not raw_key.startswith(KEY_PREFIX) or len(raw_key) > 200:
            raise exceptions.AuthenticationFailed("invalid API key")
        return key_hash(raw_key)

    def _principal(self, api_key: ApiKey, hashed: str, *, from_cache: bool = False) -> Principal:
        now = timezone.now()
        # Record use at a minute's resolution: one extra UPDATE a minute per key, not one per request.
        if api_key.last_used_at is None or now - api_key.last_used_at > LAST_USED_RESOLUTION:
            ApiKey.objects.filter(pk=api_key.pk).update(last_used_at=now)
            api_key.last_used_at = now
        if from_cache:
            agent = Agent.from_db(DEFAULT_DB_ALIAS, ["id"], [api_key.agent_id])  # fields load on access
        else:
            agent = api_key.agent if api_key.agent_id else None
        user = api_key.user if api_key.user_id else None
        return Principal(api_key=api_key, agent=agent, user=user, key_hash=hashed, from_cache=from_cache)

    def authenticate_header(self, request) -> str:
        return self.keyword


def key_lookup(hashed: str) -> ApiKey | None:
    """The active key of hash ``hashed`` with its agent (or its operator, if still active staff)."""
    api_key = ApiKey.objects.select_related("agent", "user").filter(key_hash=hashed, revoked_at=None).first()
    if api_key is not None and api_key.user_id is not None:
        user = api_key.user
        if not (user.is_active and user.is_staff):
            return None
    return api_key


class _AgentKeyCache:
    """Agent keys this process authenticated in the last ``KEY_CACHE_SECONDS``, by hash.

    Only ``CachedApiKeyAuthentication`` (the allocation hot path) uses it, and only for agent keys. A hit
    saves the key lookup, one round trip of two on an allocation. Nothing that can change is trusted from
    it: the allocation statement requires the key to be still unrevoked and the agent to be active
    (``grid_allocate`` checks both), so a revocation, a suspension or a throttle applies
    to the very next allocation in every process, as without the cache. What is cached is which agent a key
    belongs to, which never changes, and when it was last recorded as used: the time-to-live only bounds
    memory and that record, hence a minute rather than seconds.
    """

    def __init__(self, *, seconds: float, size: int) -> None:
        self.seconds, self.size = seconds, size
        self._entries: dict[str, tuple[float, ApiKey]] = {}

    def get(self, hashed: str) -> ApiKey | None:
        entry = self._entries.get(hashed)
        if entry is None or time.monotonic() - entry[0] > self.seconds:
            return None
        return entry[1]

    def put(self, hashed: str, api_key: ApiKey) -> None:
        if len(self._entries) >= self.size:
            self._entries.clear()
        self._entries[hashed] = (time.monotonic(), api_key)

    def forget(self, hashed: str) -> None:
        self._entries.pop(hashed, None)

    def clear(self) -> None:
        self._entries.clear()


agent_key_cache = _AgentKeyCache(seconds=KEY_CACHE_SECONDS, size=10_000)


class CachedApiKeyAuthentication(ApiKeyAuthentication):
    """``ApiKeyAuthentication`` that remembers agent keys for a few seconds (see ``_AgentKeyCache``).

    For views whose one statement requires the key again (``MutationFrame.api_key_id``): on a cache hit the
    agent is not read, and ``request.user.agent`` is a reference whose fields load on access.
    """

    def authenticate(self, request):
        hashed = self._key_hash(request)
        if hashed is None:
            return None
        api_key = agent_key_cache.get(hashed)
        if api_key is not None:
            return self._principal(api_key, hashed, from_cache=True), api_key
        api_key = key_lookup(hashed)
        if api_key is None:
            raise exceptions.AuthenticationFailed("invalid or revoked API key")
        principal = self._principal(api_key, hashed)
        if api_key.agent_id is not None:
            agent_key_cache.put(hashed, _without_agent(api_key))
        return principal, api_key


def _without_agent(api_key: ApiKey) -> ApiKey:
    """A copy of ``api_key`` that does not hold its agent, so that a cached key never serves stale agent
    data: a cache hit gives a reference instead (``ApiKeyAuthentication._principal``)."""
    names = [field.attname for field in ApiKey._meta.concrete_fields]
    return ApiKey.from_db(DEFAULT_DB_ALIAS, names, [getattr(api_key, name) for name in names])


def principal_still_valid(principal: Principal) -> bool:
    """Is the key of ``principal`` still active? A cached key that is not is forgotten."""
    if key_lookup(principal.key_hash) is not None:
        return True
    agent_key_cache.forget(principal.key_hash)
    return False


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

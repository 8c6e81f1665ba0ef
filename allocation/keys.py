"""API keys: issuing, hashing, revoking. A key is ``axg_`` + 43 URL-safe characters (256 random bits)."""

from __future__ import annotations

import hashlib
import secrets

from django.contrib.auth import get_user_model
from django.utils import timezone

from allocation.models import ApiKey
from ledger.models import Agent

KEY_PREFIX = "axg_"
VISIBLE_CHARS = 12


def key_hash(raw_key: str) -> str:
    return hashlib.sha256(raw_key.encode()).hexdigest()


def api_key_issue(*, agent: Agent | None = None, user=None, name: str = "") -> tuple[ApiKey, str]:
    """Create a key for an agent or an operator (a staff user). The raw key is returned once, never stored."""
    if (agent is None) == (user is None):
        raise ValueError("a key belongs to exactly one agent or one operator")
    if user is not None and not (user.is_active and user.is_staff):
        raise ValueError("an operator key needs an active staff user")
    raw_key = KEY_PREFIX + secrets.token_urlsafe(32)
    api_key = ApiKey.objects.create(
        name=name, prefix=raw_key[:VISIBLE_CHARS], key_hash=key_hash(raw_key), agent=agent, user=user
    )
    return api_key, raw_key


def operator_key_issue(*, username: str, name: str = "") -> tuple[ApiKey, str]:
    """Issue an operator key for ``username``, creating that staff user (with no password) if needed."""
    User = get_user_model()
    user, created = User.objects.get_or_create(username=username, defaults={"is_staff": True})
    if created:
        user.set_unusable_password()
        user.save(update_fields=["password"])
    elif not user.is_staff:
        user.is_staff = True
        user.save(update_fields=["is_staff"])
    return api_key_issue(user=user, name=name or "operator key")


def api_key_revoke(*, api_key: ApiKey) -> bool:
    """Revoke the key; False if it already was."""
    return bool(
        ApiKey.objects.filter(pk=api_key.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
    )

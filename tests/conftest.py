"""Shared fixtures and the rules for tests that need real services.

Tests marked ``postgres`` need ``DATABASE_URL`` to point at PostgreSQL, and tests marked ``redis`` need a
reachable ``REDIS_URL``. Without them those tests are skipped with the reason shown; with ``CI=true`` a
missing service stops the run as a failure instead.
"""

from __future__ import annotations

import os

import pytest
from django.conf import settings

from tests.factories import AgentFactory  # noqa: F401  (import registers the factories)

CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def _postgres_available() -> bool:
    return settings.DATABASES["default"]["ENGINE"].endswith("postgresql")


def _redis_available() -> bool:
    url = os.environ.get("REDIS_URL")
    if not url:
        return False
    try:
        import redis

        return bool(redis.Redis.from_url(url, socket_connect_timeout=2).ping())
    except Exception:
        return False


POSTGRES = _postgres_available()
REDIS = _redis_available()


def pytest_sessionstart(session):
    if CI and not POSTGRES:
        pytest.exit("CI=true but DATABASE_URL does not point at PostgreSQL", returncode=1)
    if CI and not REDIS:
        pytest.exit("CI=true but Redis is not reachable at REDIS_URL", returncode=1)


def pytest_collection_modifyitems(config, items):
    skip_pg = pytest.mark.skip(reason="needs PostgreSQL: set DATABASE_URL=postgres://... to run")
    skip_redis = pytest.mark.skip(reason="needs Redis: set REDIS_URL=redis://... to run")
    for item in items:
        if item.get_closest_marker("postgres") and not POSTGRES:
            item.add_marker(skip_pg)
        if item.get_closest_marker("redis") and not REDIS:
            item.add_marker(skip_redis)


@pytest.fixture
def reference_data(db):
    from ledger.services import reference_data_load

    reference_data_load()


@pytest.fixture
def staff_user(db, django_user_model):
    return django_user_model.objects.create_superuser("operator", "operator@example.com", "pw-operator-1")


@pytest.fixture
def admin_client_logged_in(client, staff_user):
    client.force_login(staff_user)
    return client


@pytest.fixture(autouse=True)
def _fresh_process_caches():
    """The per-process cache of reference data must not leak between tests that roll back their rows."""
    from ledger.reference_cache import reference_cache_clear

    reference_cache_clear()
    yield
    reference_cache_clear()


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

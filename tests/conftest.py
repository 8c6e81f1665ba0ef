"""Shared fixtures and the rules for tests that need real services.

Every test runs on PostgreSQL: the server ``DATABASE_URL`` names or, without it, the embedded one under
``var/postgres``, started here for the session (and stopped at its end unless ``make run`` still uses it).
Tests marked ``redis`` need a reachable ``REDIS_URL``: without it they are skipped with the reason shown;
with ``CI=true`` a missing Redis stops the run as a failure instead.
"""

from __future__ import annotations

import os

import dj_database_url
import pytest
from django.conf import settings

from axiom_grid.embedded_postgres import EmbeddedPostgres, EmbeddedPostgresError
from tests.factories import AgentFactory  # noqa: F401  (import registers the factories)
from tests.live_grid import agent_with_key, grid_server, operator_key  # noqa: F401  (the live grid's fixtures)

CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
_embedded: EmbeddedPostgres | None = None


def _redis_available() -> bool:
    url = os.environ.get("REDIS_URL")
    if not url:
        return False
    try:
        import redis

        return bool(redis.Redis.from_url(url, socket_connect_timeout=2).ping())
    except Exception:
        return False


REDIS = _redis_available()


def pytest_configure(config):
    """Start the embedded server before any test touches the database. The settings were read before
    this hook (pytest-django loads them first), so they learn the server's address here, in place,
    before any connection is made; subprocesses (the bench, the settings probes) get ``DATABASE_URL``."""
    global _embedded
    if os.environ.get("DATABASE_URL") or config.getoption("help") or config.getoption("version", 0):
        return
    _embedded = EmbeddedPostgres(settings.EMBEDDED_POSTGRES_DIR)
    try:
        url = _embedded.start()
    except EmbeddedPostgresError as error:
        _embedded = None
        pytest.exit(str(error), returncode=1)
    os.environ["DATABASE_URL"] = url
    address = dj_database_url.parse(url)
    settings.DATABASES["default"].update({key: address[key] for key in ("HOST", "PORT", "NAME", "USER")})


def pytest_unconfigure(config):
    global _embedded
    if _embedded is not None:
        _embedded.stop()
        os.environ.pop("DATABASE_URL", None)
        _embedded = None


def pytest_sessionstart(session):
    if CI and not REDIS:
        pytest.exit("CI=true but Redis is not reachable at REDIS_URL", returncode=1)


def pytest_collection_modifyitems(config, items):
    skip_redis = pytest.mark.skip(reason="needs Redis: set REDIS_URL=redis://... to run")
    for item in items:
        if item.get_closest_marker("redis") and not REDIS:
            item.add_marker(skip_redis)


@pytest.fixture(scope="session")
def django_db_modify_db_settings(django_db_modify_db_settings_parallel_suffix) -> None:
    """Each session its own test database (named after its process), so that two runs at once on one
    server, e.g. the embedded one, do not drop each other's."""
    from django.db import connections

    default = connections["default"].settings_dict
    test = default.setdefault("TEST", {})
    if not test.get("NAME"):
        test["NAME"] = f"test_{default['NAME']}_{os.getpid()}"


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

"""A live grid for tests that talk HTTP to the real server: gunicorn on a free loopback port, against the
suite's test database, and the fixtures to get keys for it.

- ``live_server(log_dir, database_url=...)``: a context manager running the production server (gthread
  workers) against any database; stopped afterwards, also when the test fails.
- ``grid_server`` (module-scoped): one such server per test module on the suite's test database; yields
  its base URL (``http://127.0.0.1:PORT``).
- ``operator_key`` (function): the test's rows are committed (``transactional_db``: gunicorn is another
  process and sees only committed rows), the reference data loaded, and a fresh operator key issued.
- ``agent_with_key`` (function): a factory, ``agent_with_key(tier="PRO", **options) -> LiveAgent``, making
  an agent with a unique id and a key of its own.

Transactional tests flush the database after each test, while the server's processes live for the whole
module. What those processes keep between requests therefore must not outlive a test's rows: keys are new
in every test (the key cache is keyed by the key's hash, so a flushed key is never found in it), agent ids
are unique, the server's Redis keys carry a prefix of their own, and the reference data snapshot is
reloaded on every request (``REFERENCE_CACHE_SECONDS=0``) so a test that edits prices or tiers is seen at
once.

Registered for every test module by one import in ``tests/conftest.py``.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from django.db import connection

from bench.server import GunicornServer

HOST = "127.0.0.1"
SECRET_KEY = "tests-only-" + "k" * 50  # DEBUG is off: the server and the worker refuse the public key


def suite_database_url() -> str:
    """The URL of the database this test process uses (the suite's test database once it is set up)."""
    db = connection.settings_dict
    credentials = db["USER"] + (f":{db['PASSWORD']}" if db["PASSWORD"] else "")
    return f"postgres://{credentials}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


def redis_prefix(name: str) -> str:
    """Every Redis key a process started by this test process writes starts with this: nothing is shared."""
    return f"axiom-tests:{os.getpid()}:{name}:"


@contextlib.contextmanager
def live_server(
    log_dir: Path,
    *,
    database_url: str,
    redis_url: str | None = None,
    workers: int = 2,
    threads: int = 8,
    environment: dict[str, str] | None = None,
) -> Iterator[GunicornServer]:
    """gunicorn serving the grid on a free loopback port, against ``database_url``; stopped afterwards.
    ``environment`` adds to (or overrides) the server's variables."""
    variables = {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url if redis_url is not None else os.environ.get("REDIS_URL", ""),
        "REDIS_KEY_PREFIX": redis_prefix("web"),
        "SECRET_KEY": SECRET_KEY,
        "DEBUG": "false",
        "LOG_LEVEL": "WARNING",
        **(environment or {}),
    }
    server = GunicornServer(
        application="axiom_grid.wsgi:application",
        workers=workers,
        worker_class="gthread",
        threads=threads,
        log_path=log_dir / "gunicorn.log",
    )
    # GunicornServer hands its process a copy of this process's environment.
    with pytest.MonkeyPatch.context() as patch:
        for name, value in variables.items():
            patch.setenv(name, value)
        server.__enter__()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def grid_server(request, django_db_setup, tmp_path_factory) -> Iterator[str]:
    """One gunicorn per test module on the suite's test database; yields its base URL."""
    module = request.module.__name__.rsplit(".", 1)[-1]
    log_dir = tmp_path_factory.mktemp(f"grid-{module}")
    environment = {"REFERENCE_CACHE_SECONDS": "0", "REDIS_KEY_PREFIX": redis_prefix(f"grid-{module}")}
    with live_server(log_dir, database_url=suite_database_url(), environment=environment) as server:
        yield f"http://{HOST}:{server.port}"


@pytest.fixture
def operator_key(transactional_db) -> str:
    """A new operator key, with the reference data loaded and committed for the server to see."""
    from allocation.keys import operator_key_issue
    from ledger.services import reference_data_load

    reference_data_load()
    _, raw_key = operator_key_issue(username=f"operator-{uuid.uuid4().hex[:8]}")
    return raw_key


@dataclass(frozen=True)
class LiveAgent:
    id: str
    api_key: str


@pytest.fixture
def agent_with_key(operator_key) -> Callable[..., LiveAgent]:
    """``agent_with_key(tier="PRO", *, agent_id=None, **options)``: a committed agent with a unique id
    (unless given) and a new key of its own. ``options`` go to ``ledger.services.agent_create``
    (``custom_limits``, ``monthly_budget_usd``, ``name``, ``metadata``)."""
    from allocation.keys import api_key_issue
    from ledger.services import agent_create

    def make(tier: str = "PRO", *, agent_id: str | None = None, **options) -> LiveAgent:
        agent = agent_create(agent_id=agent_id or f"agent-{uuid.uuid4().hex[:12]}", tier_code=tier, **options)
        _, raw_key = api_key_issue(agent=agent)
        return LiveAgent(agent.id, raw_key)

    return make

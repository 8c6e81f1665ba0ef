"""Settings read the environment: SQLite and a filesystem broker by default, PostgreSQL and Redis when set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PROBE = (
    "import json, django; from django.conf import settings; django.setup(); "
    "print(json.dumps({'engine': settings.DATABASES['default']['ENGINE'], "
    "'name': str(settings.DATABASES['default']['NAME']), 'host': settings.DATABASES['default'].get('HOST'), "
    "'broker': settings.CELERY_BROKER_URL, 'cache': settings.CACHES['default']['BACKEND'], "
    "'debug': settings.DEBUG, 'flags': [settings.ENABLE_SUPERPOWERS_TRACKING, "
    "settings.ENABLE_PERFORMANCE_ANALYTICS, settings.ENABLE_MARKETPLACE_OPTIMIZATION, "
    "settings.ENABLE_COLLABORATION_SHARING]}))"
)


def probe(tmp_path, **env) -> dict:
    """Import the settings in a fresh interpreter with exactly the given environment."""
    clean = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL", "DEBUG"}}
    clean.update(DJANGO_SETTINGS_MODULE="axiom_grid.settings", AXIOM_VAR_DIR=str(tmp_path / "var"), **env)
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, env=clean, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_defaults_are_sqlite_and_a_serverless_broker(tmp_path):
    got = probe(tmp_path)
    assert got["engine"] == "django.db.backends.sqlite3"
    assert got["name"].startswith(str(tmp_path / "var"))
    assert got["broker"] == "filesystem://"
    assert (tmp_path / "var" / "broker" / "out").is_dir()
    assert got["debug"] is False
    assert got["flags"] == [True, True, True, True]


def test_database_url_and_redis_url_pick_postgres_and_redis(tmp_path):
    got = probe(
        tmp_path,
        DATABASE_URL="postgres://grid:secret@db.internal:5432/grid",
        REDIS_URL="redis://cache.internal:6379/2",
        DEBUG="true",
        ENABLE_MARKETPLACE_OPTIMIZATION="false",
    )
    assert got["engine"] == "django.db.backends.postgresql"
    assert (got["name"], got["host"]) == ("grid", "db.internal")
    assert got["broker"] == "redis://cache.internal:6379/2"
    assert got["cache"] == "django.core.cache.backends.redis.RedisCache"
    assert got["debug"] is True
    assert got["flags"] == [True, True, False, True]


def test_suite_runs_on_postgres_when_database_url_is_set():
    from django.db import connection

    assert connection.vendor == "postgresql"

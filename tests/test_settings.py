"""Settings read the environment: PostgreSQL always (the embedded server by default, ``DATABASE_URL`` when
set), a filesystem broker by default and Redis when ``REDIS_URL`` is set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection

from axiom_grid.apps import postgresql_version_check

ROOT = Path(__file__).resolve().parent.parent
SKIPPED_DIRS = {".git", ".venv", "var", "build", "__pycache__", ".pytest_cache", ".ruff_cache"}
TEXT_SUFFIXES = {".py", ".md", ".toml", ".yml", ".yaml", ".cfg", ".txt"}
TEXT_NAMES = {"Makefile", "Procfile", "Dockerfile", ".dockerignore", ".gitignore"}

PROBE = (
    "import json, django; from django.conf import settings; django.setup(); "
    "print(json.dumps({'engine': settings.DATABASES['default']['ENGINE'], "
    "'name': str(settings.DATABASES['default']['NAME']), 'host': settings.DATABASES['default'].get('HOST'), "
    "'options': settings.DATABASES['default'].get('OPTIONS', {}), "
    "'broker': settings.CELERY_BROKER_URL, 'cache': settings.CACHES['default']['BACKEND'], "
    "'debug': settings.DEBUG, 'flags': [settings.ENABLE_SUPERPOWERS_TRACKING, "
    "settings.ENABLE_PERFORMANCE_ANALYTICS, settings.ENABLE_MARKETPLACE_OPTIMIZATION, "
    "settings.ENABLE_COLLABORATION_SHARING]}))"
)


def probe_env(tmp_path, **env) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL", "DEBUG"}}
    clean.update(DJANGO_SETTINGS_MODULE="axiom_grid.settings", AXIOM_VAR_DIR=str(tmp_path / "var"), **env)
    return clean


def probe_run(tmp_path, code: str = PROBE, **env) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with exactly the given environment."""
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=probe_env(tmp_path, **env), capture_output=True, text=True
    )


def probe(tmp_path, **env) -> dict:
    """Import the settings in a fresh interpreter with exactly the given environment."""
    out = probe_run(tmp_path, **env)
    out.check_returncode()
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_defaults_are_the_embedded_postgres_and_a_serverless_broker(tmp_path):
    got = probe(tmp_path)
    assert got["engine"] == "django.db.backends.postgresql"
    # Not running: the address is a socket in the data directory, which no other server answers on.
    assert got["host"] == str(tmp_path / "var" / "postgres")
    assert got["name"] == "axiom_grid"
    assert got["options"] == {"prepare_threshold": 5}
    assert got["broker"] == "filesystem://localhost//"
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
    assert got["options"] == {"prepare_threshold": 5}
    assert got["broker"] == "redis://cache.internal:6379/2"
    assert got["cache"] == "django.core.cache.backends.redis.RedisCache"
    assert got["debug"] is True
    assert got["flags"] == [True, True, False, True]


@pytest.mark.parametrize("url", ["sqlite:///var/grid.sqlite3", "mysql://grid@db.internal/grid"])
def test_settings_refuse_a_database_that_is_not_postgres(tmp_path, url):
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        env=probe_env(tmp_path, DATABASE_URL=url),
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "ImproperlyConfigured: DATABASE_URL must name a PostgreSQL 15-18 server" in result.stderr


def test_no_file_of_the_project_names_sqlite():
    this_file = Path(__file__).resolve()
    named = []
    for path in ROOT.rglob("*"):
        parts = path.relative_to(ROOT).parts
        skipped = SKIPPED_DIRS & set(parts) or any(part.endswith(".egg-info") for part in parts)
        if skipped or not path.is_file() or path == this_file:
            continue
        if not (path.suffix in TEXT_SUFFIXES or path.name in TEXT_NAMES or path.parent.name == ".ci"):
            continue
        if "sqlite" in path.read_text(encoding="utf-8", errors="replace").lower():
            named.append(str(path.relative_to(ROOT)))
    assert not named


def test_check_says_how_to_start_the_database_when_the_embedded_one_is_not_running(tmp_path):
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--database", "default"],
        cwd=ROOT,
        env=probe_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "(axiom_grid.E001) DATABASE_URL is not set and the embedded PostgreSQL in" in result.stderr
    assert "python -m axiom_grid.embedded_postgres -- <command>" in result.stderr


# --- On the suite's own database ------------------------------------------------------------------------


@pytest.mark.django_db
def test_suite_runs_on_a_supported_postgres():
    oldest, newest = settings.POSTGRESQL_VERSIONS
    assert connection.vendor == "postgresql"
    assert oldest <= connection.pg_version // 10000 <= newest
    assert postgresql_version_check(databases=["default"]) == []


@pytest.mark.parametrize(
    ("server_version", "expected"), [(140012, "axiom_grid.E002"), (190001, "axiom_grid.W001")]
)
@pytest.mark.django_db
def test_check_refuses_an_older_server_and_warns_about_a_newer_one(monkeypatch, server_version, expected):
    monkeypatch.setattr(connection, "pg_version", server_version)
    (message,) = postgresql_version_check(databases=["default"])
    assert message.id == expected
    assert f"PostgreSQL {server_version // 10000}" in message.msg
    assert "PostgreSQL 15 to 18" in message.msg


ROLLUP_PROBE = (
    "import json, django; from django.conf import settings; django.setup(); "
    "from optimization.services import rollups; "
    "print(json.dumps([rollups.late_window().total_seconds(), rollups.lookback_window().total_seconds(), "
    "rollups.chunk_hours()]))"
)


def test_the_rollup_windows_come_from_the_environment(tmp_path):
    def windows(**env) -> subprocess.CompletedProcess:
        return probe_run(tmp_path, ROLLUP_PROBE, **env)

    assert json.loads(windows().stdout.strip().splitlines()[-1]) == [7200, 604800, 1]
    given = windows(
        USAGE_ROLLUP_LATE_SECONDS="600", USAGE_ROLLUP_LOOKBACK_SECONDS="86400", USAGE_ROLLUP_CHUNK_HOURS="6"
    )
    assert json.loads(given.stdout.strip().splitlines()[-1]) == [600, 86400, 6]
    for wrong in ("0", "two hours", "-5"):
        refused = windows(USAGE_ROLLUP_LATE_SECONDS=wrong)
        assert refused.returncode != 0
        assert "USAGE_ROLLUP_LATE_SECONDS must be a whole number of at least 1" in refused.stderr

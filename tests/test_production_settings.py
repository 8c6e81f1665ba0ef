"""Safe defaults in production: without SECRET_KEY and with DEBUG off nothing serves, and the documented
HTTPS variables make ``manage.py check --deploy`` report nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PRODUCTION = {
    "DEBUG": "false",
    "SECRET_KEY": "a-production-key-of-fifty-characters-or-more-0123456789abcdef",
    "ALLOWED_HOSTS": "grid.example.com",
    "TRUST_X_FORWARDED_PROTO": "true",
    "SECURE_SSL_REDIRECT": "true",
    "SECURE_COOKIES": "true",
    "SECURE_HSTS_SECONDS": "31536000",
    "SECURE_HSTS_INCLUDE_SUBDOMAINS": "true",
    "SECURE_HSTS_PRELOAD": "true",
}


def _test_database_url() -> str:
    from django.db import connection

    db = connection.settings_dict
    credentials = db["USER"] + (f":{db['PASSWORD']}" if db["PASSWORD"] else "")
    return f"postgres://{credentials}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


def _run(command: list[str], tmp_path: Path, **overrides) -> subprocess.CompletedProcess:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"SECRET_KEY", "REDIS_URL", "DEBUG", "DJANGO_ALLOW_ASYNC_UNSAFE"}
    }
    env.update(
        {
            "AXIOM_VAR_DIR": str(tmp_path),
            "PYTHONPATH": str(ROOT),
            "DJANGO_SETTINGS_MODULE": "axiom_grid.settings",
        }
    )
    env.update(overrides)
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "command",
    [
        [sys.executable, "-c", "import axiom_grid.wsgi"],
        [sys.executable, "-c", "import axiom_grid.asgi"],
        [sys.executable, "-m", "celery", "-A", "axiom_grid", "worker", "-l", "INFO"],
        [sys.executable, "-m", "celery", "-A", "axiom_grid", "beat", "-l", "INFO"],
    ],
    ids=["wsgi", "asgi", "worker", "beat"],
)
@pytest.mark.django_db  # beat reads its schedule first: it needs the test database
def test_nothing_serves_with_debug_off_and_no_secret_key(command, tmp_path):
    refused = _run(command, tmp_path, DEBUG="false", DATABASE_URL=_test_database_url())

    assert refused.returncode != 0
    assert "SECRET_KEY is not set and DEBUG is off" in refused.stdout + refused.stderr


def test_the_web_process_starts_with_a_secret_key(tmp_path):
    started = _run([sys.executable, "-c", "import axiom_grid.wsgi"], tmp_path, **PRODUCTION)
    assert started.returncode == 0, started.stderr


def test_check_deploy_reports_nothing_with_the_documented_production_variables(tmp_path):
    checked = _run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"], tmp_path, **PRODUCTION
    )

    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "no issues" in checked.stdout


def test_check_deploy_warns_without_them(tmp_path):
    checked = _run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        tmp_path,
        DEBUG="false",
        SECRET_KEY=PRODUCTION["SECRET_KEY"],
    )
    assert checked.returncode != 0
    for warning in ("security.W004", "security.W008"):
        assert warning in checked.stderr


def test_the_readme_documents_every_production_variable():
    readme = (ROOT / "README.md").read_text()
    for name in PRODUCTION:
        assert f"`{name}`" in readme, name

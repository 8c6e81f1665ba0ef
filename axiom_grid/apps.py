"""The project package as an app, for one reason: Django runs system checks registered in an app's
``ready()``, and the database checks below belong to no business app. They tell at ``migrate`` (so at
``make run``) and at ``manage.py check --database default`` that the database is not one the code is for:
a PostgreSQL server outside ``settings.POSTGRESQL_VERSIONS``, or no server at all."""

from __future__ import annotations

from django.apps import AppConfig
from django.conf import settings
from django.core import checks
from django.db import connections
from django.db.utils import OperationalError


class AxiomGridConfig(AppConfig):
    name = "axiom_grid"
    verbose_name = "Axiom Energy Grid"

    def ready(self) -> None:
        checks.register(postgresql_version_check, checks.Tags.database)
        checks.register(csrf_middleware_check, checks.Tags.security, deploy=True)


def csrf_middleware_check(app_configs=None, **kwargs) -> list[checks.CheckMessage]:
    """Django's security.W003 looks for CsrfViewMiddleware by its dotted path, and the grid installs a
    subclass that skips API calls (axiom_grid.middleware), so W003 is silenced in settings and this check
    stands in for it: some installed middleware must be a CsrfViewMiddleware."""
    from django.middleware.csrf import CsrfViewMiddleware
    from django.utils.module_loading import import_string

    if any(issubclass(import_string(path), CsrfViewMiddleware) for path in settings.MIDDLEWARE):
        return []
    return [checks.Error("No CSRF middleware is installed (a CsrfViewMiddleware).", id="axiom_grid.E004")]


def postgresql_version_check(app_configs=None, databases=None, **kwargs) -> list[checks.CheckMessage]:
    oldest, newest = settings.POSTGRESQL_VERSIONS
    supported = f"PostgreSQL {oldest} to {newest}"
    messages: list[checks.CheckMessage] = []
    for alias in databases or ():
        connection = connections[alias]
        try:
            connection.ensure_connection()
        except OperationalError as error:
            if settings.DATABASE_URL:
                continue  # Django's own error says where it tried; nothing to add
            messages.append(
                checks.Error(
                    "DATABASE_URL is not set and the embedded PostgreSQL in "
                    f"{settings.EMBEDDED_POSTGRES_DIR} is not running ({str(error).strip().splitlines()[0]})",
                    hint="Run the command through `make run` / `make test`, or as `python -m "
                    "axiom_grid.embedded_postgres -- <command>`; or set DATABASE_URL.",
                    id="axiom_grid.E001",
                )
            )
            continue
        major = connection.pg_version // 10000
        if major < oldest:
            messages.append(
                checks.Error(
                    f"The database {alias!r} is PostgreSQL {major}; the grid needs {supported}.",
                    id="axiom_grid.E002",
                )
            )
        elif major > newest:
            messages.append(
                checks.Warning(
                    f"The database {alias!r} is PostgreSQL {major}; the grid is tested on {supported}.",
                    id="axiom_grid.W001",
                )
            )
    return messages

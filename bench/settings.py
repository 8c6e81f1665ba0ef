"""Bench-only settings: the project's settings plus the bare baseline route (``bench.urls``).

``bench.run`` points ``DATABASE_URL`` and ``REDIS_URL`` at the bench database and Redis database 14 before
Django starts, so these settings never touch the development or test databases.
"""

from __future__ import annotations

from axiom_grid.settings import *  # noqa: F403

ROOT_URLCONF = "bench.urls"
WSGI_APPLICATION = "bench.wsgi.application"

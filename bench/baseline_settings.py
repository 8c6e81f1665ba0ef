"""Settings of the bare baseline server: the project's settings (same database, connection reuse and
caches) with no middleware at all and one route (``bench.baseline_urls``).

``bench.run`` points ``DATABASE_URL`` at the bench database before this server starts.
"""

from __future__ import annotations

from axiom_grid.settings import *  # noqa: F403

MIDDLEWARE: list[str] = []
ROOT_URLCONF = "bench.baseline_urls"
WSGI_APPLICATION = "bench.baseline_wsgi.application"

"""Settings of the grid's bench server and of the bench process: the project's settings as they are.

``bench.run`` points ``DATABASE_URL`` at the bench database and gives its Redis keys their own prefix before
Django starts, so these settings never touch the development or test databases.
"""

from __future__ import annotations

from axiom_grid.settings import *  # noqa: F403

WSGI_APPLICATION = "bench.wsgi.application"

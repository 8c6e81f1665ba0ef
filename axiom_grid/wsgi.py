"""WSGI entry point (gunicorn axiom_grid.wsgi)."""

from __future__ import annotations

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "axiom_grid.settings")
application = get_wsgi_application()

from axiom_grid.startup import ensure_secret_key  # noqa: E402  (needs the settings loaded above)

ensure_secret_key()

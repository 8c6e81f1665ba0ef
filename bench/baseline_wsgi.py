"""WSGI entry point of the bare baseline server: ``gunicorn bench.baseline_wsgi:application``."""

from __future__ import annotations

import os

from django.core.wsgi import get_wsgi_application

# Assigned, not set by default: the bench exports DJANGO_SETTINGS_MODULE=bench.settings for the grid.
os.environ["DJANGO_SETTINGS_MODULE"] = "bench.baseline_settings"

application = get_wsgi_application()

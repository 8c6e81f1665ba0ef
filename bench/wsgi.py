"""WSGI entry point of the bench server: ``gunicorn bench.wsgi:application``."""

from __future__ import annotations

import os

from django.core.wsgi import get_wsgi_application

# Assigned, not set by default: a DJANGO_SETTINGS_MODULE inherited from pytest must not win here.
os.environ["DJANGO_SETTINGS_MODULE"] = "bench.settings"

application = get_wsgi_application()

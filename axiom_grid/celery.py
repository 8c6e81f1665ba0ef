"""The Celery app. Configuration comes from Django settings (``CELERY_*``); tasks are found in each app."""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "axiom_grid.settings")

app = Celery("axiom_grid")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

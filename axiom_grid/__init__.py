"""Axiom Energy Grid project package: settings, root URLs, the Celery app, WSGI/ASGI."""

from __future__ import annotations

from axiom_grid.celery import app as celery_app

__all__ = ("celery_app",)

"""What a serving process checks before it starts: the web process (``wsgi``/``asgi``), the Celery worker
and beat. The settings themselves load without a secret key, so that ``manage.py`` commands and the test
suite run anywhere; serving with DEBUG off and the public fallback key would let anyone forge sessions."""

from __future__ import annotations

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured


def ensure_secret_key() -> None:
    if not settings.DEBUG and not settings.SECRET_KEY_IS_SET:
        raise ImproperlyConfigured(
            "SECRET_KEY is not set and DEBUG is off: refusing to start with the public development key. "
            "Set SECRET_KEY (e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(50))'), "
            "or DEBUG=true on a laptop."
        )


# A request of the usage batch makes some 30,000 objects that live until its answer is sent; at Python's
# default threshold (700) they set off dozens of young collections and a full one every few requests, each
# scanning every object the process holds (Django, the app, the URL conf: some 150,000).
GC_YOUNG_THRESHOLD = 50_000


def collector_tune() -> None:
    """Tune a serving process's garbage collector once its application is loaded: import what the first
    request would import (the URL conf and every view), move everything alive so far into the permanent
    generation the collector never scans (``gc.freeze``), and collect the young generation less often.
    Objects are still freed by reference counting the moment they are no longer used; only cycles wait
    longer. Called by gunicorn's ``post_worker_init`` (``gunicorn.conf.py``) and in each Celery pool process
    (``worker_process_init``, ``axiom_grid.celery``)."""
    import gc

    from django.urls import get_resolver

    get_resolver().url_patterns  # noqa: B018  (imports every view, as a first request would)
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)

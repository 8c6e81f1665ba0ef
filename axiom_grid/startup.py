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

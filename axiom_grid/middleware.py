"""Browser middleware that API calls do not pay for.

An agent's call under ``/api/`` authenticates with a Bearer key (``allocation.api.shared.auth``): it has no
session, needs no CSRF token (every DRF view is ``csrf_exempt``, and no API view uses DRF's
SessionAuthentication), never reads ``request.user`` from Django's auth (DRF sets its own principal) and
shows no flash messages. Yet Django's session, CSRF, auth and messages middleware run on every request they
are listed for: a session store object, a CSRF cookie read, a lazy user and a message storage per call, and
their response hooks on the way out. These four classes are Django's own, skipped for API paths and
unchanged for everything else: the admin, the dashboard and the API docs page (Swagger UI renders a CSRF
token for its "Try it out" requests) keep sessions, CSRF checks, login and messages exactly as before.

They subclass Django's classes, adding only the skip: the admin's system checks (admin.E408-E410) look for
the session, auth and messages middleware by class, and ``settings.MIDDLEWARE`` keeps each at its place in
Django's documented order. ``__call__`` is the middleware's public entry point (``get_response`` is the
next layer); ``process_view`` is the hook the handler calls for CSRF checks. Both work in sync and async
mode alike: each branch returns what the next layer returns.
"""

from __future__ import annotations

from django.contrib.auth.middleware import AuthenticationMiddleware as DjangoAuthenticationMiddleware
from django.contrib.messages.middleware import MessageMiddleware as DjangoMessageMiddleware
from django.contrib.sessions.middleware import SessionMiddleware as DjangoSessionMiddleware
from django.http import HttpRequest
from django.middleware.csrf import CsrfViewMiddleware as DjangoCsrfViewMiddleware

API_PREFIX = "/api/"
# Browser pages mounted under /api/ (axiom_grid/urls.py): they keep the whole browser stack.
BROWSER_PAGES_UNDER_API = ("/api/docs/",)


def is_api_request(request: HttpRequest) -> bool:
    """An agent-facing API call: a path under /api/ that is not one of the browser pages there.
    ``path_info`` is the path the URLconf sees, whatever prefix the server mounts the site under."""
    path = request.path_info
    return path.startswith(API_PREFIX) and not path.startswith(BROWSER_PAGES_UNDER_API)


class BrowserOnly:
    """Runs the Django middleware it is mixed into only for requests that are not API calls."""

    def __call__(self, request: HttpRequest):
        if is_api_request(request):
            return self.get_response(request)
        return super().__call__(request)


class SessionMiddleware(BrowserOnly, DjangoSessionMiddleware):
    pass


class CsrfViewMiddleware(BrowserOnly, DjangoCsrfViewMiddleware):
    def process_view(self, request: HttpRequest, callback, callback_args, callback_kwargs):
        # The handler calls process_view itself, outside __call__, so the skip is needed here too.
        if is_api_request(request):
            return None
        return super().process_view(request, callback, callback_args, callback_kwargs)


class AuthenticationMiddleware(BrowserOnly, DjangoAuthenticationMiddleware):
    pass


class MessageMiddleware(BrowserOnly, DjangoMessageMiddleware):
    pass

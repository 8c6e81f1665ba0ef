"""API calls skip the browser middleware (axiom_grid/middleware.py); the admin, the dashboard and the API docs
page keep sessions, CSRF checks, login and messages as before."""

from __future__ import annotations

import uuid

import pytest
from django.contrib.auth.models import Group
from django.test import Client, RequestFactory
from django.urls import reverse

from axiom_grid.middleware import is_api_request

pytestmark = pytest.mark.django_db
pytest_plugins = ["tests.api_fixtures"]

PASSWORD = "pw-operator-1"  # conftest's staff_user


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def _browser_middleware_ran(request) -> dict[str, bool]:
    """What each browser middleware leaves on the request it handled."""
    return {
        "session": hasattr(request, "session"),
        "auth": hasattr(request, "auser"),
        "messages": hasattr(request, "_messages"),
        "csrf": "CSRF_COOKIE" in request.META,  # set from the csrftoken cookie when the middleware reads it
    }


def _logged_in_browser(staff_user) -> Client:
    browser = Client(enforce_csrf_checks=True)
    browser.get(reverse("admin:login"))
    token = browser.cookies["csrftoken"].value
    response = browser.post(
        reverse("admin:login"),
        {"username": staff_user.username, "password": PASSWORD, "csrfmiddlewaretoken": token},
    )
    assert response.status_code == 302, response.content[:500]
    return browser


@pytest.mark.parametrize(
    ("path", "api"),
    [
        ("/api/v1/agents/a-1/allocations", True),
        ("/api/v1/alerts", True),
        ("/api/resources", True),
        ("/api/schema/", True),
        ("/api/docs/", False),
        ("/admin/", False),
        ("/admin/login/", False),
        ("/dashboard/", False),
        ("/healthz", False),
        ("/apiary", False),
    ],
)
def test_api_calls_are_the_paths_under_api_except_the_docs_page(path, api):
    assert is_api_request(RequestFactory().get(path)) is api


def test_the_docs_page_route_is_the_browser_page_the_middleware_names():
    assert not is_api_request(RequestFactory().get(reverse("api-docs")))
    assert is_api_request(RequestFactory().get(reverse("api:allocations", kwargs={"agent_id": "a-1"})))


def test_bearer_key_post_runs_no_browser_middleware_and_needs_no_csrf_token(agent_a, staff_user):
    # The client also carries a staff session and a CSRF cookie, as a browser logged into the admin would:
    # the API call must neither read them nor answer with cookies of its own.
    browser = _logged_in_browser(staff_user)
    agent_a.client.cookies = browser.cookies
    response = agent_a.client.post(
        reverse("api:allocations", kwargs={"agent_id": agent_a.id}),
        {"resource_type": "AI_TOKENS", "amount": 5},
        format="json",
        headers={"idempotency-key": str(uuid.uuid4())},
    )

    assert response.status_code == 201, response.content[:500]
    assert _browser_middleware_ran(response.wsgi_request) == dict.fromkeys(
        ("session", "auth", "messages", "csrf"), False
    )
    assert not response.cookies
    assert "Cookie" not in response.get("Vary", "")


def test_api_errors_are_answered_without_the_browser_middleware(db):
    response = Client().get("/api/v1/no-such-route")

    assert response.status_code == 404
    assert response["Content-Type"].startswith("application/json")
    assert not any(_browser_middleware_ran(response.wsgi_request).values())


def test_api_docs_page_keeps_the_browser_middleware(db):
    response = Client().get(reverse("api-docs"))

    assert response.status_code == 200
    assert _browser_middleware_ran(response.wsgi_request)["session"]
    # Swagger UI sends the page's CSRF token with its requests: the middleware sets the cookie for it.
    assert "csrftoken" in response.cookies


def test_admin_post_without_csrf_token_is_refused_and_writes_nothing(staff_user):
    browser = _logged_in_browser(staff_user)

    response = browser.post(reverse("admin:auth_group_add"), {"name": "no-token"})

    assert response.status_code == 403
    assert not Group.objects.exists()


def test_admin_login_csrf_and_messages_work(staff_user):
    browser = _logged_in_browser(staff_user)
    assert "sessionid" in browser.cookies

    response = browser.post(
        reverse("admin:auth_group_add"),
        {"name": "operators", "csrfmiddlewaretoken": browser.cookies["csrftoken"].value},
        follow=True,
    )

    assert response.status_code == 200
    assert Group.objects.filter(name="operators").exists()
    shown = [str(message) for message in response.context["messages"]]
    assert any("was added successfully" in message for message in shown), shown
    assert all(_browser_middleware_ran(response.wsgi_request).values())


def test_dashboard_still_knows_the_logged_in_staff_user(staff_user):
    assert Client().get(reverse("dashboard:fleet")).status_code == 302  # to the admin login

    response = _logged_in_browser(staff_user).get(reverse("dashboard:fleet"))

    assert response.status_code == 200
    assert response.wsgi_request.user == staff_user

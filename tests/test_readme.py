"""The README is the users' reference: every route of the API is in it, and every command it shows exists."""

from __future__ import annotations

import re
from pathlib import Path

from django.core.management import get_commands
from django.urls import URLPattern, URLResolver, get_resolver

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
# Path parameters as the README writes them: an agent, budget, organization, team or experiment is {id}.
SHOWN_AS_ID = {"agent_id", "budget_id", "organization_id", "team_id", "experiment_id"}
NOT_API = ("/api/schema/", "/api/docs/")


def _routes(patterns, prefix: str = "") -> list[str]:
    routes = []
    for pattern in patterns:
        text = prefix + str(pattern.pattern)
        if isinstance(pattern, URLResolver):
            routes += _routes(pattern.url_patterns, text)
        elif isinstance(pattern, URLPattern):
            routes.append("/" + text)
    return routes


def _as_written(route: str) -> str:
    def parameter(match: re.Match) -> str:
        name = match.group(1)
        return "{id}" if name in SHOWN_AS_ID else "{" + name + "}"

    return re.sub(r"<(?:[^:>]+:)?([^>]+)>", parameter, route)


def test_every_api_route_is_in_the_readme():
    routes = [
        _as_written(route)
        for route in _routes(get_resolver().url_patterns)
        if (route.startswith("/api/") and not route.startswith(NOT_API)) or route in ("/metrics", "/healthz")
    ]
    assert len(routes) > 40
    missing = [route for route in routes if f"{route}`" not in README and f"{route}?" not in README]
    assert missing == [], f"routes the README does not show: {missing}"


def test_every_management_command_the_readme_shows_exists():
    shown = set(re.findall(r"manage\.py ([a-z_]+)", README))
    assert {"issue_api_key", "load_reference_data"} <= shown
    unknown = shown - set(get_commands())
    assert unknown == set(), f"the README shows commands that do not exist: {unknown}"


def test_commands_for_a_checkout_run_the_projects_python():
    # Outside docker compose, `python` is whatever is on the PATH, not the project's .venv.
    bare = [
        line
        for line in README.splitlines()
        if re.search(r"(?<![/\w])python manage\.py", line)
        and "docker compose" not in line
        and "image" not in line
    ]
    assert bare == [], bare

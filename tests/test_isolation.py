"""Isolation under attack: agent A's key on anything of agent B answers 404 ``not_found``, exactly as it would
for an agent that does not exist (so a key cannot even learn which agents there are), and writes nothing.

The routes are not listed by hand: every URL pattern under ``/api/`` whose path takes an agent (the
``<agent_id:...>`` converter) is found by walking the URL resolver, with every method its view answers. A
route added later is attacked as soon as it exists; one whose request this module cannot build fails
``test_every_agent_route_is_attacked`` until a body is added to ``BODIES``. Besides the paths: A's own path
with B's allocation or alert id, and the routes that name an agent in their body or query
(``/api/resources``, deal purchases, the operator's usage batch).

Each attack is also made with an agent id that does not exist: the answer must be the same. Then B itself
makes the same request, which must not be a 404: the 404 A got was isolation, not a bad request.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass
from decimal import Decimal

import pytest
from django.urls import URLPattern, URLResolver, get_resolver
from django.utils import timezone

from allocation import services
from allocation.api.shared.converters import AgentIdConverter
from ledger.models import Agent, Budget
from ledger.services import agent_set_status
from optimization.models import (
    Alert,
    AlertSettings,
    Deal,
    Execution,
    Purchase,
    ScalingEvent,
    ScalingPolicy,
)
from tests.api_fixtures import client_with_key, keyed_agent, ledger_snapshot

pytestmark = pytest.mark.django_db

A, B, GHOST = "agent-a", "agent-b", "agent-ghost"  # GHOST never exists
GHOST_ALLOCATION = "00000000-0000-7000-8000-000000000000"
GHOST_ALERT = 2_000_000_000
# What this module attacked when it was written, HEAD and OPTIONS aside: 28 agent paths and methods, 4 of
# A's own paths with B's ids, 10 routes naming the agent in their body or query. Fewer means routes were
# lost from the walk, not that the API got safer.
MINIMUM_ATTACKS = 42
# The other path parameters of agent routes, and what of B's to put in them.
KNOWN_PARAMETERS = {"allocation_id", "alert_id"}


# --- Walking the routes -----------------------------------------------------------------------------------


def _walk(patterns, prefix: str = "", namespace: str = ""):
    for pattern in patterns:
        if isinstance(pattern, URLResolver):
            inner = f"{namespace}{pattern.namespace}:" if pattern.namespace else namespace
            yield from _walk(pattern.url_patterns, prefix + str(pattern.pattern), inner)
        elif isinstance(pattern, URLPattern):
            yield prefix + str(pattern.pattern), f"{namespace}{pattern.name}", pattern


def _methods(pattern: URLPattern) -> list[str]:
    view = pattern.callback.view_class
    methods = [m for m in view.http_method_names if m not in {"head", "options"} and hasattr(view, m)]
    # Django answers HEAD with the GET handler; every DRF view answers OPTIONS.
    return [m.upper() for m in methods] + (["HEAD"] if "get" in methods else []) + ["OPTIONS"]


def agent_routes() -> list[tuple[str, str, list[str], str]]:
    """(route name, route, its other parameters, method) of every /api/ route whose path takes an agent."""
    found = []
    for route, name, pattern in _walk(get_resolver().url_patterns):
        converters = pattern.pattern.converters
        if not route.startswith("api/") or not any(
            isinstance(converter, AgentIdConverter) for converter in converters.values()
        ):
            continue
        others = sorted(parameter for parameter in converters if parameter != "agent_id")
        for method in _methods(pattern):
            found.append((name, route, others, method))
    return found


# --- What B has, and what A sends -------------------------------------------------------------------------


@dataclass
class Victim:
    hold_id: str
    alert_id: int
    deal_id: str


@pytest.fixture
def keys(reference_data) -> dict[str, str]:
    return {agent_id: keyed_agent(id=agent_id).raw_key for agent_id in (A, B)}


@pytest.fixture
def victim(keys) -> Victim:
    """B with something of every kind a route can name: an open hold and a committed allocation, an open
    alert, alert settings, a scaling policy of its own; and a platform deal anyone may buy."""
    agent_b = Agent.objects.get(pk=B)
    services.allocation_create(agent=agent_b, resource_type_id="AI_TOKENS", amount=2_000)
    hold = services.allocation_create(agent=agent_b, resource_type_id="AI_TOKENS", amount=5_000, hold=True)
    alert = Alert.objects.create(
        agent=agent_b,
        kind=Alert.Kind.BUDGET,
        severity="warning",
        title="Budget 50% reached",
        message="B's own business",
        dedup_key="isolation-test",
    )
    AlertSettings.objects.create(agent=agent_b, budget_thresholds=[50], email="b@example.com")
    ScalingPolicy.objects.create(agent=agent_b, scale_up_threshold=90, scale_down_threshold=10)
    deal = Deal.objects.create(
        resource_type_id="AI_TOKENS",
        amount_total=100,
        amount_left=100,
        unit_price_usd=Decimal("0.0000005"),
        expires_at=timezone.now() + dt.timedelta(hours=1),
    )
    services.agent_quotas(agent=Agent.objects.get(pk=A))  # A's quotas open: a share has room to refuse
    return Victim(hold_id=str(hold.pk), alert_id=alert.pk, deal_id=str(deal.pk))


# Bodies that are valid for the agent itself, so that the only reason to refuse A is isolation.
BODIES = {
    ("api:allocations", "POST"): {"resource_type": "AI_TOKENS", "amount": 1},
    ("api:leases", "POST"): {"resource_type": "AI_TOKENS", "amount": 1},
    ("api:quota-checks", "POST"): {"resource_type": "AI_TOKENS", "amount": 1},
    ("api:allocations-batch", "POST"): {"items": [{"resource_type": "AI_TOKENS", "amount": 1}]},
    ("api:agent", "PATCH"): {"name": "stolen"},
    ("api:allocation-settle", "POST"): {"amount": 1_000},
    ("api:allocation-release", "POST"): {},
    ("api:shares", "POST"): {"resource_type": "AI_TOKENS", "amount": 1_000, "target_agent_id": A},
    ("api:agent-runs", "POST"): {"run_id": "stolen-run", "limit_usd": "1"},
    ("optimization:executions", "POST"): {
        "superpower": "stealing",
        "resources": {"AI_TOKENS": 10},
        "duration_ms": 5,
        "success": True,
    },
    ("optimization:agent-optimize", "POST"): {},
    ("optimization:alert-acknowledge", "POST"): {},
    ("optimization:alert-settings", "PUT"): {"budget_thresholds": [10], "email": "thief@example.com"},
    ("optimization:scaling", "POST"): {"direction": "up"},
    ("optimization:scaling-policy", "PUT"): {"enabled": False},
    ("optimization:scaling-policy", "DELETE"): {},
    ("optimization:agent-deals", "POST"): {
        "resource_type": "AI_TOKENS",
        "amount": 10,
        "unit_price_usd": "0.0000001",
    },
}
# A's own path with one of B's ids in it.
OWN_PATH_ROUTES = {
    "api:allocation",
    "api:allocation-settle",
    "api:allocation-release",
    "optimization:alert-acknowledge",
}


@dataclass(frozen=True)
class Attack:
    """One request as A sends it (``target`` = B), as it would be for an agent that does not exist
    (``target`` = GHOST), and as B itself would send it (``target`` = B, B's key)."""

    case: str
    method: str
    build: object  # (target, victim) -> (path, body)
    # "not_found": 404 not_found. "same": whatever the route answers any key on any path (OPTIONS describes
    # the route), byte for byte. "refused": the route itself is refused to an agent key (operator only).
    expect: str = "not_found"


def _path(route: str, target_path: str, parameters: dict) -> str:
    path = "/" + route.replace("<agent_id:agent_id>", target_path)
    for name, value in parameters.items():
        path = path.replace(f"<uuid:{name}>", str(value)).replace(f"<int:{name}>", str(value))
    assert "<" not in path, path
    return path


def _parameters(others: list[str], victim: Victim, *, ghost: bool) -> dict:
    known = {
        "allocation_id": GHOST_ALLOCATION if ghost else victim.hold_id,
        "alert_id": GHOST_ALERT if ghost else victim.alert_id,
    }
    return {name: known[name] for name in others}


def _path_attack(name: str, route: str, others: list[str], method: str) -> Attack:
    body = BODIES.get((name, method))

    def build(target: str, victim: Victim):
        return _path(route, target, _parameters(others, victim, ghost=target == GHOST)), body

    return Attack(f"{name}-{method}", method, build, expect="same" if method == "OPTIONS" else "not_found")


def _own_path_attack(name: str, route: str, others: list[str], method: str) -> Attack:
    body = BODIES.get((name, method))

    def build(target: str, victim: Victim):
        # A's own path, with B's id in it (or an id nobody has); B itself uses its own path (_own_request).
        return _path(route, A, _parameters(others, victim, ghost=target == GHOST)), body

    return Attack(f"{name}-{method}-on-own-path", method, build)


def _compat_get(action: str) -> Attack:
    return Attack(
        f"compat-get-{action}",
        "GET",
        lambda target, victim: (f"/api/resources?action={action}&agentId={target}", None),
    )


def _compat_post(action: str, extra) -> Attack:
    return Attack(
        f"compat-post-{action}",
        "POST",
        lambda target, victim: ("/api/resources", {"action": action, "agentId": target, **extra(victim)}),
    )


BODY_ATTACKS = [
    *(_compat_get(action) for action in ("quota", "cost", "metrics", "recommendations")),
    _compat_post("allocate", lambda v: {"resourceType": "AI_TOKENS", "amount": 1}),
    _compat_post("check", lambda v: {"resourceType": "AI_TOKENS", "amount": 1}),
    _compat_post("share", lambda v: {"resourceType": "AI_TOKENS", "amount": 1_000, "targetAgentId": A}),
    _compat_post("purchase", lambda v: {"dealId": v.deal_id, "amount": 1}),
    _compat_post("optimize", lambda v: {}),
    Attack(
        "deal-purchase-for-another-agent",
        "POST",
        lambda target, victim: (
            f"/api/v1/marketplace/deals/{victim.deal_id}/purchase",
            {"agent_id": target, "amount": 1},
        ),
    ),
    # The operator's batch takes items of any agent: an agent key is refused the route itself (403), for B
    # as for an agent that does not exist.
    Attack(
        "usage-batch-for-another-agent",
        "POST",
        lambda target, victim: (
            "/api/v1/usage/batch",
            {"items": [{"agent_id": target, "resource_type": "AI_TOKENS", "amount": 1}]},
        ),
        expect="refused",
    ),
]


def attacks() -> list[Attack]:
    found = []
    for name, route, others, method in agent_routes():
        found.append(_path_attack(name, route, others, method))
        if name in OWN_PATH_ROUTES and method not in {"HEAD", "OPTIONS"}:
            found.append(_own_path_attack(name, route, others, method))
    return found + BODY_ATTACKS


ATTACKS = attacks()


# --- The attacks ------------------------------------------------------------------------------------------


def snapshot() -> dict:
    """Everything a call could write, ledger and optimization (not audit records: refusals are audited)."""
    return {
        **ledger_snapshot(),
        "budgets": sorted(Budget.objects.values_list("id", "agent_id", "run_id", "limit_usd", "spent_usd")),
        "instances": sorted(Agent.objects.values_list("id", "instance_count")),
        "alerts": sorted(Alert.objects.values_list("id", "acknowledged_at", "acknowledged_by")),
        "alert_settings": sorted(AlertSettings.objects.values_list("agent_id", "budget_thresholds", "email")),
        "deals": sorted(
            (str(pk), left, status)
            for pk, left, status in Deal.objects.values_list("pk", "amount_left", "status")
        ),
        "purchases": Purchase.objects.count(),
        "executions": Execution.objects.count(),
        "scaling_events": ScalingEvent.objects.count(),
        "scaling_policies": list(  # the tiers' (reference data) and B's own
            ScalingPolicy.objects.order_by("pk").values_list(
                "agent_id", "tier_id", "enabled", "scale_up_threshold"
            )
        ),
    }


def _send(client, method: str, path: str, body):
    if method in {"GET", "HEAD", "OPTIONS"}:
        return client.generic(method, path)
    return client.generic(
        method, path, json.dumps(body if body is not None else {}), content_type="application/json"
    )


def _answer(response, *, names: list[str]) -> tuple:
    """What a response tells: status, error code and message, with the ids it was asked about made
    neutral (an answer about B must read as one about an agent that does not exist)."""
    try:
        error = response.json().get("error") or {}
    except (ValueError, AttributeError):
        error = {}
    message = str(error.get("message", ""))
    for name in names:
        message = re.sub(rf"(?<![\w-]){re.escape(name)}(?![\w-])", "<id>", message)
    return response.status_code, error.get("code"), message


def test_every_agent_route_is_attacked():
    routes = agent_routes()
    assert len({name for name, _, _, _ in routes}) >= 20, routes
    writes = {(name, method) for name, _, _, method in routes if method not in {"GET", "HEAD", "OPTIONS"}}
    assert writes <= set(BODIES), f"routes without a body to attack them with: {sorted(writes - set(BODIES))}"
    assert set(BODIES) <= writes, f"bodies for routes that are gone: {sorted(set(BODIES) - writes)}"
    unknown = {(name, parameter) for name, _, others, _ in routes for parameter in others} - {
        (name, parameter) for name, _, others, _ in routes for parameter in KNOWN_PARAMETERS
    }
    assert not unknown, f"path parameters this module cannot fill with B's ids: {sorted(unknown)}"
    assert {case.case for case in ATTACKS} >= {f"{name}-{method}" for name, _, _, method in routes}
    substantial = [case for case in ATTACKS if case.method not in {"HEAD", "OPTIONS"}]
    assert len(substantial) >= MINIMUM_ATTACKS, len(substantial)


@pytest.mark.parametrize("attack", ATTACKS, ids=[attack.case for attack in ATTACKS])
def test_another_agents_key_meets_404_and_writes_nothing(attack, keys, victim):
    attacker = client_with_key(keys[A])
    before = snapshot()

    path, body = attack.build(B, victim)
    response = _send(attacker, attack.method, path, body)
    ghost_path, ghost_body = attack.build(GHOST, victim)
    ghost = _send(attacker, attack.method, ghost_path, ghost_body)

    answer = _answer(response, names=[B, victim.hold_id, str(victim.alert_id)])
    ghost_answer = _answer(ghost, names=[GHOST, GHOST_ALLOCATION, str(GHOST_ALERT)])
    assert answer == ghost_answer, (path, response.content[:300], ghost.content[:300])
    if attack.expect == "not_found":
        # A HEAD answer has no body to carry the code.
        assert answer[:2] == (404, None if attack.method == "HEAD" else "not_found"), response.content[:300]
    elif attack.expect == "same":
        assert response.content == ghost.content
    else:
        assert answer[:2] == (403, "forbidden"), answer
    assert snapshot() == before

    # B's own request is not a 404: A's was refused for being A, not for a bad request.
    own = _send(client_with_key(keys[B]), attack.method, *_own_request(attack, victim))
    assert own.status_code != 404, (path, own.status_code, own.content[:300])


def _own_request(attack: Attack, victim: Victim) -> tuple[str, object]:
    path, body = attack.build(B, victim)
    if attack.case.endswith("-on-own-path"):
        path = path.replace(f"/agents/{A}/", f"/agents/{B}/")
    return path, body


@pytest.mark.parametrize("target_state", ["active", "suspended"])
def test_a_refused_share_does_not_tell_whether_its_target_exists(keys, victim, target_state):
    """A share names another agent, so one that succeeds tells that it exists (and costs what it gives);
    a refused one, free and leaving nothing behind, must not: it answers as for an agent that does not
    exist."""
    if target_state == "suspended":
        agent_set_status(agent=Agent.objects.get(pk=B), status=Agent.Status.SUSPENDED, reason="test")
    attacker = client_with_key(keys[A])
    before = snapshot()
    answers = {}
    for target in (B, GHOST):
        body = {"resource_type": "AI_TOKENS", "amount": 2**53, "target_agent_id": target}
        response = _send(attacker, "POST", f"/api/v1/agents/{A}/shares", body)
        answers[target] = _answer(response, names=[target])
    assert snapshot() == before
    assert answers[B] == answers[GHOST]

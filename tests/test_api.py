"""The REST API v1 and the /api/resources compatibility endpoint, end to end through APIClient."""

from __future__ import annotations

import datetime as dt
import re
from decimal import Decimal
from io import StringIO

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from django.urls import reverse
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from allocation import services
from allocation.api.shared.idempotency import idempotency_cleanup
from allocation.keys import api_key_issue, api_key_revoke
from allocation.models import Allocation, ApiKey, AuditRecord, IdempotencyRecord
from ledger.models import Agent, Grant, Quota, UsageLog
from ledger.periods import month_bounds
from ledger.services import agent_set_status, quota_grant
from tests.factories import AgentFactory

pytest.register_assert_rewrite("tests.api_fixtures")  # its assert_error helper, imported just below

from tests.api_fixtures import (  # noqa: E402
    PRO_AI_TOKENS,
    RESOURCE_CODES,
    assert_error,
    client_with_key,
    ledger_snapshot,
)

# The agent_a, agent_b and operator_client fixtures.
pytest_plugins = ["tests.api_fixtures"]

pytestmark = pytest.mark.django_db


def _call(client, method: str, url: str, body=None, **headers):
    if method == "get":
        return client.get(url, **headers)
    return getattr(client, method)(url, body if body is not None else {}, format="json", **headers)


def _allocate(keyed, amount: int, resource_type: str = "AI_TOKENS", **extra):
    headers = {}
    if "idempotency_key" in extra:
        headers["HTTP_IDEMPOTENCY_KEY"] = extra.pop("idempotency_key")
    return keyed.client.post(
        reverse("api:allocations", args=[keyed.id]),
        {"resource_type": resource_type, "amount": amount, **extra},
        format="json",
        **headers,
    )


def _quota(agent_id: str, resource_type: str = "AI_TOKENS", at: dt.datetime | None = None) -> Quota:
    start, _ = month_bounds(at or timezone.now())
    return Quota.objects.get(agent_id=agent_id, resource_type_id=resource_type, period_start=start)


# --- 1. Isolation and authentication ----------------------------------------------------------------------


def _compat(query: str) -> str:
    return f"{reverse('api:resources')}?{query}"


# (case id, method, url(a_id, b_id, b_hold_id), body(a_id, b_id))
AGENT_SCOPED_ROUTES = [
    ("agent-get", "get", lambda a, b, h: reverse("api:agent", args=[b]), None),
    ("agent-patch", "patch", lambda a, b, h: reverse("api:agent", args=[b]), lambda a, b: {"name": "stolen"}),
    ("quotas", "get", lambda a, b, h: reverse("api:quotas", args=[b]), None),
    (
        "quota-checks",
        "post",
        lambda a, b, h: reverse("api:quota-checks", args=[b]),
        lambda a, b: {"resource_type": "AI_TOKENS", "amount": 1},
    ),
    (
        "allocations-create",
        "post",
        lambda a, b, h: reverse("api:allocations", args=[b]),
        lambda a, b: {"resource_type": "AI_TOKENS", "amount": 1000},
    ),
    ("allocation-detail", "get", lambda a, b, h: reverse("api:allocation", args=[b, h]), None),
    ("allocation-detail-own-path", "get", lambda a, b, h: reverse("api:allocation", args=[a, h]), None),
    (
        "settle",
        "post",
        lambda a, b, h: reverse("api:allocation-settle", args=[b, h]),
        lambda a, b: {"amount": 100},
    ),
    (
        "settle-own-path",
        "post",
        lambda a, b, h: reverse("api:allocation-settle", args=[a, h]),
        lambda a, b: {"amount": 100},
    ),
    ("release", "post", lambda a, b, h: reverse("api:allocation-release", args=[b, h]), None),
    ("release-own-path", "post", lambda a, b, h: reverse("api:allocation-release", args=[a, h]), None),
    ("usage", "get", lambda a, b, h: reverse("api:usage", args=[b]), None),
    ("cost", "get", lambda a, b, h: reverse("api:cost", args=[b]), None),
    (
        "shares",
        "post",
        lambda a, b, h: reverse("api:shares", args=[b]),
        lambda a, b: {"resource_type": "AI_TOKENS", "amount": 1000, "target_agent_id": a},
    ),
    ("compat-quota", "get", lambda a, b, h: _compat(f"action=quota&agentId={b}"), None),
    ("compat-cost", "get", lambda a, b, h: _compat(f"action=cost&agentId={b}"), None),
    (
        "compat-allocate",
        "post",
        lambda a, b, h: reverse("api:resources"),
        lambda a, b: {"action": "allocate", "agentId": b, "resourceType": "AI_TOKENS", "amount": 1000},
    ),
    (
        "compat-check",
        "post",
        lambda a, b, h: reverse("api:resources"),
        lambda a, b: {"action": "check", "agentId": b, "resourceType": "AI_TOKENS", "amount": 1},
    ),
    (
        "compat-share",
        "post",
        lambda a, b, h: reverse("api:resources"),
        lambda a, b: {
            "action": "share",
            "agentId": b,
            "resourceType": "AI_TOKENS",
            "amount": 1000,
            "targetAgentId": a,
        },
    ),
]

# What an operator key gets on agent B's own paths.
OPERATOR_EXPECTED_STATUS = {
    "agent-get": 200,
    "agent-patch": 200,
    "quotas": 200,
    "quota-checks": 200,
    "allocations-create": 201,
    "allocation-detail": 200,
    "settle": 200,
    "release": 200,
    "usage": 200,
    "cost": 200,
    "shares": 201,
    "compat-quota": 200,
    "compat-cost": 200,
    "compat-allocate": 201,
    "compat-check": 200,
    "compat-share": 200,
}


@pytest.fixture
def b_with_history(agent_a, agent_b):
    """Agent B with a committed allocation, an open hold and a manual grant; returns the hold's id."""
    services.allocation_create(agent=agent_b.agent, resource_type_id="AI_TOKENS", amount=2000)
    hold = services.allocation_create(
        agent=agent_b.agent, resource_type_id="AI_TOKENS", amount=5000, hold=True
    )
    quota_grant(
        agent=agent_b.agent,
        resource_type_id="COMPUTE_MS",
        amount=10,
        reason=Grant.Reason.MANUAL,
        actor="test",
    )
    services.agent_quotas(agent=agent_b.agent)
    services.agent_quotas(agent=agent_a.agent)
    return str(hold.pk)


@pytest.mark.parametrize(
    ("method", "url", "body"),
    [pytest.param(method, url, body, id=case) for case, method, url, body in AGENT_SCOPED_ROUTES],
)
def test_agent_key_cannot_reach_another_agent(agent_a, agent_b, b_with_history, method, url, body):
    before = ledger_snapshot()

    response = _call(
        agent_a.client,
        method,
        url(agent_a.id, agent_b.id, b_with_history),
        body(agent_a.id, agent_b.id) if body else None,
    )

    assert_error(response, 404, "not_found")
    assert ledger_snapshot() == before
    assert Allocation.objects.get(pk=b_with_history).status == Allocation.Status.HELD
    assert _quota(agent_b.id).reserved == 5000


@pytest.mark.parametrize(
    ("method", "url", "body"),
    [
        pytest.param(method, url, body, id=case)
        for case, method, url, body in AGENT_SCOPED_ROUTES
        if case in OPERATOR_EXPECTED_STATUS
    ],
)
def test_operator_key_acts_on_every_agent(
    request, operator_client, agent_a, agent_b, b_with_history, method, url, body
):
    case = request.node.callspec.id
    response = _call(
        operator_client,
        method,
        url(agent_a.id, agent_b.id, b_with_history),
        body(agent_a.id, agent_b.id) if body else None,
    )

    assert response.status_code == OPERATOR_EXPECTED_STATUS[case], response.content[:500]


@pytest.mark.parametrize("method", ["get", "post"])
def test_agent_key_on_agents_collection_is_forbidden(agent_a, method):
    before = ledger_snapshot()

    response = _call(
        agent_a.client,
        method,
        reverse("api:agents"),
        {"id": "sneaky", "tier": "ENTERPRISE"} if method == "post" else None,
    )

    assert_error(response, 403, "forbidden")
    assert ledger_snapshot() == before


def _auth_cases_urls(agent_id: str) -> list[tuple[str, str]]:
    return [
        ("get", reverse("api:agent", args=[agent_id])),
        ("get", reverse("api:quotas", args=[agent_id])),
        ("post", reverse("api:allocations", args=[agent_id])),
        ("get", reverse("api:agents")),
        ("get", _compat(f"action=quota&agentId={agent_id}")),
    ]


@pytest.mark.parametrize(
    ("authorization", "code"),
    [
        pytest.param(None, "not_authenticated", id="missing"),
        pytest.param(
            "Bearer axg_thisKeyWasNeverIssuedxxxxxxxxxxxxxxxxxxxxxxxx", "invalid_api_key", id="unknown"
        ),
        pytest.param("Bearer not-even-a-key", "invalid_api_key", id="malformed"),
        pytest.param("Token {raw}", "invalid_api_key", id="wrong-scheme"),
        pytest.param("Bearer ", "invalid_api_key", id="empty"),
    ],
)
def test_missing_or_invalid_key_is_401(agent_a, authorization, code):
    client = client_with_key(None)
    if authorization is not None:
        client.credentials(HTTP_AUTHORIZATION=authorization.format(raw=agent_a.raw_key))
    before = ledger_snapshot()

    for method, url in _auth_cases_urls(agent_a.id):
        response = _call(client, method, url, {"resource_type": "AI_TOKENS", "amount": 1})
        assert_error(response, 401, code)
        assert response["WWW-Authenticate"] == "Bearer"

    assert ledger_snapshot() == before
    assert not AuditRecord.objects.exists()


def test_revoked_key_is_401(agent_a):
    assert agent_a.client.get(reverse("api:agent", args=[agent_a.id])).status_code == 200
    api_key_revoke(api_key=agent_a.api_key)
    before = ledger_snapshot()

    for method, url in _auth_cases_urls(agent_a.id):
        response = _call(agent_a.client, method, url, {"resource_type": "AI_TOKENS", "amount": 1})
        assert_error(response, 401, "invalid_api_key")

    assert ledger_snapshot() == before


def test_operator_key_of_a_demoted_user_is_401(operator_client, agent_a):
    get_user_model().objects.filter(username="ops").update(is_staff=False)

    response = operator_client.get(reverse("api:agent", args=[agent_a.id]))

    assert_error(response, 401, "invalid_api_key")


# --- 2. Allocation flow -----------------------------------------------------------------------------------


def test_commit_charges_quota_and_writes_one_usage_row(agent_a):
    response = _allocate(agent_a, 4000, task_id="task-1")

    assert response.status_code == 201, response.content
    data = response.json()
    assert data["resource_type"] == "AI_TOKENS"
    assert data["allocated_amount"] == 4000
    assert data["cost_usd"] == "0.004000000000"
    assert data["status"] == "committed"
    assert data["agent_id"] == agent_a.id
    assert data["task_id"] == "task-1"
    assert data["expires_at"] is None
    allocation = Allocation.objects.get(pk=data["id"])
    assert allocation.agent_id == agent_a.id
    quota = _quota(agent_a.id)
    assert (quota.used, quota.reserved) == (4000, 0)
    usage = UsageLog.objects.get(agent_id=agent_a.id)
    assert usage.amount == 4000
    assert usage.cost_usd == Decimal("0.004")
    assert usage.kind == UsageLog.Kind.ALLOCATION
    assert usage.quota_id == quota.pk
    assert usage.metadata["allocation_id"] == data["id"]


def test_hold_reserves_without_usage_and_expires_in_15_minutes_by_default(agent_a):
    before_call = timezone.now()

    response = _allocate(agent_a, 10_000, hold=True)

    assert response.status_code == 201, response.content
    data = response.json()
    assert data["status"] == "held"
    assert data["cost_usd"] == "0.000000000000"
    expires_at = parse_datetime(data["expires_at"])
    expected = before_call + dt.timedelta(minutes=15)
    assert expected - dt.timedelta(seconds=1) <= expires_at <= timezone.now() + dt.timedelta(minutes=15)
    quota = _quota(agent_a.id)
    assert (quota.used, quota.reserved) == (0, 10_000)
    assert not UsageLog.objects.filter(agent_id=agent_a.id).exists()


def test_hold_honours_a_custom_ttl(agent_a):
    before_call = timezone.now()

    response = _allocate(agent_a, 1000, hold=True, hold_ttl_seconds=90)

    assert response.status_code == 201, response.content
    expires_at = parse_datetime(response.json()["expires_at"])
    assert before_call + dt.timedelta(seconds=89) <= expires_at <= timezone.now() + dt.timedelta(seconds=90)


def _settle(keyed, allocation_id: str, amount: int, **headers):
    return keyed.client.post(
        reverse("api:allocation-settle", args=[keyed.id, allocation_id]),
        {"amount": amount},
        format="json",
        **headers,
    )


def _release(keyed, allocation_id: str):
    return keyed.client.post(
        reverse("api:allocation-release", args=[keyed.id, allocation_id]), {}, format="json"
    )


def test_settle_less_than_held_charges_the_actual_amount_and_frees_the_rest(agent_a):
    hold_id = _allocate(agent_a, 10_000, hold=True).json()["id"]

    response = _settle(agent_a, hold_id, 6000)

    assert response.status_code == 200, response.content
    data = response.json()
    assert data["status"] == "settled"
    assert data["settled_amount"] == 6000
    assert data["allocated_amount"] == 6000
    assert data["cost_usd"] == "0.006000000000"
    quota = _quota(agent_a.id)
    assert (quota.used, quota.reserved) == (6000, 0)
    usage = UsageLog.objects.get(agent_id=agent_a.id)
    assert (usage.kind, usage.amount, usage.cost_usd) == (UsageLog.Kind.SETTLEMENT, 6000, Decimal("0.006"))


def test_settle_more_than_held_succeeds_when_the_difference_is_available(agent_a):
    hold_id = _allocate(agent_a, 1000, hold=True).json()["id"]

    response = _settle(agent_a, hold_id, 1500)

    assert response.status_code == 200, response.content
    assert response.json()["cost_usd"] == "0.001500000000"
    quota = _quota(agent_a.id)
    assert (quota.used, quota.reserved) == (1500, 0)
    assert UsageLog.objects.get(agent_id=agent_a.id).amount == 1500


def test_settle_more_than_available_is_refused_and_the_hold_stays_open(agent_a):
    hold_id = _allocate(agent_a, 1000, hold=True).json()["id"]
    assert _allocate(agent_a, PRO_AI_TOKENS - 1000).status_code == 201
    before = ledger_snapshot()

    response = _settle(agent_a, hold_id, 1001)

    details = assert_error(response, 429, "quota_exceeded")
    assert details["requested"] == 1
    assert details["available"] == 0
    assert details["held"] == 1000
    assert ledger_snapshot() == before
    hold = Allocation.objects.get(pk=hold_id)
    assert (hold.status, hold.settled_amount) == (Allocation.Status.HELD, None)
    quota = _quota(agent_a.id)
    assert (quota.used, quota.reserved) == (PRO_AI_TOKENS - 1000, 1000)
    # The refused settle left the hold usable: settling within it still works.
    assert _settle(agent_a, hold_id, 1000).status_code == 200


def test_release_gives_the_hold_back(agent_a):
    hold_id = _allocate(agent_a, 7000, hold=True).json()["id"]

    response = _release(agent_a, hold_id)

    assert response.status_code == 200, response.content
    assert response.json()["status"] == "released"
    quota = _quota(agent_a.id)
    assert (quota.used, quota.reserved) == (0, 0)
    assert not UsageLog.objects.exists()


@pytest.mark.parametrize("second", ["settle", "release"])
@pytest.mark.parametrize("first", ["settle", "release"])
def test_a_finished_hold_cannot_be_finished_again(agent_a, first, second):
    hold_id = _allocate(agent_a, 7000, hold=True).json()["id"]
    finish = {
        "settle": lambda: _settle(agent_a, hold_id, 5000),
        "release": lambda: _release(agent_a, hold_id),
    }
    assert finish[first]().status_code == 200
    before = ledger_snapshot()

    details = assert_error(finish[second](), 409, "hold_not_open")

    assert details["status"] == ("settled" if first == "settle" else "released")
    assert ledger_snapshot() == before


def test_an_expired_hold_cannot_be_settled(agent_a):
    hold_id = _allocate(agent_a, 7000, hold=True, hold_ttl_seconds=60).json()["id"]
    assert services.holds_expire(now=timezone.now() + dt.timedelta(seconds=61)) == 1
    assert _quota(agent_a.id).reserved == 0
    before = ledger_snapshot()

    details = assert_error(_settle(agent_a, hold_id, 7000), 409, "hold_not_open")

    assert details["status"] == "expired"
    assert ledger_snapshot() == before
    detail = agent_a.client.get(reverse("api:allocation", args=[agent_a.id, hold_id])).json()
    assert detail["status"] == "expired"


def test_committed_allocation_is_not_a_hold(agent_a):
    allocation_id = _allocate(agent_a, 100).json()["id"]

    assert_error(_settle(agent_a, allocation_id, 100), 409, "hold_not_open")
    assert_error(_release(agent_a, allocation_id), 409, "hold_not_open")


def test_allocation_detail_returns_the_allocation(agent_a):
    created = _allocate(agent_a, 4000).json()

    response = agent_a.client.get(reverse("api:allocation", args=[agent_a.id, created["id"]]))

    assert response.status_code == 200
    assert response.json() == created


# --- 3. Quota exceeded ------------------------------------------------------------------------------------


def test_allocation_over_quota_is_429_and_writes_nothing(agent_a):
    assert _allocate(agent_a, 400_000).status_code == 201
    before = ledger_snapshot()

    response = _allocate(agent_a, 600_001)

    details = assert_error(response, 429, "quota_exceeded")
    period_end = month_bounds(timezone.now())[1]
    assert details == {
        "resource_type": "AI_TOKENS",
        "requested": 600_001,
        "available": 600_000,
        "resets_at": period_end.isoformat().replace("+00:00", "Z"),
    }
    # The quota comes back when the period ends: Retry-After says how long that is.
    seconds = (period_end - timezone.now()).total_seconds()
    assert seconds - 5 <= int(response["Retry-After"]) <= seconds + 5
    assert ledger_snapshot() == before
    assert _quota(agent_a.id).used == 400_000
    assert UsageLog.objects.count() == 1
    assert Allocation.objects.count() == 1


def test_first_allocation_of_a_period_over_quota_opens_nothing(agent_a):
    before = ledger_snapshot()

    response = _allocate(agent_a, PRO_AI_TOKENS + 1)

    details = assert_error(response, 429, "quota_exceeded")
    assert details["available"] == PRO_AI_TOKENS
    assert ledger_snapshot() == before


def test_allocation_of_exactly_the_available_amount_fits(agent_a):
    assert _allocate(agent_a, PRO_AI_TOKENS).status_code == 201
    assert _quota(agent_a.id).available == 0
    assert_error(_allocate(agent_a, 1), 429, "quota_exceeded")


# --- 4. Agent status --------------------------------------------------------------------------------------


def test_throttled_agent_may_check_but_not_allocate(agent_a):
    agent_set_status(agent=agent_a.agent, status=Agent.Status.THROTTLED, reason="budget")
    before = ledger_snapshot()

    check = agent_a.client.post(
        reverse("api:quota-checks", args=[agent_a.id]),
        {"resource_type": "AI_TOKENS", "amount": 10},
        format="json",
    )
    allocation = _allocate(agent_a, 10)

    assert check.status_code == 200
    assert check.json() == {"allowed": False, "available": PRO_AI_TOKENS, "reason": "agent_throttled"}
    details = assert_error(allocation, 429, "agent_throttled")
    assert details["reason"] == "budget"
    assert ledger_snapshot() == before


def test_a_rule_throttle_says_which_rule_and_when_to_look_again(agent_a):
    agent_set_status(agent=agent_a.agent, status=Agent.Status.THROTTLED, reason="rule:BudgetExceeded")

    response = _allocate(agent_a, 10)

    details = assert_error(response, 429, "agent_throttled")
    assert details == {"reason": "rule:BudgetExceeded", "rule": "BudgetExceeded"}
    assert "by rule BudgetExceeded" in response.json()["error"]["message"]
    assert response["Retry-After"] == "60"  # rules are evaluated every minute


def test_suspended_agent_cannot_allocate(agent_a):
    agent_set_status(agent=agent_a.agent, status=Agent.Status.SUSPENDED)
    before = ledger_snapshot()

    assert_error(_allocate(agent_a, 10), 403, "agent_suspended")
    check = agent_a.client.post(
        reverse("api:quota-checks", args=[agent_a.id]),
        {"resource_type": "AI_TOKENS", "amount": 10},
        format="json",
    )
    assert check.json()["reason"] == "agent_suspended"
    assert ledger_snapshot() == before


def test_quota_check_answers_without_writing(agent_a):
    before = ledger_snapshot()

    fits = agent_a.client.post(
        reverse("api:quota-checks", args=[agent_a.id]),
        {"resource_type": "AI_TOKENS", "amount": PRO_AI_TOKENS},
        format="json",
    )
    too_much = agent_a.client.post(
        reverse("api:quota-checks", args=[agent_a.id]),
        {"resource_type": "AI_TOKENS", "amount": PRO_AI_TOKENS + 1},
        format="json",
    )

    assert fits.json() == {"allowed": True, "available": PRO_AI_TOKENS, "reason": "ok"}
    assert too_much.json() == {"allowed": False, "available": PRO_AI_TOKENS, "reason": "quota_exceeded"}
    assert ledger_snapshot() == before
    assert not AuditRecord.objects.exists()


# --- 5. Periods -------------------------------------------------------------------------------------------


def test_allocation_in_a_new_month_opens_a_new_period(agent_a):
    assert _allocate(agent_a, 3000).status_code == 201
    this_month = _quota(agent_a.id)
    _, next_month_start = month_bounds(timezone.now())
    in_next_month = next_month_start + dt.timedelta(hours=5)

    allocation = services.allocation_create(
        agent=agent_a.agent, resource_type_id="AI_TOKENS", amount=8000, now=in_next_month
    )

    new_quota = _quota(agent_a.id, at=in_next_month)
    assert new_quota.pk != this_month.pk
    assert allocation.quota_id == new_quota.pk
    assert new_quota.period_start == next_month_start
    assert (new_quota.limit, new_quota.used, new_quota.reserved) == (PRO_AI_TOKENS, 8000, 0)
    old = Quota.objects.get(pk=this_month.pk)
    assert (old.limit, old.used, old.reserved, old.period_start) == (
        this_month.limit,
        3000,
        0,
        this_month.period_start,
    )


# --- 6. Idempotency ---------------------------------------------------------------------------------------


def test_same_idempotency_key_and_body_replays_and_charges_once(agent_a):
    first = _allocate(agent_a, 4000, idempotency_key="order-1")
    second = _allocate(agent_a, 4000, idempotency_key="order-1")

    assert first.status_code == second.status_code == 201
    assert "Idempotent-Replayed" not in first
    assert second["Idempotent-Replayed"] == "true"
    assert second.json() == first.json()
    assert UsageLog.objects.count() == 1
    assert UsageLog.objects.get().idempotency_key == "order-1"
    assert Allocation.objects.count() == 1
    assert _quota(agent_a.id).used == 4000


def test_same_idempotency_key_with_another_body_is_422(agent_a):
    assert _allocate(agent_a, 4000, idempotency_key="order-2").status_code == 201
    before = ledger_snapshot()

    response = _allocate(agent_a, 5000, idempotency_key="order-2")

    assert_error(response, 422, "idempotency_key_reused")
    assert ledger_snapshot() == before


def test_same_idempotency_key_on_another_path_is_422(agent_a):
    hold_id = _allocate(agent_a, 4000, hold=True, idempotency_key="op-1").json()["id"]
    before = ledger_snapshot()

    response = _settle(agent_a, hold_id, 4000, HTTP_IDEMPOTENCY_KEY="op-1")

    assert_error(response, 422, "idempotency_key_reused")
    assert ledger_snapshot() == before


def test_idempotent_settle_replays_without_a_second_charge(agent_a):
    hold_id = _allocate(agent_a, 4000, hold=True).json()["id"]

    first = _settle(agent_a, hold_id, 3000, HTTP_IDEMPOTENCY_KEY="settle-1")
    second = _settle(agent_a, hold_id, 3000, HTTP_IDEMPOTENCY_KEY="settle-1")

    assert first.status_code == second.status_code == 200
    assert second["Idempotent-Replayed"] == "true"
    assert second.json() == first.json()
    assert UsageLog.objects.count() == 1
    assert _quota(agent_a.id).used == 3000


def test_refused_request_can_be_retried_with_the_same_key(agent_a):
    assert _allocate(agent_a, PRO_AI_TOKENS).status_code == 201

    refused = _allocate(agent_a, 5000, idempotency_key="retry-me")
    assert_error(refused, 429, "quota_exceeded")
    assert not IdempotencyRecord.objects.exists()
    quota_grant(
        agent=agent_a.agent,
        resource_type_id="AI_TOKENS",
        amount=5000,
        reason=Grant.Reason.MANUAL,
        actor="test",
    )
    retried = _allocate(agent_a, 5000, idempotency_key="retry-me")

    assert retried.status_code == 201, retried.content
    assert "Idempotent-Replayed" not in retried
    assert _quota(agent_a.id).used == PRO_AI_TOKENS + 5000
    assert UsageLog.objects.filter(idempotency_key="retry-me").count() == 1


def test_idempotency_keys_are_per_principal(agent_a, agent_b):
    response_a = _allocate(agent_a, 1000, idempotency_key="shared-key")
    response_b = _allocate(agent_b, 2000, idempotency_key="shared-key")

    assert response_a.status_code == response_b.status_code == 201
    assert "Idempotent-Replayed" not in response_b
    assert response_a.json()["id"] != response_b.json()["id"]
    assert _quota(agent_a.id).used == 1000
    assert _quota(agent_b.id).used == 2000
    assert set(IdempotencyRecord.objects.values_list("principal", flat=True)) == {
        f"agent:{agent_a.id}",
        f"agent:{agent_b.id}",
    }


def test_idempotency_cleanup_forgets_records_older_than_24_hours(agent_a):
    now = timezone.now()
    common = {
        "principal": "agent:x",
        "method": "POST",
        "path": "/p",
        "request_hash": "h",
        "response_status": 201,
    }
    old = IdempotencyRecord.objects.create(
        key="old", created_at=now - dt.timedelta(hours=24, seconds=1), **common
    )
    recent = IdempotencyRecord.objects.create(key="recent", created_at=now - dt.timedelta(hours=23), **common)

    deleted = idempotency_cleanup(now=now)

    assert deleted == 1
    assert not IdempotencyRecord.objects.filter(pk=old.pk).exists()
    assert IdempotencyRecord.objects.filter(pk=recent.pk).exists()


def test_forgotten_key_runs_again(agent_a):
    assert _allocate(agent_a, 1000, idempotency_key="k").status_code == 201
    assert idempotency_cleanup(now=timezone.now() + dt.timedelta(hours=25)) == 1

    again = _allocate(agent_a, 1000, idempotency_key="k")

    assert again.status_code == 201
    assert "Idempotent-Replayed" not in again
    assert UsageLog.objects.count() == 2


# --- 7. Audit ---------------------------------------------------------------------------------------------


def test_state_changing_calls_are_audited(agent_a, agent_b, operator_client):
    hold_id = _allocate(agent_a, 5000, hold=True, idempotency_key="audit-1").json()["id"]
    _settle(agent_a, hold_id, 4000)
    second_hold = _allocate(agent_a, 100, hold=True).json()["id"]
    _release(agent_a, second_hold)
    agent_a.client.post(
        reverse("api:shares", args=[agent_a.id]),
        {"resource_type": "AI_TOKENS", "amount": 10, "target_agent_id": agent_b.id},
        format="json",
    )
    operator_client.patch(reverse("api:agent", args=[agent_b.id]), {"name": "Bee"}, format="json")
    operator_client.post(reverse("api:agents"), {"id": "agent-new", "tier": "FREE"}, format="json")

    records = list(AuditRecord.objects.order_by("id"))

    expected = [
        (f"agent:{agent_a.id}", "allocation.create", agent_a.id, 201),
        (f"agent:{agent_a.id}", "allocation.settle", agent_a.id, 200),
        (f"agent:{agent_a.id}", "allocation.create", agent_a.id, 201),
        (f"agent:{agent_a.id}", "allocation.release", agent_a.id, 200),
        (f"agent:{agent_a.id}", "quota.share", agent_a.id, 201),
        ("operator:ops", "agent.update", agent_b.id, 200),
        ("operator:ops", "agent.create", "agent-new", 201),
    ]
    assert [(r.actor, r.action, r.agent_id, r.status_code) for r in records] == expected
    assert {r.outcome for r in records} == {"ok"}
    assert {r.client_address for r in records} == {"127.0.0.1"}
    first = records[0]
    assert first.method == "POST"
    assert first.path == reverse("api:allocations", args=[agent_a.id])
    assert first.request_body == {"resource_type": "AI_TOKENS", "amount": 5000, "hold": True}
    assert first.idempotency_key == "audit-1"


def test_refused_call_is_audited_with_its_error_code(agent_a):
    _allocate(agent_a, PRO_AI_TOKENS + 1)
    agent_a.client.post(reverse("api:allocations", args=[agent_a.id]), {"amount": 1}, format="json")

    refused, invalid = AuditRecord.objects.order_by("id")

    assert (refused.actor, refused.action, refused.agent_id) == (
        f"agent:{agent_a.id}",
        "allocation.create",
        agent_a.id,
    )
    assert (refused.status_code, refused.outcome, refused.client_address) == (
        429,
        "quota_exceeded",
        "127.0.0.1",
    )
    assert (invalid.status_code, invalid.outcome) == (400, "validation_error")


def test_call_on_another_agent_is_audited_as_not_found(agent_a, agent_b):
    _allocate(agent_b, 10)
    agent_a.client.post(
        reverse("api:allocations", args=[agent_b.id]),
        {"resource_type": "AI_TOKENS", "amount": 1},
        format="json",
    )

    record = AuditRecord.objects.get(actor=f"agent:{agent_a.id}")

    assert (record.agent_id, record.status_code, record.outcome) == (agent_b.id, 404, "not_found")


def test_idempotent_replay_is_not_audited_twice(agent_a):
    _allocate(agent_a, 10, idempotency_key="once")
    _allocate(agent_a, 10, idempotency_key="once")

    assert AuditRecord.objects.count() == 1


# --- 8. Agents API ----------------------------------------------------------------------------------------


def test_operator_creates_an_agent_with_a_working_key(operator_client):
    response = operator_client.post(
        reverse("api:agents"),
        {
            "id": "agent-new",
            "tier": "PRO",
            "monthly_budget_usd": "25.50",
            "custom_limits": {"AI_TOKENS": 5000},
        },
        format="json",
    )

    assert response.status_code == 201, response.content
    data = response.json()
    assert data["id"] == "agent-new"
    assert data["tier"] == "PRO"
    assert data["monthly_budget_usd"] == "25.50"
    assert data["custom_limits"] == {"AI_TOKENS": 5000}
    assert data["status"] == "active"
    raw_key = data["api_key"]
    assert raw_key.startswith("axg_")
    assert ApiKey.objects.get(agent_id="agent-new").prefix == raw_key[:12]
    new_client = client_with_key(raw_key)
    assert new_client.get(reverse("api:agent", args=["agent-new"])).status_code == 200
    quotas = {q["resource_type"]: q for q in new_client.get(reverse("api:quotas", args=["agent-new"])).json()}
    assert quotas["AI_TOKENS"]["limit"] == 5000
    assert quotas["COMPUTE_MS"]["limit"] == 3_600_000
    allocation = new_client.post(
        reverse("api:allocations", args=["agent-new"]),
        {"resource_type": "AI_TOKENS", "amount": 5001},
        format="json",
    )
    assert_error(allocation, 429, "quota_exceeded")


def test_new_agent_key_is_shown_once_and_never_stored(operator_client):
    body = {"id": "agent-once", "tier": "FREE"}

    first = operator_client.post(reverse("api:agents"), body, format="json", HTTP_IDEMPOTENCY_KEY="create-1")
    replay = operator_client.post(reverse("api:agents"), body, format="json", HTTP_IDEMPOTENCY_KEY="create-1")

    assert first.status_code == replay.status_code == 201
    raw_key = first.json()["api_key"]
    assert raw_key.startswith("axg_")
    assert replay["Idempotent-Replayed"] == "true"
    assert replay.json()["api_key"] is None
    assert replay.json()["id"] == "agent-once"
    assert Agent.objects.filter(pk="agent-once").count() == 1
    assert ApiKey.objects.filter(agent_id="agent-once").count() == 1
    for record in IdempotencyRecord.objects.all():
        assert raw_key not in str(record.response_body)
    for record in AuditRecord.objects.all():
        assert raw_key not in str(record.request_body)


def test_creating_an_existing_agent_is_400(operator_client, agent_a):
    before = ledger_snapshot()

    response = operator_client.post(reverse("api:agents"), {"id": agent_a.id, "tier": "FREE"}, format="json")

    assert_error(response, 409, "agent_exists")
    assert ledger_snapshot() == before
    assert Agent.objects.get(pk=agent_a.id).tier_id == "PRO"


def test_agent_list_is_paginated_and_filterable(operator_client, reference_data):
    AgentFactory.create_batch(52)
    AgentFactory(id="zz-free-1", tier_id="FREE")
    AgentFactory(id="zz-free-2", tier_id="FREE", status=Agent.Status.THROTTLED)
    AgentFactory(id="zz-ent", tier_id="ENTERPRISE", status=Agent.Status.THROTTLED)
    all_ids = sorted(Agent.objects.values_list("id", flat=True))

    first_page = operator_client.get(reverse("api:agents")).json()
    second_page = operator_client.get(first_page["next"]).json()

    assert first_page["count"] == len(all_ids) == 55
    assert len(first_page["results"]) == 50
    assert second_page["next"] is None
    assert [a["id"] for a in first_page["results"] + second_page["results"]] == all_ids

    by_tier = operator_client.get(reverse("api:agents"), {"tier": "FREE"}).json()
    assert [a["id"] for a in by_tier["results"]] == ["zz-free-1", "zz-free-2"]
    by_status = operator_client.get(reverse("api:agents"), {"status": "throttled"}).json()
    assert [a["id"] for a in by_status["results"]] == ["zz-ent", "zz-free-2"]
    both = operator_client.get(reverse("api:agents"), {"tier": "FREE", "status": "throttled"}).json()
    assert [a["id"] for a in both["results"]] == ["zz-free-2"]


def test_operator_patches_tier_status_and_budget(operator_client, agent_a):
    assert _allocate(agent_a, 1000).status_code == 201

    response = operator_client.patch(
        reverse("api:agent", args=[agent_a.id]),
        {"tier": "FREE", "status": "throttled", "status_reason": "manual", "monthly_budget_usd": "12.00"},
        format="json",
    )

    assert response.status_code == 200, response.content
    data = response.json()
    assert (data["tier"], data["status"], data["status_reason"], data["monthly_budget_usd"]) == (
        "FREE",
        "throttled",
        "manual",
        "12.00",
    )
    agent = Agent.objects.get(pk=agent_a.id)
    assert (agent.tier_id, agent.status, agent.monthly_budget_usd) == ("FREE", "throttled", Decimal("12.00"))
    quota = _quota(agent_a.id)
    assert (quota.limit, quota.used) == (100_000, 1000)  # re-based on the FREE tier
    assert_error(_allocate(agent_a, 1), 429, "agent_throttled")


def test_agent_cannot_patch_itself(agent_a):
    before = ledger_snapshot()

    response = agent_a.client.patch(
        reverse("api:agent", args=[agent_a.id]),
        {"tier": "ENTERPRISE", "monthly_budget_usd": "1000000.00"},
        format="json",
    )

    assert_error(response, 403, "forbidden")
    assert ledger_snapshot() == before
    assert AuditRecord.objects.get().outcome == "forbidden"


def test_agent_reads_itself(agent_a):
    response = agent_a.client.get(reverse("api:agent", args=[agent_a.id]))

    assert response.status_code == 200
    assert response.json()["id"] == agent_a.id
    assert response.json()["tier"] == "PRO"


# --- 9. Quotas, cost and usage ----------------------------------------------------------------------------


def test_quotas_list_every_resource_type(agent_a):
    assert _allocate(agent_a, 4000).status_code == 201
    assert _allocate(agent_a, 600, resource_type="NETWORK_REQS", hold=True).status_code == 201
    start, end = month_bounds(timezone.now())

    response = agent_a.client.get(reverse("api:quotas", args=[agent_a.id]))

    assert response.status_code == 200
    quotas = {q["resource_type"]: q for q in response.json()}
    assert sorted(quotas) == sorted(RESOURCE_CODES)
    for quota in quotas.values():
        assert set(quota) == {
            "resource_type",
            "limit",
            "used",
            "reserved",
            "available",
            "period_start",
            "period_end",
        }
        assert parse_datetime(quota["period_start"]) == start
        assert parse_datetime(quota["period_end"]) == end
        assert quota["available"] == quota["limit"] - quota["used"] - quota["reserved"]
    ai_tokens = quotas["AI_TOKENS"]
    assert (ai_tokens["limit"], ai_tokens["used"], ai_tokens["reserved"], ai_tokens["available"]) == (
        PRO_AI_TOKENS,
        4000,
        0,
        PRO_AI_TOKENS - 4000,
    )
    assert (quotas["NETWORK_REQS"]["reserved"], quotas["NETWORK_REQS"]["available"]) == (600, 9400)
    assert quotas["COMPUTE_MS"]["used"] == 0


def test_cost_adds_up_this_periods_usage_exactly(reference_data):
    agent = AgentFactory(id="budgeted", monthly_budget_usd=Decimal("2.00"))
    _, raw_key = api_key_issue(agent=agent)
    client = client_with_key(raw_key)
    start, _ = month_bounds(timezone.now())
    services.allocation_create(agent=agent, resource_type_id="COMPUTE_MS", amount=100_000)  # $1.00
    services.allocation_create(agent=agent, resource_type_id="NETWORK_REQS", amount=250)  # $0.25
    services.allocation_create(agent=agent, resource_type_id="AI_TOKENS", amount=3000)  # $0.003
    services.allocation_create(agent=agent, resource_type_id="AI_TOKENS", amount=1000)  # $0.001
    hold = services.allocation_create(agent=agent, resource_type_id="STORAGE_KB", amount=500, hold=True)
    services.hold_settle(agent=agent, allocation_id=hold.pk, amount=333)  # $0.000333
    services.allocation_create(
        agent=agent, resource_type_id="SOLANA_LAMPORTS", amount=9, hold=True
    )  # not yet
    # Last month's spend does not count in this period.
    services.allocation_create(
        agent=agent, resource_type_id="COMPUTE_MS", amount=50_000, now=start - dt.timedelta(days=2)
    )

    response = client.get(reverse("api:cost", args=[agent.id]))

    assert response.status_code == 200
    data = response.json()
    by_type = data["by_resource_type"]
    assert sorted(by_type) == sorted(RESOURCE_CODES)
    assert {code: by_type[code] for code in ("COMPUTE_MS", "AI_TOKENS", "STORAGE_KB", "NETWORK_REQS")} == {
        "COMPUTE_MS": "1.000000000000",
        "AI_TOKENS": "0.004000000000",
        "STORAGE_KB": "0.000333000000",
        "NETWORK_REQS": "0.250000000000",
    }
    assert Decimal(by_type["SOLANA_LAMPORTS"]) == 0  # its exact rendering: see the zero-spend test below
    assert data["total_usd"] == "1.254333000000"
    assert data["monthly_budget_usd"] == "2.00"
    # 1.254333 / 2.00 = 62.71665 % -> 62.72
    assert data["budget_utilization_percent"] == "62.72"
    assert parse_datetime(data["period_start"]) == start
    assert data["agent_id"] == agent.id


def test_cost_renders_zero_spend_as_plain_decimal_strings(agent_a):
    # Money is a plain decimal string everywhere; "0E-12" is what str() makes of a zero with 12 places.
    v1 = agent_a.client.get(reverse("api:cost", args=[agent_a.id])).json()
    compat = agent_a.client.get(reverse("api:resources"), {"action": "cost", "agentId": agent_a.id}).json()

    assert v1["total_usd"] == "0.000000000000"
    assert set(v1["by_resource_type"].values()) == {"0.000000000000"}
    assert compat["totalUSD"] == "0.000000000000"
    # Times in UTC, written as every other time of the API writes them.
    assert v1["period_start"].endswith("T00:00:00Z") and v1["period_end"].endswith("T00:00:00Z")


def test_cost_without_a_budget_has_no_utilization(agent_a):
    _allocate(agent_a, 4000)

    data = agent_a.client.get(reverse("api:cost", args=[agent_a.id])).json()

    assert data["total_usd"] == "0.004000000000"
    assert data["monthly_budget_usd"] is None
    assert data["budget_utilization_percent"] is None


def test_usage_is_filtered_by_type_and_time(agent_a):
    base = timezone.now().replace(microsecond=0)
    rows = {}
    for hours_ago, resource_type in [(3, "AI_TOKENS"), (2, "AI_TOKENS"), (2, "COMPUTE_MS"), (1, "AI_TOKENS")]:
        allocation = services.allocation_create(
            agent=agent_a.agent,
            resource_type_id=resource_type,
            amount=10,
            now=base - dt.timedelta(hours=hours_ago),
        )
        rows[(hours_ago, resource_type)] = UsageLog.objects.get(metadata__allocation_id=str(allocation.pk)).pk
    url = reverse("api:usage", args=[agent_a.id])

    by_type = agent_a.client.get(url, {"resource_type": "AI_TOKENS"}).json()["results"]
    window = agent_a.client.get(
        url,
        {
            "since": (base - dt.timedelta(hours=2)).isoformat(),
            "until": (base - dt.timedelta(hours=1)).isoformat(),
        },
    ).json()["results"]
    both = agent_a.client.get(
        url, {"resource_type": "COMPUTE_MS", "since": (base - dt.timedelta(hours=2)).isoformat()}
    ).json()["results"]

    assert [r["id"] for r in by_type] == [
        rows[(1, "AI_TOKENS")],
        rows[(2, "AI_TOKENS")],
        rows[(3, "AI_TOKENS")],
    ]
    assert {r["id"] for r in window} == {rows[(2, "AI_TOKENS")], rows[(2, "COMPUTE_MS")]}
    assert [r["id"] for r in both] == [rows[(2, "COMPUTE_MS")]]
    assert set(by_type[0]) >= {
        "id",
        "agent_id",
        "resource_type",
        "amount",
        "unit_price_usd",
        "cost_usd",
        "kind",
        "created_at",
    }
    assert by_type[0]["cost_usd"] == "0.000010000000"


def test_usage_cursor_pagination_walks_every_row_once_newest_first(agent_a, agent_b):
    base = timezone.now()
    for minutes_ago in range(7):
        services.allocation_create(
            agent=agent_a.agent,
            resource_type_id="AI_TOKENS",
            amount=10 + minutes_ago,
            now=base - dt.timedelta(minutes=minutes_ago),
        )
    # Two rows at the very same instant: the id breaks the tie.
    for amount in (1, 2):
        services.allocation_create(
            agent=agent_a.agent,
            resource_type_id="COMPUTE_MS",
            amount=amount,
            now=base - dt.timedelta(minutes=3),
        )
    _allocate(agent_b, 5)
    expected = list(
        UsageLog.objects.filter(agent_id=agent_a.id)
        .order_by("-created_at", "-id")
        .values_list("id", flat=True)
    )

    seen: list[int] = []
    pages = 0
    url = f"{reverse('api:usage', args=[agent_a.id])}?page_size=2"
    while url is not None:
        response = agent_a.client.get(url)
        assert response.status_code == 200, response.content
        page = response.json()
        assert len(page["results"]) <= 2
        seen.extend(row["id"] for row in page["results"])
        url = page["next"]
        pages += 1
        assert pages < 20

    assert len(seen) == len(set(seen)) == 9
    assert seen == expected


# --- 10. Shares -------------------------------------------------------------------------------------------


def _share(keyed, target_id: str, amount: int, resource_type: str = "AI_TOKENS"):
    return keyed.client.post(
        reverse("api:shares", args=[keyed.id]),
        {"resource_type": resource_type, "amount": amount, "target_agent_id": target_id},
        format="json",
    )


def test_share_moves_unused_quota_with_grants_on_both_sides(agent_a, agent_b):
    assert _allocate(agent_a, 900_000).status_code == 201

    response = _share(agent_a, agent_b.id, 60_000)

    assert response.status_code == 201, response.content
    assert response.json() == {
        "resource_type": "AI_TOKENS",
        "amount": 60_000,
        "source_agent_id": agent_a.id,
        "target_agent_id": agent_b.id,
        "source_available": 40_000,
    }
    quota_a, quota_b = _quota(agent_a.id), _quota(agent_b.id)
    assert (quota_a.limit, quota_a.used, quota_a.available) == (PRO_AI_TOKENS - 60_000, 900_000, 40_000)
    assert (quota_b.limit, quota_b.used) == (PRO_AI_TOKENS + 60_000, 0)
    out = Grant.objects.get(quota=quota_a)
    into = Grant.objects.get(quota=quota_b)
    assert (out.amount, out.reason, out.counterparty_agent_id, out.actor) == (
        -60_000,
        Grant.Reason.SHARE_OUT,
        agent_b.id,
        f"agent:{agent_a.id}",
    )
    assert (into.amount, into.reason, into.counterparty_agent_id, into.actor) == (
        60_000,
        Grant.Reason.SHARE_IN,
        agent_a.id,
        f"agent:{agent_a.id}",
    )
    assert _allocate(agent_b, PRO_AI_TOKENS + 60_000).status_code == 201
    assert_error(_allocate(agent_a, 40_001), 429, "quota_exceeded")


def test_share_more_than_available_is_refused(agent_a, agent_b):
    assert _allocate(agent_a, 900_000).status_code == 201
    assert _allocate(agent_a, 50_000, hold=True).status_code == 201
    services.agent_quotas(agent=agent_b.agent)
    before = ledger_snapshot()

    response = _share(agent_a, agent_b.id, 50_001)

    details = assert_error(response, 429, "quota_exceeded")
    assert (details["requested"], details["available"]) == (50_001, 50_000)
    assert ledger_snapshot() == before


def test_share_with_an_unknown_agent_is_404(agent_a):
    services.agent_quotas(agent=agent_a.agent)
    before = ledger_snapshot()

    assert_error(_share(agent_a, "nobody", 10), 404, "not_found")
    assert ledger_snapshot() == before


def test_share_is_refused_when_the_feature_is_off(agent_a, agent_b, settings):
    settings.ENABLE_COLLABORATION_SHARING = False
    before = ledger_snapshot()

    assert_error(_share(agent_a, agent_b.id, 10), 403, "feature_disabled")
    compat = agent_a.client.post(
        reverse("api:resources"),
        {
            "action": "share",
            "agentId": agent_a.id,
            "resourceType": "AI_TOKENS",
            "amount": 10,
            "targetAgentId": agent_b.id,
        },
        format="json",
    )
    assert_error(compat, 403, "feature_disabled")
    assert ledger_snapshot() == before


# --- 11. Compatibility endpoint ---------------------------------------------------------------------------


def test_compat_quota_matches_v1(agent_a):
    _allocate(agent_a, 4000)
    _allocate(agent_a, 250, resource_type="NETWORK_REQS", hold=True)

    v1 = agent_a.client.get(reverse("api:quotas", args=[agent_a.id])).json()
    compat = agent_a.client.get(reverse("api:resources"), {"action": "quota", "agentId": agent_a.id})

    assert compat.status_code == 200
    data = compat.json()
    assert data["agentId"] == agent_a.id
    assert len(data["quotas"]) == 5
    by_type = {q["resourceType"]: q for q in data["quotas"]}
    for quota in v1:
        got = by_type[quota["resource_type"]]
        for v1_key, compat_key in [
            ("limit", "limit"),
            ("used", "used"),
            ("reserved", "reserved"),
            ("available", "available"),
            ("period_start", "periodStart"),
            ("period_end", "periodEnd"),
        ]:
            assert got[compat_key] == quota[v1_key]
    assert by_type["AI_TOKENS"]["used"] == 4000
    assert by_type["NETWORK_REQS"]["reserved"] == 250


def test_compat_cost_matches_v1(agent_a):
    _allocate(agent_a, 4000)
    _allocate(agent_a, 12_345, resource_type="COMPUTE_MS")

    v1 = agent_a.client.get(reverse("api:cost", args=[agent_a.id])).json()
    compat = agent_a.client.get(reverse("api:resources"), {"action": "cost", "agentId": agent_a.id})

    assert compat.status_code == 200
    data = compat.json()
    assert data["totalUSD"] == v1["total_usd"] == "0.127450000000"
    assert data["byResourceType"] == v1["by_resource_type"]
    assert data["monthlyBudgetUSD"] == v1["monthly_budget_usd"]
    assert data["budgetUtilizationPercent"] == v1["budget_utilization_percent"]
    assert data["periodStart"] == v1["period_start"]


def test_compat_allocate_answers_like_v1(agent_a, agent_b):
    v1 = _allocate(agent_b, 4000).json()

    response = agent_a.client.post(
        reverse("api:resources"),
        {
            "action": "allocate",
            "agentId": agent_a.id,
            "resourceType": "AI_TOKENS",
            "amount": 4000,
            "taskId": "t-9",
        },
        format="json",
    )

    assert response.status_code == 201, response.content
    data = response.json()
    assert data["allocatedAmount"] == v1["allocated_amount"] == 4000
    assert data["costUSD"] == v1["cost_usd"] == "0.004000000000"
    assert data["status"] == "committed"
    assert data["resourceType"] == "AI_TOKENS"
    assert Allocation.objects.get(pk=data["allocationId"]).task_id == "t-9"
    assert _quota(agent_a.id).used == 4000
    assert UsageLog.objects.filter(agent_id=agent_a.id).count() == 1
    record = AuditRecord.objects.get(actor=f"agent:{agent_a.id}")
    assert (record.action, record.outcome, record.status_code) == ("compat.allocate", "ok", 201)


def test_compat_hold_answers_like_v1(agent_a, agent_b):
    v1 = _allocate(agent_b, 4000, hold=True).json()

    response = agent_a.client.post(
        reverse("api:resources"),
        {
            "action": "allocate",
            "agentId": agent_a.id,
            "resourceType": "AI_TOKENS",
            "amount": 4000,
            "hold": True,
        },
        format="json",
    )

    assert response.status_code == 201, response.content
    data = response.json()
    assert data["status"] == v1["status"] == "held"
    assert parse_datetime(data["expiresAt"]) > timezone.now()
    assert _quota(agent_a.id).reserved == 4000
    assert data["costUSD"] == v1["cost_usd"] == "0.000000000000"


def test_compat_allocate_over_quota_is_429(agent_a):
    before = ledger_snapshot()

    response = agent_a.client.post(
        reverse("api:resources"),
        {
            "action": "allocate",
            "agentId": agent_a.id,
            "resourceType": "AI_TOKENS",
            "amount": PRO_AI_TOKENS + 1,
        },
        format="json",
    )

    assert_error(response, 429, "quota_exceeded")
    assert ledger_snapshot() == before


def test_compat_check_answers_allowed(agent_a):
    response = agent_a.client.post(
        reverse("api:resources"),
        {"action": "check", "agentId": agent_a.id, "resourceType": "AI_TOKENS", "amount": 4000},
        format="json",
    )

    assert response.status_code == 200, response.content
    assert response.json() == {"allowed": True, "available": PRO_AI_TOKENS, "reason": "ok"}


def test_compat_share_moves_quota(agent_a, agent_b):
    response = agent_a.client.post(
        reverse("api:resources"),
        {
            "action": "share",
            "agentId": agent_a.id,
            "resourceType": "AI_TOKENS",
            "amount": 10,
            "targetAgentId": agent_b.id,
        },
        format="json",
    )

    assert response.status_code == 200, response.content
    assert response.json()["amount"] == 10
    assert _quota(agent_b.id).limit == PRO_AI_TOKENS + 10


def test_compat_share_answers_with_the_endpoints_own_id_casing(agent_a, agent_b):
    # The request says "agentId"/"targetAgentId" and the allocate answer "agentId"/"allocationId"; the share
    # answer should spell its agent ids the same way.
    response = agent_a.client.post(
        reverse("api:resources"),
        {
            "action": "share",
            "agentId": agent_a.id,
            "resourceType": "AI_TOKENS",
            "amount": 10,
            "targetAgentId": agent_b.id,
        },
        format="json",
    )

    assert response.status_code == 200, response.content
    assert response.json() == {
        "resourceType": "AI_TOKENS",
        "amount": 10,
        "sourceAgentId": agent_a.id,
        "targetAgentId": agent_b.id,
        "sourceAvailable": PRO_AI_TOKENS - 10,
    }


def test_compat_optimization_actions_are_served_by_the_optimization_app(agent_a):
    url = reverse("api:resources")
    metrics = agent_a.client.get(url, {"action": "metrics", "agentId": agent_a.id})
    assert metrics.status_code == 200
    assert {"current", "performance", "cost"} <= set(metrics.json())
    recommendations = agent_a.client.get(url, {"action": "recommendations", "agentId": agent_a.id})
    assert recommendations.status_code == 200
    missing_deal = agent_a.client.post(
        url,
        {
            "action": "purchase",
            "agentId": agent_a.id,
            "dealId": "00000000-0000-0000-0000-000000000000",
            "amount": 1,
        },
        format="json",
    )
    assert_error(missing_deal, 404, "not_found")
    optimize = agent_a.client.post(f"{url}?action=optimize", {"agentId": agent_a.id}, format="json")
    assert optimize.status_code == 200


# --- 12. OpenAPI ------------------------------------------------------------------------------------------


def test_openapi_schema_describes_the_v1_paths(db):
    response = APIClientNoAuth().get(reverse("schema"), {"format": "json"})

    assert response.status_code == 200
    schema = response.json()
    assert schema["openapi"].startswith("3.")
    for path in [
        "/api/v1/agents",
        "/api/v1/agents/{agent_id}",
        "/api/v1/agents/{agent_id}/quotas",
        "/api/v1/agents/{agent_id}/quota-checks",
        "/api/v1/agents/{agent_id}/allocations",
        "/api/v1/agents/{agent_id}/allocations/{allocation_id}",
        "/api/v1/agents/{agent_id}/allocations/{allocation_id}/settle",
        "/api/v1/agents/{agent_id}/allocations/{allocation_id}/release",
        "/api/v1/agents/{agent_id}/usage",
        "/api/v1/agents/{agent_id}/cost",
        "/api/v1/agents/{agent_id}/shares",
        "/api/resources",
    ]:
        assert path in schema["paths"], path
    assert schema["components"]["securitySchemes"]["ApiKey"]["scheme"] == "bearer"


def test_api_docs_use_only_local_assets(db):
    response = APIClientNoAuth().get(reverse("api-docs"))

    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/html")
    html = response.content.decode()
    # Host names, with their dot: the page also carries a random token, which may spell "cdn" by chance.
    for cdn in ("cdn.", "cdnjs.", "jsdelivr.", "unpkg."):
        assert cdn not in html.lower()
    for url in re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html):
        assert not url.startswith(("http://", "https://", "//")) or "://testserver/" in url, url


def APIClientNoAuth():  # noqa: N802 - reads like the class it returns
    return client_with_key(None)


# --- 13. issue_api_key ------------------------------------------------------------------------------------


def test_issue_api_key_prints_only_the_agent_key(agent_a):
    stdout, stderr = StringIO(), StringIO()

    call_command("issue_api_key", "--agent", agent_a.id, stdout=stdout, stderr=stderr)

    raw_key = stdout.getvalue().strip()
    assert raw_key.startswith("axg_")
    assert not re.search(r"\s", raw_key)
    assert stdout.getvalue().count("\n") <= 1
    assert raw_key not in stderr.getvalue()
    client = client_with_key(raw_key)
    assert client.get(reverse("api:agent", args=[agent_a.id])).status_code == 200
    assert client.get(reverse("api:agents")).status_code == 403


def test_issue_api_key_for_a_new_operator_creates_a_staff_user(agent_a):
    stdout = StringIO()

    call_command("issue_api_key", "--operator", "new-operator", stdout=stdout, stderr=StringIO())

    raw_key = stdout.getvalue().strip()
    assert raw_key.startswith("axg_") and not re.search(r"\s", raw_key)
    user = get_user_model().objects.get(username="new-operator")
    assert user.is_staff
    assert not user.has_usable_password()
    client = client_with_key(raw_key)
    assert client.get(reverse("api:agents")).status_code == 200
    assert client.get(reverse("api:agent", args=[agent_a.id])).status_code == 200


def test_issue_api_key_for_an_unknown_agent_fails_without_a_key(reference_data):
    stdout = StringIO()

    with pytest.raises(CommandError, match="no agent"):
        call_command("issue_api_key", "--agent", "nobody", stdout=stdout, stderr=StringIO())

    assert stdout.getvalue() == ""
    assert not ApiKey.objects.exists()

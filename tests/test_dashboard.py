"""The dashboard's server side: staff-only pages, the polling endpoints, CSRF-protected audited actions."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from allocation.models import AuditRecord
from ledger.demo import demo_data_load
from ledger.models import Agent, Quota
from ledger.periods import month_bounds
from optimization.models import Alert, ScalingEvent, ScalingPolicy

pytestmark = pytest.mark.django_db


@pytest.fixture
def fleet(reference_data):
    demo_data_load()
    agent = Agent.objects.get(pk="agent-123")
    Alert.objects.create(
        agent=agent, kind="budget", severity="warning", title="Budget 80% used", message="m", dedup_key="t:80"
    )
    return agent


def _current_quotas(agent_id: str):
    """The agent's quotas of this month: the demo's weeks can reach into the month before."""
    return Quota.objects.filter(agent_id=agent_id, period_start=month_bounds(timezone.now())[0])


def test_pages_need_a_staff_login(fleet, client, django_user_model):
    resources = f"{reverse('dashboard:resources')}?agent=agent-123"
    for url in (reverse("dashboard:fleet"), resources, reverse("dashboard:fleet-data")):
        response = client.get(url)
        assert response.status_code == 302 and "/admin/login/" in response["Location"]
    django_user_model.objects.create_user("visitor", password="pw-visitor-1")
    client.login(username="visitor", password="pw-visitor-1")
    assert client.get(reverse("dashboard:fleet")).status_code == 302


def test_fleet_page_and_data(fleet, admin_client_logged_in):
    page = admin_client_logged_in.get(reverse("dashboard:fleet"))
    assert page.status_code == 200
    assert b'id="fleet-data"' in page.content
    data = admin_client_logged_in.get(reverse("dashboard:fleet-data")).json()
    assert data["total_agents"] == 4
    assert {row["tier"]: row["total"] for row in data["tiers"]} == {
        "FREE": 1,
        "PRO": 1,
        "ENTERPRISE": 1,
        "CUSTOM": 1,
    }
    spend = {row["agent_id"]: Decimal(row["spent_usd"]) for row in data["top_spenders"]}
    for agent_id, spent in spend.items():
        assert spent == sum(q.spent_usd for q in _current_quotas(agent_id))
    assert list(spend.values()) == sorted(spend.values(), reverse=True)
    assert data["nearest_limits"][0]["agent_id"] == "agent-456"  # 92% of its compute
    assert [alert["title"] for alert in data["open_alerts"]] == ["Budget 80% used"]


def test_monitor_data_matches_the_ledger(fleet, admin_client_logged_in):
    data = admin_client_logged_in.get(f"{reverse('dashboard:resources-data')}?agent=agent-123").json()
    gauges = {gauge["resource_type"]: gauge for gauge in data["gauges"]}
    for quota in _current_quotas("agent-123"):
        gauge = gauges[quota.resource_type_id]
        assert (gauge["used"], gauge["limit"]) == (quota.used, quota.limit)
        assert gauge["percent"] == str(quota.utilization_percent)
    cost = data["cost"]
    assert len(cost["series"]) == 5
    assert Decimal(cost["spent_usd"]) == sum(q.spent_usd for q in _current_quotas("agent-123")).quantize(
        Decimal("0.01")
    )
    assert [alert["title"] for alert in data["alerts"]] == ["Budget 80% used"]


def test_unknown_agent_is_404(fleet, admin_client_logged_in):
    assert admin_client_logged_in.get(f"{reverse('dashboard:resources')}?agent=nobody").status_code == 404


def test_actions_need_csrf(fleet, staff_user):
    client = Client(enforce_csrf_checks=True)
    client.force_login(staff_user)
    response = client.post(
        reverse("dashboard:action", args=["scale"]), {"agent": "agent-123", "direction": "up"}
    )
    assert response.status_code == 403
    assert not ScalingEvent.objects.exists()


def test_actions_go_through_services_and_are_audited(fleet, admin_client_logged_in, staff_user):
    json = {"HTTP_ACCEPT": "application/json"}
    url = reverse("dashboard:action", args=["scale"])
    response = admin_client_logged_in.post(url, {"agent": "agent-123", "direction": "up"}, **json)
    assert response.json()["ok"] is True
    event = ScalingEvent.objects.get()
    assert (event.trigger, event.before, event.after, event.actor) == (
        "manual",
        1,
        2,
        f"user:{staff_user.username}",
    )

    alert = Alert.objects.get()
    response = admin_client_logged_in.post(
        reverse("dashboard:action", args=["acknowledge"]),
        {"agent": "agent-123", "alert_id": alert.pk},
        **json,
    )
    assert response.status_code == 200
    alert.refresh_from_db()
    assert alert.acknowledged_by == f"user:{staff_user.username}"

    response = admin_client_logged_in.post(
        reverse("dashboard:action", args=["autoscaling"]), {"agent": "agent-123"}, **json
    )
    assert response.status_code == 200
    assert ScalingPolicy.objects.get(agent_id="agent-123").enabled is False

    refused = admin_client_logged_in.post(
        reverse("dashboard:action", args=["scale"]), {"agent": "agent-123", "direction": "sideways"}, **json
    )
    assert refused.status_code == 400 and refused.json()["ok"] is False

    audit = list(AuditRecord.objects.order_by("id").values_list("action", "outcome", "actor"))
    actor = f"user:{staff_user.username}"
    assert audit == [
        ("dashboard.scale", "ok", actor),
        ("dashboard.acknowledge", "ok", actor),
        ("dashboard.autoscaling", "ok", actor),
        ("dashboard.scale", "invalid_direction", actor),
    ]


def test_action_without_javascript_redirects_back_with_a_message(fleet, admin_client_logged_in):
    response = admin_client_logged_in.post(
        reverse("dashboard:action", args=["scale"]), {"agent": "agent-123", "direction": "up"}, follow=True
    )
    assert response.redirect_chain[-1][0].endswith("?agent=agent-123")
    assert b"Scaled up: 1" in response.content


def test_admin_links_to_the_dashboard(fleet, admin_client_logged_in):
    index = admin_client_logged_in.get(reverse("admin:index")).content.decode()
    assert reverse("dashboard:fleet") in index
    agent_page = admin_client_logged_in.get(
        reverse("admin:ledger_agent_change", args=["agent-123"])
    ).content.decode()
    assert f"{reverse('dashboard:resources')}?agent=agent-123" in agent_page


def test_monitor_data_lists_every_budget_that_applies_with_what_remains(fleet, admin_client_logged_in):
    from allocation.services import allocation_create
    from ledger import budgets
    from ledger.models import Budget, UsageLog
    from ledger.periods import window_bounds
    from tests.factories import AgentFactory, OrganizationFactory, TeamFactory

    team = TeamFactory(id="team-search", organization=OrganizationFactory(id="org-acme"))
    agent = AgentFactory(id="agent-budgeted", team=team)
    AgentFactory(id="agent-elsewhere")  # budgets of agents outside the team do not apply
    daily = budgets.budget_create(scope="team", scope_id="team-search", window="day", limit_usd="5")
    weekly = budgets.budget_create(scope="team", scope_id="team-search", window="week", limit_usd="2")
    tiny = budgets.budget_create(
        scope="organization", scope_id="org-acme", window="month", limit_usd="0.000001", mode="soft"
    )
    run = budgets.run_create(agent=agent, run_id="loop-1", limit_usd="1")
    budgets.budget_create(scope="agent", scope_id="agent-elsewhere", window="day", limit_usd="9")
    budgets.run_create(agent=Agent.objects.get(pk="agent-elsewhere"), run_id="loop-1", limit_usd="1")

    allocation_create(agent=agent, resource_type_id="AI_TOKENS", amount=40_000)
    allocation_create(agent=agent, resource_type_id="AI_TOKENS", amount=10_000, run_id="loop-1")
    first, second = UsageLog.objects.filter(agent=agent).order_by("id")
    total, run_cost = first.cost_usd + second.cost_usd, second.cost_usd
    assert first.cost_usd > 0 and run_cost > 0
    # The agent's own month budget, created now: it counts the month's spend and has no room left.
    exhausted = budgets.budget_create(
        scope="agent", scope_id=agent.pk, window="month", limit_usd=total.normalize()
    )
    # The weekly budget's window ended: it is shown as the next call will find it, rolled over.
    last_week = timezone.now() - dt.timedelta(days=7)
    start, end = window_bounds("week", last_week)
    Budget.objects.filter(pk=weekly.pk).update(window_start=start, window_end=end, spent_usd=Decimal("2"))

    data = admin_client_logged_in.get(f"{reverse('dashboard:resources-data')}?agent={agent.pk}").json()

    shown = {row["id"]: row for row in data["budgets"]}
    assert list(shown) == sorted([daily.pk, weekly.pk, tiny.pk, run.pk, exhausted.pk])
    assert (shown[daily.pk]["scope"], shown[daily.pk]["scope_id"], shown[daily.pk]["window"]) == (
        "team",
        "team-search",
        "day",
    )
    assert Decimal(shown[daily.pk]["remaining_usd"]) == Decimal("5") - total
    assert Decimal(shown[daily.pk]["spent_usd"]) == total
    assert shown[daily.pk]["window_end"] == window_bounds("day", timezone.now())[1].isoformat()
    assert Decimal(shown[run.pk]["remaining_usd"]) == Decimal("1") - run_cost
    assert shown[run.pk]["window_end"] is None and shown[run.pk]["expires_at"] == run.expires_at.isoformat()
    this_week_end = window_bounds("week", timezone.now())[1].isoformat()
    assert (Decimal(shown[weekly.pk]["remaining_usd"]), shown[weekly.pk]["window_end"]) == (
        Decimal("2"),
        this_week_end,
    )
    # A hard budget with nothing left is flagged; a soft one past its limit only warns.
    assert Decimal(shown[exhausted.pk]["remaining_usd"]) == 0
    assert (shown[exhausted.pk]["refusing"], shown[exhausted.pk]["level"]) == (True, "critical")
    assert Decimal(shown[tiny.pk]["remaining_usd"]) == Decimal("0.000001") - total
    assert (shown[tiny.pk]["mode"], shown[tiny.pk]["refusing"]) == ("soft", False)
    assert [shown[pk]["refusing"] for pk in (daily.pk, weekly.pk, run.pk)] == [False, False, False]

    # The page's first render carries the same figures.
    page = admin_client_logged_in.get(f"{reverse('dashboard:resources')}?agent={agent.pk}").content.decode()
    assert 'data-panel="budgets"' in page and shown[daily.pk]["remaining_usd"] in page


def test_the_scaling_activity_shown_is_that_of_the_last_month(fleet, admin_client_logged_in):
    now = timezone.now()
    for days, reason in ((40, "old"), (1, "recent")):
        ScalingEvent.objects.create(
            agent=fleet, direction="up", kind="horizontal", trigger="manual", before=1, after=2,
            reason=reason, created_at=now - dt.timedelta(days=days),
        )  # fmt: skip

    fleet_data = admin_client_logged_in.get(reverse("dashboard:fleet-data")).json()
    monitor = admin_client_logged_in.get(f"{reverse('dashboard:resources-data')}?agent={fleet.pk}").json()

    for shown in (fleet_data["scaling_events"], monitor["scaling_events"]):
        assert [event["reason"] for event in shown] == ["recent"]

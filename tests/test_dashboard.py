"""The dashboard's server side: staff-only pages, the polling endpoints, CSRF-protected audited actions."""

from __future__ import annotations

import datetime as dt
import json
import re
from decimal import Decimal

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from allocation.models import AuditRecord
from ledger.demo import demo_data_load
from ledger.models import Agent, Budget, Quota
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
    csv = f"{reverse('dashboard:usage-csv')}?agent=agent-123"
    for url in (reverse("dashboard:fleet"), resources, reverse("dashboard:fleet-data"), csv):
        response = client.get(url)
        assert response.status_code == 302 and "/admin/login/" in response["Location"]
    django_user_model.objects.create_user("visitor", password="pw-visitor-1")
    client.login(username="visitor", password="pw-visitor-1")
    assert client.get(reverse("dashboard:fleet")).status_code == 302
    assert client.get(reverse("dashboard:agent-search"), {"q": "agent"}).status_code == 302


def _rollups_built() -> None:
    """The rollups of the demo's history, as the backfill command and the upkeep build them."""
    from optimization.rollups import floor_day
    from optimization.services.rollups import usage_rollups_backfill

    now = timezone.now()
    usage_rollups_backfill(
        since=month_bounds(now)[0] - dt.timedelta(days=1), until=floor_day(now) + dt.timedelta(days=1)
    )


def test_fleet_page_and_data(fleet, admin_client_logged_in):
    from optimization.services.alerts import budget_sweep

    budget_sweep()  # the demo's budgets past a threshold alert, as the beat sweep would
    _rollups_built()
    page = admin_client_logged_in.get(reverse("dashboard:fleet"))
    assert page.status_code == 200
    assert b'id="fleet-data"' in page.content
    data = admin_client_logged_in.get(reverse("dashboard:fleet-data")).json()
    assert data["total_agents"] == 4 and data["total_estimated"] is False
    assert {row["tier"]: row["total"] for row in data["tiers"]} == {
        "FREE": 1,
        "PRO": 1,
        "ENTERPRISE": 1,
        "CUSTOM": 1,
    }
    # The period's spend is every agent's, day by day, and the forecast continues its pace.
    start, end = month_bounds(timezone.now())
    spent = sum(q.spent_usd for q in Quota.objects.filter(period_start=start))
    spend = data["spend"]
    assert Decimal(spend["spent_usd"]) == spent.quantize(Decimal("0.01"))
    assert [row["day"] for row in spend["days"]][0] == start.date().isoformat()
    assert spend["days"][-1]["day"] == timezone.now().date().isoformat()
    assert sum(Decimal(row["spent_usd"]) for row in spend["days"]) == pytest.approx(
        spent, abs=Decimal("0.05")
    )
    elapsed = (timezone.now() - start) / (end - start)
    assert Decimal(spend["forecast_usd"]) == pytest.approx(spent / Decimal(elapsed), rel=Decimal("0.01"))
    # The budgets nearest their limits come first: agent-456 has used 91 % of its monthly budget.
    nearest = data["budgets_nearest"]
    assert nearest[0]["agent_id"] == "agent-456" and nearest[0]["level"] == "critical"
    percents = [Decimal(row["percent"]) for row in nearest]
    assert percents == sorted(percents, reverse=True)
    assert [alert["title"] for alert in data["open_alerts"]][-1] == "Budget 80% used"


def test_fleet_page_queries_are_bounded_whatever_the_fleet(fleet, monkeypatch):
    """The number of queries does not grow with the fleet, and no query reads every agent, quota or budget
    row: with the page's caps set below the fleet's size, EXPLAIN ANALYZE shows every scan of those tables
    reading (and filtering out) fewer rows than there are agents. Sequential scans are discouraged, as
    the planner would choose them on a small table and for no fleet of size."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from allocation.services import allocation_create
    from optimization.dashboard import data as dashboard_data
    from optimization.services.alerts import budget_sweep
    from tests.factories import AgentFactory

    bound = 10
    monkeypatch.setattr(dashboard_data, "EXACT_COUNT_CAP", bound - 1)
    monkeypatch.setattr(dashboard_data, "NEAREST_ALERTS_READ", bound)
    budget_sweep()
    _rollups_built()
    with CaptureQueriesContext(connection) as small:
        dashboard_data.fleet_overview()
    for index in range(40):
        agent = AgentFactory(id=f"agent-more-{index:03d}", monthly_budget_usd=Decimal("1"))
        allocation_create(agent=agent, resource_type_id="AI_TOKENS", amount=60_000)
    budget_sweep()
    _rollups_built()
    with CaptureQueriesContext(connection) as large:
        dashboard_data.fleet_overview()
    assert Agent.objects.count() == 44
    # The counts past the cap are estimated by an EXPLAIN each: at most one per (tier, status) cell.
    cells = len(Agent.Status.values) * 4
    assert len(small.captured_queries) <= len(large.captured_queries) <= len(small.captured_queries) + cells

    guarded = {model._meta.db_table for model in (Agent, Budget, Quota)}
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")
        for query in large.captured_queries:
            if query["sql"].startswith("EXPLAIN"):
                continue
            cursor.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {query['sql']}")
            plan = cursor.fetchone()[0]
            plan = json.loads(plan) if isinstance(plan, str) else plan
            for node in _plan_nodes(plan[0]["Plan"]):
                if node.get("Relation Name") not in guarded:
                    continue
                read = node["Actual Rows"] + node.get("Rows Removed by Filter", 0)
                assert read <= bound, (read, query["sql"])


def _plan_nodes(node: dict):
    yield node
    for child in node.get("Plans", []):
        yield from _plan_nodes(child)


def test_fleet_counts_are_estimated_past_the_cap(fleet, admin_client_logged_in, monkeypatch):
    from optimization.dashboard import data as dashboard_data

    monkeypatch.setattr(dashboard_data, "EXACT_COUNT_CAP", 0)
    data = admin_client_logged_in.get(reverse("dashboard:fleet-data")).json()
    assert data["total_estimated"] is True
    custom = next(row for row in data["tiers"] if row["tier"] == "CUSTOM")
    assert custom["counts"]["active"]["estimated"] is True
    assert custom["counts"]["throttled"] == {"count": 0, "estimated": False}


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


def test_unknown_agent_gets_a_helpful_404_page(fleet, admin_client_logged_in):
    response = admin_client_logged_in.get(f"{reverse('dashboard:resources')}?agent=agent-1")
    assert response.status_code == 404
    page = response.content.decode()
    assert "No agent “agent-1”" in page and 'id="agent-picker"' in page
    # The nearest ids are offered as links (agent-123 follows agent-1), and the favicon is linked.
    assert f"{reverse('dashboard:resources')}?agent=agent-123" in page
    assert "favicon.svg" in page
    assert "Django" not in page and "Traceback" not in page
    data = admin_client_logged_in.get(f"{reverse('dashboard:resources-data')}?agent=agent-1")
    assert data.status_code == 404 and data.json()["error"]["code"] == "not_found"
    action = admin_client_logged_in.post(
        reverse("dashboard:action", args=["scale"]),
        {"agent": "agent-1", "direction": "up"},
        HTTP_ACCEPT="application/json",
    )
    assert action.status_code == 404 and action.json()["error"]["code"] == "not_found"
    assert not ScalingEvent.objects.exists() and not AuditRecord.objects.exists()


def test_agent_picker_suggests_ids_that_start_with_the_text(fleet, admin_client_logged_in):
    url = reverse("dashboard:agent-search")
    assert admin_client_logged_in.get(url, {"q": "agent-4"}).json() == {"agents": ["agent-456"]}
    assert admin_client_logged_in.get(url, {"q": "agent-"}).json()["agents"] == [
        "agent-123",
        "agent-456",
        "agent-789",
        "agent-research",
    ]


def test_monitor_leads_with_the_forecast_passing_the_budget(fleet, admin_client_logged_in):
    data = admin_client_logged_in.get(f"{reverse('dashboard:resources-data')}?agent=agent-research").json()
    cost, outlook = data["cost"], data["outlook"]
    assert Decimal(cost["forecast_usd"]) > Decimal(cost["budget_usd"]) == Decimal("120.00")
    assert outlook["level"] == "critical"
    start, _ = month_bounds(timezone.now())
    spent = Decimal(cost["spent_usd"])
    # At the pace so far the budget is used up after budget/spent of the time elapsed.
    runs_out = start + (timezone.now() - start) * float(Decimal("120") / spent)
    assert outlook["runs_out_on"] == runs_out.date().isoformat()
    assert f"runs out on {runs_out.date().isoformat()}" in outlook["message"]
    assert f"${Decimal(cost['forecast_usd']):,}" in outlook["message"] and "$120.00" in outlook["message"]
    page = admin_client_logged_in.get(
        f"{reverse('dashboard:resources')}?agent=agent-research"
    ).content.decode()
    assert 'class="outlook critical"' in page and outlook["message"] in page
    # An agent whose forecast stays well within its budget is on track.
    Agent.objects.filter(pk="agent-research").update(monthly_budget_usd=Decimal("100000"))
    calm = admin_client_logged_in.get(f"{reverse('dashboard:resources-data')}?agent=agent-research").json()
    assert calm["outlook"]["level"] == "ok" and calm["outlook"]["message"].startswith("On track")


def test_monitor_shows_spend_per_day_by_resource_type_over_a_range(fleet, admin_client_logged_in):
    from ledger.models import UsageLog

    today = timezone.now().date()
    since = today - dt.timedelta(days=9)
    url = reverse("dashboard:resources-data")
    data = admin_client_logged_in.get(
        url, {"agent": "agent-123", "since": since.isoformat(), "until": today.isoformat()}
    ).json()["range"]
    assert [row["day"] for row in data["days"]][0] == since.isoformat() and len(data["days"]) == 10
    for row in data["days"]:
        day = dt.date.fromisoformat(row["day"])
        logs = UsageLog.objects.filter(agent_id="agent-123", created_at__date=day)
        for code, value in row["by_type"].items():
            expected = sum(log.cost_usd for log in logs if log.resource_type_id == code)
            assert Decimal(value) == Decimal(expected).quantize(Decimal("0.01")), (day, code)
    assert Decimal(data["total_usd"]) > 0

    # The CSV link downloads the same days' usage rows through the export.
    csv = admin_client_logged_in.get(data["csv_url"])
    assert csv.status_code == 200 and csv["Content-Type"].startswith("text/csv")
    lines = b"".join(csv.streaming_content).decode().splitlines()
    start = dt.datetime.combine(since, dt.time(), tzinfo=dt.UTC)
    assert len(lines) - 1 == UsageLog.objects.filter(agent_id="agent-123", created_at__gte=start).count()

    # A range that cannot be read is said so, and the period so far is shown instead.
    page = admin_client_logged_in.get(
        reverse("dashboard:resources"), {"agent": "agent-123", "since": "2026-13-01", "until": "x"}
    )
    assert page.status_code == 200 and "Dates are written YYYY-MM-DD" in page.content.decode()
    backwards = admin_client_logged_in.get(
        url, {"agent": "agent-123", "since": today.isoformat(), "until": since.isoformat()}
    ).json()["range"]
    assert backwards["since"] == month_bounds(timezone.now())[0].date().isoformat()


def test_recommendations_show_times_as_the_page_does(fleet, admin_client_logged_in):
    data = admin_client_logged_in.get(f"{reverse('dashboard:resources-data')}?agent=agent-456").json()
    texts = [item["rationale"] for item in data["recommendations"]]
    assert any("runs out at" in text for text in texts)
    for text in texts:
        assert not re.search(r"\d{4}-\d\d-\d\dT\d", text), text
        assert re.search(r"runs out at \d{4}-\d\d-\d\d \d\d:\d\d UTC", text) or "runs out" not in text


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


def test_monitor_shows_the_last_hour_against_its_baseline(fleet, admin_client_logged_in):
    from optimization.models import Execution

    now = timezone.now()
    rows = [(now - dt.timedelta(days=2, minutes=i), 100) for i in range(20)]
    rows += [(now - dt.timedelta(minutes=5 + i), 300) for i in range(10)]
    Execution.objects.bulk_create(
        Execution(
            agent_id="agent-research",
            superpower="search",
            resources={},
            duration_ms=duration,
            success=True,
            cost_usd=Decimal("0.01"),
            created_at=at,
        )
        for at, duration in rows
    )
    data = admin_client_logged_in.get(f"{reverse('dashboard:resources-data')}?agent=agent-research").json()
    p95 = data["degradation"]["p95_duration_ms"]
    figures = (Decimal(p95["current"]), Decimal(p95["baseline"]), Decimal(p95["ratio"]))
    assert figures == (Decimal(300), Decimal(100), Decimal(3))
    page = admin_client_logged_in.get(
        f"{reverse('dashboard:resources')}?agent=agent-research"
    ).content.decode()
    row = re.search(r'<tr data-metric="p95_duration_ms">.*?</tr>', page, re.S).group(0)
    assert "300.00 ms" in row and "100.00 ms" in row and 'class="badge critical"' in row

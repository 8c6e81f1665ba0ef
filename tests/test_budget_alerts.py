"""Budget alerts read from the budget rows: thresholds once per budget and window, for every scope (a team's
and an organization's belong to no agent and reach the global webhooks), soft budgets that alert and never
refuse, and the "resolved" alert when a budget that refused has room again."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal

import pytest
from django.core import mail
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from allocation import services
from allocation.models import Allocation
from ledger.budgets import budget_create, budget_update, run_create
from ledger.errors import BudgetExceeded
from ledger.models import Agent, Budget
from ledger.periods import UTC
from optimization.models import Alert, AlertDelivery, AlertSettings, WebhookEndpoint
from optimization.services.alert_delivery import alerts_deliver
from optimization.services.alerts import budget_sweep, budgets_resolve
from optimization.tasks import alerts as alert_tasks
from tests.factories import AgentFactory, OrganizationFactory, TeamFactory
from tests.test_alerts import SECRET, WebhookReceiver, signature_of

pytest.register_assert_rewrite("tests.api_fixtures")
from tests.api_fixtures import assert_error  # noqa: E402

pytestmark = pytest.mark.django_db
pytest_plugins = ["tests.api_fixtures"]

# COMPUTE_MS lists at $0.00001 a millisecond: 1,000 ms cost one cent.
CENT_MS = 1_000
T0 = dt.datetime(2026, 12, 9, 10, 0, tzinfo=UTC)  # a Wednesday
NEXT_DAY = dt.datetime(2026, 12, 10, 9, 0, tzinfo=UTC)


def _allocate(agent: Agent, cents: int, *, at: dt.datetime = T0, **extra) -> Allocation:
    return services.allocation_create(
        agent=agent, resource_type_id="COMPUTE_MS", amount=cents * CENT_MS, now=at, **extra
    )


def _refuse(agent: Agent, cents: int, *, at: dt.datetime = T0) -> BudgetExceeded:
    with pytest.raises(BudgetExceeded) as refused:
        _allocate(agent, cents, at=at)
    return refused.value


def _thresholds(**filters) -> list[int]:
    return sorted(Alert.objects.filter(kind="budget", **filters).values_list("data__threshold", flat=True))


@pytest.fixture
def team_agents(reference_data):
    organization = OrganizationFactory(id="acme")
    team = TeamFactory(id="research", organization=organization)
    agents = [AgentFactory(id=f"agent-{n}", team=team) for n in range(3)]
    return organization, team, agents


# --- Thresholds -------------------------------------------------------------------------------------------


def test_a_team_budget_alerts_each_threshold_once_per_window_with_no_agent(team_agents):
    _, team, agents = team_agents
    budget = budget_create(scope="team", scope_id=team.id, window="day", limit_usd="0.10", now=T0)
    _allocate(agents[0], 4, at=T0)
    assert budget_sweep(now=T0) == 0  # 40%: no threshold yet
    _allocate(agents[1], 4, at=T0)

    assert budget_sweep(now=T0) == 2  # 80% reached: 50 and 80
    assert budget_sweep(now=T0 + dt.timedelta(minutes=1)) == 0  # swept twice: alerted once
    assert _thresholds() == [50, 80]

    alert = Alert.objects.get(data__threshold=80)
    assert alert.agent_id is None  # a team's alert belongs to no agent
    assert (alert.kind, alert.severity) == ("budget", "warning")
    assert alert.dedup_key == f"budget:{budget.pk}:2026-12-09T00:00:00+00:00:80"
    assert alert.title == "Team research's daily budget 80% reached"
    assert alert.message == (
        "Team research's daily budget 80% reached: $0.08 of $0.10 spent (80.00%) in the window "
        "2026-12-09 00:00 to 2026-12-10 00:00 UTC."
    )
    assert {key: alert.data[key] for key in ("budget_id", "scope", "scope_id", "window", "threshold")} == {
        "budget_id": budget.pk,
        "scope": "team",
        "scope_id": "research",
        "window": "day",
        "threshold": 80,
    }
    assert (alert.data["window_start"], alert.data["window_end"]) == (
        "2026-12-09T00:00:00+00:00",
        "2026-12-10T00:00:00+00:00",
    )
    assert Decimal(alert.data["spent_usd"]) == Decimal("0.08")
    assert Decimal(alert.data["limit_usd"]) == Decimal("0.10")
    assert Decimal(alert.data["reserved_usd"]) == 0

    # 90% later in the same window: only the new threshold.
    _allocate(agents[2], 1, at=T0)
    assert budget_sweep(now=T0) == 1
    assert _thresholds() == [50, 80, 90]


def test_a_new_window_alerts_again_against_its_limit_plus_the_rollover(team_agents):
    _, team, agents = team_agents
    budget = budget_create(
        scope="team", scope_id=team.id, window="day", limit_usd="0.10", rollover_percent=50, now=T0
    )
    _allocate(agents[0], 6, at=T0)
    assert budget_sweep(now=T0) == 1  # 60%: 50
    # Nothing more spent today. The next day opens with $0.04 left over (under the $0.05 cap): $0.14.
    assert budget_sweep(now=NEXT_DAY) == 0
    rolled = Budget.objects.get(pk=budget.pk)  # the sweep rolled the row, as an allocation would have
    assert (rolled.window_start, rolled.spent_usd, rolled.rollover_usd) == (
        dt.datetime(2026, 12, 10, tzinfo=UTC),
        0,
        Decimal("0.04"),
    )
    _allocate(agents[0], 6, at=NEXT_DAY)  # 6 of 14: 42.9%, below 50% of the limit with its rollover
    assert budget_sweep(now=NEXT_DAY) == 0
    _allocate(agents[0], 1, at=NEXT_DAY)  # 7 of 14: exactly 50%
    assert budget_sweep(now=NEXT_DAY) == 1
    assert sorted(Alert.objects.values_list("data__window_start", "data__threshold")) == [
        ("2026-12-09T00:00:00+00:00", 50),
        ("2026-12-10T00:00:00+00:00", 50),
    ]
    alert = Alert.objects.get(data__window_start="2026-12-10T00:00:00+00:00")
    assert "$0.07 of $0.14 ($0.10 + $0.04 rolled over) spent (50.00%)" in alert.message
    assert Decimal(alert.data["rollover_usd"]) == Decimal("0.04")


def test_each_scope_alerts_with_its_own_name_and_owner(team_agents):
    organization, team, agents = team_agents
    budget_create(scope="organization", scope_id=organization.id, window="month", limit_usd="0.10", now=T0)
    budget_create(scope="agent", scope_id=agents[0].id, window="week", limit_usd="0.10", now=T0)
    run_create(agent=agents[0], run_id="loop-1", limit_usd="0.10", now=T0)
    _allocate(agents[0], 5, at=T0, run_id="loop-1")

    assert budget_sweep(now=T0) == 3
    titles = dict(Alert.objects.values_list("title", "agent_id"))
    assert titles == {
        "Organization acme's monthly budget 50% reached": None,
        "Agent agent-0's weekly budget 50% reached": "agent-0",
        "Agent agent-0's run loop-1 budget 50% reached": "agent-0",
    }
    run_alert = Alert.objects.get(data__scope="run")
    assert (run_alert.data["scope_id"], run_alert.data["window"], run_alert.data["window_end"]) == (
        "loop-1",
        "total",
        None,
    )


def test_budget_thresholds_come_from_the_budget_and_the_agents_settings_for_its_monthly_budget(
    team_agents,
):
    _, team, agents = team_agents
    budget_create(scope="team", scope_id=team.id, window="day", limit_usd="0.10", thresholds=[25, 75], now=T0)
    budget_create(scope="agent", scope_id=agents[1].id, window="day", limit_usd="0.10", thresholds=[], now=T0)
    Agent.objects.filter(pk=agents[0].pk).update(monthly_budget_usd=Decimal("0.10"))
    monthly = Budget.objects.get(agent=agents[0], managed=True)
    Budget.objects.filter(pk=monthly.pk).update(
        window_start=dt.datetime(2026, 12, 1, tzinfo=UTC), window_end=dt.datetime(2027, 1, 1, tzinfo=UTC)
    )
    AlertSettings.objects.create(agent=agents[0], budget_thresholds=[30])
    _allocate(agents[0], 4, at=T0)
    _allocate(agents[1], 4, at=T0)

    assert budget_sweep(now=T0) == 3
    assert sorted(Alert.objects.values_list("data__scope", "data__threshold")) == [
        ("agent", 30),  # the agent's monthly budget (4 cents of 10): its alert settings' thresholds
        ("team", 25),  # the team's 8 cents of 10: 25 and 75, the team budget's own list
        ("team", 75),
    ]
    # The other agent's daily budget opted out ([]): nothing, although 40% of it is spent.
    assert not Alert.objects.filter(agent=agents[1]).exists()


def test_a_soft_budget_alerts_like_a_hard_one_and_never_refuses(team_agents):
    _, team, agents = team_agents
    budget = budget_create(
        scope="team", scope_id=team.id, window="day", limit_usd="0.05", mode="soft", now=T0
    )
    for agent in agents:
        allocation = _allocate(agent, 3, at=T0)  # 9 cents against a 5-cent soft limit: all allowed
        assert allocation.pk is not None
    assert Budget.objects.get(pk=budget.pk).spent_usd == Decimal("0.09")
    assert Budget.objects.get(pk=budget.pk).refused_at is None

    assert budget_sweep(now=T0) == 4  # 180%: every threshold up to 100
    assert _thresholds() == [50, 80, 90, 100]
    assert Alert.objects.get(data__threshold=100).severity == "critical"
    assert Alert.objects.get(data__threshold=100).data["mode"] == "soft"
    assert budget_sweep(now=T0) == 0
    assert not Alert.objects.filter(kind="budget_resolved").exists()


def test_the_sweep_reads_the_budget_rows_in_chunks_with_a_fixed_number_of_queries(team_agents):
    organization, _, _ = team_agents
    counts = []
    for count in (5, 60):
        Alert.objects.all().delete()
        Budget.objects.all().delete()
        Budget.objects.bulk_create(
            Budget(
                scope="organization",
                organization=organization,
                window="day",
                limit_usd=Decimal("1"),
                window_start=dt.datetime(2026, 12, 9, tzinfo=UTC),
                window_end=dt.datetime(2026, 12, 10, tzinfo=UTC),
                spent_usd=Decimal("0.85"),
            )
            for _ in range(count)
        )
        with CaptureQueriesContext(connection) as ctx:
            assert budget_sweep(now=T0, chunk_size=1000) == 2 * count
        counts.append(len(ctx.captured_queries))
        assert Alert.objects.filter(agent__isnull=True).count() == 2 * count
    assert counts[0] == counts[1], counts
    # Chunked: the same alerts whatever the chunk size, each budget read once.
    Alert.objects.all().delete()
    assert budget_sweep(now=T0, chunk_size=7) == 2 * 60
    assert budget_sweep(now=T0, chunk_size=7) == 0


# --- Delivery of alerts with no agent ---------------------------------------------------------------------


def test_a_team_alert_reaches_the_global_webhooks_and_alert_emails_only(team_agents, settings):
    settings.ALERT_EMAILS = ["oncall@example.com"]
    _, team, agents = team_agents
    budget = budget_create(scope="team", scope_id=team.id, window="day", limit_usd="0.10", now=T0)
    AlertSettings.objects.create(agent=agents[0], email="owner@example.com")
    with WebhookReceiver() as receiver:
        WebhookEndpoint.objects.create(agent=None, url=receiver.url + "/global", secret=SECRET)
        WebhookEndpoint.objects.create(agent=agents[0], url=receiver.url + "/agent", secret=SECRET)
        _allocate(agents[0], 5, at=T0)
        assert budget_sweep(now=T0) == 1
        assert set(AlertDelivery.objects.values_list("channel", "target")) == {
            ("webhook", receiver.url + "/global"),
            ("email", "oncall@example.com"),
        }
        assert alerts_deliver(now=T0).delivered == 2
    (request,) = receiver.requests
    assert request["path"] == "/hooks/axiom/global"
    assert request["headers"]["X-Axiom-Signature"] == signature_of(request)
    body = json.loads(request["body"])
    assert (body["agent_id"], body["scope"], body["scope_id"], body["kind"]) == (
        None,
        "team",
        "research",
        "budget",
    )
    assert body["data"]["budget_id"] == budget.pk
    assert [message.to for message in mail.outbox] == [["oncall@example.com"]]
    assert mail.outbox[0].subject == "[Axiom info] team research: Team research's daily budget 50% reached"


# --- Resolved ---------------------------------------------------------------------------------------------


def _resolved() -> list[Alert]:
    return list(Alert.objects.filter(kind="budget_resolved"))


def test_resolved_fires_once_when_a_refusing_budget_gets_a_higher_limit(team_agents):
    _, team, agents = team_agents
    budget = budget_create(scope="team", scope_id=team.id, window="day", limit_usd="0.05", now=T0)
    _allocate(agents[0], 5, at=T0)
    refusal = _refuse(agents[1], 1)
    assert refusal.details["budget_id"] == budget.pk
    refused_at = Budget.objects.get(pk=budget.pk).refused_at
    assert refused_at == T0

    budget_sweep(now=T0)
    assert _resolved() == []  # still no room: nothing resolved, the refusal is remembered
    assert Budget.objects.get(pk=budget.pk).refused_at == refused_at

    budget_update(budget=budget, changes={"limit_usd": "0.08"})
    assert budgets_resolve(now=T0, budget_ids=[budget.pk]) == 1  # what the API calls after a PATCH
    assert budgets_resolve(now=T0, budget_ids=[budget.pk]) == 0
    assert budget_sweep(now=T0) == 0
    (alert,) = _resolved()
    assert alert.agent_id is None
    assert alert.severity == "info"
    assert alert.dedup_key == f"budget_resolved:{budget.pk}:{refused_at.isoformat()}"
    assert alert.title == "Team research's daily budget has room again"
    assert "$0.03 is left" in alert.message
    assert (alert.data["budget_id"], alert.data["scope"], alert.data["scope_id"]) == (
        budget.pk,
        "team",
        "research",
    )
    assert alert.data["refused_at"] == refused_at.isoformat()
    assert Decimal(alert.data["remaining_usd"]) == Decimal("0.03")
    assert Budget.objects.get(pk=budget.pk).refused_at is None

    # A new refusal is a new episode, resolved once more when it has room again.
    _allocate(agents[0], 3, at=T0)
    later = T0 + dt.timedelta(minutes=5)
    _refuse(agents[1], 1, at=later)
    assert Budget.objects.get(pk=budget.pk).refused_at == later
    budget_update(budget=budget, changes={"limit_usd": "0.20"})
    assert budget_sweep(now=later) == 1
    assert len(_resolved()) == 2


def test_resolved_fires_once_when_the_window_rolls(team_agents):
    _, team, agents = team_agents
    budget = budget_create(scope="agent", scope_id=agents[0].id, window="day", limit_usd="0.02", now=T0)
    _allocate(agents[0], 2, at=T0)
    _refuse(agents[0], 1)
    assert budget_sweep(now=T0) == 4  # 100%: 50, 80, 90, 100; nothing resolved yet
    assert _resolved() == []

    assert budget_sweep(now=NEXT_DAY) == 1
    assert budget_sweep(now=NEXT_DAY + dt.timedelta(minutes=1)) == 0
    (alert,) = _resolved()
    assert alert.agent_id == agents[0].id  # an agent's budget: the agent's alert
    assert alert.data["window_start"] == "2026-12-10T00:00:00+00:00"
    assert Budget.objects.get(pk=budget.pk).refused_at is None
    _allocate(agents[0], 1, at=NEXT_DAY)  # and it takes calls again


def test_resolved_fires_once_when_a_hold_is_released(team_agents):
    _, team, agents = team_agents
    budget = budget_create(scope="team", scope_id=team.id, window="day", limit_usd="0.05", now=T0)
    hold = _allocate(agents[0], 5, at=T0, hold=True)
    _refuse(agents[1], 1)
    assert budget_sweep(now=T0) == 0  # reserved is not spent: no threshold, and no room
    assert _resolved() == []

    services.hold_release(agent=agents[0], allocation_id=hold.pk, now=T0 + dt.timedelta(seconds=30))
    assert budget_sweep(now=T0 + dt.timedelta(minutes=1)) == 1
    assert budget_sweep(now=T0 + dt.timedelta(minutes=2)) == 0
    (alert,) = _resolved()
    assert Decimal(alert.data["remaining_usd"]) == Decimal("0.05")
    assert Budget.objects.get(pk=budget.pk).refused_at is None


def test_nothing_is_resolved_without_a_refusal(team_agents):
    _, team, agents = team_agents
    budget_create(scope="team", scope_id=team.id, window="day", limit_usd="0.05", now=T0)
    hold = _allocate(agents[0], 4, at=T0, hold=True)
    services.hold_release(agent=agents[0], allocation_id=hold.pk, now=T0)
    assert budget_sweep(now=T0) == 0
    assert budget_sweep(now=NEXT_DAY) == 0
    assert budgets_resolve(now=NEXT_DAY) == 0
    assert _resolved() == []


def test_the_resolve_task_resolves_the_budgets_it_is_given(team_agents):
    _, team, agents = team_agents
    budget = budget_create(scope="team", scope_id=team.id, window="day", limit_usd="0.01", now=T0)
    _allocate(agents[0], 1)
    _refuse(agents[0], 1)
    budget_update(budget=budget, changes={"limit_usd": "1.00"})
    assert alert_tasks.budgets_resolve_task.name == "optimization.budgets_resolve"
    assert alert_tasks.budgets_resolve_task([budget.pk]) == 1
    assert alert_tasks.budgets_resolve_task([budget.pk]) == 0


# --- API and admin ----------------------------------------------------------------------------------------


@pytest.fixture
def team_and_agent_alerts(agent_a, agent_b):
    team = TeamFactory(id="research")
    Agent.objects.filter(pk__in=[agent_a.id, agent_b.id]).update(team=team)
    budget_create(scope="team", scope_id=team.id, window="day", limit_usd="0.10", now=T0)
    budget_create(scope="agent", scope_id=agent_a.id, window="day", limit_usd="0.10", now=T0)
    _allocate(agent_a.agent, 5, at=T0)
    assert budget_sweep(now=T0) == 2
    return Alert.objects.get(agent__isnull=True), Alert.objects.get(agent_id=agent_a.id)


def test_operators_list_every_alert_and_agents_only_their_own(
    team_and_agent_alerts, agent_a, agent_b, operator_client
):
    team_alert, agent_alert = team_and_agent_alerts
    url = reverse("optimization:all-alerts")
    rows = operator_client.get(url).json()["results"]
    assert {(row["id"], row["agent_id"], row["scope"], row["scope_id"]) for row in rows} == {
        (team_alert.pk, None, "team", "research"),
        (agent_alert.pk, agent_a.id, "agent", agent_a.id),
    }
    by_agent = operator_client.get(url, {"agent_id": agent_a.id}).json()["results"]
    assert [row["id"] for row in by_agent] == [agent_alert.pk]
    by_scope = operator_client.get(url, {"scope": "team", "scope_id": "research"}).json()["results"]
    assert [row["id"] for row in by_scope] == [team_alert.pk]
    assert operator_client.get(url, {"kind": "budget_resolved"}).json()["results"] == []
    assert operator_client.get(url, {"kind": "nope"}).status_code == 400

    # An agent's key sees its own alerts, not its team's, and may not list everyone's.
    own = agent_a.client.get(reverse("optimization:alerts", args=[agent_a.id])).json()["results"]
    assert [(row["id"], row["scope"]) for row in own] == [(agent_alert.pk, "agent")]
    assert agent_b.client.get(reverse("optimization:alerts", args=[agent_b.id])).json()["results"] == []
    assert agent_a.client.get(url).status_code == 403

    ack = reverse("optimization:operator-alert-acknowledge", args=[team_alert.pk])
    assert agent_a.client.post(ack, {}, format="json").status_code == 403
    response = operator_client.post(ack, {}, format="json")
    assert response.status_code == 200
    assert response.json()["status"] == "acknowledged"
    assert (
        operator_client.post(ack, {}, format="json").json()["acknowledged_at"]
        == (response.json()["acknowledged_at"])
    )
    missing = operator_client.post(
        reverse("optimization:operator-alert-acknowledge", args=[10**9]), {}, format="json"
    )
    assert_error(missing, 404, "not_found")


def test_the_admin_shows_alerts_with_no_agent(team_and_agent_alerts, admin_client_logged_in):
    team_alert, _ = team_and_agent_alerts
    changelist = admin_client_logged_in.get(reverse("admin:optimization_alert_changelist"))
    assert changelist.status_code == 200
    assert "team research" in changelist.content.decode()
    page = admin_client_logged_in.get(reverse("admin:optimization_alert_change", args=[team_alert.pk]))
    assert page.status_code == 200

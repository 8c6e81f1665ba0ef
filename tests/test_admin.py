"""The back office: every registered admin page renders, the ledger stays read-only, and the agent actions
change what they promise through the services (and nothing when refused)."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
from django.contrib import admin
from django.contrib.admin.models import LogEntry
from django.contrib.admin.utils import quote
from django.contrib.auth.models import Group, Permission
from django.db import connection
from django.db.models import F
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone
from django_celery_beat.models import (
    ClockedSchedule,
    CrontabSchedule,
    IntervalSchedule,
    PeriodicTask,
    SolarSchedule,
)

from ledger import services
from ledger.demo import demo_data_load
from ledger.errors import QuotaExceeded
from ledger.models import Agent, Grant, OptimizationRule, Quota, ResourcePrice, Tier, UsageLog
from ledger.periods import month_bounds
from ledger.services import quota_grant, quotas_open_all
from tests.factories import AgentFactory

pytestmark = pytest.mark.django_db

AGENT_CHANGELIST = "admin:ledger_agent_changelist"

# Apps whose every model must have a row for the change page test; a model another app registers later
# without a fixture row still gets its changelist and add page checked.

REGISTERED_MODELS = sorted(admin.site._registry, key=lambda model: model._meta.label)


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    # Each test creates two superusers (the operator and the demo admin); the real hasher is slow by design.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def _url(model, view: str, *args) -> str:
    return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_{view}", args=args)


@pytest.fixture
def every_model_has_a_row(reference_data, staff_user):
    """Demo agents with usage, a manual grant, the seed rules, and one row of each celery beat schedule."""
    demo_data_load()
    quota_grant(
        agent=Agent.objects.get(id="agent-123"),
        resource_type_id="AI_TOKENS",
        amount=1_000,
        reason=Grant.Reason.MANUAL,
        actor=staff_user.username,
    )
    interval = IntervalSchedule.objects.create(every=5, period=IntervalSchedule.MINUTES)
    crontab = CrontabSchedule.objects.create(minute="0", hour="*/6")
    SolarSchedule.objects.create(event="sunrise", latitude=Decimal("52.37"), longitude=Decimal("4.89"))
    ClockedSchedule.objects.create(clocked_time=timezone.now() + dt.timedelta(days=1))
    PeriodicTask.objects.create(name="every five minutes", task="ledger.noop", interval=interval)
    PeriodicTask.objects.create(name="every six hours", task="ledger.noop", crontab=crontab)
    Group.objects.create(name="operators")
    # One row of each allocation model, so that every change page is opened.
    from allocation.keys import api_key_issue
    from allocation.models import AuditRecord, IdempotencyRecord
    from allocation.services import allocation_create

    agent = Agent.objects.get(id="agent-123")
    allocation_create(agent=agent, resource_type_id="AI_TOKENS", amount=10)
    api_key_issue(agent=agent)
    IdempotencyRecord.objects.create(
        principal="agent:agent-123",
        key="k",
        method="POST",
        path="/",
        request_hash="0" * 64,
        response_status=201,
        response_body={},
        created_at=timezone.now(),
    )
    AuditRecord.objects.create(
        actor="agent:agent-123",
        action="allocation.create",
        agent_id="agent-123",
        method="POST",
        path="/",
        status_code=201,
        outcome="ok",
    )
    # One row of each optimization model, so that their change pages are opened too.
    from optimization.models import Experiment, ExperimentArm, ScalingPolicy
    from optimization.services.executions import execution_record
    from optimization.services.experiments import experiment_assign
    from optimization.services.marketplace import deal_list, deal_purchase
    from optimization.services.scaling import scaling_apply

    execution_record(
        agent=agent, superpower="search", resources={"AI_TOKENS": 10}, duration_ms=120, success=True
    )
    experiment = Experiment.objects.create(name="demo", started_at=timezone.now() - dt.timedelta(days=1))
    ExperimentArm.objects.create(experiment=experiment, name="control")
    experiment_assign(experiment=experiment, agents=[agent])
    ScalingPolicy.objects.create(agent=agent, max_instances=5)
    scaling_apply(agent=agent, direction="up", trigger="manual", reason="fixture", actor="operator")
    deal = deal_list(
        agent=agent, resource_type_id="COMPUTE_MS", amount=10, unit_price_usd=Decimal("0.000005")
    )
    deal_purchase(deal_id=deal.pk, buyer=Agent.objects.get(id="agent-456"), amount=1, actor="operator")
    from ledger.models import OptimizationRule
    from optimization.models import Alert, AlertDelivery, AlertSettings, RuleState, WebhookEndpoint

    alert = Alert.objects.create(
        agent=agent, kind="budget", severity="warning", title="Budget 80%", message="m", dedup_key="fixture"
    )
    webhook = WebhookEndpoint.objects.create(agent=agent, url="http://127.0.0.1:9/hook", secret="s3cret")
    AlertDelivery.objects.create(alert=alert, channel="webhook", webhook=webhook, target=webhook.url)
    AlertSettings.objects.create(agent=agent, email="ops@example.com")
    RuleState.objects.create(
        rule=OptimizationRule.objects.first(),
        agent=agent,
        true_since=timezone.now(),
        last_value=Decimal("85"),
    )
    # An organization, its team with the agent in it, and a budget of each scope (the demo agents'
    # monthly budgets are the managed ones).
    from ledger import budgets

    budgets.organization_create(id="org-acme", name="Acme")
    budgets.team_create(id="team-search", name="Search", organization_id="org-acme")
    budgets.agent_team_set(agent=agent, team_id="team-search")
    budgets.budget_create(scope="organization", scope_id="org-acme", window="month", limit_usd="100")
    budgets.budget_create(scope="team", scope_id="team-search", window="week", limit_usd="20")
    budgets.run_create(agent=agent, run_id="loop-1", limit_usd="1")


@pytest.fixture
def pro_agent(reference_data):
    return AgentFactory(id="agent-pro", tier=Tier.objects.get(code="PRO"))


def _current_quota(agent: Agent, resource_type_id: str) -> Quota:
    start, _ = month_bounds(timezone.now())
    return Quota.objects.get(agent=agent, resource_type_id=resource_type_id, period_start=start)


def _run_action(client, action: str, agents: list[Agent], *, follow: bool = False, **data):
    payload = {"action": action, "_selected_action": [agent.pk for agent in agents], **data}
    return client.post(reverse(AGENT_CHANGELIST), payload, follow=follow)


# --- Every page renders ---------------------------------------------------------------------------------


def test_ledger_celery_beat_and_auth_models_are_registered():
    labels = {model._meta.label for model in REGISTERED_MODELS}
    assert {
        "ledger.ResourceType",
        "ledger.ResourcePrice",
        "ledger.Tier",
        "ledger.Agent",
        "ledger.Quota",
        "ledger.Grant",
        "ledger.UsageLog",
        "ledger.OptimizationRule",
        "ledger.Organization",
        "ledger.Team",
        "ledger.Budget",
        "django_celery_beat.PeriodicTask",
        "django_celery_beat.IntervalSchedule",
        "django_celery_beat.CrontabSchedule",
        "django_celery_beat.SolarSchedule",
        "django_celery_beat.ClockedSchedule",
        "auth.User",
        "auth.Group",
    } <= labels


@pytest.mark.parametrize("model", REGISTERED_MODELS, ids=lambda model: model._meta.label)
def test_admin_changelist_renders(model, every_model_has_a_row, admin_client_logged_in):
    response = admin_client_logged_in.get(_url(model, "changelist"))
    assert response.status_code == 200


@pytest.mark.parametrize("model", REGISTERED_MODELS, ids=lambda model: model._meta.label)
def test_admin_add_page_renders_where_adding_is_allowed(
    model, every_model_has_a_row, admin_client_logged_in, staff_user, rf
):
    request = rf.get("/")
    request.user = staff_user
    may_add = admin.site._registry[model].has_add_permission(request)
    response = admin_client_logged_in.get(_url(model, "add"))
    assert response.status_code == (200 if may_add else 403)


@pytest.mark.parametrize("model", REGISTERED_MODELS, ids=lambda model: model._meta.label)
def test_admin_change_page_renders(model, every_model_has_a_row, admin_client_logged_in):
    obj = model._default_manager.order_by("pk").first()
    assert obj is not None, f"the fixture made no {model._meta.label}"
    response = admin_client_logged_in.get(_url(model, "change", quote(obj.pk)))
    assert response.status_code == 200


def _add_agent_with_ledger_rows(agent_id: str) -> None:
    agent = AgentFactory(id=agent_id)
    quota = quota_grant(
        agent=agent, resource_type_id="AI_TOKENS", amount=10, reason="manual", actor="t"
    ).quota
    UsageLog.objects.create(
        agent=agent,
        resource_type_id="AI_TOKENS",
        quota=quota,
        amount=5,
        unit_price_usd=Decimal("0.000001"),
        cost_usd=Decimal("0.000005"),
        kind=UsageLog.Kind.ALLOCATION,
        created_at=timezone.now(),
        period_start=quota.period_start,
    )
    Quota.objects.filter(pk=quota.pk).update(used=F("used") + 5)
    OptimizationRule.objects.create(
        name=f"{agent_id}-errors",
        scope="agent",
        agent=agent,
        metric="error_rate_percent",
        operator=">",
        threshold=5,
    )


@pytest.mark.parametrize(
    "model", [Agent, Quota, Grant, UsageLog, OptimizationRule], ids=lambda model: model.__name__
)
def test_admin_changelist_makes_no_query_per_row(model, reference_data, admin_client_logged_in):
    # Searching for the extra agents keeps the page to their rows, so the second page shows three times
    # as many rows as the first.
    url = _url(model, "changelist") + "?q=agent-more"
    _add_agent_with_ledger_rows("agent-more-0")
    with CaptureQueriesContext(connection) as one_row:
        assert admin_client_logged_in.get(url).status_code == 200
    _add_agent_with_ledger_rows("agent-more-1")
    _add_agent_with_ledger_rows("agent-more-2")
    with CaptureQueriesContext(connection) as three_rows:
        page = admin_client_logged_in.get(url).content.decode()
    assert "agent-more-2" in page
    assert len(three_rows) == len(one_row)


def test_usage_log_changelist_filters_by_the_links_of_the_agent_and_quota_pages(
    every_model_has_a_row, admin_client_logged_in
):
    quota = Quota.objects.filter(agent_id="agent-123").first()
    changelist = reverse("admin:ledger_usagelog_changelist")
    assert admin_client_logged_in.get(changelist, {"agent": "agent-123"}).status_code == 200
    assert admin_client_logged_in.get(changelist, {"quota": quota.pk}).status_code == 200


# --- The ledger is read-only ----------------------------------------------------------------------------


@pytest.fixture
def usage_log(every_model_has_a_row) -> UsageLog:
    return UsageLog.objects.order_by("pk").first()


def test_usage_log_cannot_be_added_in_the_admin(usage_log, admin_client_logged_in):
    count = UsageLog.objects.count()
    assert admin_client_logged_in.get(_url(UsageLog, "add")).status_code == 403
    response = admin_client_logged_in.post(_url(UsageLog, "add"), {"agent": "agent-123", "amount": 5})
    assert response.status_code == 403
    assert UsageLog.objects.count() == count


def test_usage_log_change_page_is_view_only(usage_log, admin_client_logged_in):
    response = admin_client_logged_in.get(_url(UsageLog, "change", usage_log.pk))
    assert response.status_code == 200
    assert 'name="_save"' not in response.content.decode()


def test_usage_log_post_to_change_page_is_refused_and_changes_nothing(usage_log, admin_client_logged_in):
    before = (usage_log.amount, usage_log.cost_usd, usage_log.kind)
    response = admin_client_logged_in.post(
        _url(UsageLog, "change", usage_log.pk), {"amount": 1, "cost_usd": "0", "kind": "purchase"}
    )
    assert response.status_code == 403
    usage_log.refresh_from_db()
    assert (usage_log.amount, usage_log.cost_usd, usage_log.kind) == before


def test_usage_log_cannot_be_deleted_in_the_admin(usage_log, admin_client_logged_in):
    assert (
        admin_client_logged_in.post(_url(UsageLog, "delete", usage_log.pk), {"post": "yes"}).status_code
        == 403
    )
    changelist = admin_client_logged_in.get(_url(UsageLog, "changelist")).content.decode()
    assert "delete_selected" not in changelist
    assert UsageLog.objects.filter(pk=usage_log.pk).exists()


def test_staff_with_only_the_view_permission_can_audit_the_usage_log(usage_log, client, django_user_model):
    auditor = django_user_model.objects.create_user("auditor", password="pw-auditor-1", is_staff=True)
    auditor.user_permissions.add(Permission.objects.get(codename="view_usagelog"))
    client.force_login(auditor)
    assert client.get(_url(UsageLog, "changelist")).status_code == 200
    assert client.get(_url(UsageLog, "change", usage_log.pk)).status_code == 200
    assert client.get(_url(Agent, "changelist")).status_code == 403


def test_grants_are_append_only_in_the_admin(every_model_has_a_row, admin_client_logged_in):
    grant = Grant.objects.get(reason=Grant.Reason.MANUAL)
    assert admin_client_logged_in.get(_url(Grant, "add")).status_code == 403
    response = admin_client_logged_in.post(_url(Grant, "change", grant.pk), {"amount": 9_999_999})
    assert response.status_code == 403
    assert admin_client_logged_in.post(_url(Grant, "delete", grant.pk), {"post": "yes"}).status_code == 403
    grant.refresh_from_db()
    assert grant.amount == 1_000


def test_quota_counters_cannot_be_edited_in_the_admin(every_model_has_a_row, admin_client_logged_in):
    quota = _current_quota(Agent.objects.get(id="agent-123"), "AI_TOKENS")
    before = (quota.used, quota.reserved, quota.base_limit, quota.limit)
    page = admin_client_logged_in.get(_url(Quota, "change", quota.pk)).content.decode()
    assert 'name="_save"' not in page
    assert "matches" in page  # the counters agree with the usage log and grants behind them
    response = admin_client_logged_in.post(
        _url(Quota, "change", quota.pk), {"used": 0, "reserved": 0, "base_limit": 1, "limit": 10**12}
    )
    assert response.status_code == 403
    assert admin_client_logged_in.get(_url(Quota, "add")).status_code == 403
    quota.refresh_from_db()
    assert (quota.used, quota.reserved, quota.base_limit, quota.limit) == before


def test_a_price_in_effect_cannot_be_deleted_or_repriced(reference_data, admin_client_logged_in):
    price = ResourcePrice.objects.get(resource_type_id="COMPUTE_MS")
    assert (
        admin_client_logged_in.post(_url(ResourcePrice, "delete", price.pk), {"post": "yes"}).status_code
        == 403
    )
    response = admin_client_logged_in.post(
        _url(ResourcePrice, "change", price.pk),
        {
            "resource_type": "COMPUTE_MS",
            "unit_price_usd": "9",
            "effective_from_0": "2024-01-01",
            "effective_from_1": "00:00:00",
            "note": "corrected note",
        },
    )
    assert response.status_code == 302
    price.refresh_from_db()
    assert (price.unit_price_usd, price.note) == (Decimal("0.00001"), "corrected note")


def test_rule_with_a_scope_missing_its_target_is_refused_by_the_form(reference_data, admin_client_logged_in):
    response = admin_client_logged_in.post(
        _url(OptimizationRule, "add"),
        {
            "name": "TierWithoutTier",
            "scope": "tier",
            "metric": "error_rate_percent",
            "operator": ">",
            "threshold": "5",
            "duration_seconds": 0,
            "severity": "warning",
            "action": "notify",
            "cooldown_seconds": 3600,
            "enabled": "on",
        },
    )
    assert response.status_code == 200
    assert response.context["adminform"].form.errors
    assert not OptimizationRule.objects.filter(name="TierWithoutTier").exists()


# --- Agent pages ----------------------------------------------------------------------------------------


def test_agent_change_page_shows_current_quota_used_reserved_limit_and_available(
    pro_agent, admin_client_logged_in
):
    quotas_open_all(agent=pro_agent)
    quota_grant(agent=pro_agent, resource_type_id="AI_TOKENS", amount=1_000, reason="manual", actor="t")
    Quota.objects.filter(pk=_current_quota(pro_agent, "AI_TOKENS").pk).update(used=123_456, reserved=7_890)

    page = admin_client_logged_in.get(_url(Agent, "change", pro_agent.pk)).content.decode()

    # used, reserved, limit (1,000,000 + 1,000), the grant, available and used + reserved as a percentage
    for text in ("123,456", "7,890", "1,001,000", "+1,000", "869,654", "13.12%"):
        assert text in page
    assert "3,600,000" in page  # COMPUTE_MS's PRO limit, unused


def test_agent_change_page_shows_base_limits_of_quotas_not_opened_yet(pro_agent, admin_client_logged_in):
    page = admin_client_logged_in.get(_url(Agent, "change", pro_agent.pk)).content.decode()
    assert "not opened yet" in page
    assert "10,485,760" in page  # STORAGE_KB's PRO limit


def _agent_form(**fields) -> dict:
    data = {
        "limit_overrides-TOTAL_FORMS": "0",
        "limit_overrides-INITIAL_FORMS": "0",
        "limit_overrides-MIN_NUM_FORMS": "0",
        "limit_overrides-MAX_NUM_FORMS": "1000",
        "metadata": "{}",
        # What the page's hidden input carries for a field with a callable default (metadata=dict).
        "initial-metadata": "{}",
    }
    data.update(fields)
    return data


def test_agent_added_in_the_admin_is_created_with_its_overrides(reference_data, admin_client_logged_in):
    data = _agent_form(id="agent-new", name="New", tier="CUSTOM", monthly_budget_usd="12.50")
    data.update(
        {
            "limit_overrides-TOTAL_FORMS": "1",
            "limit_overrides-0-resource_type": "AI_TOKENS",
            "limit_overrides-0-limit": "42000",
        }
    )
    response = admin_client_logged_in.post(_url(Agent, "add"), data)
    assert response.status_code == 302
    agent = Agent.objects.get(id="agent-new")
    assert (agent.tier_id, agent.monthly_budget_usd) == ("CUSTOM", Decimal("12.50"))
    assert list(agent.limit_overrides.values_list("resource_type_id", "limit")) == [("AI_TOKENS", 42_000)]


def test_agent_change_form_edits_the_budget_but_not_the_tier(pro_agent, admin_client_logged_in):
    data = _agent_form(
        name="Renamed", tier="FREE", monthly_budget_usd="7.00", min_instances=1, max_instances=3
    )
    response = admin_client_logged_in.post(_url(Agent, "change", pro_agent.pk), data)
    assert response.status_code == 302
    pro_agent.refresh_from_db()
    assert (pro_agent.name, pro_agent.monthly_budget_usd, pro_agent.tier_id) == (
        "Renamed",
        Decimal("7.00"),
        "PRO",
    )


def test_agent_change_form_refuses_min_instances_above_max(pro_agent, admin_client_logged_in):
    data = _agent_form(name="x", monthly_budget_usd="", min_instances=5, max_instances=4)
    response = admin_client_logged_in.post(_url(Agent, "change", pro_agent.pk), data)
    assert response.status_code == 200
    assert "Min instances cannot exceed max instances." in response.content.decode()
    pro_agent.refresh_from_db()
    assert (pro_agent.name, pro_agent.min_instances, pro_agent.max_instances) == ("Agent agent-pro", 1, 10)


def test_agent_change_form_narrowing_the_bounds_clamps_the_running_instances(
    pro_agent, admin_client_logged_in
):
    data = _agent_form(name="x", monthly_budget_usd="", min_instances=3, max_instances=4)
    assert admin_client_logged_in.post(_url(Agent, "change", pro_agent.pk), data).status_code == 302
    pro_agent.refresh_from_db()
    assert (pro_agent.min_instances, pro_agent.instance_count, pro_agent.max_instances) == (3, 3, 4)


def test_editing_a_limit_override_in_the_admin_rebases_this_periods_quota(
    reference_data, admin_client_logged_in
):
    agent = services.agent_create(
        agent_id="agent-custom", tier_code="CUSTOM", custom_limits={"AI_TOKENS": 42_000}
    )
    quotas_open_all(agent=agent)
    override = agent.limit_overrides.get()
    data = _agent_form(name="agent-custom", monthly_budget_usd="", min_instances=1, max_instances=10)
    data.update(
        {
            "limit_overrides-TOTAL_FORMS": "1",
            "limit_overrides-INITIAL_FORMS": "1",
            "limit_overrides-0-id": str(override.pk),
            "limit_overrides-0-agent": agent.pk,
            "limit_overrides-0-resource_type": "AI_TOKENS",
            "limit_overrides-0-limit": "50000",
        }
    )

    assert admin_client_logged_in.post(_url(Agent, "change", agent.pk), data).status_code == 302

    override.refresh_from_db()
    tokens = _current_quota(agent, "AI_TOKENS")
    assert (override.limit, tokens.base_limit, tokens.limit) == (50_000, 50_000, 50_000)
    entry = LogEntry.objects.get(object_id=agent.pk)
    assert (
        entry.get_change_message()
        == "Changed Limit for agent limit override “agent-custom AI_TOKENS: 50,000”."
    )


# --- Agent actions --------------------------------------------------------------------------------------


def test_change_tier_action_first_shows_a_form_carrying_the_selection(pro_agent, admin_client_logged_in):
    response = _run_action(admin_client_logged_in, "change_tier", [pro_agent], index="0")
    page = response.content.decode()
    assert response.status_code == 200
    assert 'name="_selected_action" value="agent-pro"' in page
    assert 'name="action" value="change_tier"' in page
    assert 'name="apply"' in page and 'name="tier"' in page and "csrfmiddlewaretoken" in page
    assert Agent.objects.get(pk=pro_agent.pk).tier_id == "PRO"


def test_change_tier_action_moves_agents_and_rebases_current_quotas(pro_agent, admin_client_logged_in):
    quotas_open_all(agent=pro_agent)
    quota_grant(agent=pro_agent, resource_type_id="AI_TOKENS", amount=500, reason="manual", actor="t")

    response = _run_action(
        admin_client_logged_in, "change_tier", [pro_agent], tier="ENTERPRISE", apply="Apply"
    )

    assert response.status_code == 302
    pro_agent.refresh_from_db()
    assert pro_agent.tier_id == "ENTERPRISE"
    tokens = _current_quota(pro_agent, "AI_TOKENS")
    assert (tokens.base_limit, tokens.limit) == (10_000_000, 10_000_500)
    compute = _current_quota(pro_agent, "COMPUTE_MS")
    assert (compute.base_limit, compute.limit) == (36_000_000, 36_000_000)
    entry = LogEntry.objects.get(object_id=pro_agent.pk)
    assert (entry.user.username, entry.get_change_message()) == (
        "operator",
        "Changed tier from PRO to ENTERPRISE.",
    )


def test_change_tier_down_keeps_limits_at_what_is_used_with_a_grant_by_the_operator(
    pro_agent, admin_client_logged_in
):
    quotas_open_all(agent=pro_agent)
    Quota.objects.filter(pk=_current_quota(pro_agent, "AI_TOKENS").pk).update(used=400_000)

    _run_action(admin_client_logged_in, "change_tier", [pro_agent], tier="FREE", apply="Apply")

    tokens = _current_quota(pro_agent, "AI_TOKENS")
    assert (tokens.base_limit, tokens.limit) == (100_000, 400_000)
    grant = Grant.objects.get(quota=tokens)
    assert (grant.amount, grant.reason, grant.actor) == (300_000, Grant.Reason.TIER_CHANGE, "operator")


def test_change_tier_action_without_a_tier_shows_the_form_again_and_changes_nothing(
    pro_agent, admin_client_logged_in
):
    response = _run_action(admin_client_logged_in, "change_tier", [pro_agent], tier="", apply="Apply")
    assert response.status_code == 200
    assert "This field is required" in response.content.decode()
    assert Agent.objects.get(pk=pro_agent.pk).tier_id == "PRO"


def test_throttle_and_unthrottle_actions_switch_status_with_the_reason_and_the_operator(
    pro_agent, admin_client_logged_in
):
    other = AgentFactory(id="agent-other")

    response = _run_action(
        admin_client_logged_in, "throttle", [pro_agent, other], reason="runaway loop", apply="Apply"
    )
    assert response.status_code == 302
    for agent in (pro_agent, other):
        agent.refresh_from_db()
        assert (agent.status, agent.status_reason) == (
            Agent.Status.THROTTLED,
            "runaway loop (by operator in the admin)",
        )

    _run_action(admin_client_logged_in, "unthrottle", [pro_agent])
    pro_agent.refresh_from_db()
    other.refresh_from_db()
    assert pro_agent.status == Agent.Status.ACTIVE
    assert other.status == Agent.Status.THROTTLED


def test_unthrottle_does_not_lift_a_suspension(pro_agent, admin_client_logged_in):
    services.agent_set_status(agent=pro_agent, status=Agent.Status.SUSPENDED, reason="unpaid")

    response = _run_action(admin_client_logged_in, "unthrottle", [pro_agent], follow=True)

    assert "Left alone (not throttled): agent-pro" in response.content.decode()
    pro_agent.refresh_from_db()
    assert (pro_agent.status, pro_agent.status_reason) == (Agent.Status.SUSPENDED, "unpaid")


def test_grant_action_first_shows_a_form_carrying_the_selection(pro_agent, admin_client_logged_in):
    response = _run_action(admin_client_logged_in, "grant_quota", [pro_agent], index="0")
    page = response.content.decode()
    assert response.status_code == 200
    assert 'name="_selected_action" value="agent-pro"' in page
    assert 'name="resource_type"' in page and 'name="amount"' in page and 'name="note"' in page


def test_grant_action_raises_the_limit_and_records_a_manual_grant_by_the_operator(
    pro_agent, admin_client_logged_in
):
    other = AgentFactory(id="agent-other")
    quotas_open_all(agent=pro_agent)  # one agent has this period's quota already, the other not yet

    response = _run_action(
        admin_client_logged_in,
        "grant_quota",
        [pro_agent, other],
        resource_type="NETWORK_REQS",
        amount="250",
        note="launch week",
        apply="Apply",
    )

    assert response.status_code == 302
    for agent in (pro_agent, other):
        quota = _current_quota(agent, "NETWORK_REQS")
        assert (quota.base_limit, quota.limit) == (10_000, 10_250)
        grant = Grant.objects.get(quota=quota)
        assert (grant.amount, grant.reason, grant.actor, grant.note) == (
            250,
            Grant.Reason.MANUAL,
            "operator",
            "launch week",
        )


@pytest.mark.parametrize("amount", ["0", "-5", "1.5", ""])
def test_grant_action_with_a_bad_amount_shows_the_error_and_writes_nothing(
    amount, pro_agent, admin_client_logged_in
):
    quotas_before = Quota.objects.count()

    response = _run_action(
        admin_client_logged_in,
        "grant_quota",
        [pro_agent],
        resource_type="AI_TOKENS",
        amount=amount,
        apply="Apply",
    )

    assert response.status_code == 200
    assert response.context["form"].errors["amount"]
    assert 'class="errorlist' in response.content.decode()
    assert not Grant.objects.exists()
    assert Quota.objects.count() == quotas_before


def test_grant_action_refused_by_the_ledger_shows_the_error_and_writes_nothing(
    pro_agent, admin_client_logged_in, monkeypatch
):
    other = AgentFactory(id="agent-zzz")
    real_quota_grant = services.quota_grant

    def refuse_the_second_agent(**kwargs):
        if kwargs["agent"].pk == other.pk:
            raise QuotaExceeded("refused for the test")
        return real_quota_grant(**kwargs)

    monkeypatch.setattr(services, "quota_grant", refuse_the_second_agent)

    response = _run_action(
        admin_client_logged_in,
        "grant_quota",
        [pro_agent, other],
        resource_type="AI_TOKENS",
        amount="1000",
        apply="Apply",
        follow=True,
    )

    assert "No quota was granted (agent-zzz: refused for the test)" in response.content.decode()
    # The first agent's grant was rolled back with the refused one.
    assert not Grant.objects.exists()
    assert not Quota.objects.filter(agent=pro_agent).exists()

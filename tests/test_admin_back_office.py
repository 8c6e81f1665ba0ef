"""The back office's agent list (this period's spend and most used resource, in the page's one query),
throttling with a reason, and money shown as money everywhere the admin shows a price or a cost."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
from django.contrib.admin.models import LogEntry
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from allocation.services import allocation_create
from ledger.errors import AgentThrottled
from ledger.models import Agent, Budget, Quota, ResourcePrice, Tier, UsageLog
from ledger.money import usd_text
from ledger.periods import month_bounds
from ledger.services import agent_set_status, agent_update, quota_open
from tests.factories import AgentFactory

pytestmark = pytest.mark.django_db

AGENTS = reverse("admin:ledger_agent_changelist")


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def _throttle(client, agents: list[Agent], **data):
    payload = {"action": "throttle", "_selected_action": [agent.pk for agent in agents], **data}
    return client.post(AGENTS, payload)


def _set_period(agent: Agent, resource_type_id: str, *, used: int, limit: int, spent: str) -> None:
    quota = quota_open(agent=agent, resource_type_id=resource_type_id, at=timezone.now())
    Quota.objects.filter(pk=quota.pk).update(
        used=used, limit=limit, base_limit=limit, spent_usd=Decimal(spent)
    )


# --- Money -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (Decimal("0.000010000000"), "$0.00001"),
        (Decimal("12.5"), "$12.50"),
        (Decimal("0"), "$0.00"),
        (Decimal("-3"), "-$3.00"),
        (Decimal("1234.000125000000"), "$1234.000125"),
        (None, "-"),
    ],
)
def test_usd_text_trims_trailing_zeros_and_keeps_cents(value, text):
    assert usd_text(value) == text


def test_prices_and_costs_show_as_money_in_lists_and_view_only_pages(reference_data, admin_client_logged_in):
    agent = AgentFactory(id="agent-money", tier=Tier.objects.get(code="PRO"))
    agent_update(agent=agent, actor="t", monthly_budget_usd=Decimal("25"))
    allocation_create(agent=agent, resource_type_id="COMPUTE_MS", amount=3)  # 3 ms at $0.00001
    log = UsageLog.objects.get(agent=agent)
    assert log.unit_price_usd == Decimal("0.000010000000")

    pages = {
        "usage log list": reverse("admin:ledger_usagelog_changelist"),
        "usage log page": reverse("admin:ledger_usagelog_change", args=[log.pk]),
        "resource types": reverse("admin:ledger_resourcetype_changelist"),
        "prices": reverse("admin:ledger_resourceprice_changelist"),
        "allocations": reverse("admin:allocation_allocation_changelist"),
    }
    for name, url in pages.items():
        page = admin_client_logged_in.get(url).content.decode()
        # The unit price, or (an allocation's list) the cost of the 3 ms.
        assert "$0.00001<" in page or "$0.00003<" in page, name
        assert "0.000010000000" not in page and "0.000030000000" not in page, name
    usage = admin_client_logged_in.get(pages["usage log list"]).content.decode()
    assert "$0.00003<" in usage  # its cost
    price = ResourcePrice.objects.get(resource_type_id="COMPUTE_MS")
    price_page = admin_client_logged_in.get(reverse("admin:ledger_resourceprice_change", args=[price.pk]))
    assert "$0.00001<" in price_page.content.decode()  # in effect: shown, not editable
    budget = Budget.objects.get(agent=agent, managed=True)
    budget_page = admin_client_logged_in.get(reverse("admin:ledger_budget_change", args=[budget.pk]))
    assert "$25.00<" in budget_page.content.decode()  # the agent's monthly budget: its limit, read-only
    tiers = admin_client_logged_in.get(reverse("admin:ledger_tier_changelist")).content.decode()
    assert "$10.00<" in tiers and "$100.00<" in tiers
    assert ResourcePrice.objects.filter(unit_price_usd=Decimal("0.00001")).exists()


# --- The agent list --------------------------------------------------------------------------------------


def test_agent_list_shows_this_periods_spend_and_most_used_resource(reference_data, admin_client_logged_in):
    busy = AgentFactory(id="agent-busy", tier=Tier.objects.get(code="PRO"))
    _set_period(busy, "AI_TOKENS", used=921_600, limit=1_000_000, spent="0.9216")
    _set_period(busy, "COMPUTE_MS", used=1_800_000, limit=3_600_000, spent="18")
    # Last month's rows count for neither.
    start, _ = month_bounds(timezone.now())
    last_month = quota_open(agent=busy, resource_type_id="NETWORK_REQS", at=start - dt.timedelta(days=1))
    Quota.objects.filter(pk=last_month.pk).update(used=10_000, spent_usd=Decimal("10"))
    AgentFactory(id="agent-idle")

    page = admin_client_logged_in.get(AGENTS)

    rows = {agent.pk: agent for agent in page.context["cl"].result_list}
    admin = page.context["cl"].model_admin
    assert admin.period_spend(rows["agent-busy"]) == "$18.9216"
    assert admin.busiest_resource(rows["agent-busy"]) == "92.16%<br><small>AI_TOKENS</small>"
    assert admin.period_spend(rows["agent-idle"]) == "$0.00"
    assert admin.busiest_resource(rows["agent-idle"]) == "-"
    html = page.content.decode()
    assert "$18.9216" in html and "92.16%" in html


def test_agent_list_sorts_by_utilization(reference_data, admin_client_logged_in):
    for agent_id, used in (("agent-half", 500_000), ("agent-full", 990_000), ("agent-tenth", 100_000)):
        agent = AgentFactory(id=agent_id, tier=Tier.objects.get(code="PRO"))
        _set_period(agent, "AI_TOKENS", used=used, limit=1_000_000, spent="0")
    page = admin_client_logged_in.get(
        AGENTS, {"o": "-8"}
    )  # "most used resource" (0 is the checkbox), descending
    assert [agent.pk for agent in page.context["cl"].result_list] == [
        "agent-full",
        "agent-half",
        "agent-tenth",
    ]


def test_agent_list_spend_and_utilization_make_no_query_per_row(reference_data, admin_client_logged_in):
    def add(agent_id: str) -> None:
        agent = AgentFactory(id=agent_id)
        _set_period(agent, "AI_TOKENS", used=10, limit=100, spent="0.00001")
        _set_period(agent, "COMPUTE_MS", used=50, limit=100, spent="0.0005")

    add("agent-row-0")
    with CaptureQueriesContext(connection) as one_row:
        assert admin_client_logged_in.get(AGENTS, {"q": "agent-row"}).status_code == 200
    for i in range(1, 6):
        add(f"agent-row-{i}")
    with CaptureQueriesContext(connection) as six_rows:
        page = admin_client_logged_in.get(AGENTS, {"q": "agent-row"}).content.decode()
    assert page.count("50.00%") == 6
    assert len(six_rows) == len(one_row)


# --- Throttling with a reason ----------------------------------------------------------------------------


def test_throttle_first_asks_for_a_reason_and_changes_nothing(reference_data, admin_client_logged_in):
    agent = AgentFactory(id="agent-calm")

    response = _throttle(admin_client_logged_in, [agent], index="0")

    page = response.content.decode()
    assert response.status_code == 200
    assert 'name="reason"' in page and 'name="_selected_action" value="agent-calm"' in page
    assert 'name="action" value="throttle"' in page
    agent.refresh_from_db()
    assert (agent.status, agent.status_reason) == (Agent.Status.ACTIVE, "")


def test_throttle_refuses_a_blank_reason(reference_data, admin_client_logged_in):
    agent = AgentFactory(id="agent-calm")

    response = _throttle(admin_client_logged_in, [agent], reason="   ", apply="Apply")

    assert response.status_code == 200
    assert "This field is required" in response.content.decode()
    agent.refresh_from_db()
    assert agent.status == Agent.Status.ACTIVE
    assert not LogEntry.objects.exists()


def test_throttle_records_the_reason_on_the_agent_its_history_and_its_refusals(
    reference_data, admin_client_logged_in
):
    agent = AgentFactory(id="agent-loop", tier=Tier.objects.get(code="PRO"))
    suspended = AgentFactory(id="agent-off")
    agent_set_status(agent=suspended, status=Agent.Status.SUSPENDED, reason="unpaid")

    response = _throttle(
        admin_client_logged_in, [agent, suspended], reason="retry storm on search", apply="Apply"
    )

    assert response.status_code == 302
    agent.refresh_from_db()
    reason = "retry storm on search (by operator in the admin)"
    assert (agent.status, agent.status_reason) == (Agent.Status.THROTTLED, reason)
    # A suspension is not softened.
    suspended.refresh_from_db()
    assert (suspended.status, suspended.status_reason) == (Agent.Status.SUSPENDED, "unpaid")
    # The admin's history of the agent says it, with the reason.
    (entry,) = LogEntry.objects.filter(object_id="agent-loop")
    assert entry.get_change_message() == f"Set status to throttled ({reason})."
    # Shown: on the agent's page, in the list, and to the agent whose allocation is refused.
    change_page = admin_client_logged_in.get(reverse("admin:ledger_agent_change", args=[agent.pk]))
    assert "retry storm on search" in change_page.content.decode()
    listing = admin_client_logged_in.get(AGENTS).content.decode()
    assert "Throttled<br><small>retry storm on search (by operator in the admin)</small>" in listing
    with pytest.raises(AgentThrottled) as refused:
        allocation_create(agent=agent, resource_type_id="AI_TOKENS", amount=1)
    assert refused.value.details["reason"] == reason

"""The back office in a real browser (Debian's Chromium driven by Playwright): every main change list fits a
1280 px wide window, and throttling asks for a reason."""

from __future__ import annotations

import os

import pytest
from django.urls import reverse

from ledger.models import Agent
from tests.test_admin import every_model_has_a_row  # noqa: F401  (a fixture)
from tests.test_dashboard_browser import ARTIFACTS, browser, page_for  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")

CHANGE_LISTS = [
    "ledger_agent",
    "ledger_quota",
    "ledger_usagelog",
    "ledger_grant",
    "ledger_budget",
    "ledger_resourcetype",
    "ledger_resourceprice",
    "ledger_tier",
    "ledger_team",
    "ledger_organization",
    "ledger_optimizationrule",
    "allocation_allocation",
    "allocation_apikey",
    "allocation_auditrecord",
    "allocation_idempotencyrecord",
    "optimization_alert",
    "optimization_alertdelivery",
    "optimization_webhookendpoint",
    "optimization_execution",
    "optimization_experiment",
    "optimization_deal",
    "optimization_purchase",
    "optimization_scalingpolicy",
    "optimization_scalingevent",
]


def test_every_main_change_list_fits_1280_pixels(every_model_has_a_row, page_for, live_server):  # noqa: F811
    # One page, every list in turn: the fixture's rows are made once (each test flushes the database).
    page = page_for(1280)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    too_wide = {}
    for model in CHANGE_LISTS:
        page.goto(live_server.url + reverse(f"admin:{model}_changelist"))
        page.wait_for_selector("#result_list")
        page.screenshot(path=str(ARTIFACTS / f"admin-{model}-1280.png"), full_page=True)
        widths = page.evaluate(
            """() => { const results = document.querySelector('.results');
            return {document: document.documentElement.scrollWidth, results: results.scrollWidth,
                    visible: results.clientWidth}; }"""
        )
        # Nothing wider than the window, and the table needs no scrolling of its own either.
        if widths["document"] > 1280 or widths["results"] > widths["visible"]:
            too_wide[model] = widths
    assert too_wide == {}
    assert page.console_errors == []


def test_throttling_from_the_agent_list_asks_why_and_shows_it(
    every_model_has_a_row,  # noqa: F811
    page_for,  # noqa: F811
    live_server,
):
    page = page_for(1280)
    page.goto(live_server.url + reverse("admin:ledger_agent_changelist"))
    page.check('input[name="_selected_action"][value="agent-456"]')
    page.select_option('select[name="action"]', "throttle")
    page.click('button[name="index"]')
    page.wait_for_selector('input[name="reason"]')
    assert Agent.objects.get(pk="agent-456").status == Agent.Status.ACTIVE  # nothing yet

    # A reason is required: the browser will not send the form without one (the server refuses too).
    assert page.evaluate("document.querySelector('input[name=reason]').validity.valueMissing")
    page.fill('input[name="reason"]', "spending spike under review")
    page.click('input[name="apply"]')
    page.wait_for_selector(".messagelist")

    assert "spending spike under review" in page.inner_text(".messagelist")
    assert "spending spike under review" in page.inner_text("#result_list")
    agent = Agent.objects.get(pk="agent-456")
    assert (agent.status, agent.status_reason) == (
        Agent.Status.THROTTLED,
        "spending spike under review (by admin in the admin)",
    )
    assert page.console_errors == []

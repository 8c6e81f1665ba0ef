"""The resource monitor in a real browser: headless Chromium (Debian's package) driven by Playwright, against
a live test server with a seeded history. Screenshots go to artifacts/screenshots/ (git-ignored)."""

from __future__ import annotations

import datetime as dt
import os
import shutil
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlparse

import pytest
from django.conf import settings as django_settings
from django.utils import timezone

from ledger.demo import demo_data_load
from ledger.models import Agent, Quota
from ledger.periods import month_bounds, window_bounds
from ledger.services import reference_data_load
from optimization.models import Alert, ScalingEvent

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts" / "screenshots"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-features=Translate,OptimizationHints,MediaRouter",
]

# Playwright's sync API runs an event loop in this thread; the test's own ORM calls are still synchronous.
os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")


@pytest.fixture(scope="module")
def browser():
    if not shutil.which(CHROMIUM) and not Path(CHROMIUM).exists():
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(f"CI=true but Chromium is not installed at {CHROMIUM}")
        pytest.skip(f"needs Chromium at {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def seeded(db):
    reference_data_load()
    demo_data_load()
    agent = Agent.objects.get(pk="agent-456")
    Alert.objects.create(
        agent=agent,
        kind="budget",
        severity="warning",
        title="Budget 80% used",
        message="$0.80 of $1.00",
        dedup_key="test:budget:80",
    )
    Alert.objects.create(
        agent=agent,
        kind="budget",
        severity="critical",
        title="Budget 90% used",
        message="$0.90 of $1.00",
        dedup_key="test:budget:90",
    )
    ScalingEvent.objects.create(
        agent=agent,
        direction="up",
        kind="horizontal",
        trigger="auto",
        before=1,
        after=2,
        reason="resource_utilization_percent 92.16 > 80 (COMPUTE_MS)",
        created_at=timezone.now() - dt.timedelta(hours=2),
    )
    Agent.objects.filter(pk=agent.pk).update(instance_count=2, max_instances=5)
    return agent


@pytest.fixture
def page_for(browser, live_server, admin_user, client):
    """A page logged in as a staff user, recording console errors and any request that leaves localhost."""
    client.force_login(admin_user)
    session_cookie = client.cookies[django_settings.SESSION_COOKIE_NAME].value
    opened = []

    def make(width: int):
        context = browser.new_context(viewport={"width": width, "height": 900})
        context.add_cookies(
            [{"name": django_settings.SESSION_COOKIE_NAME, "value": session_cookie, "url": live_server.url}]
        )
        page = context.new_page()
        page.console_errors = []
        page.outside_requests = []
        page.failed_responses = []
        page.on("console", lambda msg: msg.type == "error" and page.console_errors.append(msg.text))
        page.on("response", lambda r: r.status >= 400 and page.failed_responses.append(f"{r.status} {r.url}"))
        page.on("pageerror", lambda exc: page.console_errors.append(str(exc)))

        def guard(route):
            host = urlparse(route.request.url).hostname
            if host in {"127.0.0.1", "localhost", "::1"} or route.request.url.startswith(("data:", "blob:")):
                route.continue_()
            else:
                page.outside_requests.append(route.request.url)
                route.abort()

        context.route("**/*", guard)
        opened.append(context)
        return page

    yield make
    for context in opened:
        context.close()


def _expected_percents(agent: Agent) -> dict[str, str]:
    start, _ = month_bounds(timezone.now())
    return {
        quota.resource_type_id: f"{quota.utilization_percent}"
        for quota in Quota.objects.filter(agent=agent, period_start=start)
    }


def test_resource_monitor_shows_gauges_chart_and_acts(seeded, page_for, live_server):
    page = page_for(1280)
    page.goto(f"{live_server.url}/dashboard/resources/?agent={seeded.pk}")
    page.wait_for_selector("figure.gauge")

    # Gauges: one per resource type, with the percentages of the ledger.
    expected = _expected_percents(seeded)
    shown = {
        figure.get_attribute("data-resource"): figure.get_attribute("data-percent")
        for figure in page.query_selector_all("figure.gauge")
    }
    assert shown == expected
    compute = page.query_selector('figure.gauge[data-resource="COMPUTE_MS"]')
    assert f"{expected['COMPUTE_MS']}%" in compute.inner_text()
    assert "Critical" in compute.inner_text()  # 92% is past the critical threshold, said in words too

    # The cost chart: five resource series, the budget line and the forecast, each drawn.
    series = page.query_selector_all("svg.chart [data-series]")
    assert sorted(s.get_attribute("data-series") for s in series) == sorted(
        ["COMPUTE_MS", "AI_TOKENS", "STORAGE_KB", "NETWORK_REQS", "SOLANA_LAMPORTS", "budget", "forecast"]
    )
    # The areas run from the period's first day to today, the budget line across the whole period.
    area = page.query_selector('svg.chart path[data-series="COMPUTE_MS"]').bounding_box()
    budget = page.query_selector('svg.chart [data-series="budget"]').bounding_box()
    start, end = month_bounds(timezone.now())
    elapsed = (timezone.now().date() - start.date()).days / ((end - start).days - 1)
    assert area["width"] == pytest.approx(budget["width"] * elapsed, abs=2)
    assert budget["width"] > 300 and area["height"] > 1

    # Acknowledging an alert removes it from the panel.
    alert = Alert.objects.get(dedup_key="test:budget:80")
    page.click(f'li[data-alert="{alert.pk}"] button[data-action="acknowledge"]')
    page.wait_for_selector(f'li[data-alert="{alert.pk}"]', state="detached")
    alert.refresh_from_db()
    assert alert.acknowledged_at is not None
    assert page.query_selector(f'li[data-alert="{Alert.objects.get(dedup_key="test:budget:90").pk}"]')

    # A manual scale-up shows a new scaling event.
    rows_before = len(page.query_selector_all('[data-panel="scaling"] tbody tr'))
    page.click('button[data-action="scale"][aria-label^="Scale up"]')
    page.wait_for_function(
        f"document.querySelectorAll('[data-panel=\"scaling\"] tbody tr').length > {rows_before}"
    )
    assert "manual" in page.inner_text('[data-panel="scaling"] tbody tr:first-child')
    assert Agent.objects.get(pk=seeded.pk).instance_count == 3

    assert page.console_errors == []
    assert page.outside_requests == []


def test_resource_monitor_shows_each_budget_remaining_and_flags_a_refusing_one(seeded, page_for, live_server):
    from ledger import budgets
    from ledger.models import Budget
    from tests.factories import TeamFactory

    TeamFactory(id="team-search")
    budgets.agent_team_set(agent=seeded, team_id="team-search")
    team_week = budgets.budget_create(scope="team", scope_id="team-search", window="week", limit_usd="5")
    Budget.objects.filter(pk=team_week.pk).update(spent_usd=Decimal("1.25"), reserved_usd=Decimal("0.5"))
    empty = budgets.budget_create(scope="agent", scope_id=seeded.pk, window="day", limit_usd="0")
    run = budgets.run_create(agent=seeded, run_id="loop-7", limit_usd="0.004")

    page = page_for(1280)
    page.goto(f"{live_server.url}/dashboard/resources/?agent={seeded.pk}")
    page.wait_for_selector('[data-panel="budgets"] tr[data-budget]')

    def row(budget: Budget):
        return page.query_selector(f'[data-panel="budgets"] tr[data-budget="{budget.pk}"]')

    team_row = row(team_week)
    assert team_row.query_selector(".remaining").inner_text() == "$3.25"
    assert "team team-search" in team_row.inner_text() and "$5.00" in team_row.inner_text()
    _, week_end = window_bounds("week", timezone.now())
    assert f"{week_end:%Y-%m-%d %H:%M} UTC" in team_row.inner_text()
    assert "refusing" not in (team_row.get_attribute("class") or "")
    # A run's window is its life: its end is the run's, and amounts below a cent are not rounded away.
    assert row(run).query_selector(".remaining").inner_text() == "$0.004"
    assert f"run ends {run.expires_at:%Y-%m-%d %H:%M} UTC" in row(run).inner_text()
    # A hard budget with nothing left is flagged in words and in colour.
    assert "refusing" in row(empty).get_attribute("class")
    assert "Refusing calls" in row(empty).inner_text()
    # The agent's monthly budget (the demo gives it one) is listed too, as the monthly budget.
    managed = Budget.objects.get(agent=seeded, managed=True)
    assert "(monthly budget)" in row(managed).inner_text()
    assert page.console_errors == []
    assert page.outside_requests == []


# Every piece of text on the page, with its rendered size: CSS font size for HTML, the drawn height of SVG
# text (a scaled drawing shrinks its labels without changing their CSS size).
TEXT_SIZES = """() => {
  const found = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  while (walker.nextNode()) {
    const text = walker.currentNode.textContent.trim();
    const el = walker.currentNode.parentElement;
    if (!text || !el || el.closest('.sr-only, [hidden], title, script, style, datalist')) continue;
    const box = el.getBoundingClientRect();
    if (!box.width || !box.height) continue;
    // An SVG label's drawn box is about its font size tall; an HTML element's font size is computed.
    const size = el.closest('svg') ? box.height : parseFloat(getComputedStyle(el).fontSize);
    found.push({text: text.slice(0, 40), size: size});
  }
  return found;
}"""

# Table cells cut off by their card (a card scrolls sideways rather than widening the page).
CLIPPED_CELLS = """() => Array.from(document.querySelectorAll('td, th')).filter(cell => {
  if (cell.closest('thead') && getComputedStyle(cell.closest('thead')).position === 'absolute') return false;
  const card = cell.closest('.card').getBoundingClientRect(), box = cell.getBoundingClientRect();
  if (!box.width && !box.height) return false;  // not displayed at this width
  return box.right > card.right + 1 || box.left < card.left - 1;
}).map(cell => cell.textContent.trim().slice(0, 30))"""


def _assert_readable(page, width: int) -> None:
    # Nothing wider than the viewport: readable without sideways scrolling of the page.
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    small = [item for item in page.evaluate(TEXT_SIZES) if item["size"] < 11.5]
    assert small == [], small
    assert page.evaluate(CLIPPED_CELLS) == []
    # Every control has an accessible name.
    unnamed = page.evaluate(
        """Array.from(document.querySelectorAll('button, input:not([type=hidden]), select')).filter(el =>
            !(el.getAttribute('aria-label') || el.textContent.trim() || (el.id && document.querySelector(
            'label[for="' + el.id + '"]')))).length"""
    )
    assert unnamed == 0


@pytest.mark.parametrize("width", [1280, 390])
def test_pages_render_at_desktop_and_phone_widths(seeded, page_for, live_server, width):
    from optimization.rollups import floor_day
    from optimization.services.alerts import budget_sweep
    from optimization.services.rollups import usage_rollups_backfill

    budget_sweep()
    now = timezone.now()
    usage_rollups_backfill(since=month_bounds(now)[0], until=floor_day(now) + dt.timedelta(days=1))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = page_for(width)
    page.goto(f"{live_server.url}/dashboard/")
    page.wait_for_selector('[data-panel="nearest"] table')
    bars = page.query_selector_all('[data-panel="spend"] svg.bars rect[data-day]')
    assert len(bars) == (now.date() - month_bounds(now)[0].date()).days + 1
    assert max(bar.bounding_box()["height"] for bar in bars) > 50
    assert page.inner_text('[data-figure="forecast"]').startswith("$")
    # The tier table keeps its Total column on a phone: each row's total is on screen.
    totals = page.query_selector_all('[data-panel="tiers"] td[data-label="Total"]')
    assert len(totals) == 4 and all(cell.is_visible() for cell in totals)
    assert all(cell.bounding_box()["x"] + cell.bounding_box()["width"] <= width for cell in totals)
    page.screenshot(path=str(ARTIFACTS / f"fleet-{width}.png"), full_page=True)
    _assert_readable(page, width)

    page.click(f'[data-panel="nearest"] a[href$="agent={seeded.pk}"]')
    page.wait_for_selector("figure.gauge")
    # The forecast against the budget is the first thing under the heading, in words and colour.
    outlook = page.query_selector("#outlook")
    assert outlook.get_attribute("data-level") == "critical"
    assert "runs out on" in outlook.inner_text() and "Over budget" in outlook.inner_text()
    assert outlook.bounding_box()["y"] < page.query_selector("#h-gauges").bounding_box()["y"]
    background = page.evaluate("getComputedStyle(document.getElementById('outlook')).backgroundColor")
    assert background == "rgb(253, 238, 238)"
    page.wait_for_selector('[data-panel="range"] table')
    # Spend per day: a row per day of the period so far, and the link to those days' usage as CSV.
    days = (timezone.now().date() - month_bounds(timezone.now())[0].date()).days + 1
    assert len(page.query_selector_all('[data-panel="range"] tbody tr')) == days
    csv = page.get_attribute("a.csv", "href")
    assert csv.startswith("/dashboard/resources/usage.csv?agent=agent-456&since=")
    if width < 600:  # on a phone the resource types fold into one line per day
        assert not page.query_selector('[data-panel="range"] td.per-type').is_visible()
        assert page.query_selector('[data-panel="range"] td.by-type').is_visible()
    page.screenshot(path=str(ARTIFACTS / f"resources-{width}.png"), full_page=True)
    _assert_readable(page, width)
    # The cost chart's labels are drawn at least 12 px tall whatever the width.
    heights = [label.bounding_box()["height"] for label in page.query_selector_all("svg.chart text.axis")]
    assert heights and min(heights) >= 12
    # Every y-axis label has the same form: "$" and a number with the same decimals.
    labels = [
        label.text_content() for label in page.query_selector_all("svg.chart text.axis[text-anchor=end]")
    ]
    assert (
        len({len(label.split(".")[-1]) if "." in label else 0 for label in labels if label.startswith("$")})
        == 1
    )

    assert page.console_errors == []
    assert page.outside_requests == []
    assert page.failed_responses == []


def test_unknown_agent_page_and_the_agent_picker(seeded, page_for, live_server):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = page_for(390)
    response = page.goto(f"{live_server.url}/dashboard/resources/?agent=agent-4")
    assert response.status == 404
    assert "No agent “agent-4”" in page.inner_text("h1")
    page.screenshot(path=str(ARTIFACTS / "not-found-390.png"), full_page=True)
    _assert_readable(page, 390)
    # The picker suggests matching ids as they are typed, and opens the one chosen.
    page.fill("#agent-picker", "agent-4")
    page.wait_for_function("document.querySelectorAll('#agent-options option').length > 0")
    assert page.eval_on_selector_all("#agent-options option", "o => o.map(x => x.value)") == ["agent-456"]
    page.fill("#agent-picker", "agent-456")
    page.press("#agent-picker", "Enter")
    page.wait_for_selector("figure.gauge")
    assert page.url.endswith("agent=agent-456")
    # Only the page asked for on purpose answered 404; nothing else failed (the favicon is served).
    assert [entry for entry in page.failed_responses if "agent-4" not in entry] == []
    assert page.console_errors in ([], [page.console_errors[0]]) and all(
        "404" in error for error in page.console_errors
    )
    assert page.outside_requests == []

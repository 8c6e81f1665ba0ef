"""Organizations, teams and dollar budgets: the rules for creating and changing them, and their figures.

A budget belongs to one scope (an organization, a team, an agent, or one run of an agent) and limits what
that scope may spend in a window: a UTC day, a week from Monday 00:00 UTC, a calendar month, or a run's
whole life (``total``). Every allocation, hold, execution, batch item and purchase is charged to every
budget that applies, inside the statement that takes the quota (``allocation.sql.grid_budgets_apply``):
a hard budget refuses what does not fit, a soft one only alerts.

Lock order, for everyone who writes budgets: an allocation's row, then budget rows by ascending id, then
quota rows, several of them by agent and then id (``ledger.models.QUOTA_LOCK_ORDER``). ``grid_budgets_apply``
takes the budget rows in that order; nothing here locks quota rows.

An agent's ``monthly_budget_usd`` is a hard agent/month budget marked ``managed``: a database trigger
(``MANAGED_BUDGET_TRIGGER_SQL``) creates, changes and deletes it with the agent's field, whatever writes
the agent (API, admin, a script).
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from django.db import IntegrityError, transaction
from django.db.models import Q, Sum
from django.utils import timezone

from ledger.errors import BudgetExceeded, Conflict, LedgerError, NotFound, RunEnded, RunNotFound
from ledger.invariants import budget_carry, budget_room
from ledger.models import (
    DEFAULT_BUDGET_THRESHOLDS,
    Agent,
    Budget,
    Organization,
    Quota,
    Team,
    UsageLog,
    agent_id_validator,
)
from ledger.periods import window_bounds

logger = logging.getLogger(__name__)

RESOLVE_TASK = "optimization.budgets_resolve"
THRESHOLD_MIN, THRESHOLD_MAX = 1, 1000
MAX_LIMIT_USD = Decimal("100000000000000")  # 10^14: more than any budget, within the column
MAX_RUN_ID_LENGTH = 200
DEFAULT_RUN_TTL_SECONDS = 86400
MAX_RUN_TTL_SECONDS = 90 * 86400
EDITABLE_FIELDS = ("limit_usd", "mode", "rollover_percent", "thresholds")

MANAGED_BUDGET_TRIGGER_SQL = """
CREATE OR REPLACE FUNCTION grid_agent_monthly_budget() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    w record;
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.monthly_budget_usd IS NOT DISTINCT FROM OLD.monthly_budget_usd THEN
        RETURN NULL;
    END IF;
    IF NEW.monthly_budget_usd IS NULL THEN
        DELETE FROM ledger_budget WHERE agent_id = NEW.id AND managed;
        RETURN NULL;
    END IF;
    UPDATE ledger_budget SET limit_usd = NEW.monthly_budget_usd, updated_at = now()
    WHERE agent_id = NEW.id AND managed;
    IF NOT FOUND THEN
        -- A new budget starts with what the agent has already spent this month (its quota rows' cache).
        w := grid_budget_window('month', now());
        INSERT INTO ledger_budget
            (scope, agent_id, run_id, budget_window, limit_usd, mode, rollover_percent, thresholds, managed,
             window_start, window_end, spent_usd, reserved_usd, rollover_usd, created_at, updated_at)
        VALUES
            ('agent', NEW.id, '', 'month', NEW.monthly_budget_usd, 'hard', 0, '[50, 80, 90, 100]', true,
             w.window_start, w.window_end,
             (SELECT coalesce(sum(spent_usd), 0) FROM quotas
              WHERE agent_id = NEW.id AND period_start = w.window_start),
             0, 0, now(), now());
    END IF;
    RETURN NULL;
END
$fn$;

DROP TRIGGER IF EXISTS agent_monthly_budget ON ledger_agent;
CREATE TRIGGER agent_monthly_budget
AFTER INSERT OR UPDATE OF monthly_budget_usd ON ledger_agent
FOR EACH ROW EXECUTE FUNCTION grid_agent_monthly_budget();
"""
MANAGED_BUDGET_TRIGGER_DROP_SQL = """
DROP TRIGGER IF EXISTS agent_monthly_budget ON ledger_agent;
DROP FUNCTION IF EXISTS grid_agent_monthly_budget();
"""


# --- Organizations and teams ------------------------------------------------------------------------------


def _id_validate(value: object, *, field: str) -> str:
    if not isinstance(value, str):
        raise LedgerError(f"{field} must be a string", code="invalid_id")
    try:
        agent_id_validator(value)
    except Exception:
        raise LedgerError(
            f"{field} is 1-64 letters, digits, '-', '_', '.' or ':', starting with a letter or digit",
            code="invalid_id",
        ) from None
    return value


def organization_create(*, id: str, name: str = "") -> Organization:
    _id_validate(id, field="id")
    try:
        with transaction.atomic():
            return Organization.objects.create(id=id, name=name)
    except IntegrityError:
        raise Conflict(f"organization {id!r} exists", code="already_exists") from None


def team_create(*, id: str, name: str = "", organization_id: str | None = None) -> Team:
    _id_validate(id, field="id")
    organization = None
    if organization_id is not None:
        organization = Organization.objects.filter(pk=organization_id).first()
        if organization is None:
            raise NotFound(f"organization {organization_id!r} not found", code="organization_not_found")
    try:
        with transaction.atomic():
            return Team.objects.create(id=id, name=name, organization=organization)
    except IntegrityError:
        raise Conflict(f"team {id!r} exists", code="already_exists") from None


def agent_team_set(*, agent: Agent, team_id: str | None) -> Agent:
    """Put the agent in ``team_id`` (None: in no team). Its calls are charged to the new team's and
    organization's budgets from the next one; what it spent stays where it was charged."""
    team = None
    if team_id is not None:
        team = Team.objects.filter(pk=team_id).first()
        if team is None:
            raise NotFound(f"team {team_id!r} not found", code="team_not_found")
    Agent.objects.filter(pk=agent.pk).update(team=team, updated_at=timezone.now())
    agent.team = team
    return agent


# --- Budgets ----------------------------------------------------------------------------------------------


def limit_validate(value: object, *, field: str = "limit_usd") -> Decimal:
    try:
        amount = value if isinstance(value, Decimal) else Decimal(str(value))
    except (InvalidOperation, ValueError):
        raise LedgerError(f"{field} must be a decimal number of dollars", code="invalid_limit") from None
    if (
        isinstance(value, bool)
        or not amount.is_finite()
        or amount < 0
        or amount > MAX_LIMIT_USD
        or amount.normalize().as_tuple().exponent < -6
    ):
        raise LedgerError(
            f"{field} must be from 0 to {MAX_LIMIT_USD:,} dollars, with at most 6 decimal places",
            code="invalid_limit",
        )
    return amount


def thresholds_validate(value: object) -> list[int]:
    """Whole percentages from 1 to 1000, returned sorted without repeats; [] opts out of alerts."""
    if not isinstance(value, list) or not all(
        isinstance(item, int) and not isinstance(item, bool) and THRESHOLD_MIN <= item <= THRESHOLD_MAX
        for item in value
    ):
        raise LedgerError(
            f"thresholds are whole percentages from {THRESHOLD_MIN} to {THRESHOLD_MAX}",
            code="invalid_thresholds",
        )
    return sorted(set(value))


def _choice(value: object, choices, *, field: str, code: str) -> str:
    if value not in choices.values:
        raise LedgerError(f"{field} must be one of {', '.join(choices.values)}", code=code)
    return value


def _rollover_validate(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 100:
        raise LedgerError("rollover_percent is a whole number from 0 to 100", code="invalid_rollover")
    return value


def _scope_target(scope: str, scope_id: object) -> dict:
    if not isinstance(scope_id, str) or not scope_id:
        raise LedgerError("scope_id names the organization, team or agent", code="invalid_scope")
    model = {Budget.Scope.ORGANIZATION: Organization, Budget.Scope.TEAM: Team, Budget.Scope.AGENT: Agent}[
        scope
    ]
    target = model.objects.filter(pk=scope_id).first()
    if target is None:
        raise NotFound(f"{scope} {scope_id!r} not found", code=f"{scope}_not_found")
    return {scope: target}


def _spent_so_far(scope: str, target, window: str, start: dt.datetime) -> Decimal:
    """What the scope has spent since ``start``: a budget created mid-window starts from it. A month is
    read from the quota rows' cache of each period's spend; a day or a week from the usage log."""
    members = {
        Budget.Scope.AGENT: Q(agent=target),
        Budget.Scope.TEAM: Q(agent__team=target),
        Budget.Scope.ORGANIZATION: Q(agent__team__organization=target),
    }[scope]
    if window == Budget.Window.MONTH:
        rows = Quota.objects.filter(members, period_start=start)
    else:
        rows = UsageLog.objects.filter(members, created_at__gte=start)
    return rows.aggregate(total=Sum("spent_usd" if window == Budget.Window.MONTH else "cost_usd"))[
        "total"
    ] or Decimal(0)


def budget_create(
    *,
    scope: object,
    scope_id: object,
    window: object,
    limit_usd: object,
    mode: object = Budget.Mode.HARD,
    rollover_percent: object = 0,
    thresholds: object = None,
    now: dt.datetime | None = None,
) -> Budget:
    """A budget of an organization, a team or an agent (runs: ``run_create``), counting what the scope
    has already spent in the current window."""
    now = now or timezone.now()
    scope = _choice(scope, Budget.Scope, field="scope", code="invalid_scope")
    if scope == Budget.Scope.RUN:
        raise LedgerError("a run's budget is created with POST /agents/{id}/runs", code="invalid_scope")
    window = _choice(window, Budget.Window, field="window", code="invalid_window")
    if window == Budget.Window.TOTAL:
        raise LedgerError("a total window is a run's: use day, week or month", code="invalid_window")
    fields = {
        "limit_usd": limit_validate(limit_usd),
        "mode": _choice(mode, Budget.Mode, field="mode", code="invalid_mode"),
        "rollover_percent": _rollover_validate(rollover_percent),
        "thresholds": list(DEFAULT_BUDGET_THRESHOLDS)
        if thresholds is None
        else thresholds_validate(thresholds),
    }
    target = _scope_target(scope, scope_id)
    start, end = window_bounds(window, now)
    spent = _spent_so_far(scope, target[scope], window, start)
    return Budget.objects.create(
        scope=scope, window=window, window_start=start, window_end=end, spent_usd=spent, **target, **fields
    )


def run_create(
    *,
    agent: Agent,
    run_id: object,
    limit_usd: object,
    ttl_seconds: object = None,
    now: dt.datetime | None = None,
) -> Budget:
    """A budget for one run of the agent: ``limit_usd`` for the run's whole life, which ends after
    ``ttl_seconds`` (a day unless asked). Calls that name the run are charged to it; after it ends they are
    refused (``run_ended``)."""
    now = now or timezone.now()
    if not isinstance(run_id, str) or not run_id.strip() or len(run_id) > MAX_RUN_ID_LENGTH:
        raise LedgerError(f"run_id is 1-{MAX_RUN_ID_LENGTH} characters", code="invalid_run_id")
    if ttl_seconds is None:
        ttl_seconds = DEFAULT_RUN_TTL_SECONDS
    if (
        not isinstance(ttl_seconds, int)
        or isinstance(ttl_seconds, bool)
        or not 1 <= ttl_seconds <= MAX_RUN_TTL_SECONDS
    ):
        raise LedgerError(f"ttl_seconds must be from 1 to {MAX_RUN_TTL_SECONDS}", code="invalid_ttl")
    limit = limit_validate(limit_usd)
    try:
        with transaction.atomic():
            return Budget.objects.create(
                scope=Budget.Scope.RUN,
                agent=agent,
                run_id=run_id,
                window=Budget.Window.TOTAL,
                limit_usd=limit,
                window_start=now,
                window_end=None,
                expires_at=now + dt.timedelta(seconds=ttl_seconds),
            )
    except IntegrityError:
        raise Conflict(f"agent {agent.pk} already has a run {run_id!r}", code="already_exists") from None


def budget_update(*, budget: Budget, changes: dict, now: dt.datetime | None = None) -> Budget:
    """Change a budget's limit, mode, rollover or thresholds (its scope and window are what it is). A
    managed budget's limit is the agent's ``monthly_budget_usd``: it is changed there."""
    unknown = sorted(set(changes) - set(EDITABLE_FIELDS))
    if unknown:
        raise LedgerError(
            f"{', '.join(unknown)} cannot be changed; {', '.join(EDITABLE_FIELDS)} can",
            code="immutable_field",
        )
    values: dict = {}
    if "limit_usd" in changes:
        if budget.managed:
            raise Conflict(
                "this is the agent's monthly budget: change its monthly_budget_usd", code="managed_budget"
            )
        values["limit_usd"] = limit_validate(changes["limit_usd"])
    if "mode" in changes:
        values["mode"] = _choice(changes["mode"], Budget.Mode, field="mode", code="invalid_mode")
    if "rollover_percent" in changes:
        values["rollover_percent"] = _rollover_validate(changes["rollover_percent"])
    if "thresholds" in changes:
        values["thresholds"] = thresholds_validate(changes["thresholds"])
    if values:
        Budget.objects.filter(pk=budget.pk).update(updated_at=now or timezone.now(), **values)
        budget.refresh_from_db()
        if budget.refused_at is not None:
            # A budget that refused calls may have room now: say so without waiting for the next sweep.
            pk = budget.pk
            transaction.on_commit(lambda: _resolve_enqueue(pk))
    return budget


def _resolve_enqueue(budget_id: int) -> None:
    """Ask a worker to send the budget's ``budget_resolved`` alert if it has room again (the task lives in
    the optimization app, so it is named, not imported). A broker that is down loses nothing: the budget
    sweep does the same every minute."""
    from celery import current_app

    try:
        current_app.send_task(RESOLVE_TASK, args=[[budget_id]])
    except Exception:  # any broker error; the sweep is the safety net
        logger.warning("could not enqueue %s; the budget sweep will do it", RESOLVE_TASK, exc_info=True)


def budget_delete(*, budget: Budget) -> None:
    if budget.managed:
        raise Conflict(
            "this is the agent's monthly budget: set its monthly_budget_usd to null", code="managed_budget"
        )
    budget.delete()


def budget_mark_refused(*, budget_id: int, now: dt.datetime | None = None) -> None:
    """Remember that a hard budget refused a call, so the sweep can say when it has room again. Written
    once per episode (not per refusal): the refusals themselves change nothing."""
    Budget.objects.filter(pk=budget_id, refused_at=None).update(refused_at=now or timezone.now())


# --- Reading ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BudgetFigures:
    """A budget's current window as a reader sees it at ``now``: rolled, if its window has ended since
    the budget was last charged."""

    window_start: dt.datetime
    window_end: dt.datetime | None
    spent_usd: Decimal
    reserved_usd: Decimal
    rollover_usd: Decimal
    remaining_usd: Decimal


def budget_figures(budget: Budget, *, now: dt.datetime | None = None) -> BudgetFigures:
    now = now or timezone.now()
    start, end, spent, rollover = (
        budget.window_start,
        budget.window_end,
        budget.spent_usd,
        budget.rollover_usd,
    )
    if end is not None and now >= end:
        new_start, new_end = window_bounds(budget.window, now)
        unused = (
            budget_room(limit=budget.limit_usd, rollover=rollover, spent=spent, reserved=budget.reserved_usd)
            if end == new_start
            else budget.limit_usd - budget.reserved_usd
        )
        rollover = budget_carry(
            limit=budget.limit_usd, rollover_percent=budget.rollover_percent, unused=unused
        )
        start, end, spent = new_start, new_end, Decimal(0)
    remaining = budget_room(
        limit=budget.limit_usd, rollover=rollover, spent=spent, reserved=budget.reserved_usd
    )
    return BudgetFigures(start, end, spent, budget.reserved_usd, rollover, remaining)


def budgets_applying(*, agent: Agent, now: dt.datetime | None = None) -> list[Budget]:
    """Every budget that applies to the agent's calls now: its own, its team's, its organization's, and
    its runs that have not ended (those apply to the calls that name them)."""
    now = now or timezone.now()
    team_id = agent.team_id
    organization_id = (
        Team.objects.filter(pk=team_id).values_list("organization_id", flat=True).first() if team_id else None
    )
    scopes = Q(scope=Budget.Scope.AGENT, agent=agent) | Q(
        scope=Budget.Scope.RUN, agent=agent, expires_at__gt=now
    )
    if team_id:
        scopes |= Q(scope=Budget.Scope.TEAM, team_id=team_id)
    if organization_id:
        scopes |= Q(scope=Budget.Scope.ORGANIZATION, organization_id=organization_id)
    return list(Budget.objects.filter(scopes).order_by("id"))


def budget_refusal(
    *, agent: Agent, cost: Decimal, run_id: str = "", now: dt.datetime | None = None
) -> LedgerError | None:
    """The refusal a call by the agent costing ``cost`` (and naming ``run_id``) would get from its budgets
    now, or None: what ``quota-checks`` answers, read without locking anything."""
    now = now or timezone.now()
    budgets = budgets_applying(agent=agent, now=now)
    if run_id:
        run = Budget.objects.filter(scope=Budget.Scope.RUN, agent=agent, run_id=run_id).first()
        if run is None:
            return RunNotFound(run_id)
        if run.expires_at <= now:
            return RunEnded(run_id)
    for budget in budgets:
        if budget.scope == Budget.Scope.RUN and budget.run_id != run_id:
            continue
        figures = budget_figures(budget, now=now)
        if budget.mode == Budget.Mode.HARD and cost > 0 and figures.remaining_usd < cost:
            return budget_exceeded(budget, figures, requested=cost)
    return None


def budget_exceeded(
    budget: Budget, figures: BudgetFigures, *, requested: Decimal, also_spent: Decimal = Decimal(0)
) -> BudgetExceeded:
    """The refusal ``grid_budgets_apply`` would report for ``budget`` read as ``figures`` (plus
    ``also_spent`` charged since), for a request of ``requested`` dollars."""
    return BudgetExceeded.from_detail(
        {
            "budget_id": budget.pk,
            "scope": budget.scope,
            "scope_id": budget.scope_id,
            "window": budget.window,
            "window_start": figures.window_start.isoformat(),
            "window_end": None if figures.window_end is None else figures.window_end.isoformat(),
            "limit_usd": budget.limit_usd,
            "rollover_usd": figures.rollover_usd,
            "spent_usd": figures.spent_usd + also_spent,
            "reserved_usd": figures.reserved_usd,
            "requested_usd": requested,
        }
    )

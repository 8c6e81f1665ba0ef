"""The grid's core rules, each stated once: every module that needs one imports it from here.

- **Capacity**: a quota has room for ``n`` more units when ``used + reserved + listed + n <= limit``
  (``listed`` is what the agent set aside for sale in the marketplace). The same rule is given here in the
  three forms callers need: SQL text for statements that take quota (``quota_fits_sql``), an ORM condition
  for conditional UPDATEs (``quota_fits``) and plain Python (``quota_available``). The CHECK constraint on
  ``quotas`` is ``quota_fits(0)``.
- **Amounts**: a resource amount is a whole number from 1 (0 where a settle may use nothing) to 2^53, the
  largest integer every JSON client represents exactly (``amount_validate``).
- **Who may allocate**: only an ``active`` agent (``agent_ensure_may_allocate``, ``AGENT_MAY_ALLOCATE_SQL``).
- **Holds**: live 1 second to 7 days, 15 minutes unless asked (``hold_expires_at``).
- **Budgets**: a hard budget has room for a cost ``c`` when ``spent + reserved + c <= limit + rollover``
  (``budget_room_sql``, ``budget_room``); a window that opens carries over the previous window's unused
  part, at most ``rollover_percent`` of the limit (``BUDGET_CARRY_SQL``, ``budget_carry``).

Opening a quota period lives in ``ledger.services.quotas_open`` and money rounding in ``ledger.money``;
``tests/test_single_home.py`` fails if another module states any of these again.
"""

from __future__ import annotations

import datetime as dt
from decimal import ROUND_HALF_UP, Decimal

from django.db.models import F, Q

from ledger.errors import AgentSuspended, AgentThrottled, LedgerError

# --- Amounts ----------------------------------------------------------------------------------------------

MAX_AMOUNT = 2**53


def amount_validate(amount: object, *, allow_zero: bool = False, field: str = "amount") -> int:
    """``amount`` if it is a whole number of units within bounds, else ``LedgerError(invalid_amount)``."""
    lowest = 0 if allow_zero else 1
    if not isinstance(amount, int) or isinstance(amount, bool):
        raise LedgerError(f"{field} must be a whole number of units", code="invalid_amount")
    if not lowest <= amount <= MAX_AMOUNT:
        raise LedgerError(
            f"{field} must be between {lowest} and 2^53", code="invalid_amount", details={field: amount}
        )
    return amount


def amount_is_valid(amount: object, *, allow_zero: bool = False) -> bool:
    """``amount_validate`` as a yes/no, for code that reports bad items instead of raising."""
    try:
        amount_validate(amount, allow_zero=allow_zero)
    except LedgerError:
        return False
    return True


# --- Capacity ---------------------------------------------------------------------------------------------

# Column names as PostgreSQL has them (``Quota.limit`` is stored as ``limit_amount``).
QUOTA_AVAILABLE_SQL = "(limit_amount - used - reserved - listed)"


def quota_fits_sql(amount: str) -> str:
    """SQL that is true when a ``quotas`` row has room for ``amount`` (an SQL expression or parameter)."""
    return f"{QUOTA_AVAILABLE_SQL} >= {amount}"


def quota_fits(amount: int | F = 0) -> Q:
    """The ORM condition that a quota row has room for ``amount`` more units (negative: fewer)."""
    return Q(limit__gte=F("used") + F("reserved") + F("listed") + amount)


def quota_available(*, limit: int, used: int, reserved: int, listed: int) -> int:
    """Units a quota can still give (negative when a limit was cut below what is taken)."""
    return limit - used - reserved - listed


# --- Who may allocate -------------------------------------------------------------------------------------

AGENT_MAY_ALLOCATE_SQL = "status = 'active'"
RULE_THROTTLE_PREFIX = "rule:"  # the status reason of a throttle a rule set: "rule:<name>"


def agent_refusal(*, agent_id: str, status: str, reason: str) -> LedgerError | None:
    """The error an allocation by an agent in ``status`` gets, or None if it may allocate."""
    if status == "active":
        return None
    if status == "suspended":
        return AgentSuspended(f"agent {agent_id} is suspended", details={"reason": reason})
    details = {"reason": reason}
    if reason.startswith(RULE_THROTTLE_PREFIX):
        # Lifted by the rule's evaluation once its condition no longer holds: no fixed end.
        details["rule"] = reason.removeprefix(RULE_THROTTLE_PREFIX)
    why = f" by rule {details['rule']}" if "rule" in details else (f" ({reason})" if reason else "")
    return AgentThrottled(
        f"agent {agent_id} is throttled{why}: allocations are refused until it is lifted", details=details
    )


def agent_ensure_may_allocate(*, agent_id: str, status: str, reason: str) -> None:
    error = agent_refusal(agent_id=agent_id, status=status, reason=reason)
    if error is not None:
        raise error


# --- Holds ------------------------------------------------------------------------------------------------

DEFAULT_HOLD_TTL = dt.timedelta(minutes=15)
MIN_HOLD_TTL_SECONDS = 1
MAX_HOLD_TTL_SECONDS = 7 * 86400


def hold_expires_at(*, now: dt.datetime, ttl_seconds: int | None) -> dt.datetime:
    """When a hold taken at ``now`` for ``ttl_seconds`` (None: the default) expires."""
    if ttl_seconds is None:
        return now + DEFAULT_HOLD_TTL
    if (
        not isinstance(ttl_seconds, int)
        or isinstance(ttl_seconds, bool)
        or not MIN_HOLD_TTL_SECONDS <= ttl_seconds <= MAX_HOLD_TTL_SECONDS
    ):
        raise LedgerError(
            f"hold_ttl_seconds must be between {MIN_HOLD_TTL_SECONDS} and {MAX_HOLD_TTL_SECONDS}",
            code="invalid_hold_ttl",
        )
    return now + dt.timedelta(seconds=ttl_seconds)


# --- Budgets ----------------------------------------------------------------------------------------------


def budget_room_sql(row: str = "") -> str:
    """SQL for the dollars a ``ledger_budget`` row (or PL/pgSQL record ``row``) can still take this window."""
    p = f"{row}." if row else ""
    return f"({p}limit_usd + {p}rollover_usd - {p}spent_usd - {p}reserved_usd)"


def budget_room(*, limit: Decimal, rollover: Decimal, spent: Decimal, reserved: Decimal) -> Decimal:
    """Dollars a budget can still take this window (negative when its limit was cut below what is taken)."""
    return limit + rollover - spent - reserved


# SQL for the rollover a window opens with, from the previous window's figures: ``unused`` is what that
# window left (its limit plus its own rollover, less spent and reserved; a window nobody charged left its
# whole limit less what is still reserved). Parameters: limit, rollover_percent, unused.
BUDGET_CARRY_SQL = "LEAST(GREATEST({unused}, 0), round({limit} * {percent} / 100, 6))"


def budget_carry(*, limit: Decimal, rollover_percent: int, unused: Decimal) -> Decimal:
    """``BUDGET_CARRY_SQL`` in Python."""
    cap = (limit * rollover_percent / 100).quantize(Decimal("0.000001"), rounding=ROUND_HALF_UP)
    return min(max(unused, Decimal(0)), cap)

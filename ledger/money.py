"""Money arithmetic: Decimal only, with the ledger's precision."""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal

COST_QUANTUM = Decimal("0.000000000001")  # 12 decimal places, the precision of usage_logs.cost_usd
CENT = Decimal("0.01")


def usage_cost(amount: int, unit_price_usd: Decimal) -> Decimal:
    """The USD cost of ``amount`` units at ``unit_price_usd``, exact to the ledger's 12 decimal places."""
    return (Decimal(amount) * unit_price_usd).quantize(COST_QUANTUM, rounding=ROUND_HALF_EVEN)


def percent(part: Decimal | int, whole: Decimal | int | None) -> Decimal | None:
    """``part`` as a percentage of ``whole`` to two places; None when there is no whole to compare with."""
    if not whole:
        return None
    return (Decimal(part) * 100 / Decimal(whole)).quantize(CENT, rounding=ROUND_HALF_EVEN)

"""Money arithmetic: Decimal only, with the ledger's precision. The one home of money rounding."""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal

COST_QUANTUM = Decimal("0.000000000001")  # 12 decimal places, the precision of usage_logs.cost_usd
CENT = Decimal("0.01")


def usage_cost(amount: int, unit_price_usd: Decimal) -> Decimal:
    """The USD cost of ``amount`` units at ``unit_price_usd``, exact to the ledger's 12 decimal places."""
    return money_round(Decimal(amount) * unit_price_usd)


def percent(part: Decimal | int, whole: Decimal | int | None) -> Decimal | None:
    """``part`` as a percentage of ``whole`` to two places; None when there is no whole to compare with."""
    if not whole:
        return None
    return cents(Decimal(part) * 100 / Decimal(whole))


def money_round(value: Decimal | int) -> Decimal:
    """``value`` in USD rounded to the ledger's 12 decimal places (half to even), as every cost is."""
    return Decimal(value).quantize(COST_QUANTUM, rounding=ROUND_HALF_EVEN)


def cents(value: Decimal | int) -> Decimal:
    """``value`` rounded to whole cents (half to even), for what people read: messages and charts."""
    return Decimal(value).quantize(CENT, rounding=ROUND_HALF_EVEN)


def money_text(value: Decimal) -> str:
    """Dollars exactly, as a string with at least cents and no trailing zeros beyond: "1.00", "0.000125"
    (how budgets are shown)."""
    value = Decimal(value).normalize()
    if value.as_tuple().exponent > -2:
        value = cents(value)
    return f"{value:f}"


def usd_text(value: Decimal | int | None) -> str:
    """An amount of money as people read it in the back office: "$0.00001", "$12.50", "-$3.00" (``money_text``
    with the sign before the dollar sign); "-" for none."""
    if value is None:
        return "-"
    value = Decimal(value)
    return f"{'-' if value < 0 else ''}${money_text(abs(value))}"

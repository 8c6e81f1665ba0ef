"""The marketplace: quota for sale at a unit price, from the platform or from agents with quota to spare.

**Listing** (``deal_list``): an agent sets aside unused quota of the current period for sale. The units move
into ``Quota.listed`` with a conditional UPDATE (the capacity rule of ``ledger.invariants``), so they can
no longer be allocated, until they are sold or the deal expires (within the current period; by default at
its end).

**Buying** (``deal_purchase``): one transaction takes the units from the deal with a conditional UPDATE
(open, unexpired, ``amount_left >= amount``), so no unit is ever sold twice and an ask for more than is
left is refused whole. It raises the buyer's limit for the period (a ``marketplace_purchase`` grant), takes
the units out of an agent seller's set-aside quota and limit (a negative ``marketplace_sale`` grant), and
records the cost on the buyer's ledger: a ``purchase`` usage row at the deal's price, and ``spent_usd``,
which budgets read. The seller is not paid: the grid keeps no revenue accounts. An agent cannot buy its own
deal (409 ``own_deal``).

The price is charged to the buyer's dollar budgets (its own, its team's and its organization's) in the same
transaction: a hard budget without room for it refuses the purchase with 429 ``budget_exceeded`` and
nothing is bought. Lock order, as for every writer of budgets (``ledger.budgets``): the deal's row (the
claim), then the budget rows by id, then the quota rows (in ``QUOTA_LOCK_ORDER``: by agent, then id).

**Refresh** (``marketplace_refresh``, every 15 minutes):

1. Open deals past their expiry are closed as expired; what an agent deal did not sell goes back to its
   seller (``listed -= amount_left``).
2. Restock: every resource type gets one open platform deal if it has none, of ``RESTOCK_PERCENT`` (10%) of
   the ENTERPRISE tier's monthly limit, expiring at the end of the period.
3. Reprice: an open platform deal costs the list price less a discount that follows how much of that
   resource type the fleet has used this period (sum of ``used`` over sum of ``limit`` of the current
   quotas): **30% below 50% utilization, 20% below 75%, 10% otherwise**. Idle capacity is sold cheaper.

Each step is set-based and idempotent: a second run right after the first changes nothing.

**Shortfall forecast** (``deals_for_agent``): for each resource type the agent has opened this period,
projected usage at period end = ``used`` divided by the fraction of the period elapsed (at least one hour,
so that the first minutes of a month do not extrapolate wildly); the shortfall is what that projection
exceeds ``limit - listed`` by. The deals offered are open ones of those resource types, cheaper than the
list price, from other sellers, cheapest first.

``ENABLE_MARKETPLACE_OPTIMIZATION`` switches deals and purchases on; agent-listed deals (listing them, seeing
and buying them) also need ``ENABLE_COLLABORATION_SHARING``. Expiry always runs, so set-aside quota always
comes back.
"""

from __future__ import annotations

import datetime as dt
import math
import uuid
from decimal import Decimal

from django.conf import settings
from django.db import transaction
from django.db.models import Case, DateTimeField, F, Q, QuerySet, Sum, Value, When
from django.utils import timezone

from allocation import sql
from ledger.budgets import budget_mark_refused
from ledger.bulk import bulk_update_column
from ledger.errors import (
    AgentSuspended,
    BudgetExceeded,
    Conflict,
    FeatureDisabled,
    LedgerError,
    NotFound,
    QuotaExceeded,
)
from ledger.invariants import amount_validate, quota_fits
from ledger.models import Agent, Grant, Quota, Tier, TierQuota, UsageLog
from ledger.money import money_round, percent, usage_cost
from ledger.periods import month_bounds
from ledger.reference_cache import resource_type_codes
from ledger.selectors import prices_in_effect
from ledger.services import quota_open
from optimization.models import Deal, Purchase

REFRESH_ACTOR = "marketplace"
RESTOCK_TIER = Tier.ENTERPRISE
RESTOCK_PERCENT = 10
# (fleet utilization below this percent, discount off the list price); the last entry catches the rest.
DISCOUNTS: list[tuple[Decimal | None, Decimal]] = [
    (Decimal("50"), Decimal("0.30")),
    (Decimal("75"), Decimal("0.20")),
    (None, Decimal("0.10")),
]
MIN_FORECAST_ELAPSED = dt.timedelta(hours=1)


# --- Switches and checks --------------------------------------------------------------------------------


# Deals per transaction of the expiry sweep.
DEALS_EXPIRE_BATCH = 5000


def marketplace_ensure_enabled(*, agent_deals: bool = False) -> None:
    if not settings.ENABLE_MARKETPLACE_OPTIMIZATION:
        raise FeatureDisabled("the marketplace is switched off (ENABLE_MARKETPLACE_OPTIMIZATION)")
    if agent_deals and not settings.ENABLE_COLLABORATION_SHARING:
        raise FeatureDisabled("deals between agents are switched off (ENABLE_COLLABORATION_SHARING)")


def _ensure_resource_type(resource_type_id: str) -> None:
    if resource_type_id not in resource_type_codes():
        raise LedgerError(f"unknown resource type {resource_type_id!r}", code="unknown_resource_type")


def discount_for(utilization_percent: Decimal) -> Decimal:
    """The platform's discount off the list price at this fleet utilization of a resource type."""
    for below, discount in DISCOUNTS:
        if below is None or utilization_percent < below:
            return discount
    raise AssertionError("DISCOUNTS ends with a catch-all")  # pragma: no cover


# --- Reading --------------------------------------------------------------------------------------------


def deals_open(*, resource_type_id: str | None = None, now: dt.datetime | None = None) -> QuerySet[Deal]:
    """Open, unexpired deals, cheapest first; agent deals only while sharing between agents is on."""
    marketplace_ensure_enabled()
    deals = Deal.objects.filter(status=Deal.Status.OPEN, expires_at__gt=now or timezone.now())
    if not settings.ENABLE_COLLABORATION_SHARING:
        deals = deals.filter(seller__isnull=True)
    if resource_type_id is not None:
        deals = deals.filter(resource_type_id=resource_type_id)
    return deals.order_by("unit_price_usd", "created_at", "id")


def shortfall_forecast(*, agent: Agent, now: dt.datetime | None = None) -> list[dict]:
    """Per resource type of the current period: limit, used, projected usage at period end and shortfall
    (see the module docstring for the rule). One query."""
    now = now or timezone.now()
    start, end = month_bounds(now)
    elapsed = max(now - start, MIN_FORECAST_ELAPSED)
    fraction = Decimal(elapsed.total_seconds()) / Decimal((end - start).total_seconds())
    result = []
    for quota in Quota.objects.filter(agent=agent, period_start=start).order_by(
        "resource_type__display_order"
    ):
        projected = math.ceil(Decimal(quota.used) / fraction)
        own_limit = quota.limit - quota.listed
        result.append(
            {
                "resource_type": quota.resource_type_id,
                "limit": quota.limit,
                "listed": quota.listed,
                "used": quota.used,
                "projected_usage": projected,
                "shortfall": max(projected - own_limit, 0),
            }
        )
    return result


def deals_for_agent(*, agent: Agent, now: dt.datetime | None = None, limit: int = 100) -> dict:
    """What the agent is forecast to be short of this period, and the open deals below list price for it."""
    marketplace_ensure_enabled()
    now = now or timezone.now()
    start, end = month_bounds(now)
    forecast = shortfall_forecast(agent=agent, now=now)
    short = [row["resource_type"] for row in forecast if row["shortfall"] > 0]
    prices = prices_in_effect(at=now)
    cheaper = Q()
    for code in short:
        if code in prices:
            cheaper |= Q(resource_type_id=code, unit_price_usd__lt=prices[code])
    deals: list[Deal] = []
    if cheaper:
        deals = list(
            deals_open(now=now)
            .filter(cheaper)
            .exclude(seller_id=agent.pk)
            .select_related("resource_type")[:limit]
        )
    return {
        "agent_id": agent.pk,
        "period_start": start,
        "period_end": end,
        "shortfalls": [row for row in forecast if row["shortfall"] > 0],
        "list_prices": {code: prices[code] for code in short if code in prices},
        "deals": deals,
    }


# --- Listing --------------------------------------------------------------------------------------------


def deal_list(
    *,
    agent: Agent,
    resource_type_id: str,
    amount: int,
    unit_price_usd: Decimal,
    expires_at: dt.datetime | None = None,
    now: dt.datetime | None = None,
) -> Deal:
    """Offer ``amount`` units of the agent's unused quota of this period at ``unit_price_usd``.

    The units are set aside (``listed``) at once; ``QuotaExceeded`` when fewer are unused, and nothing is
    written then.
    """
    marketplace_ensure_enabled(agent_deals=True)
    _ensure_resource_type(resource_type_id)
    amount_validate(amount)
    if not isinstance(unit_price_usd, Decimal) or not unit_price_usd.is_finite() or unit_price_usd < 0:
        raise LedgerError("unit_price_usd must be a decimal >= 0", code="invalid_price")
    now = now or timezone.now()
    _, period_end = month_bounds(now)
    expires_at = expires_at or period_end
    if not now < expires_at <= period_end:
        raise LedgerError(
            "expires_at must be after now and no later than the end of the current period",
            code="invalid_expiry",
            details={"period_end": period_end.isoformat()},
        )
    with transaction.atomic():
        quota = quota_open(agent=agent, resource_type_id=resource_type_id, at=now)
        set_aside = Quota.objects.filter(quota_fits(amount), pk=quota.pk, agent_id=agent.pk).update(
            listed=F("listed") + amount, updated_at=now
        )
        if not set_aside:
            quota.refresh_from_db()
            available = max(quota.available, 0)
            raise QuotaExceeded(
                f"{agent.pk} has {available:,} {resource_type_id} unused, {amount:,} offered",
                details={"resource_type": resource_type_id, "requested": amount, "available": available},
            )
        return Deal.objects.create(
            resource_type_id=resource_type_id,
            amount_total=amount,
            amount_left=amount,
            unit_price_usd=unit_price_usd,
            seller=agent,
            seller_quota=quota,
            expires_at=expires_at,
        )


# --- Buying ---------------------------------------------------------------------------------------------


def _deal_get(deal_id) -> Deal:
    try:
        pk = deal_id if isinstance(deal_id, uuid.UUID) else uuid.UUID(str(deal_id))
    except ValueError:
        raise NotFound(f"deal {deal_id!r} not found") from None
    deal = Deal.objects.filter(pk=pk).first()
    if deal is None:
        raise NotFound(f"deal {deal_id} not found")
    return deal


def _ensure_buyable(deal: Deal, *, amount: int, now: dt.datetime) -> None:
    if deal.status != Deal.Status.OPEN or deal.expires_at <= now:
        status = deal.status if deal.status != Deal.Status.OPEN else Deal.Status.EXPIRED
        raise Conflict(f"deal {deal.pk} is {status}", code="deal_not_open", details={"status": status})
    if deal.amount_left < amount:
        raise Conflict(
            f"deal {deal.pk} has {deal.amount_left:,} units left, {amount:,} asked",
            code="deal_insufficient",
            details={"requested": amount, "amount_left": deal.amount_left},
        )


def deal_purchase(
    *, deal_id, buyer: Agent, amount: int, actor: str, now: dt.datetime | None = None
) -> Purchase:
    """Buy ``amount`` units of a deal for ``buyer``, all or nothing (see the module docstring).

    Refused with 409 ``deal_not_open`` (sold out, expired) or ``deal_insufficient`` (fewer left than asked),
    or 429 ``budget_exceeded`` (a hard budget of the buyer has no room for the price), and nothing changes
    then.
    """
    marketplace_ensure_enabled()
    amount_validate(amount)
    if buyer.status == Agent.Status.SUSPENDED:
        raise AgentSuspended(f"agent {buyer.pk} is suspended", details={"reason": buyer.status_reason})
    now = now or timezone.now()
    deal = _deal_get(deal_id)
    if deal.seller_id is not None:
        marketplace_ensure_enabled(agent_deals=True)
    if deal.seller_id == buyer.pk:
        raise LedgerError("an agent cannot buy its own deal", code="own_deal", status=409)
    _ensure_buyable(deal, amount=amount, now=now)
    try:
        return _purchase_claim(deal=deal, buyer=buyer, amount=amount, actor=actor, now=now)
    except BudgetExceeded as refusal:
        # After the purchase's rollback: the budget's refusal is remembered (for its "resolved" alert).
        budget_mark_refused(budget_id=refusal.details["budget_id"], now=now)
        raise


def _purchase_claim(*, deal: Deal, buyer: Agent, amount: int, actor: str, now: dt.datetime) -> Purchase:
    with transaction.atomic():
        # The claim: one conditional UPDATE, so no unit is ever sold twice and an ask for more than is
        # left takes nothing.
        claimed = Deal.objects.filter(
            pk=deal.pk, status=Deal.Status.OPEN, expires_at__gt=now, amount_left__gte=amount
        ).update(
            amount_left=F("amount_left") - amount,
            status=Case(
                When(amount_left=amount, then=Value(Deal.Status.SOLD_OUT)),
                default=Value(Deal.Status.OPEN),
            ),
            closed_at=Case(
                When(amount_left=amount, then=Value(now)),
                default=Value(None),
                output_field=DateTimeField(),
            ),
        )
        deal.refresh_from_db()
        if not claimed:
            _ensure_buyable(deal, amount=amount, now=now)  # raises the reason another buyer left us
            raise Conflict(f"deal {deal.pk} changed meanwhile; try again", code="deal_changed")
        # Read after the claim, while this transaction holds the deal's row: the price charged is the
        # price of the units taken, even if a reprice was waiting to run.
        return _purchase_book(deal=deal, buyer=buyer, amount=amount, actor=actor, now=now)


def _purchase_book(*, deal: Deal, buyer: Agent, amount: int, actor: str, now: dt.datetime) -> Purchase:
    """The ledger side of a claimed purchase: limits, grants, the usage row and the purchase."""
    unit_price = deal.unit_price_usd
    cost = usage_cost(amount, unit_price)
    # Opened before the budgets are locked: opening may wait for another transaction opening the same
    # period, and must not while holding budget rows that one may wait for.
    buyer_quota = quota_open(agent=buyer, resource_type_id=deal.resource_type_id, at=now)
    # The price on every budget of the buyer (its own, its team's, its organization's): locked in id order
    # and refused (BudgetExceeded) before any quota row is locked, the lock order of every writer.
    sql.budgets_apply(sql.agent_budget_ids(buyer.pk, now=now), now=now, spend=cost)
    # Lock the buyer's and the seller's quota rows in the lock order of every writer (QUOTA_LOCK_ORDER), so
    # that two agents buying each other's deals at once wait for one another instead of deadlocking.
    locked = Q(pk=buyer_quota.pk, agent_id=buyer.pk)
    if deal.seller_quota_id is not None:
        locked |= Q(pk=deal.seller_quota_id, agent_id=deal.seller_id)
    list(Quota.objects.filter(locked).locked().values("pk"))
    Quota.objects.filter(pk=buyer_quota.pk, agent_id=buyer.pk).update(
        limit=F("limit") + amount, spent_usd=F("spent_usd") + cost, updated_at=now
    )
    note = f"deal {deal.pk}: {amount:,} at {unit_price} USD"
    grants = [
        Grant(
            quota_id=buyer_quota.pk,
            agent_id=buyer.pk,
            resource_type_id=deal.resource_type_id,
            amount=amount,
            reason=Grant.Reason.MARKETPLACE_PURCHASE,
            actor=actor[:150],
            counterparty_agent_id=deal.seller_id,
            note=note,
        )
    ]
    if deal.seller_id is not None:
        # The sold units leave the seller's set-aside quota and its limit together; ``listed >= amount``
        # always holds for an open deal, the condition only guards against a broken invariant.
        moved = Quota.objects.filter(
            pk=deal.seller_quota_id, agent_id=deal.seller_id, listed__gte=amount
        ).update(listed=F("listed") - amount, limit=F("limit") - amount, updated_at=now)
        if not moved:
            raise LedgerError(
                f"the seller's set-aside quota of deal {deal.pk} is short",
                code="deal_inconsistent",
                status=409,
            )
        grants.append(
            Grant(
                quota_id=deal.seller_quota_id,
                agent_id=deal.seller_id,
                resource_type_id=deal.resource_type_id,
                amount=-amount,
                reason=Grant.Reason.MARKETPLACE_SALE,
                actor=actor[:150],
                counterparty_agent_id=buyer.pk,
                note=note,
            )
        )
    Grant.objects.bulk_create(grants)
    purchase = Purchase.objects.create(
        deal=deal, buyer=buyer, amount=amount, unit_price_usd=unit_price, cost_usd=cost
    )
    UsageLog.objects.create(
        agent=buyer,
        resource_type_id=deal.resource_type_id,
        quota_id=buyer_quota.pk,
        amount=amount,
        unit_price_usd=unit_price,
        cost_usd=cost,
        kind=UsageLog.Kind.PURCHASE,
        metadata={"deal_id": str(deal.pk), "purchase_id": purchase.pk},
        created_at=now,
        period_start=buyer_quota.period_start,
    )
    return purchase


# --- Expiry and the refresh sweep -----------------------------------------------------------------------


def deals_expire(
    *, now: dt.datetime | None = None, deal_ids=None, batch_size: int = DEALS_EXPIRE_BATCH
) -> dict[str, int]:
    """Close open deals as expired: those past their expiry, or the ``deal_ids`` given (the admin's "expire
    now"), whatever their expiry. What agent deals did not sell goes back to their sellers.

    Set-based and streaming: the deals in batches of ``batch_size`` by id (a keyset, so each batch reads on
    from the last), each batch its own short transaction of a fixed number of queries, so the end of a
    period (when every listing of the month expires at once) never holds sellers' quota rows for longer
    than a batch, and a crash loses only the batch in flight. Rows are locked with SKIP LOCKED, so a
    purchase in flight keeps its deal (the next run takes it) and two sweeps at once never return a deal
    twice.
    """
    now = now or timezone.now()
    expired = returned_units = 0
    after = None
    while True:
        deals = Deal.objects.select_for_update(skip_locked=True).filter(status=Deal.Status.OPEN)
        deals = deals.filter(expires_at__lte=now) if deal_ids is None else deals.filter(pk__in=list(deal_ids))
        if after is not None:
            deals = deals.filter(pk__gt=after)
        with transaction.atomic():
            rows = list(
                deals.order_by("pk").values_list("pk", "seller_id", "seller_quota_id", "amount_left")[
                    :batch_size
                ]
            )
            if not rows:
                break
            Deal.objects.filter(pk__in=[pk for pk, _, _, _ in rows]).update(
                status=Deal.Status.EXPIRED, closed_at=now
            )
            returned: dict[int, int] = {}
            sellers: set[str] = set()
            for _, seller_id, quota_id, left in rows:
                if quota_id is not None and left:
                    returned[quota_id] = returned.get(quota_id, 0) + left
                    sellers.add(seller_id)
            # The sellers' quota rows in the lock order of every writer that locks several of them
            # (QUOTA_LOCK_ORDER), then one UPDATE FROM unnest for all of them, not a CASE arm per quota
            # (ledger/bulk.py).
            quota_ids = sorted(returned)
            list(Quota.objects.filter(pk__in=quota_ids, agent_id__in=sellers).locked().values_list("pk"))
            bulk_update_column(
                model=Quota,
                field="listed",
                values={pk: -returned[pk] for pk in quota_ids},
                add=True,
                touch=now,
            )
        expired += len(rows)
        returned_units += sum(returned.values())
        if len(rows) < batch_size:
            break
        after = rows[-1][0]
    return {"expired": expired, "returned_units": returned_units}


def platform_prices(*, now: dt.datetime | None = None) -> dict[str, Decimal]:
    """resource type -> the platform's deal price now: list price less the utilization discount. Two
    queries."""
    now = now or timezone.now()
    start, _ = month_bounds(now)
    totals = {
        row["resource_type_id"]: row
        for row in Quota.objects.filter(period_start=start)
        .values("resource_type_id")
        .annotate(used=Sum("used"), limit=Sum("limit"))
        .order_by()
    }
    prices = {}
    for code, list_price in prices_in_effect(at=now).items():
        row = totals.get(code)
        utilization = (percent(row["used"] or 0, row["limit"]) if row else None) or Decimal(0)
        price = list_price * (1 - discount_for(utilization))
        prices[code] = money_round(price)
    return prices


def marketplace_refresh(*, now: dt.datetime | None = None) -> dict:
    """Expire deals (returning unsold agent quota), restock and reprice platform deals. Idempotent."""
    now = now or timezone.now()
    summary = {**deals_expire(now=now), "restocked": 0, "repriced": 0}
    if not settings.ENABLE_MARKETPLACE_OPTIMIZATION:
        return summary
    _, period_end = month_bounds(now)
    with transaction.atomic():
        # The restock tier's limits double as the refresh's mutex: two refreshes at once take turns here,
        # and the second then sees the first one's deals instead of restocking them again.
        restock_limits = list(
            TierQuota.objects.select_for_update()
            .filter(tier_id=RESTOCK_TIER)
            .order_by("pk")
            .values_list("resource_type_id", "limit")
        )
        prices = platform_prices(now=now)
        open_platform = list(
            Deal.objects.filter(seller__isnull=True, status=Deal.Status.OPEN, expires_at__gt=now)
            .order_by("pk")
            .values_list("pk", "resource_type_id", "unit_price_usd")
        )
        stocked = {code for _, code, _ in open_platform}
        new_deals = [
            Deal(
                resource_type_id=code,
                amount_total=limit * RESTOCK_PERCENT // 100,
                amount_left=limit * RESTOCK_PERCENT // 100,
                unit_price_usd=prices[code],
                expires_at=period_end,
            )
            for code, limit in restock_limits
            if code not in stocked and code in prices and limit * RESTOCK_PERCENT // 100 > 0
        ]
        Deal.objects.bulk_create(new_deals)
        stale = {
            pk: prices[code] for pk, code, price in open_platform if code in prices and price != prices[code]
        }
        if stale:
            Deal.objects.filter(pk__in=list(stale)).update(
                unit_price_usd=Case(*[When(pk=pk, then=Value(price)) for pk, price in stale.items()])
            )
        summary["restocked"] = len(new_deals)
        summary["repriced"] = len(stale)
    return summary


__all__ = [
    "DISCOUNTS",
    "RESTOCK_PERCENT",
    "deal_list",
    "deal_purchase",
    "deals_expire",
    "deals_for_agent",
    "deals_open",
    "discount_for",
    "marketplace_ensure_enabled",
    "marketplace_refresh",
    "platform_prices",
    "shortfall_forecast",
]

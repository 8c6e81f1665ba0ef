"""Recommendations for one agent, ranked, and the optimizer that applies the safe ones.

Every item has a ``type``, a ``priority`` (high, medium, low), ``expected_monthly_saving_usd`` (Decimal;
negative means extra cost), a ``rationale`` sentence with the numbers behind it, the same numbers in
``evidence``, machine-readable ``action`` parameters, a stable ``id`` (``type`` or ``type:RESOURCE``) and
``safe``: whether ``optimization_run`` would apply it on its own. Items are ranked by priority, then by
saving (largest first).

Rules
-----
- **Projected monthly usage** of a resource = used / elapsed fraction of the period, rounded up to a whole
  unit (at the very start of a period, the usage so far).
- **downgrade_tier**: the cheapest tier cheaper than the agent's whose limits cover every projection.
  Saving = the difference in monthly price. Priority medium.
- **upgrade_tier**: when a projection exceeds the current limit, the cheapest dearer tier whose limits cover
  every projection. Saving = -(price difference). Priority high when a short resource runs out within
  7 days at the trailing 24 hours' burn rate, else medium.
  Tier items compare with the tiers' own limits (this period's grants do not carry over to the next
  month) and are not made for agents with per-agent limit overrides, whose limits no tier sets.
- **buy_deal**: for each resource projected short (projection > limit), the open, unexpired deal of
  another seller, priced under the list price, that saves the most: saving = (list price - deal price) x
  min(shortfall, units left in the deal). Priority as for upgrade_tier. Only with
  ``ENABLE_MARKETPLACE_OPTIMIZATION``.
- **share_unused**: when a projection is under 50 % of the limit: the units expected to go unused
  (limit - projection, at most what is available now) are worth their list price to another agent.
  Priority low. Only with ``ENABLE_COLLABORATION_SHARING``.
- **When no tier covers** (the top tier runs out, or the agent's limits are its own overrides: no
  upgrade_tier item), each resource projected short gets:
  - **grant_quota**: a grant of the shortfall (projection - limit) this period, or a custom limit of the
    projection from the next: saving = -(shortfall x list price). Priority as for upgrade_tier.
  - **share_from_teammate**: the team-mate (another agent of the same team, not suspended) whose quota of
    the resource is expected to go unused the most (limit - projection, at most what is available now;
    its whole base limit when it has not used the resource this period) gives min(shortfall, that):
    saving = those units at the list price, the grant they spare. Priority as for upgrade_tier. Only with
    ``ENABLE_COLLABORATION_SHARING``.
  - **cheaper_resource**: another resource type counted in the same unit at a lower list price (another
    model's tokens, say), with room in the agent's own limit of it (limit - projection): moving
    min(shortfall, room) units there saves (price - its price) x those units. Priority medium.
  Cheaper deals of the marketplace are buy_deal items whatever the tier.
- **reduce_resource**: when more than 10 % of this period's executions failed: saving = the cost of the
  failed executions so far / elapsed fraction (their projected monthly cost). Priority medium.
- **scale_up / scale_down**: when the agent's scaling policy (its own, else its tier's; an enabled one:
  auto-scaling switched off means instances are managed by hand) has its metric (the highest resource
  utilization, or budget utilization) above the scale-up / below the scale-down threshold, and the
  instance count can move within the narrower of the agent's and the policy's bounds. One policy step, cut
  at the bound. Priority high; saving 0 (the ledger prices resources, not instances).

``optimization_run`` applies only high-priority items that are safe: scaling within bounds, and deal
purchases whose cost keeps the period's spend within the agent's monthly budget (an agent without a budget
buys nothing automatically), and that the agent's arm of a running A/B experiment allows (its ``buy_deals``
and ``deal_max_unit_price_usd``). Tier changes and sharing always need an operator.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

from django.conf import settings
from django.db import transaction
from django.db.models import Count

from ledger.errors import Conflict, LedgerError, NotFound
from ledger.invariants import quota_available
from ledger.models import Agent, AgentLimitOverride, Quota, ResourceType, Tier, TierQuota
from ledger.money import cents, money_round, percent, usage_cost
from ledger.reference_cache import tier_limits
from ledger.selectors import prices_in_effect
from optimization.models import Deal, Execution, ScalingEvent
from optimization.services.analytics import (
    PeriodClock,
    ResourceSnapshot,
    analytics_ensure_enabled,
    burn_last_24h,
    exhaustion_at,
    period_executions,
    resource_snapshots,
    scaled,
)
from optimization.services.experiments import arm_deal_refusal, experiment_arm_running
from optimization.services.scaling import scaling_apply, scaling_bounds, scaling_policy_resolve

PRIORITY_RANK = {"high": 0, "medium": 1, "low": 2}
SHORT_HORIZON = dt.timedelta(days=7)
ERROR_RATE_LIMIT = Decimal("10")
SHARE_BELOW_PERCENT = 50
DEALS_CONSIDERED = 200
OPERATOR_ONLY = frozenset(
    {"upgrade_tier", "downgrade_tier", "share_unused", "grant_quota", "share_from_teammate"}
)
SCALING_TYPES = frozenset({"scale_up", "scale_down"})
ZERO = money_round(Decimal(0))


def _item(
    *,
    kind: str,
    priority: str,
    saving: Decimal,
    rationale: str,
    evidence: dict,
    action: dict,
    resource_type: str | None = None,
) -> dict:
    return {
        "id": kind if resource_type is None else f"{kind}:{resource_type}",
        "type": kind,
        "resource_type": resource_type,
        "priority": priority,
        "expected_monthly_saving_usd": money_round(saving),
        "rationale": rationale,
        "evidence": evidence,
        "action": action,
    }


def _money(value: Decimal) -> str:
    return f"${cents(value):,}"


def _moment(value: dt.datetime) -> str:
    """A time as the dashboard shows every time: "2026-12-06 14:05 UTC"."""
    return f"{value.astimezone(dt.UTC):%Y-%m-%d %H:%M} UTC"


class _Context:
    """What every rule reads, fetched once."""

    def __init__(self, *, agent: Agent, now: dt.datetime | None):
        self.agent = agent
        self.clock = PeriodClock.at(now)
        self.snapshots: list[ResourceSnapshot] = resource_snapshots(agent=agent, clock=self.clock)
        self.burn = burn_last_24h(agent=agent, now=self.clock.now)
        self.prices = prices_in_effect(at=self.clock.now)
        self.projections = {s.resource_type: self.clock.projected_units(s.used) for s in self.snapshots}
        self.short = [s for s in self.snapshots if self.projections[s.resource_type] > s.limit]

    def runs_out_at(self, snapshot: ResourceSnapshot) -> dt.datetime | None:
        return exhaustion_at(
            available=snapshot.available,
            units_24h=self.burn.get(snapshot.resource_type, 0),
            now=self.clock.now,
        )

    def urgent(self, snapshots: list[ResourceSnapshot]) -> tuple[bool, dt.datetime | None]:
        """Whether any of ``snapshots`` runs out within 7 days, and the earliest time one does."""
        times = [at for at in (self.runs_out_at(s) for s in snapshots) if at is not None]
        earliest = min(times, default=None)
        return earliest is not None and earliest <= self.clock.now + SHORT_HORIZON, earliest

    @property
    def elapsed_percent(self) -> Decimal:
        return percent(self.clock.elapsed_us, self.clock.total_us) or Decimal("0.00")


def _tier_items(context: _Context) -> list[dict]:
    agent = context.agent
    if AgentLimitOverride.objects.filter(agent=agent).exists():
        return []
    limits: dict[str, dict[str, int]] = {}
    for tier_id, code, limit in TierQuota.objects.values_list("tier_id", "resource_type_id", "limit"):
        limits.setdefault(tier_id, {})[code] = limit
    tiers = {
        code: price
        for code, price in Tier.objects.order_by("monthly_price_usd", "display_order").values_list(
            "code", "monthly_price_usd"
        )
        if code in limits or code == agent.tier_id
    }
    current_price = tiers[agent.tier_id]
    projected = {code: units for code, units in context.projections.items() if units > 0}

    def covers(tier_id: str) -> bool:
        return all(limits[tier_id].get(code, 0) >= units for code, units in projected.items())

    evidence_base = {
        "current_tier": agent.tier_id,
        "current_price_usd": current_price,
        "elapsed_percent": context.elapsed_percent,
        "projected_units": dict(projected),
    }
    items = []
    cheaper = [code for code, price in tiers.items() if price < current_price and covers(code)]
    if cheaper:
        target = cheaper[0]  # ordered by price: the cheapest that still covers everything
        saving = current_price - tiers[target]
        items.append(
            _item(
                kind="downgrade_tier",
                priority="medium",
                saving=saving,
                rationale=(
                    f"At {context.elapsed_percent}% of the period, projected use fits {target}'s limits "
                    f"({_usage_text(projected, limits[target])}); {target} costs "
                    f"{_money(tiers[target])} a month against {agent.tier_id}'s {_money(current_price)}."
                ),
                evidence={
                    **evidence_base,
                    "target_tier": target,
                    "target_price_usd": tiers[target],
                    "target_limits": {code: limits[target].get(code, 0) for code in projected},
                },
                action={"tier": target},
            )
        )
    if context.short:
        dearer = [code for code, price in tiers.items() if price > current_price and covers(code)]
        if dearer:
            target = dearer[0]
            urgent, earliest = context.urgent(context.short)
            short_text = ", ".join(
                f"{s.resource_type} {context.projections[s.resource_type]:,} projected > {s.limit:,} limit"
                for s in context.short
            )
            items.append(
                _item(
                    kind="upgrade_tier",
                    priority="high" if urgent else "medium",
                    saving=-(tiers[target] - current_price),
                    rationale=(
                        f"{short_text}; {target} covers every projection for "
                        f"{_money(tiers[target] - current_price)} more a month"
                        + (f"; runs out at {_moment(earliest)}" if earliest else "")
                        + "."
                    ),
                    evidence={
                        **evidence_base,
                        "target_tier": target,
                        "target_price_usd": tiers[target],
                        "target_limits": {code: limits[target].get(code, 0) for code in projected},
                        "current_limits": {s.resource_type: s.limit for s in context.short},
                        "projected_exhaustion_at": earliest,
                    },
                    action={"tier": target},
                )
            )
    return items


def _usage_text(projected: dict[str, int], limits: dict[str, int]) -> str:
    return ", ".join(f"{code} {units:,} of {limits.get(code, 0):,}" for code, units in projected.items())


def _deal_items(context: _Context) -> list[dict]:
    if not context.short or not settings.ENABLE_MARKETPLACE_OPTIMIZATION:
        return []
    short = {s.resource_type: s for s in context.short}
    deals = (
        Deal.objects.filter(
            status=Deal.Status.OPEN,
            expires_at__gt=context.clock.now,
            amount_left__gt=0,
            resource_type_id__in=list(short),
        )
        .exclude(seller=context.agent)
        .order_by("unit_price_usd", "created_at")[:DEALS_CONSIDERED]
    )
    best: dict[str, tuple[Decimal, int, Deal]] = {}
    for deal in deals:
        list_price = context.prices.get(deal.resource_type_id)
        if list_price is None or deal.unit_price_usd >= list_price:
            continue
        snapshot = short[deal.resource_type_id]
        shortfall = context.projections[snapshot.resource_type] - snapshot.limit
        amount = min(shortfall, deal.amount_left)
        saving = usage_cost(amount, list_price - deal.unit_price_usd)
        if deal.resource_type_id not in best or saving > best[deal.resource_type_id][0]:
            best[deal.resource_type_id] = (saving, amount, deal)
    items = []
    for code, (saving, amount, deal) in best.items():
        snapshot = short[code]
        urgent, earliest = context.urgent([snapshot])
        list_price = context.prices[code]
        shortfall = context.projections[code] - snapshot.limit
        items.append(
            _item(
                kind="buy_deal",
                resource_type=code,
                priority="high" if urgent else "medium",
                saving=saving,
                rationale=(
                    f"{code} is projected at {context.projections[code]:,} against a "
                    f"{snapshot.limit:,} limit "
                    f"({shortfall:,} short); deal {deal.pk} sells {deal.amount_left:,} at "
                    f"{deal.unit_price_usd.normalize():f} a unit against the list price "
                    f"{list_price.normalize():f}: buying {amount:,} saves {_money(saving)}"
                    + (f"; runs out at {_moment(earliest)}" if earliest else "")
                    + "."
                ),
                evidence={
                    "projected_units": context.projections[code],
                    "limit": snapshot.limit,
                    "shortfall": shortfall,
                    "list_unit_price_usd": list_price,
                    "deal_unit_price_usd": deal.unit_price_usd,
                    "deal_amount_left": deal.amount_left,
                    "projected_exhaustion_at": earliest,
                },
                action={
                    "deal_id": str(deal.pk),
                    "resource_type": code,
                    "amount": amount,
                    "unit_price_usd": deal.unit_price_usd,
                    "cost_usd": usage_cost(amount, deal.unit_price_usd),
                },
            )
        )
    return items


def _share_items(context: _Context) -> list[dict]:
    if not settings.ENABLE_COLLABORATION_SHARING:
        return []
    items = []
    for snapshot in context.snapshots:
        code = snapshot.resource_type
        projected = context.projections[code]
        price = context.prices.get(code)
        if snapshot.limit <= 0 or price is None or projected * 100 >= snapshot.limit * SHARE_BELOW_PERCENT:
            continue
        unused = min(snapshot.limit - projected, snapshot.available)
        if unused <= 0:
            continue
        value = usage_cost(unused, price)
        items.append(
            _item(
                kind="share_unused",
                resource_type=code,
                priority="low",
                saving=value,
                rationale=(
                    f"{code} is projected at {projected:,} of a {snapshot.limit:,} limit "
                    f"({percent(projected, snapshot.limit)}%): {unused:,} units are expected to go unused, "
                    f"worth {_money(value)} at the list price {price.normalize():f}."
                ),
                evidence={
                    "projected_units": projected,
                    "limit": snapshot.limit,
                    "available": snapshot.available,
                    "unused_units": unused,
                    "list_unit_price_usd": price,
                },
                action={"resource_type": code, "amount": unused},
            )
        )
    return items


def _uncovered_items(context: _Context) -> list[dict]:
    """What can relieve a resource that no tier covers: a grant, a team-mate's spare quota, a cheaper
    resource of the same unit. Each short resource is priced at its list price."""
    items = []
    teammates = _teammate_spares(context)
    units = dict(ResourceType.objects.values_list("code", "unit"))
    for snapshot in context.short:
        code = snapshot.resource_type
        price = context.prices.get(code)
        if price is None:
            continue
        projected = context.projections[code]
        shortfall = projected - snapshot.limit
        urgent, earliest = context.urgent([snapshot])
        priority = "high" if urgent else "medium"
        runs_out = f"; runs out at {earliest.isoformat()}" if earliest else ""
        short_text = (
            f"{code} is projected at {projected:,} against a {snapshot.limit:,} limit ({shortfall:,} short)"
        )
        evidence = {
            "projected_units": projected,
            "limit": snapshot.limit,
            "shortfall": shortfall,
            "list_unit_price_usd": price,
            "projected_exhaustion_at": earliest,
        }
        cost = usage_cost(shortfall, price)
        items.append(
            _item(
                kind="grant_quota",
                resource_type=code,
                priority=priority,
                saving=-cost,
                rationale=(
                    f"{short_text} and no tier covers it: a grant of {shortfall:,} this period (or a custom "
                    f"limit of {projected:,}) costs {_money(cost)} a month at the list price "
                    f"{price.normalize():f}{runs_out}."
                ),
                evidence=evidence,
                action={
                    "resource_type": code,
                    "amount": shortfall,
                    "limit_after": projected,
                    "unit_price_usd": price,
                    "cost_usd": cost,
                },
            )
        )
        spare = teammates.get(code)
        if spare is not None:
            teammate, spare_units = spare
            amount = min(shortfall, spare_units)
            value = usage_cost(amount, price)
            items.append(
                _item(
                    kind="share_from_teammate",
                    resource_type=code,
                    priority=priority,
                    saving=value,
                    rationale=(
                        f"{short_text}; team-mate {teammate} is expected to leave {spare_units:,} unused: "
                        f"sharing {amount:,} spares a grant worth {_money(value)} at the list price "
                        f"{price.normalize():f}{runs_out}."
                    ),
                    evidence={**evidence, "teammate_unused_units": spare_units},
                    action={"from_agent": teammate, "resource_type": code, "amount": amount},
                )
            )
        alternative = _cheaper_alternative(context, code=code, units=units, price=price)
        if alternative is not None:
            other, other_price, room = alternative
            amount = min(shortfall, room)
            saving = usage_cost(amount, price - other_price)
            items.append(
                _item(
                    kind="cheaper_resource",
                    resource_type=code,
                    priority="medium",
                    saving=saving,
                    rationale=(
                        f"{short_text}; {other} is counted in {units[code]} too, at "
                        f"{other_price.normalize():f} a unit against {price.normalize():f}, with {room:,} "
                        f"expected to go unused: moving {amount:,} of the work there saves {_money(saving)}."
                    ),
                    evidence={
                        **evidence,
                        "alternative_unit_price_usd": other_price,
                        "alternative_unused_units": room,
                    },
                    action={"from_resource_type": code, "to_resource_type": other, "amount": amount},
                )
            )
    return items


def _teammate_spares(context: _Context) -> dict[str, tuple[str, int]]:
    """resource type -> (the team-mate expected to leave the most of it unused this period, how much), for
    the resources projected short. A team-mate that has not used a resource yet this period (no quota row
    opened) leaves its whole base limit. Three queries, whatever the size of the team."""
    agent = context.agent
    if agent.team_id is None or not context.short or not settings.ENABLE_COLLABORATION_SHARING:
        return {}
    codes = [s.resource_type for s in context.short]
    teammates = dict(
        Agent.objects.filter(team_id=agent.team_id)
        .exclude(pk=agent.pk)
        .exclude(status=Agent.Status.SUSPENDED)
        .order_by("pk")
        .values_list("pk", "tier_id")
    )
    if not teammates:
        return {}
    spares: dict[tuple[str, str], int] = {}
    for agent_id, code, limit, used, reserved, listed in Quota.objects.filter(
        agent__team_id=agent.team_id, period_start=context.clock.start, resource_type_id__in=codes
    ).values_list("agent_id", "resource_type_id", "limit", "used", "reserved", "listed"):
        if agent_id in teammates:
            projected = context.clock.projected_units(used)
            spares[(agent_id, code)] = min(
                limit - projected, quota_available(limit=limit, used=used, reserved=reserved, listed=listed)
            )
    overrides = {
        (agent_id, code): limit
        for agent_id, code, limit in AgentLimitOverride.objects.filter(
            agent__team_id=agent.team_id, resource_type_id__in=codes
        ).values_list("agent_id", "resource_type_id", "limit")
    }
    best: dict[str, tuple[str, int]] = {}
    for teammate, tier_id in teammates.items():  # in id order: a tie names the first
        for code in codes:
            spare = spares.get((teammate, code))
            if spare is None:  # not opened this period: its base limit, as base_limits reads it
                spare = overrides.get((teammate, code), tier_limits(tier_id).get(code, 0))
            if spare > 0 and (code not in best or spare > best[code][1]):
                best[code] = (teammate, spare)
    return best


def _cheaper_alternative(
    context: _Context, *, code: str, units: dict[str, str], price: Decimal
) -> tuple[str, Decimal, int] | None:
    """The cheapest other resource type counted in the same unit as ``code`` (``units``: code -> unit) with
    room left in the agent's own limit: (its code, its list price, the units expected to go unused)."""
    best = None
    for snapshot in context.snapshots:
        other = snapshot.resource_type
        other_price = context.prices.get(other)
        if (
            other == code
            or units.get(other) != units.get(code)
            or other_price is None
            or other_price >= price
        ):
            continue
        room = min(snapshot.limit - context.projections[other], snapshot.available)
        if room > 0 and (best is None or other_price < best[1]):
            best = (other, other_price, room)
    return best


def _reduce_items(context: _Context) -> list[dict]:
    executions = period_executions(agent=context.agent, clock=context.clock)
    # Over the executions with a known outcome: one that did not report it is neither a success nor a failure.
    known = executions.successes + executions.failures
    error_rate = percent(executions.failures, known)
    if error_rate is None or error_rate <= ERROR_RATE_LIMIT:
        return []
    clock = context.clock
    saving = (
        scaled(executions.failed_cost_usd, clock.total_us, clock.elapsed_us)
        if clock.elapsed_us > 0
        else executions.failed_cost_usd
    )
    superpowers = [
        {"superpower": row["superpower"], "failures": row["failures"]}
        for row in Execution.objects.filter(
            agent=context.agent, success=False, created_at__gte=clock.start, created_at__lt=clock.end
        )
        .values("superpower")
        .annotate(failures=Count("id"))
        .order_by("-failures", "superpower")[:3]
    ]
    return [
        _item(
            kind="reduce_resource",
            priority="medium",
            saving=saving,
            rationale=(
                f"{executions.failures:,} of {known:,} executions with a known outcome this period failed "
                f"({error_rate}%, over the {ERROR_RATE_LIMIT}% limit); they cost "
                f"{_money(executions.failed_cost_usd)} so far, {_money(saving)} over a whole month."
            ),
            evidence={
                "executions": executions.executions,
                "failures": executions.failures,
                "error_rate_percent": error_rate,
                "failed_cost_usd": money_round(executions.failed_cost_usd),
                "elapsed_percent": context.elapsed_percent,
            },
            action={"failed_executions": executions.failures, "superpowers": superpowers},
        )
    ]


def _scaling_items(context: _Context) -> list[dict]:
    agent = context.agent
    policy = scaling_policy_resolve(agent=agent)
    if policy is None or not policy.enabled:
        return []
    if policy.metric == "budget_utilization_percent":
        spent = sum((s.spent_usd for s in context.snapshots), Decimal(0))
        value, subject = percent(spent, agent.monthly_budget_usd), "budget utilization"
    else:
        measured = [(s.utilization_percent, s.resource_type) for s in context.snapshots if s.limit > 0]
        top = max(measured, default=(None, None))
        value, subject = top[0], f"utilization of {top[1]}"
    if value is None:
        return []
    lower, upper = scaling_bounds(agent_min=agent.min_instances, agent_max=agent.max_instances, policy=policy)
    count = agent.instance_count
    if value > policy.scale_up_threshold and count < upper:
        direction, step, after = "up", min(policy.step, upper - count), min(count + policy.step, upper)
        threshold, limit_value = "scale-up", policy.scale_up_threshold
    elif value < policy.scale_down_threshold and count > lower:
        direction, step, after = "down", min(policy.step, count - lower), max(count - policy.step, lower)
        threshold, limit_value = "scale-down", policy.scale_down_threshold
    else:
        return []
    return [
        _item(
            kind=f"scale_{direction}",
            priority="high",
            saving=ZERO,
            rationale=(
                f"The {subject} is {value}%, {'above' if direction == 'up' else 'below'} the policy's "
                f"{threshold} threshold of {limit_value}%: {count} -> {after} instances "
                f"(bounds {lower}-{upper})."
            ),
            evidence={
                "metric": policy.metric,
                "value_percent": value,
                "threshold_percent": limit_value,
                "instance_count": count,
                "min_instances": lower,
                "max_instances": upper,
            },
            action={"direction": direction, "step": step, "from_instances": count, "to_instances": after},
        )
    ]


def _ranked(context: _Context) -> list[dict]:
    tier_items = _tier_items(context)
    covered = any(item["type"] == "upgrade_tier" for item in tier_items)
    items = [
        *tier_items,
        *([] if covered else _uncovered_items(context)),
        *_deal_items(context),
        *_share_items(context),
        *_reduce_items(context),
        *_scaling_items(context),
    ]
    items.sort(
        key=lambda item: (
            PRIORITY_RANK[item["priority"]],
            -item["expected_monthly_saving_usd"],
            item["type"],
            item["resource_type"] or "",
        )
    )
    spent, budget = _period_spend(context), context.agent.monthly_budget_usd
    for item in items:
        item["safe"] = apply_refusal(item, spent=spent, budget=budget) is None
    return items


def agent_recommendations(*, agent: Agent, now: dt.datetime | None = None) -> list[dict]:
    """Every recommendation for the agent, ranked by priority, then by expected saving (largest first).
    ``safe`` says whether ``optimization_run`` would apply the item on its own."""
    analytics_ensure_enabled()
    return _ranked(_Context(agent=agent, now=now))


# --- Applying them --------------------------------------------------------------------------------------


def _period_spend(context: _Context) -> Decimal:
    return sum((s.spent_usd for s in context.snapshots), Decimal(0))


def apply_refusal(item: dict, *, spent: Decimal, budget: Decimal | None) -> str | None:
    """Why ``optimization_run`` would not apply ``item`` (None: it would). ``spent`` is this period's spend
    so far, including purchases made earlier in the same run."""
    kind = item["type"]
    if kind in OPERATOR_ONLY:
        return "needs an operator"
    if item["priority"] != "high":
        return f"{item['priority']} priority: only high-priority items are applied"
    if kind in SCALING_TYPES:
        return None
    if kind == "buy_deal":
        cost = item["action"]["cost_usd"]
        if budget is None:
            return "the agent has no monthly budget to keep the purchase within"
        if spent + cost > budget:
            return (
                f"buying for {_money(cost)} would take this period's spend to {_money(spent + cost)}, "
                f"over the {_money(budget)} budget"
            )
        return None
    return "needs a change in how the agent works: nothing to apply automatically"


def _purchase_result(result) -> dict:
    """What the marketplace's ``deal_purchase`` answered, whether a Purchase row or a dict."""
    if isinstance(result, dict):
        return result
    return {
        "purchase_id": getattr(result, "pk", None),
        "amount": getattr(result, "amount", None),
        "cost_usd": getattr(result, "cost_usd", None),
    }


def _apply(item: dict, *, agent: Agent, actor: str, now: dt.datetime) -> dict | None:
    """Carry out one safe item in a savepoint; its result, or None when it turned out to change nothing.
    A refusal by the marketplace raises its ``LedgerError`` with nothing written."""
    with transaction.atomic():
        if item["type"] in SCALING_TYPES:
            event = scaling_apply(
                agent=agent,
                direction=item["action"]["direction"],
                trigger=ScalingEvent.Trigger.OPTIMIZE,
                reason=item["rationale"],
                actor=actor,
                step=item["action"]["step"],
                now=now,
            )
            if event is None:
                return None
            return {"scaling_event_id": event.pk, "before": event.before, "after": event.after}
        # Imported here: the marketplace is its own area and may be switched off.
        from optimization.services.marketplace import deal_purchase

        purchase = deal_purchase(
            deal_id=item["action"]["deal_id"], buyer=agent, amount=item["action"]["amount"], actor=actor
        )
        return _purchase_result(purchase)


def optimization_run(*, agent: Agent, actor: str, now: dt.datetime | None = None) -> dict:
    """Apply the high-priority recommendations that are safe; say what was done and what was not, and why.

    Safe: scaling within the agent's bounds (``scaling_apply``), and buying a deal when the period's spend
    plus the purchase stays within the monthly budget. Each application runs in its own savepoint, so a
    refused purchase is reported and the rest still applies.
    """
    analytics_ensure_enabled()
    context = _Context(agent=agent, now=now)
    recommendations = _ranked(context)
    spent = _period_spend(context)
    budget = agent.monthly_budget_usd
    applied: list[dict] = []
    skipped: list[dict] = []

    def skip(item: dict, reason: str) -> None:
        skipped.append(
            {key: item[key] for key in ("id", "type", "resource_type", "priority")} | {"reason": reason}
        )

    arm = experiment_arm_running(agent_id=agent.pk, now=context.clock.now)
    for item in recommendations:
        reason = apply_refusal(item, spent=spent, budget=budget)
        if reason is None and item["type"] == "buy_deal":
            reason = arm_deal_refusal(arm=arm, unit_price_usd=item["action"]["unit_price_usd"])
        if reason is not None:
            skip(item, reason)
            continue
        try:
            result = _apply(item, agent=agent, actor=actor, now=context.clock.now)
        except LedgerError as exc:
            skip(item, f"the marketplace refused: {exc.code}: {exc.message}")
            continue
        if result is None:
            skip(item, "the agent is already at its instance bound")
            continue
        if item["type"] == "buy_deal":
            spent += item["action"]["cost_usd"]
        applied.append({**item, "result": result})
    agent.refresh_from_db(fields=["instance_count"])
    return {
        "agent_id": agent.id,
        "generated_at": context.clock.now,
        "applied": applied,
        "skipped": skipped,
        "instance_count": agent.instance_count,
        "period_spend_usd": money_round(spent),
        "monthly_budget_usd": budget,
    }


# --- For the dashboard ----------------------------------------------------------------------------------


def recommendations_for(*, agent: Agent, now: dt.datetime | None = None) -> list[dict]:
    """The ranked recommendations for a page; empty (rather than an error) when analytics is switched off."""
    if not settings.ENABLE_PERFORMANCE_ANALYTICS:
        return []
    return agent_recommendations(agent=agent, now=now)


def recommendation_apply(
    *, agent: Agent, recommendation_id: str, actor: str, now: dt.datetime | None = None
) -> dict:
    """Apply one recommendation by its ``id``, if it is still current and safe (the rules of
    ``optimization_run``); refused with a ``LedgerError`` otherwise."""
    analytics_ensure_enabled()
    context = _Context(agent=agent, now=now)
    item = next((item for item in _ranked(context) if item["id"] == recommendation_id), None)
    if item is None:
        raise NotFound(f"recommendation {recommendation_id!r} does not apply any more", code="not_found")
    reason = apply_refusal(item, spent=_period_spend(context), budget=agent.monthly_budget_usd)
    if reason is not None:
        raise Conflict(f"{item['type']} is not applied automatically: {reason}", code="not_safe")
    result = _apply(item, agent=agent, actor=actor, now=context.clock.now)
    if result is None:
        raise Conflict("the agent is already at its instance bound", code="not_safe")
    return {"applied": item, "result": result, "message": f"Applied: {item['rationale']}"}

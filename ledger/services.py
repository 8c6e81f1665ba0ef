"""Everything that writes to the ledger, outside the hot allocation path (which lives in ``allocation``)."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from ledger import reference
from ledger.errors import Conflict, LedgerError, QuotaExceeded
from ledger.invariants import quota_fits
from ledger.models import (
    Agent,
    AgentLimitOverride,
    Grant,
    OptimizationRule,
    Quota,
    ResourcePrice,
    ResourceType,
    Tier,
    TierQuota,
)
from ledger.periods import month_bounds
from ledger.reference_cache import resource_type_codes, tier_limits
from ledger.rules_yaml import RuleSpec, parse_rules
from ledger.selectors import base_limits
from ledger.signals import reference_data_loaded

# --- Reference data -------------------------------------------------------------------------------------


@transaction.atomic
def reference_data_load() -> dict[str, int]:
    """Create the resource types, first prices, tiers, tier quotas and seed rules that are missing, then
    what the apps built on the ledger add (``reference_data_loaded``: the tiers' default scaling policies).

    Idempotent and non-destructive: what an operator has since edited in the admin is left as it is.
    Returns how many rows of each kind were created.
    """
    created = {"resource_types": 0, "prices": 0, "tiers": 0, "tier_quotas": 0, "rules": 0}
    for order, (code, name, unit, price, description) in enumerate(reference.RESOURCE_TYPES):
        resource_type, was_created = ResourceType.objects.get_or_create(
            code=code,
            defaults={"name": name, "unit": unit, "description": description, "display_order": order},
        )
        created["resource_types"] += was_created
        if not ResourcePrice.objects.filter(resource_type=resource_type).exists():
            ResourcePrice.objects.create(
                resource_type=resource_type,
                unit_price_usd=price,
                effective_from=reference.PRICES_EFFECTIVE_FROM,
                note="List price of the product description",
            )
            created["prices"] += 1
    for order, (code, (monthly_price, limits)) in enumerate(reference.TIERS.items()):
        tier, was_created = Tier.objects.get_or_create(
            code=code,
            defaults={"name": code.title(), "monthly_price_usd": monthly_price, "display_order": order},
        )
        created["tiers"] += was_created
        for resource_code, limit in limits.items():
            _, was_created = TierQuota.objects.get_or_create(
                tier=tier, resource_type_id=resource_code, defaults={"limit": limit}
            )
            created["tier_quotas"] += was_created
    existing = set(OptimizationRule.objects.values_list("name", flat=True))
    for spec in parse_rules(reference.SEED_RULES_YAML):
        if spec.name not in existing:
            _rule_save(spec)
            created["rules"] += 1
    for _, counts in reference_data_loaded.send(sender=reference_data_load):
        created.update(counts or {})
    return created


# --- Rules ----------------------------------------------------------------------------------------------


def _rule_save(spec: RuleSpec) -> OptimizationRule:
    tier = agent = None
    if spec.tier is not None:
        tier = Tier.objects.filter(code=spec.tier).first()
        if tier is None:
            raise LedgerError(f"rule {spec.name!r}: unknown tier {spec.tier!r}", code="unknown_tier")
    if spec.agent is not None:
        agent = Agent.objects.filter(id=spec.agent).first()
        if agent is None:
            raise LedgerError(f"rule {spec.name!r}: unknown agent {spec.agent!r}", code="unknown_agent")
    rule, _ = OptimizationRule.objects.update_or_create(
        name=spec.name,
        defaults={
            "metric": spec.metric,
            "operator": spec.operator,
            "threshold": spec.threshold,
            "duration_seconds": spec.duration_seconds,
            "severity": spec.severity,
            "action": spec.action,
            "cooldown_seconds": spec.cooldown_seconds,
            "enabled": spec.enabled,
            "description": spec.description,
            "scope": spec.scope,
            "tier": tier,
            "agent": agent,
        },
    )
    return rule


@transaction.atomic
def rules_load_yaml(*, text: str) -> list[OptimizationRule]:
    """Create or update the rules of a YAML file, all or none (``RuleFileError`` / ``LedgerError``)."""
    return [_rule_save(spec) for spec in parse_rules(text)]


# --- Agents and quotas ----------------------------------------------------------------------------------


def quotas_open(pairs: set[tuple[str, str]], *, tiers: dict[str, str], at: dt.datetime | None = None) -> None:
    """Open the period containing ``at`` for each (agent, resource type) of ``pairs`` that has no row yet.

    The one rule for opening a period: it starts from the agent's base limit, its override of the resource
    type if it has one, else its tier's (``tiers`` gives each agent's tier). Safe under concurrency: rows
    are inserted in one order with ``ON CONFLICT DO NOTHING``, so two openers of the same period insert it
    once and neither fails. A fixed number of queries, however many pairs.
    """
    if not pairs:
        return
    start, end = month_bounds(at or timezone.now())
    by_type: dict[str, list[str]] = {}
    for agent_id, resource_type_id in pairs:
        by_type.setdefault(resource_type_id, []).append(agent_id)
    existing_filter = Q()
    for resource_type_id, agent_ids in by_type.items():
        existing_filter |= Q(resource_type_id=resource_type_id, agent_id__in=agent_ids)
    existing = set(
        Quota.objects.filter(existing_filter, period_start=start).values_list("agent_id", "resource_type_id")
    )
    missing = sorted(pairs - existing)  # sorted: two openers of the same rows insert in one order
    if not missing:
        return
    overrides = {
        (agent_id, resource_type_id): limit
        for agent_id, resource_type_id, limit in AgentLimitOverride.objects.filter(
            agent_id__in={agent_id for agent_id, _ in missing}
        ).values_list("agent_id", "resource_type_id", "limit")
    }
    rows = []
    for agent_id, resource_type_id in missing:
        limit = overrides.get((agent_id, resource_type_id))
        if limit is None:
            limit = tier_limits(tiers[agent_id]).get(resource_type_id, 0)
        rows.append(
            Quota(
                agent_id=agent_id,
                resource_type_id=resource_type_id,
                period_start=start,
                period_end=end,
                base_limit=limit,
                limit=limit,
            )
        )
    Quota.objects.bulk_create(rows, ignore_conflicts=True)


def quota_open(*, agent: Agent, resource_type_id: str, at: dt.datetime | None = None) -> Quota:
    """The agent's quota row for the period containing ``at``, opened (``quotas_open``) if missing."""
    start, _ = month_bounds(at or timezone.now())
    quota = Quota.objects.filter(agent=agent, resource_type_id=resource_type_id, period_start=start).first()
    if quota is not None:
        return quota
    quotas_open({(agent.pk, resource_type_id)}, tiers={agent.pk: agent.tier_id}, at=at)
    return Quota.objects.get(agent=agent, resource_type_id=resource_type_id, period_start=start)


def quotas_open_all(*, agent: Agent, at: dt.datetime | None = None) -> list[Quota]:
    """Open every resource type's quota for the period, so that an agent's page shows all of them."""
    start, _ = month_bounds(at or timezone.now())
    quotas_open({(agent.pk, code) for code in resource_type_codes()}, tiers={agent.pk: agent.tier_id}, at=at)
    return list(Quota.objects.filter(agent=agent, period_start=start).select_related("resource_type"))


def quota_grant(
    *,
    agent: Agent,
    resource_type_id: str,
    amount: int,
    reason: str,
    actor: str,
    note: str = "",
    counterparty: Agent | None = None,
    at: dt.datetime | None = None,
) -> Grant:
    """Change the current period's limit by ``amount`` (negative to take unused quota away), with its grant.

    A negative grant can only take what is available: the conditional UPDATE refuses to cut into what is
    used or held, so a grant can never make an agent overspent.
    """
    if not isinstance(amount, int) or isinstance(amount, bool) or amount == 0:
        raise LedgerError("a grant amount is a non-zero whole number of units", code="invalid_amount")
    if not ResourceType.objects.filter(code=resource_type_id).exists():
        raise LedgerError(f"unknown resource type {resource_type_id!r}", code="unknown_resource_type")
    with transaction.atomic():
        quota = quota_open(agent=agent, resource_type_id=resource_type_id, at=at)
        updated = Quota.objects.filter(quota_fits(-amount), pk=quota.pk, agent_id=agent.pk).update(
            limit=F("limit") + amount, updated_at=timezone.now()
        )
        if not updated:
            quota.refresh_from_db()
            raise QuotaExceeded(
                f"cannot take {-amount:,} units of {resource_type_id}: only {quota.available:,} are unused",
                details={"requested": -amount, "available": quota.available},
            )
        return Grant.objects.create(
            quota=quota,
            agent_id=quota.agent_id,
            resource_type_id=quota.resource_type_id,
            amount=amount,
            reason=reason,
            actor=actor,
            note=note,
            counterparty_agent=counterparty,
        )


def _custom_limits_validate(limits: dict[str, int]) -> None:
    known = set(ResourceType.objects.values_list("code", flat=True))
    for resource_type_id, limit in limits.items():
        if resource_type_id not in known:
            raise LedgerError(f"unknown resource type {resource_type_id!r}", code="unknown_resource_type")
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
            raise LedgerError(
                f"the limit of {resource_type_id} must be a whole number >= 0", code="invalid_amount"
            )


@transaction.atomic
def agent_create(
    *,
    agent_id: str,
    tier_code: str,
    name: str = "",
    monthly_budget_usd: Decimal | None = None,
    custom_limits: dict[str, int] | None = None,
    metadata: dict | None = None,
) -> Agent:
    if Agent.objects.filter(id=agent_id).exists():
        raise Conflict(f"agent {agent_id!r} already exists", code="agent_exists")
    tier = Tier.objects.filter(code=tier_code).first()
    if tier is None:
        raise LedgerError(f"unknown tier {tier_code!r}", code="unknown_tier")
    agent = Agent(
        id=agent_id,
        name=name or agent_id,
        tier=tier,
        monthly_budget_usd=monthly_budget_usd,
        metadata=metadata or {},
    )
    agent.full_clean()
    agent.save()
    for resource_type_id, limit in (custom_limits or {}).items():
        AgentLimitOverride.objects.create(agent=agent, resource_type_id=resource_type_id, limit=limit)
    return agent


def _quotas_rebase(*, agent: Agent, actor: str, why: str, reason: str) -> None:
    """Re-base the current period's limits on the agent's base limits, keeping the grants on top.

    Limits never drop below what is already used or held: such a floor is recorded as a ``tier_change``
    grant, so that ``limit == base_limit + grants`` still holds.
    """
    new_limits = base_limits(agent=agent)
    start, _ = month_bounds(timezone.now())
    for quota in Quota.objects.filter(agent=agent, period_start=start).locked():
        granted = quota.limit - quota.base_limit
        new_base = new_limits.get(quota.resource_type_id, 0)
        floor = quota.committed
        new_limit = new_base + granted
        if new_limit < floor:
            Grant.objects.create(
                quota=quota,
                agent_id=quota.agent_id,
                resource_type_id=quota.resource_type_id,
                amount=floor - new_limit,
                reason=reason,
                actor=actor,
                note=f"kept at what was already used or held ({why})",
            )
            new_limit = floor
        if (quota.base_limit, quota.limit) != (new_base, new_limit):
            Quota.objects.filter(pk=quota.pk, agent_id=agent.pk).update(
                base_limit=new_base, limit=new_limit, updated_at=timezone.now()
            )


@transaction.atomic
def agent_change_tier(*, agent: Agent, tier: Tier, actor: str) -> Agent:
    """Move an agent to another tier, re-basing the current period's limits on the new tier."""
    agent = Agent.objects.select_for_update(no_key=True).get(pk=agent.pk)
    if agent.tier_id == tier.pk:
        return agent
    agent.tier = tier
    agent.save(update_fields=["tier", "updated_at"])
    _quotas_rebase(agent=agent, actor=actor, why=f"moved to {tier.code}", reason=Grant.Reason.TIER_CHANGE)
    return agent


AGENT_PLAIN_FIELDS = ("name", "monthly_budget_usd", "metadata", "min_instances", "max_instances")


@transaction.atomic
def agent_update(*, agent: Agent, actor: str, **changes) -> Agent:
    """Apply a partial update: plain fields, tier, status and custom limits (which replace the old set)."""
    agent = Agent.objects.select_for_update(no_key=True).get(pk=agent.pk)
    if "tier" in changes:
        agent = agent_change_tier(agent=agent, tier=changes["tier"], actor=actor)
    plain = {name: changes[name] for name in AGENT_PLAIN_FIELDS if name in changes}
    if plain:
        for name, value in plain.items():
            setattr(agent, name, value)
        if not agent.min_instances <= agent.max_instances:
            raise LedgerError("min_instances cannot exceed max_instances", code="invalid_instances")
        # Keep the running instance count inside new bounds rather than refusing the change.
        agent.instance_count = min(max(agent.instance_count, agent.min_instances), agent.max_instances)
        agent.save(update_fields=[*plain, "instance_count", "updated_at"])
    if "status" in changes:
        agent_set_status(agent=agent, status=changes["status"], reason=changes.get("status_reason", ""))
    if "custom_limits" in changes:
        limits: dict[str, int] = changes["custom_limits"]
        _custom_limits_validate(limits)
        AgentLimitOverride.objects.filter(agent=agent).exclude(resource_type_id__in=limits).delete()
        for resource_type_id, limit in limits.items():
            AgentLimitOverride.objects.update_or_create(
                agent=agent, resource_type_id=resource_type_id, defaults={"limit": limit}
            )
        _quotas_rebase(
            agent=agent, actor=actor, why="custom limits changed", reason=Grant.Reason.LIMIT_CHANGE
        )
    agent.refresh_from_db()
    return agent


def agent_set_status(*, agent: Agent, status: str, reason: str = "") -> Agent:
    if status not in Agent.Status.values:
        raise LedgerError(f"unknown status {status!r}", code="invalid_status")
    Agent.objects.filter(pk=agent.pk).update(
        status=status, status_reason=reason[:300], updated_at=timezone.now()
    )
    agent.status = status
    agent.status_reason = reason[:300]
    return agent

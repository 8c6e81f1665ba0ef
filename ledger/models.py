"""The ledger: what exists (resource types, prices, tiers, agents, quotas) and what was spent (usage logs).

Quotas are a cache of the ledger: ``used`` always equals the sum of the consumption rows of ``usage_logs``
for that period, and ``limit`` equals the base limit plus the sum of the period's grants. Database
constraints keep the counters within their bounds whatever the caller does.
"""

from __future__ import annotations

from decimal import Decimal

from django.core.validators import MinValueValidator, RegexValidator
from django.db import models
from django.db.models import F, Q

from ledger.invariants import quota_available, quota_fits
from ledger.money import cents, usd_text

MONEY = {"max_digits": 20, "decimal_places": 2}
UNIT_PRICE = {"max_digits": 24, "decimal_places": 12}
COST = {"max_digits": 28, "decimal_places": 12}


class ResourceType(models.Model):
    """A kind of thing an agent spends, counted in integer units (``COMPUTE_MS``, ``AI_TOKENS``, ...)."""

    code = models.CharField(max_length=32, primary_key=True)
    name = models.CharField(max_length=100)
    unit = models.CharField(max_length=32, help_text="What one unit is: milliseconds, tokens, KB, ...")
    description = models.TextField(blank=True)
    display_order = models.PositiveSmallIntegerField(default=0)

    class Meta:
        ordering = ["display_order", "code"]

    def __str__(self) -> str:
        return self.code


class ResourcePriceQuerySet(models.QuerySet):
    def in_effect(self, at):
        return self.filter(effective_from__lte=at).order_by("resource_type_id", "-effective_from")


class ResourcePrice(models.Model):
    """A list price in USD per unit, from ``effective_from`` until the next price of the same type.

    New prices apply to new usage only: each usage row copies the unit price it was charged at.
    """

    resource_type = models.ForeignKey(ResourceType, on_delete=models.PROTECT, related_name="prices")
    unit_price_usd = models.DecimalField(**UNIT_PRICE, validators=[MinValueValidator(Decimal("0"))])
    effective_from = models.DateTimeField()
    note = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = ResourcePriceQuerySet.as_manager()

    class Meta:
        ordering = ["resource_type_id", "-effective_from"]
        constraints = [
            models.UniqueConstraint(
                fields=["resource_type", "effective_from"], name="price_unique_effective"
            ),
            models.CheckConstraint(condition=Q(unit_price_usd__gte=0), name="price_non_negative"),
        ]

    def __str__(self) -> str:
        price = usd_text(self.unit_price_usd)
        return f"{self.resource_type_id} {price} from {self.effective_from:%Y-%m-%d %H:%M}"


class Tier(models.Model):
    FREE = "FREE"
    PRO = "PRO"
    ENTERPRISE = "ENTERPRISE"
    CUSTOM = "CUSTOM"

    code = models.CharField(max_length=32, primary_key=True)
    name = models.CharField(max_length=100)
    monthly_price_usd = models.DecimalField(**MONEY, default=Decimal("0"))
    description = models.TextField(blank=True)
    display_order = models.PositiveSmallIntegerField(default=0)

    class Meta:
        ordering = ["display_order", "code"]

    def __str__(self) -> str:
        return self.code


class TierQuota(models.Model):
    """The monthly limit of one resource type in one tier."""

    tier = models.ForeignKey(Tier, on_delete=models.CASCADE, related_name="quotas")
    resource_type = models.ForeignKey(ResourceType, on_delete=models.PROTECT, related_name="+")
    limit = models.BigIntegerField(validators=[MinValueValidator(0)])

    class Meta:
        ordering = ["tier__display_order", "resource_type__display_order"]
        constraints = [
            models.UniqueConstraint(fields=["tier", "resource_type"], name="tier_quota_unique"),
            models.CheckConstraint(condition=Q(limit__gte=0), name="tier_quota_limit_non_negative"),
        ]

    def __str__(self) -> str:
        return f"{self.tier_id} {self.resource_type_id}: {self.limit:,}"


AGENT_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}"
agent_id_validator = RegexValidator(
    rf"^{AGENT_ID_PATTERN}\Z",
    "An agent id is 1-64 letters, digits, '-', '_', '.' or ':', starting with a letter or digit.",
)


class Organization(models.Model):
    """The top of the budget hierarchy: teams belong to one organization, agents to one team."""

    id = models.CharField(max_length=64, primary_key=True, validators=[agent_id_validator])
    name = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return self.id


class Team(models.Model):
    id = models.CharField(max_length=64, primary_key=True, validators=[agent_id_validator])
    name = models.CharField(max_length=200, blank=True)
    organization = models.ForeignKey(
        Organization, on_delete=models.PROTECT, null=True, blank=True, related_name="teams"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return self.id


class Agent(models.Model):
    class Status(models.TextChoices):
        ACTIVE = "active", "Active"
        THROTTLED = "throttled", "Throttled"
        SUSPENDED = "suspended", "Suspended"

    id = models.CharField(max_length=64, primary_key=True, validators=[agent_id_validator])
    name = models.CharField(max_length=200, blank=True)
    tier = models.ForeignKey(Tier, on_delete=models.PROTECT, related_name="agents")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ACTIVE, db_index=True)
    status_reason = models.CharField(max_length=300, blank=True)
    monthly_budget_usd = models.DecimalField(
        **MONEY,
        null=True,
        blank=True,
        validators=[MinValueValidator(Decimal("0"))],
        help_text="A hard agent/month budget (kept as one, by a database trigger: ledger/budgets.py).",
    )
    team = models.ForeignKey(Team, on_delete=models.PROTECT, null=True, blank=True, related_name="agents")
    instance_count = models.PositiveIntegerField(default=1)
    min_instances = models.PositiveIntegerField(default=1)
    max_instances = models.PositiveIntegerField(default=10)
    metadata = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.CheckConstraint(
                condition=Q(min_instances__lte=F("instance_count"))
                & Q(instance_count__lte=F("max_instances")),
                name="agent_instances_within_bounds",
            ),
            models.CheckConstraint(
                condition=Q(monthly_budget_usd__isnull=True) | Q(monthly_budget_usd__gte=0),
                name="agent_budget_non_negative",
            ),
        ]

    def __str__(self) -> str:
        return self.id


class AgentLimitOverride(models.Model):
    """A per-agent monthly limit that replaces the tier's (how CUSTOM agents get their limits)."""

    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="limit_overrides")
    resource_type = models.ForeignKey(ResourceType, on_delete=models.PROTECT, related_name="+")
    limit = models.BigIntegerField(validators=[MinValueValidator(0)])

    class Meta:
        ordering = ["agent_id", "resource_type__display_order"]
        constraints = [
            models.UniqueConstraint(fields=["agent", "resource_type"], name="limit_override_unique"),
            models.CheckConstraint(condition=Q(limit__gte=0), name="limit_override_non_negative"),
        ]

    def __str__(self) -> str:
        return f"{self.agent_id} {self.resource_type_id}: {self.limit:,}"


# The order in which every writer locks several quota rows at once: by agent, then by id. Two writers that
# lock rows in one global order wait for each other instead of deadlocking; leading with the agent keeps
# that order global once the table is distributed by agent (docs/scaling.md), and on one server it orders
# the locks just as well.
QUOTA_LOCK_ORDER = ("agent_id", "id")


class QuotaQuerySet(models.QuerySet):
    def locked(self) -> QuotaQuerySet:
        """These rows, locked ``FOR NO KEY UPDATE`` in ``QUOTA_LOCK_ORDER`` when the query is evaluated.

        NO KEY UPDATE, not UPDATE: an allocation holds a key-share lock on its quota row (its INSERTs'
        foreign keys) while it waits for budgets, and must not be waited for by a writer it waits for.
        """
        return self.select_for_update(no_key=True, of=("self",)).order_by(*QUOTA_LOCK_ORDER)


class Quota(models.Model):
    """One agent's allowance of one resource type for one period, with its live counters.

    ``available`` is what the capacity rule (``ledger.invariants``) leaves; ``spent_usd`` caches the
    period's cost for budgets. The constraints are the last line of defence: the allocation engine takes
    quota with a conditional UPDATE, and PostgreSQL refuses any write that would overspend.
    """

    # quota_unique_period leads with the agent: no index of its own.
    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="quotas", db_index=False)
    resource_type = models.ForeignKey(ResourceType, on_delete=models.PROTECT, related_name="+")
    period_start = models.DateTimeField()
    period_end = models.DateTimeField()
    base_limit = models.BigIntegerField(help_text="The tier's (or override's) limit when the period opened.")
    limit = models.BigIntegerField(db_column="limit_amount", help_text="Base limit plus every grant.")
    used = models.BigIntegerField(default=0)
    reserved = models.BigIntegerField(default=0, help_text="Held by open holds, not yet settled.")
    listed = models.BigIntegerField(default=0, help_text="Set aside for sale in the marketplace.")
    spent_usd = models.DecimalField(
        **COST,
        default=Decimal("0"),
        help_text="Cost of this period's usage rows (consumption and purchases).",
    )
    updated_at = models.DateTimeField(auto_now=True)

    objects = QuotaQuerySet.as_manager()

    class Meta:
        db_table = "quotas"
        ordering = ["agent_id", "-period_start", "resource_type__display_order"]
        indexes = [
            # The sweeps read the current period's rows of the whole fleet (in agent order): without an
            # index that leads with the period, each of them would scan every month ever kept.
            models.Index(fields=["period_start", "agent"], name="quota_period_agent_idx"),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["agent", "resource_type", "period_start"], name="quota_unique_period"
            ),
            # The targets of the allocations', the usage rows' and the grants' one foreign key
            # (ledger/schema.py).
            models.UniqueConstraint(fields=["id", "agent", "resource_type"], name="quota_identity"),
            models.UniqueConstraint(
                fields=["id", "agent", "resource_type", "period_start"], name="quota_identity_period"
            ),
            models.CheckConstraint(condition=Q(used__gte=0), name="quota_used_non_negative"),
            models.CheckConstraint(condition=Q(reserved__gte=0), name="quota_reserved_non_negative"),
            models.CheckConstraint(condition=Q(limit__gte=0), name="quota_limit_non_negative"),
            models.CheckConstraint(condition=quota_fits(0), name="quota_within_limit"),
            models.CheckConstraint(
                condition=Q(period_end__gt=F("period_start")), name="quota_period_ordered"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.agent_id} {self.resource_type_id} {self.period_start:%Y-%m}"

    @property
    def available(self) -> int:
        return quota_available(limit=self.limit, used=self.used, reserved=self.reserved, listed=self.listed)

    @property
    def utilization_percent(self) -> Decimal:
        if not self.limit:
            return Decimal("0.00") if not self.used else Decimal("100.00")
        return cents(Decimal(self.used + self.reserved) * 100 / Decimal(self.limit))

    @property
    def committed(self) -> int:
        """What may not be taken away by a grant: used, held or listed for sale."""
        return self.used + self.reserved + self.listed


class Grant(models.Model):
    """A change to a period's limit beyond the tier, so that every limit can be explained. Append-only."""

    class Reason(models.TextChoices):
        MANUAL = "manual", "Manual grant"
        SCALING = "scaling", "Vertical scaling"
        SHARE_IN = "share_in", "Shared in from another agent"
        SHARE_OUT = "share_out", "Shared out to another agent"
        MARKETPLACE_PURCHASE = "marketplace_purchase", "Marketplace purchase"
        MARKETPLACE_SALE = "marketplace_sale", "Marketplace sale"
        TIER_CHANGE = "tier_change", "Tier change"
        LIMIT_CHANGE = "limit_change", "Custom limit change"

    # The quota's agent and resource type, written with every grant: one composite foreign key, (quota,
    # agent, resource type) -> the quota's (id, agent, resource type), checks all three (ledger/schema.py),
    # so a grant names its quota's own agent. The agent lets a grant live with its agent's other rows.
    quota = models.ForeignKey(Quota, on_delete=models.PROTECT, related_name="grants", db_constraint=False)
    agent = models.ForeignKey(
        Agent, on_delete=models.PROTECT, related_name="grants", db_index=False, db_constraint=False
    )
    resource_type = models.ForeignKey(
        ResourceType, on_delete=models.PROTECT, related_name="+", db_index=False, db_constraint=False
    )
    amount = models.BigIntegerField(help_text="Units added to the limit (negative when taken away).")
    reason = models.CharField(max_length=32, choices=Reason.choices)
    actor = models.CharField(max_length=150, help_text="Who made the change: a username, agent or task.")
    counterparty_agent = models.ForeignKey(
        Agent, on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )
    note = models.CharField(max_length=300, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.amount:+,} {self.quota} ({self.reason})"


class UsageLog(models.Model):
    """One consumption (or purchase) with the unit price it was charged at. Append-only."""

    class Kind(models.TextChoices):
        ALLOCATION = "allocation", "Allocation"
        SETTLEMENT = "settlement", "Hold settlement"
        EXECUTION = "execution", "Execution"
        PURCHASE = "purchase", "Marketplace purchase"

    # Kinds whose ``amount`` is counted in the period's ``used``; a purchase raises the limit instead.
    CONSUMPTION_KINDS = (Kind.ALLOCATION, Kind.SETTLEMENT, Kind.EXECUTION)

    # On PostgreSQL the three references are checked by one composite foreign key, (quota, agent, resource
    # type) -> the quota's (id, agent, resource type): see ledger/schema.py. Read by agent, agent and
    # type, or time (the indexes below), never by type alone: no index of its own.
    agent = models.ForeignKey(
        Agent, on_delete=models.PROTECT, related_name="usage_logs", db_index=False, db_constraint=False
    )
    resource_type = models.ForeignKey(
        ResourceType, on_delete=models.PROTECT, related_name="+", db_index=False, db_constraint=False
    )
    # No index on quota_id alone either: the composite key's checks, and the reconciliation, find a
    # quota's rows through usage_agent_type_time_idx (its agent and resource type lead it).
    quota = models.ForeignKey(
        Quota, on_delete=models.PROTECT, related_name="usage_logs", db_constraint=False, db_index=False
    )
    amount = models.BigIntegerField()
    unit_price_usd = models.DecimalField(**UNIT_PRICE)
    cost_usd = models.DecimalField(**COST)
    task_id = models.CharField(max_length=200, blank=True)
    kind = models.CharField(max_length=16, choices=Kind.choices)
    idempotency_key = models.CharField(max_length=255, blank=True)
    metadata = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(db_index=False)
    # The quota period the row is charged to: its quota's, held to it by the composite foreign key
    # (ledger/schema.py). A settlement belongs to its hold's period even when it is made after that period
    # ended, so reports by period (cost, budgets, the dashboard) read this, not ``created_at``.
    period_start = models.DateTimeField()

    class Meta:
        db_table = "usage_logs"
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["agent", "created_at"], name="usage_agent_time_idx"),
            models.Index(fields=["agent", "resource_type", "created_at"], name="usage_agent_type_time_idx"),
            models.Index(fields=["created_at"], name="usage_time_idx"),
        ]
        constraints = [
            models.CheckConstraint(condition=Q(amount__gt=0), name="usage_amount_positive"),
            models.CheckConstraint(condition=Q(cost_usd__gte=0), name="usage_cost_non_negative"),
        ]

    def __str__(self) -> str:
        return (
            f"{self.agent_id} {self.kind} {self.amount:,} {self.resource_type_id} {usd_text(self.cost_usd)}"
        )


BUDGET_MONEY = {"max_digits": 20, "decimal_places": 6}
DEFAULT_BUDGET_THRESHOLDS = (50, 80, 90, 100)


def budget_thresholds_default() -> list[int]:
    return list(DEFAULT_BUDGET_THRESHOLDS)


class Budget(models.Model):
    """A dollar limit on what one scope may spend in a window, checked inside every allocation.

    The row holds its current window's figures: ``spent_usd`` (committed and settled cost),
    ``reserved_usd`` (quoted cost of open holds) and ``rollover_usd`` (what the previous window left,
    added to the limit). A window that has ended is rolled when the budget is next charged or swept
    (``allocation.sql``); readers see it rolled already (``ledger.budgets.budget_figures``).
    """

    class Scope(models.TextChoices):
        ORGANIZATION = "organization", "Organization"
        TEAM = "team", "Team"
        AGENT = "agent", "Agent"
        RUN = "run", "Run"

    class Window(models.TextChoices):
        DAY = "day", "Day"
        WEEK = "week", "Week (from Monday 00:00 UTC)"
        MONTH = "month", "Calendar month"
        TOTAL = "total", "Total (a run's life)"

    class Mode(models.TextChoices):
        HARD = "hard", "Hard: refuse"
        SOFT = "soft", "Soft: alert only"

    scope = models.CharField(max_length=16, choices=Scope.choices)
    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, null=True, blank=True, related_name="budgets"
    )
    team = models.ForeignKey(Team, on_delete=models.CASCADE, null=True, blank=True, related_name="budgets")
    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, null=True, blank=True, related_name="budgets")
    run_id = models.CharField(max_length=200, blank=True)
    # "window" is a reserved word in SQL: the column has a plain name.
    window = models.CharField(max_length=8, choices=Window.choices, db_column="budget_window")
    limit_usd = models.DecimalField(**BUDGET_MONEY, validators=[MinValueValidator(Decimal("0"))])
    mode = models.CharField(max_length=8, choices=Mode.choices, default=Mode.HARD)
    rollover_percent = models.PositiveSmallIntegerField(default=0)
    thresholds = models.JSONField(
        default=budget_thresholds_default, blank=True, help_text="Alert percentages, e.g. [50, 80, 100]"
    )
    managed = models.BooleanField(
        default=False, help_text="The agent's monthly_budget_usd: change it there, not here."
    )
    window_start = models.DateTimeField()
    window_end = models.DateTimeField(null=True, blank=True, help_text="Empty for a total window.")
    spent_usd = models.DecimalField(**COST, default=Decimal("0"))
    reserved_usd = models.DecimalField(**COST, default=Decimal("0"))
    rollover_usd = models.DecimalField(**COST, default=Decimal("0"))
    expires_at = models.DateTimeField(
        null=True, blank=True, help_text="A run's end: no call may name it after."
    )
    refused_at = models.DateTimeField(
        null=True, blank=True, help_text="When it first refused a call since it last had room."
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["id"]
        # Every allocation looks up the agent's budgets (the run's by budget_unique_run, the team's and the
        # organization's by their foreign keys' indexes): an agent's runs must not be scanned for them.
        indexes = [models.Index(fields=["agent"], condition=Q(scope="agent"), name="budget_agent_scope_idx")]
        constraints = [
            models.CheckConstraint(
                condition=(
                    Q(scope="organization", organization__isnull=False, team__isnull=True, agent__isnull=True)
                    | Q(scope="team", organization__isnull=True, team__isnull=False, agent__isnull=True)
                    | Q(scope="agent", organization__isnull=True, team__isnull=True, agent__isnull=False)
                    | Q(scope="run", organization__isnull=True, team__isnull=True, agent__isnull=False)
                ),
                name="budget_scope_target_consistent",
            ),
            models.CheckConstraint(
                condition=(Q(scope="run", window="total") & ~Q(run_id="")) | (~Q(scope="run") & Q(run_id="")),
                name="budget_run_named_total",
            ),
            models.CheckConstraint(
                condition=Q(window="total", window_end__isnull=True)
                | (~Q(window="total") & Q(window_end__gt=F("window_start"))),
                name="budget_window_ordered",
            ),
            models.CheckConstraint(condition=Q(limit_usd__gte=0), name="budget_limit_non_negative"),
            models.CheckConstraint(condition=Q(spent_usd__gte=0), name="budget_spent_non_negative"),
            models.CheckConstraint(condition=Q(reserved_usd__gte=0), name="budget_reserved_non_negative"),
            models.CheckConstraint(condition=Q(rollover_usd__gte=0), name="budget_rollover_non_negative"),
            models.CheckConstraint(
                condition=Q(rollover_percent__gte=0, rollover_percent__lte=100),
                name="budget_rollover_percent",
            ),
            models.UniqueConstraint(
                fields=["agent", "run_id"], condition=Q(scope="run"), name="budget_unique_run"
            ),
            models.UniqueConstraint(
                fields=["agent"], condition=Q(managed=True), name="budget_unique_managed"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.scope} {self.scope_id} {self.window} {usd_text(self.limit_usd)}"

    @property
    def scope_id(self) -> str:
        if self.scope == self.Scope.ORGANIZATION:
            return self.organization_id
        if self.scope == self.Scope.TEAM:
            return self.team_id
        if self.scope == self.Scope.RUN:
            return self.run_id
        return self.agent_id


class OptimizationRule(models.Model):
    class Scope(models.TextChoices):
        GLOBAL = "global", "Global"
        TIER = "tier", "Tier"
        AGENT = "agent", "Agent"

    class Metric(models.TextChoices):
        RESOURCE_UTILIZATION_PERCENT = "resource_utilization_percent", "Resource utilization %"
        BUDGET_UTILIZATION_PERCENT = "budget_utilization_percent", "Budget utilization %"
        ERROR_RATE_PERCENT = "error_rate_percent", "Error rate %"
        COST_SPIKE_RATIO = "cost_spike_ratio", "Cost spike ratio"
        P95_DURATION_MS = "p95_duration_ms", "p95 duration (ms)"
        THROUGHPUT_PER_HOUR = "throughput_per_hour", "Throughput per hour"
        P95_DURATION_VS_BASELINE = "p95_duration_vs_baseline", "p95 duration vs the 7-day baseline"
        ERROR_RATE_VS_BASELINE = "error_rate_vs_baseline", "Error rate vs the 7-day baseline"
        THROUGHPUT_VS_BASELINE = "throughput_vs_baseline", "Throughput vs the 7-day baseline"

    class Operator(models.TextChoices):
        GT = ">", ">"
        GTE = ">=", ">="
        LT = "<", "<"
        LTE = "<=", "<="
        EQ = "==", "=="

    class Severity(models.TextChoices):
        INFO = "info", "Info"
        WARNING = "warning", "Warning"
        CRITICAL = "critical", "Critical"

    class Action(models.TextChoices):
        NOTIFY = "notify", "Notify"
        THROTTLE = "throttle", "Throttle"
        SCALE_UP = "scale_up", "Scale up"
        SCALE_DOWN = "scale_down", "Scale down"
        RECOMMEND = "recommend", "Recommend"

    name = models.CharField(max_length=100, unique=True)
    description = models.TextField(blank=True)
    scope = models.CharField(max_length=16, choices=Scope.choices, default=Scope.GLOBAL)
    tier = models.ForeignKey(Tier, on_delete=models.CASCADE, null=True, blank=True, related_name="rules")
    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, null=True, blank=True, related_name="rules")
    metric = models.CharField(max_length=64, choices=Metric.choices)
    operator = models.CharField(max_length=2, choices=Operator.choices)
    threshold = models.DecimalField(max_digits=20, decimal_places=6)
    duration_seconds = models.PositiveIntegerField(default=0, help_text="How long the condition must hold.")
    severity = models.CharField(max_length=16, choices=Severity.choices, default=Severity.WARNING)
    action = models.CharField(max_length=16, choices=Action.choices, default=Action.NOTIFY)
    cooldown_seconds = models.PositiveIntegerField(default=3600)
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(
                condition=(
                    Q(scope="global", tier__isnull=True, agent__isnull=True)
                    | Q(scope="tier", tier__isnull=False, agent__isnull=True)
                    | Q(scope="agent", tier__isnull=True, agent__isnull=False)
                ),
                name="rule_scope_target_consistent",
            ),
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def condition(self) -> str:
        return f"{self.metric} {self.operator} {self.threshold.normalize():f}"


class PeriodicRun(models.Model):
    """The last tick of a periodic schedule that ran to completion (``ledger.periodic``): a second beat's send
    of the same tick finds it and skips."""

    schedule = models.CharField(max_length=200, primary_key=True)  # django-celery-beat's PeriodicTask.name
    task = models.CharField(max_length=200)
    sent_at = models.DateTimeField(help_text="When a beat sent the run: the tick it belongs to.")
    finished_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"{self.schedule} at {self.sent_at:%Y-%m-%d %H:%M:%S}"

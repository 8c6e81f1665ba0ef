"""Reading the ledger and acting on it: executions, alerts and their delivery, rule state, scaling,
the marketplace, and A/B experiments."""

from __future__ import annotations

import uuid
from decimal import Decimal

from django.core.serializers.json import DjangoJSONEncoder
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import F, Q

from ledger.models import COST, UNIT_PRICE, Agent, OptimizationRule, Quota, ResourceType, Tier
from ledger.models import DEFAULT_BUDGET_THRESHOLDS as LEDGER_BUDGET_THRESHOLDS
from ledger.money import usd_text
from optimization.webhooks import webhook_secret_generate, webhook_secret_validate

DEFAULT_BUDGET_THRESHOLDS = list(LEDGER_BUDGET_THRESHOLDS)
# Bounds of a webhook endpoint's own limits: what one delivery run may open to it, and what one request holds.
MAX_CONCURRENT_REQUESTS = 32
MAX_BATCH_SIZE = 1000


def default_thresholds() -> list[int]:
    return list(DEFAULT_BUDGET_THRESHOLDS)


class Execution(models.Model):
    """One run of an agent's superpower, with the resources it took (all or nothing) and how it went."""

    # Read by agent and time (execution_agent_time_idx, which also serves PROTECT's check) or by time: the
    # key needs no index of its own, nor its varchar_pattern_ops twin, both written by every execution.
    agent = models.ForeignKey(Agent, on_delete=models.PROTECT, related_name="executions", db_index=False)
    superpower = models.CharField(max_length=100)
    resources = models.JSONField(default=dict, help_text="resource type -> units taken")
    # Both optional: an execution without a duration counts in cost, not in latency; one without an outcome
    # (success unknown) counts in cost and throughput, not in success or error rates.
    duration_ms = models.PositiveIntegerField(null=True, blank=True)
    success = models.BooleanField(null=True, blank=True, help_text="Empty: the outcome was not reported.")
    output_units = models.PositiveIntegerField(default=1, help_text="Useful output, for efficiency scores.")
    cost_usd = models.DecimalField(**COST)
    task_id = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(db_index=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["agent", "created_at"], name="execution_agent_time_idx")]

    def __str__(self) -> str:
        outcome = {True: "ok", False: "failed", None: "outcome unknown"}[self.success]
        return f"{self.agent_id} {self.superpower} ({outcome})"


class AlertSettings(models.Model):
    """Where an agent's alerts go and at which budget percentages. Agents without a row use the defaults."""

    agent = models.OneToOneField(Agent, on_delete=models.CASCADE, related_name="alert_settings")
    budget_thresholds = models.JSONField(default=default_thresholds, help_text="Percentages, e.g. [50, 80]")
    email = models.EmailField(blank=True)

    class Meta:
        verbose_name_plural = "alert settings"

    def __str__(self) -> str:
        return f"alert settings of {self.agent_id}"


class WebhookEndpoint(models.Model):
    """A URL that receives alerts as signed JSON (Standard Webhooks, ``optimization/webhooks.py``): for one
    agent, or for all agents when ``agent`` is empty. How hard it may be pushed is the endpoint's to say."""

    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, null=True, blank=True, related_name="webhooks")
    url = models.URLField(max_length=500)
    secret = models.CharField(
        max_length=300,
        default=webhook_secret_generate,
        validators=[webhook_secret_validate],
        help_text="Signing secret (whsec_ and base64): give it to the receiver to verify webhook-signature.",
    )
    enabled = models.BooleanField(default=True)
    max_concurrent_requests = models.PositiveSmallIntegerField(
        default=4,
        validators=[MinValueValidator(1), MaxValueValidator(MAX_CONCURRENT_REQUESTS)],
        help_text="At most this many requests to this endpoint at the same time.",
    )
    batch_size = models.PositiveSmallIntegerField(
        default=1,
        validators=[MinValueValidator(1), MaxValueValidator(MAX_BATCH_SIZE)],
        help_text="1: one alert per request, as a JSON object. More: up to this many alerts per request, "
        "as a JSON array (only for a receiver that accepts arrays).",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.CheckConstraint(
                condition=Q(
                    max_concurrent_requests__gte=1, max_concurrent_requests__lte=MAX_CONCURRENT_REQUESTS
                ),
                name="webhook_concurrency_in_range",
            ),
            models.CheckConstraint(
                condition=Q(batch_size__gte=1, batch_size__lte=MAX_BATCH_SIZE),
                name="webhook_batch_size_in_range",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.url} ({self.agent_id or 'global'})"


class Alert(models.Model):
    class Kind(models.TextChoices):
        BUDGET = "budget", "Budget threshold"
        BUDGET_RESOLVED = "budget_resolved", "Budget has room again"
        RULE = "rule", "Optimization rule"
        COST_SPIKE = "cost_spike", "Cost spike"
        SCALING = "scaling", "Scaling"

    # alert_agent_time_idx leads with the agent: no index of its own (a rule can write 100,000 alerts in
    # one evaluation, and every index is one more write per alert).
    # Empty for an alert about a team's or an organization's budget.
    agent = models.ForeignKey(
        Agent, on_delete=models.CASCADE, null=True, blank=True, related_name="alerts", db_index=False
    )
    kind = models.CharField(max_length=16, choices=Kind.choices)
    severity = models.CharField(max_length=16, choices=OptimizationRule.Severity.choices)
    title = models.CharField(max_length=200)
    message = models.TextField()
    data = models.JSONField(default=dict, blank=True, encoder=DjangoJSONEncoder)
    rule = models.ForeignKey(
        OptimizationRule, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    # At most one alert per dedup key: e.g. budget:<budget id>:<window start>:<threshold>. This is what
    # keeps a sweep that runs twice from alerting twice. Unique by a constraint (alert_unique_dedup_key),
    # not by ``unique=True``, which would add a second, pattern-matching index on PostgreSQL that nothing
    # uses.
    dedup_key = models.CharField(max_length=300)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    # A rule's alert stands for one episode of its condition (rule, agent, subject, since when it
    # holds): while the condition keeps holding, the rule notifies again each cooldown by updating this
    # row and sending it out again, rather than inserting another.
    notified_at = models.DateTimeField(null=True, blank=True, help_text="When it was last sent out again.")
    notifications = models.PositiveIntegerField(
        db_default=1, help_text="How many times it has been sent out."
    )
    delivery_queued_at = models.DateTimeField(null=True, blank=True)
    acknowledged_at = models.DateTimeField(null=True, blank=True)
    acknowledged_by = models.CharField(max_length=150, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["agent", "created_at"], name="alert_agent_time_idx"),
            models.Index(
                fields=["id"], condition=Q(delivery_queued_at__isnull=True), name="alert_not_fanned_out_idx"
            ),
        ]
        constraints = [models.UniqueConstraint(fields=["dedup_key"], name="alert_unique_dedup_key")]

    def __str__(self) -> str:
        return f"[{self.severity}] {self.agent_id or self.data.get('scope_id', 'global')}: {self.title}"

    @property
    def is_open(self) -> bool:
        return self.acknowledged_at is None


class AlertDelivery(models.Model):
    """One channel's delivery of one alert, with its attempts; each attempt claimed by a delivery run
    (``optimization/services/alert_delivery.py``) before it is sent."""

    class Channel(models.TextChoices):
        WEBHOOK = "webhook", "Webhook"
        EMAIL = "email", "Email"

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        DELIVERED = "delivered", "Delivered"
        FAILED = "failed", "Failed"

    alert = models.ForeignKey(Alert, on_delete=models.CASCADE, related_name="deliveries")
    channel = models.CharField(max_length=16, choices=Channel.choices)
    webhook = models.ForeignKey(WebhookEndpoint, on_delete=models.SET_NULL, null=True, blank=True)
    target = models.CharField(max_length=500)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveSmallIntegerField(default=0)
    last_status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    last_error = models.CharField(max_length=500, blank=True)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    delivered_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name_plural = "alert deliveries"
        indexes = [
            models.Index(fields=["next_attempt_at"], condition=Q(status="pending"), name="delivery_due_idx"),
        ]
        constraints = [
            models.UniqueConstraint(fields=["alert", "channel", "target"], name="delivery_unique_target"),
        ]

    def __str__(self) -> str:
        return f"{self.channel} -> {self.target} ({self.status})"


class RuleState(models.Model):
    """Since when a rule's condition has held for one subject (an agent, or an agent's resource type)."""

    # rule_state_unique_subject leads with the rule; the agent's index (for deleting an agent) is a plain
    # one, without the pattern-matching twin a foreign key's own index has on PostgreSQL.
    #
    # No foreign-key constraints in the database (``db_constraint=False``): a state is the evaluation's own
    # memory, derived from rows that exist when it is written, and every evaluation prunes it (the states
    # of rules no longer enabled, and of subjects no longer true, which an agent that is gone is). A
    # constraint would check each inserted state one by one at COMMIT, each check locking its agent row:
    # at 100,000 agents, 1.1 s of a 5.2 s first evaluation (docs/benchmarks.md). Deleting an agent or a
    # rule through Django still deletes its states (``on_delete``), and a test holds that.
    rule = models.ForeignKey(
        OptimizationRule, on_delete=models.CASCADE, related_name="states", db_index=False, db_constraint=False
    )
    agent = models.ForeignKey(
        Agent, on_delete=models.CASCADE, related_name="+", db_index=False, db_constraint=False
    )
    subject = models.CharField(
        max_length=64, blank=True, help_text="The resource type, for per-resource metrics."
    )
    true_since = models.DateTimeField()
    last_value = models.DecimalField(max_digits=20, decimal_places=6)
    last_fired_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["rule", "agent", "subject"], name="rule_state_unique_subject"),
        ]
        indexes = [models.Index(fields=["agent"], name="rule_state_agent_idx")]

    def __str__(self) -> str:
        return f"{self.rule} {self.agent_id} {self.subject}"


class ScalingPolicy(models.Model):
    """How an agent (or each agent of a tier) scales on a metric; an agent's own policy beats its tier's.
    A policy owned by neither is an experiment arm's (``ExperimentArm.scaling_policy``)."""

    agent = models.OneToOneField(
        Agent, on_delete=models.CASCADE, null=True, blank=True, related_name="scaling_policy"
    )
    tier = models.OneToOneField(
        Tier, on_delete=models.CASCADE, null=True, blank=True, related_name="scaling_policy"
    )
    metric = models.CharField(
        max_length=64,
        choices=[
            ("resource_utilization_percent", "Resource utilization %"),
            ("budget_utilization_percent", "Budget utilization %"),
        ],
        default="resource_utilization_percent",
    )
    scale_up_threshold = models.DecimalField(max_digits=6, decimal_places=2, default=Decimal("80"))
    scale_down_threshold = models.DecimalField(max_digits=6, decimal_places=2, default=Decimal("30"))
    step = models.PositiveIntegerField(default=1, help_text="Instances added or removed per decision.")
    min_instances = models.PositiveIntegerField(default=1)
    max_instances = models.PositiveIntegerField(default=10)
    quota_step_percent = models.PositiveIntegerField(
        default=0,
        help_text="Vertical scaling: percent of the base limit granted when at max instances (0: off).",
    )
    cooldown_seconds = models.PositiveIntegerField(default=600)
    enabled = models.BooleanField(default=True, help_text="Auto-scaling on or off.")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name_plural = "scaling policies"
        constraints = [
            # At most one owner: an agent's, a tier's, or neither (an experiment arm's, which the arm's
            # foreign key points at).
            models.CheckConstraint(
                condition=Q(agent__isnull=True) | Q(tier__isnull=True),
                name="scaling_policy_one_owner_at_most",
            ),
            # Hysteresis: a gap between the two thresholds is what stops flapping between up and down.
            models.CheckConstraint(
                condition=Q(scale_down_threshold__lt=F("scale_up_threshold")),
                name="scaling_thresholds_ordered",
            ),
            models.CheckConstraint(
                condition=Q(min_instances__lte=F("max_instances")), name="scaling_bounds_ordered"
            ),
        ]

    def __str__(self) -> str:
        return f"scaling policy of {self.agent_id or self.tier_id}"


class ScalingEvent(models.Model):
    class Direction(models.TextChoices):
        UP = "up", "Up"
        DOWN = "down", "Down"

    class Kind(models.TextChoices):
        HORIZONTAL = "horizontal", "Instances"
        VERTICAL = "vertical", "Quota"

    class Trigger(models.TextChoices):
        AUTO = "auto", "Auto-scaling"
        MANUAL = "manual", "Manual"
        RULE = "rule", "Rule"
        OPTIMIZE = "optimize", "Optimization"

    # Read by agent and time (scaling_agent_time_idx), or by time alone: neither key needs an index of its
    # own, nor the varchar_pattern_ops twin Django adds to each on PostgreSQL. Each would be written by every
    # event, 44,000 of them in one evaluation of a large fleet. (Deleting a resource type, which PROTECT
    # refuses while events name it, may scan the table: reference data is not deleted in the normal run.)
    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="scaling_events", db_index=False)
    direction = models.CharField(max_length=8, choices=Direction.choices)
    kind = models.CharField(max_length=16, choices=Kind.choices)
    trigger = models.CharField(max_length=16, choices=Trigger.choices)
    resource_type = models.ForeignKey(
        ResourceType, on_delete=models.PROTECT, null=True, blank=True, related_name="+", db_index=False
    )
    before = models.BigIntegerField(help_text="Instances, or the quota limit for vertical scaling.")
    after = models.BigIntegerField()
    reason = models.CharField(max_length=300)
    actor = models.CharField(max_length=150, blank=True)
    created_at = models.DateTimeField(db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["agent", "created_at"], name="scaling_agent_time_idx")]

    def __str__(self) -> str:
        return f"{self.agent_id} {self.kind} {self.direction} {self.before}->{self.after}"


class Deal(models.Model):
    """Units for sale at a unit price: from the platform, or an agent's unused quota of the current period."""

    class Status(models.TextChoices):
        OPEN = "open", "Open"
        SOLD_OUT = "sold_out", "Sold out"
        EXPIRED = "expired", "Expired"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    resource_type = models.ForeignKey(ResourceType, on_delete=models.PROTECT, related_name="+")
    amount_total = models.BigIntegerField()
    amount_left = models.BigIntegerField()
    unit_price_usd = models.DecimalField(**UNIT_PRICE)
    seller = models.ForeignKey(
        Agent, on_delete=models.PROTECT, null=True, blank=True, related_name="deals_sold"
    )
    seller_quota = models.ForeignKey(Quota, on_delete=models.PROTECT, null=True, blank=True, related_name="+")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.OPEN)
    expires_at = models.DateTimeField()
    created_at = models.DateTimeField(auto_now_add=True)
    closed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["unit_price_usd", "created_at"]
        indexes = [
            models.Index(
                fields=["resource_type", "unit_price_usd"],
                name="deal_open_price_idx",
                condition=Q(status="open"),
            ),
        ]
        constraints = [
            models.CheckConstraint(condition=Q(amount_left__gte=0), name="deal_left_non_negative"),
            models.CheckConstraint(
                condition=Q(amount_left__lte=F("amount_total")), name="deal_left_within_total"
            ),
            models.CheckConstraint(condition=Q(unit_price_usd__gte=0), name="deal_price_non_negative"),
            models.CheckConstraint(
                condition=Q(seller__isnull=True, seller_quota__isnull=True)
                | Q(seller__isnull=False, seller_quota__isnull=False),
                name="deal_agent_seller_has_quota",
            ),
        ]

    def __str__(self) -> str:
        seller = self.seller_id or "platform"
        return f"{self.amount_left:,} {self.resource_type_id} @ {usd_text(self.unit_price_usd)} from {seller}"


class Purchase(models.Model):
    deal = models.ForeignKey(Deal, on_delete=models.PROTECT, related_name="purchases")
    buyer = models.ForeignKey(Agent, on_delete=models.PROTECT, related_name="purchases")
    amount = models.BigIntegerField()
    unit_price_usd = models.DecimalField(**UNIT_PRICE)
    cost_usd = models.DecimalField(**COST)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [models.CheckConstraint(condition=Q(amount__gt=0), name="purchase_amount_positive")]

    def __str__(self) -> str:
        return f"{self.buyer_id} bought {self.amount:,} of {self.deal_id}"


class Experiment(models.Model):
    """An A/B test of optimization strategies: agents are assigned to arms and compared on cost per
    successful task."""

    name = models.CharField(max_length=100, unique=True)
    description = models.TextField(blank=True)
    started_at = models.DateTimeField()
    ended_at = models.DateTimeField(null=True, blank=True)
    applied_arm = models.ForeignKey(
        "ExperimentArm",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        help_text="The arm whose strategy was given to every assigned agent when the experiment was stopped.",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-started_at"]

    def __str__(self) -> str:
        return self.name


class ExperimentArm(models.Model):
    experiment = models.ForeignKey(Experiment, on_delete=models.CASCADE, related_name="arms")
    name = models.CharField(max_length=100)
    weight = models.PositiveIntegerField(default=1, help_text="Share of agents assigned to this arm.")
    rules = models.ManyToManyField(OptimizationRule, blank=True, related_name="+")
    scaling_policy = models.ForeignKey(ScalingPolicy, on_delete=models.SET_NULL, null=True, blank=True)
    # How the optimizer's automatic deal buying treats the arm's agents while the experiment runs: it only
    # ever holds back (an agent still needs its budget to buy anything automatically).
    buy_deals = models.BooleanField(default=True, help_text="Whether the optimizer may buy deals for them.")
    deal_max_unit_price_usd = models.DecimalField(
        **UNIT_PRICE, null=True, blank=True, help_text="The most a unit of a deal bought for them may cost."
    )

    class Meta:
        ordering = ["experiment_id", "name"]
        constraints = [models.UniqueConstraint(fields=["experiment", "name"], name="arm_unique_name")]

    def __str__(self) -> str:
        return f"{self.experiment.name}/{self.name}"


class ExperimentAssignment(models.Model):
    experiment = models.ForeignKey(Experiment, on_delete=models.CASCADE, related_name="assignments")
    arm = models.ForeignKey(ExperimentArm, on_delete=models.CASCADE, related_name="assignments")
    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="+")
    assigned_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["experiment", "agent"], name="assignment_one_arm_per_agent"),
        ]

    def __str__(self) -> str:
        return f"{self.agent_id} -> {self.arm}"


# Up to 10^20 dollars at the usage log's 12 decimal places: a sum of many ``usage_logs.cost_usd`` values.
ROLLUP_COST = {"max_digits": 32, "decimal_places": 12}


class UsageRollup(models.Model):
    """The usage log summed per hour or per day, agent, resource type and the quota period the rows are
    charged to (``optimization.services.rollups`` keeps it up to date; ``optimization.rollups`` reads it).

    ``units`` counts what was consumed (allocations, settlements, executions), as the quotas' ``used`` does;
    ``cost_usd`` and ``calls`` count every row, purchases included. A bucket is recomputed whole from the
    rows behind it, so its figures are a cache of the usage log that a recomputation can always restore."""

    class Granularity(models.TextChoices):
        HOUR = "hour", "Hour"
        DAY = "day", "Day"

    granularity = models.CharField(max_length=4, choices=Granularity.choices)
    bucket_start = models.DateTimeField()
    agent = models.ForeignKey(
        Agent, on_delete=models.DO_NOTHING, related_name="+", db_constraint=False, db_index=False
    )
    resource_type = models.ForeignKey(
        ResourceType, on_delete=models.DO_NOTHING, related_name="+", db_constraint=False, db_index=False
    )
    period_start = models.DateTimeField()
    units = models.BigIntegerField()
    cost_usd = models.DecimalField(**ROLLUP_COST)
    calls = models.BigIntegerField()
    # When the figures last changed: a recomputation that finds the same figures leaves the row alone.
    updated_at = models.DateTimeField()

    class Meta:
        db_table = "usage_rollups"
        ordering = ["granularity", "bucket_start", "agent_id", "resource_type_id"]
        constraints = [
            models.UniqueConstraint(
                fields=["granularity", "bucket_start", "agent", "resource_type", "period_start"],
                name="usage_rollup_bucket_key",
            ),
        ]
        # The key serves the fleet-wide reads of a time range; this one an agent's own.
        indexes = [
            models.Index(fields=["agent", "granularity", "bucket_start"], name="usage_rollup_agent_idx")
        ]

    def __str__(self) -> str:
        return f"{self.granularity} {self.bucket_start:%Y-%m-%dT%H} {self.agent_id} {self.resource_type_id}"


class UsageRollupState(models.Model):
    """How far the rollups can be trusted: every hour in [``covered_from``, ``sealed_through``) is complete,
    its late rows included, and so is every day in it. Readers take rollups for that range and raw rows for
    the rest. ``last_usage_id`` is the highest usage row id seen, to find rows written with an old time."""

    name = models.CharField(max_length=32, primary_key=True)
    covered_from = models.DateTimeField()
    sealed_through = models.DateTimeField()
    last_usage_id = models.BigIntegerField(default=0)
    updated_at = models.DateTimeField()

    class Meta:
        db_table = "usage_rollup_state"

    def __str__(self) -> str:
        return f"{self.name}: [{self.covered_from:%Y-%m-%dT%H}, {self.sealed_through:%Y-%m-%dT%H})"


class FleetUsageRollup(models.Model):
    """The whole fleet's usage per hour or per day, resource type and quota period: the agents' rollups
    (``UsageRollup``) of each bucket summed, kept by the same upkeep (``optimization.services.rollups``), so
    that the fleet page reads a few rows per day however many agents there are."""

    granularity = models.CharField(max_length=4, choices=UsageRollup.Granularity.choices)
    bucket_start = models.DateTimeField()
    resource_type = models.ForeignKey(
        ResourceType, on_delete=models.DO_NOTHING, related_name="+", db_constraint=False, db_index=False
    )
    period_start = models.DateTimeField()
    units = models.BigIntegerField()
    cost_usd = models.DecimalField(**ROLLUP_COST)
    calls = models.BigIntegerField()
    updated_at = models.DateTimeField()

    class Meta:
        db_table = "fleet_usage_rollups"
        ordering = ["granularity", "bucket_start", "resource_type_id"]
        constraints = [
            models.UniqueConstraint(
                fields=["granularity", "bucket_start", "resource_type", "period_start"],
                name="fleet_usage_rollup_bucket_key",
            ),
        ]

    def __str__(self) -> str:
        return f"fleet {self.granularity} {self.bucket_start:%Y-%m-%dT%H} {self.resource_type_id}"

"""Taking and giving back quota: allocations and holds, API keys, idempotency records and the audit trail."""

from __future__ import annotations

from django.conf import settings
from django.contrib.postgres.fields import ArrayField
from django.core.serializers.json import DjangoJSONEncoder
from django.db import models
from django.db.models import Q
from django.db.models.expressions import RawSQL

from ledger.ids import uuid7
from ledger.models import COST, UNIT_PRICE, Agent, Quota, ResourceType


class Allocation(models.Model):
    """One grant of quota to an agent: committed at once, or held and later settled, released or expired."""

    class Status(models.TextChoices):
        COMMITTED = "committed", "Committed"
        HELD = "held", "Held"
        SETTLED = "settled", "Settled"
        RELEASED = "released", "Released"
        EXPIRED = "expired", "Expired"

    # Time-ordered: allocations are appended at the end of the primary-key index.
    id = models.UUIDField(primary_key=True, default=uuid7, editable=False)
    # No index of their own: allocation_agent_time_idx leads with the agent, and nothing looks allocations
    # up by resource type or quota alone. Every index is one more write per allocation. On PostgreSQL one
    # composite foreign key checks all three references (ledger/schema.py).
    agent = models.ForeignKey(
        Agent, on_delete=models.PROTECT, related_name="allocations", db_index=False, db_constraint=False
    )
    resource_type = models.ForeignKey(
        ResourceType, on_delete=models.PROTECT, related_name="+", db_index=False, db_constraint=False
    )
    quota = models.ForeignKey(
        Quota, on_delete=models.PROTECT, related_name="allocations", db_constraint=False, db_index=False
    )
    amount = models.BigIntegerField(help_text="Units committed, or held while the hold is open.")
    settled_amount = models.BigIntegerField(null=True, blank=True)
    unit_price_usd = models.DecimalField(**UNIT_PRICE)
    cost_usd = models.DecimalField(**COST, default=0, help_text="Cost of what was committed or settled.")
    status = models.CharField(max_length=16, choices=Status.choices)
    task_id = models.CharField(max_length=200, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # Defaults in the database too: the batch writer inserts rows without these columns.
    run_id = models.CharField(
        max_length=200, blank=True, default="", db_default="", help_text="The run the call named, if any."
    )
    lease = models.BooleanField(
        default=False,
        db_default=False,
        help_text="A lease: a hold whose client counts use locally. At expiry it is charged in full, not "
        "released, since the grid cannot know what was used.",
    )
    budget_ids = ArrayField(
        models.BigIntegerField(),
        default=list,
        db_default=RawSQL("'{}'::bigint[]", []),
        blank=True,
        help_text="The budgets charged (a hold: reserved on, settled or released from).",
    )

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["agent", "created_at"], name="allocation_agent_time_idx"),
            # The expiry sweep reads only open holds, in (expiry, id) order: the index gives that whole order,
            # so each partition's scan stops at the batch's size instead of sorting every expired hold.
            models.Index(
                fields=["expires_at", "id"], name="allocation_open_hold_order_idx", condition=Q(status="held")
            ),
        ]
        constraints = [
            models.CheckConstraint(condition=Q(amount__gt=0), name="allocation_amount_positive"),
            models.CheckConstraint(
                condition=~Q(status="held") | Q(expires_at__isnull=False), name="allocation_hold_expires"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.agent_id} {self.amount:,} {self.resource_type_id} ({self.status})"


class ApiKeyQuerySet(models.QuerySet):
    def active(self):
        return self.filter(revoked_at__isnull=True)


class ApiKey(models.Model):
    """A bearer key. Only its SHA-256 is stored: keys carry 256 random bits, so a fast hash is enough.

    An agent key acts on its own agent only; an operator key (tied to a staff user) acts on every agent.
    """

    name = models.CharField(max_length=100, blank=True)
    prefix = models.CharField(max_length=16, db_index=True, help_text="The visible start of the key.")
    key_hash = models.CharField(max_length=64, unique=True)
    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, null=True, blank=True, related_name="api_keys")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, null=True, blank=True, related_name="api_keys"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    objects = ApiKeyQuerySet.as_manager()

    class Meta:
        verbose_name = "API key"
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(
                condition=Q(agent__isnull=False, user__isnull=True)
                | Q(agent__isnull=True, user__isnull=False),
                name="api_key_belongs_to_agent_or_operator",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.owner_label})"

    @property
    def is_operator(self) -> bool:
        return self.user_id is not None

    @property
    def owner_label(self) -> str:
        return f"operator:{self.user.username}" if self.user_id else f"agent:{self.agent_id}"


class IdempotencyRecord(models.Model):
    """The first successful response to a POST with an ``Idempotency-Key``, replayed to its duplicates."""

    principal = models.CharField(max_length=200, help_text="Whose key space: agent:<id> or operator:<user>.")
    # The agent whose key space it is, for an agent's key; empty for an operator's. A plain column, not a
    # foreign key: records live a day and are written a thousand at a time. It makes the unique key of an
    # agent's records (agent_id, key), the key a table distributed by agent needs (docs/scaling.md).
    agent_id = models.CharField(max_length=64, null=True, blank=True)
    key = models.CharField(max_length=255)
    method = models.CharField(max_length=8)
    path = models.CharField(max_length=500)
    request_hash = models.CharField(max_length=64)
    response_status = models.PositiveSmallIntegerField(null=True)
    response_body = models.JSONField(null=True, encoder=DjangoJSONEncoder)
    created_at = models.DateTimeField(db_index=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["agent_id", "key"], condition=Q(agent_id__isnull=False), name="idempotency_agent_key"
            ),
            models.UniqueConstraint(
                fields=["principal", "key"],
                condition=Q(agent_id__isnull=True),
                name="idempotency_operator_key",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.principal} {self.key}"


class AuditRecord(models.Model):
    """Who did what to which agent, from where, and how it ended. Written for every state-changing call."""

    actor = models.CharField(max_length=200)
    action = models.CharField(max_length=100)
    agent_id = models.CharField(max_length=64, blank=True)
    method = models.CharField(max_length=8)
    path = models.CharField(max_length=500)
    request_body = models.JSONField(null=True, blank=True, encoder=DjangoJSONEncoder)
    idempotency_key = models.CharField(max_length=255, blank=True)
    status_code = models.PositiveSmallIntegerField()
    outcome = models.CharField(max_length=100, help_text="ok, or the error code.")
    client_address = models.GenericIPAddressField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            # An agent's trail, newest first. A Meta index, not db_index: that would add a second,
            # varchar_pattern_ops index for LIKE 'x%' that no query uses, written on every call.
            models.Index(fields=["agent_id", "-created_at"], name="audit_agent_time_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.actor} {self.action} {self.agent_id} -> {self.outcome}"

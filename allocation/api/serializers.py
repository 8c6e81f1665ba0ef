"""Input validation and output shapes of the v1 API. Money is rendered as decimal strings."""

from __future__ import annotations

from decimal import Decimal

from rest_framework import serializers

from allocation.models import Allocation
from ledger.invariants import MAX_AMOUNT, MAX_HOLD_TTL_SECONDS, MIN_HOLD_TTL_SECONDS, amount_is_valid
from ledger.models import Agent, Quota, Tier, UsageLog, agent_id_validator
from ledger.reference_cache import resource_type_codes


class AmountField(serializers.Field):
    """A whole number of units, given as a JSON integer: no strings, floats or booleans."""

    default_error_messages = {
        "invalid": "must be a JSON integer",
        "min_value": "must be at least {min_value}",
        "max_value": "must be at most 2^53",
    }

    def __init__(self, *, min_value: int = 1, **kwargs):
        self.min_value = min_value
        super().__init__(**kwargs)

    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        if data < self.min_value:
            self.fail("min_value", min_value=self.min_value)
        if data > MAX_AMOUNT:
            self.fail("max_value")
        return data

    def to_representation(self, value):
        return value


class ResourceTypeField(serializers.CharField):
    default_error_messages = {"unknown_resource_type": "unknown resource type {value!r}"}

    def to_internal_value(self, data):
        value = super().to_internal_value(data)
        if value not in resource_type_codes():
            self.fail("unknown_resource_type", value=value)
        return value


class JsonTextSerializer(serializers.Serializer):
    """Takes text only as JSON strings, as the API schema says: DRF's CharField would turn 12 into "12"."""

    def to_internal_value(self, data):
        if isinstance(data, dict):
            not_text = sorted(
                name
                for name, field in self.fields.items()
                if isinstance(field, serializers.CharField)
                and data.get(name) is not None
                and not isinstance(data[name], str)
            )
            if not_text:
                raise serializers.ValidationError({name: ["must be a JSON string"] for name in not_text})
        return super().to_internal_value(data)


class StrictSerializer(JsonTextSerializer):
    """Refuses keys it does not know, so a typo is an error rather than a silently ignored field."""

    def to_internal_value(self, data):
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(self.fields))
            if unknown:
                raise serializers.ValidationError({key: ["unknown field"] for key in unknown})
        return super().to_internal_value(data)


RUN_ID = {"max_length": 200, "required": False, "allow_blank": True, "default": ""}


class QuotaCheckIn(StrictSerializer):
    resource_type = ResourceTypeField()
    amount = AmountField()
    run_id = serializers.CharField(**RUN_ID, help_text="The run the call would name: its budget applies too.")


class QuotaCheckOut(serializers.Serializer):
    allowed = serializers.BooleanField()
    available = serializers.IntegerField()
    reason = serializers.CharField()
    details = serializers.DictField(
        required=False,
        help_text="With reason budget_exceeded: the budget, as a 429 budget_exceeded gives it.",
    )


class AllocationIn(StrictSerializer):
    resource_type = ResourceTypeField()
    amount = AmountField()
    task_id = serializers.CharField(max_length=200, required=False, allow_blank=True, default="")
    hold = serializers.BooleanField(required=False, default=False)
    hold_ttl_seconds = serializers.IntegerField(
        required=False, min_value=MIN_HOLD_TTL_SECONDS, max_value=MAX_HOLD_TTL_SECONDS
    )
    run_id = serializers.CharField(
        **RUN_ID, help_text="A run of the agent (POST .../runs): its budget applies."
    )


def plain_text(value, max_length: int) -> bool:
    """What the CharFields accept unchanged: a string, not too long, nothing to trim, no NUL or surrogate."""
    return (
        type(value) is str
        and len(value) <= max_length
        and value.isprintable()
        and not value.startswith(" ")
        and not value.endswith(" ")
    )


_ALLOCATION_IN_FIELDS = frozenset(AllocationIn._declared_fields)


def allocation_in_fast(raw) -> dict | None:
    """``AllocationIn``'s validated data for a plainly valid body, else None (the serializer then says what
    is wrong). It accepts only what the serializer accepts unchanged (JSON integers and booleans, untrimmed
    strings) and gives the same data, without the serializer's few dozen calls per field; anything unusual
    goes through the serializer. A test holds the two together."""
    if type(raw) is not dict or not raw.keys() <= _ALLOCATION_IN_FIELDS:
        return None
    resource_type = raw.get("resource_type")
    amount = raw.get("amount")
    task_id = raw.get("task_id", "")
    run_id = raw.get("run_id", "")
    hold = raw.get("hold", False)
    if (
        type(resource_type) is not str
        or resource_type not in resource_type_codes()
        or type(amount) is not int
        or not amount_is_valid(amount)
        or not plain_text(task_id, 200)
        or not plain_text(run_id, 200)
        or type(hold) is not bool
    ):
        return None
    data = {
        "resource_type": resource_type,
        "amount": amount,
        "task_id": task_id,
        "hold": hold,
        "run_id": run_id,
    }
    if "hold_ttl_seconds" in raw:
        ttl = raw["hold_ttl_seconds"]
        if type(ttl) is not int or not MIN_HOLD_TTL_SECONDS <= ttl <= MAX_HOLD_TTL_SECONDS:
            return None
        data["hold_ttl_seconds"] = ttl
    return data


class AllocationOut(serializers.ModelSerializer):
    resource_type = serializers.CharField(source="resource_type_id")
    allocated_amount = serializers.SerializerMethodField()
    agent_id = serializers.CharField()

    class Meta:
        model = Allocation
        fields = [
            "id",
            "agent_id",
            "resource_type",
            "allocated_amount",
            "cost_usd",
            "unit_price_usd",
            "status",
            "task_id",
            "run_id",
            "expires_at",
            "settled_amount",
            "created_at",
            "finished_at",
            "lease",
        ]

    def get_allocated_amount(self, obj: Allocation) -> int:
        return obj.settled_amount if obj.settled_amount is not None else obj.amount


class _Reused:
    """One instance of a serializer kept for the life of the process, for the allocation hot path (which
    answers with ``allocation.representation.allocation_body``, not with a serializer).

    Instantiating a serializer builds its fields again (a ``ModelSerializer`` reads its model too): that
    was most of what the API spent in Python on an allocation. Representing and validating do not change
    the serializer, so one bound instance serves every request, from any thread.
    """

    def __init__(self, serializer_class: type[serializers.Serializer], fast=None) -> None:
        self._serializer = serializer_class()
        self._fast = fast

    def validated(self, data) -> dict:
        """What ``is_valid(raise_exception=True)`` then ``validated_data`` give, errors included; from
        ``fast(data)`` first when there is one and it accepts ``data``."""
        if self._fast is not None:
            fast = self._fast(data)
            if fast is not None:
                return fast
        return self._serializer.run_validation(data)


allocation_in = _Reused(AllocationIn, fast=allocation_in_fast)


class LeaseIn(StrictSerializer):
    resource_type = ResourceTypeField()
    amount = AmountField()
    ttl_seconds = serializers.IntegerField(
        required=False,
        min_value=MIN_HOLD_TTL_SECONDS,
        max_value=MAX_HOLD_TTL_SECONDS,
        help_text="How long the lease lives unless settled or released first (default 15 minutes). At "
        "expiry a lease is charged in full.",
    )
    task_id = serializers.CharField(max_length=200, required=False, allow_blank=True, default="")
    run_id = serializers.CharField(
        **RUN_ID, help_text="A run of the agent (POST .../runs): its budget applies."
    )


class SettleIn(StrictSerializer):
    amount = AmountField(min_value=0)


class ReleaseIn(StrictSerializer):
    """A release takes no fields."""


class ShareIn(StrictSerializer):
    resource_type = ResourceTypeField()
    amount = AmountField()
    target_agent_id = serializers.CharField(max_length=64)


# A decimal rendered as an exact string, as many places as it has ("12.5", "0.000123"): money, percentages.
DECIMAL_STRING = {"max_digits": None, "decimal_places": None}


class ShareOut(serializers.Serializer):
    resource_type = serializers.CharField()
    amount = AmountField()
    source_agent_id = serializers.CharField()
    target_agent_id = serializers.CharField()
    source_available = serializers.IntegerField(help_text="What the source has left available to allocate")


class CostOut(serializers.Serializer):
    agent_id = serializers.CharField()
    period_start = serializers.DateTimeField()
    period_end = serializers.DateTimeField()
    by_resource_type = serializers.DictField(child=serializers.DecimalField(**DECIMAL_STRING))
    total_usd = serializers.DecimalField(**DECIMAL_STRING)
    monthly_budget_usd = serializers.DecimalField(**DECIMAL_STRING, allow_null=True)
    budget_utilization_percent = serializers.DecimalField(**DECIMAL_STRING, allow_null=True)


class QuotaOut(serializers.ModelSerializer):
    resource_type = serializers.CharField(source="resource_type_id")
    available = serializers.IntegerField()

    class Meta:
        model = Quota
        fields = ["resource_type", "limit", "used", "reserved", "available", "period_start", "period_end"]


class UsageOut(serializers.ModelSerializer):
    resource_type = serializers.CharField(source="resource_type_id")

    class Meta:
        model = UsageLog
        fields = [
            "id",
            "agent_id",
            "resource_type",
            "amount",
            "unit_price_usd",
            "cost_usd",
            "kind",
            "task_id",
            "idempotency_key",
            "metadata",
            "created_at",
        ]


class UsageQuery(StrictSerializer):
    resource_type = ResourceTypeField(required=False)
    since = serializers.DateTimeField(required=False, help_text="ISO 8601, inclusive")
    until = serializers.DateTimeField(required=False, help_text="ISO 8601, exclusive")
    cursor = serializers.CharField(required=False, help_text="From the `next` or `previous` link")
    page_size = serializers.IntegerField(required=False, min_value=1, max_value=1000)


class AgentOut(serializers.ModelSerializer):
    tier = serializers.CharField(source="tier_id")
    team_id = serializers.CharField(allow_null=True, help_text="The team whose budgets apply to the agent")
    custom_limits = serializers.SerializerMethodField()

    class Meta:
        model = Agent
        fields = [
            "id",
            "name",
            "tier",
            "status",
            "status_reason",
            "monthly_budget_usd",
            "team_id",
            "instance_count",
            "min_instances",
            "max_instances",
            "custom_limits",
            "metadata",
            "created_at",
            "updated_at",
        ]

    def get_custom_limits(self, obj: Agent) -> dict[str, int]:
        return {override.resource_type_id: override.limit for override in obj.limit_overrides.all()}


class ResourceAmountsField(serializers.DictField):
    """An amount per resource type: ``{"AI_TOKENS": 500, ...}``; an unknown resource type is refused."""

    child = AmountField()

    def to_internal_value(self, data):
        value = super().to_internal_value(data)
        unknown = sorted(set(value) - resource_type_codes())
        if unknown:
            raise serializers.ValidationError(f"unknown resource types: {', '.join(unknown)}")
        return value


class CustomLimitsField(ResourceAmountsField):
    child = AmountField(min_value=0)


class AgentCreatedOut(AgentOut):
    api_key = serializers.CharField(
        allow_null=True, help_text="The agent's first key, shown once (null when the creation is replayed)"
    )

    class Meta(AgentOut.Meta):
        fields = [*AgentOut.Meta.fields, "api_key"]


MONEY = {"max_digits": 20, "decimal_places": 2, "min_value": Decimal("0")}


class AgentCreateIn(StrictSerializer):
    id = serializers.CharField(max_length=64, validators=[agent_id_validator])
    name = serializers.CharField(max_length=200, required=False, allow_blank=True, default="")
    tier = serializers.SlugRelatedField(slug_field="code", queryset=Tier.objects.all())
    monthly_budget_usd = serializers.DecimalField(**MONEY, required=False, allow_null=True, default=None)
    custom_limits = CustomLimitsField(required=False, default=dict)
    metadata = serializers.DictField(required=False, default=dict)


class AgentPatchIn(StrictSerializer):
    name = serializers.CharField(max_length=200, required=False, allow_blank=True)
    tier = serializers.SlugRelatedField(slug_field="code", queryset=Tier.objects.all(), required=False)
    status = serializers.ChoiceField(choices=Agent.Status.choices, required=False)
    status_reason = serializers.CharField(max_length=300, required=False, allow_blank=True)
    monthly_budget_usd = serializers.DecimalField(**MONEY, required=False, allow_null=True)
    custom_limits = CustomLimitsField(required=False)
    metadata = serializers.DictField(required=False)
    min_instances = serializers.IntegerField(required=False, min_value=0, max_value=10_000)
    max_instances = serializers.IntegerField(required=False, min_value=1, max_value=10_000)
    team_id = serializers.CharField(
        max_length=64,
        required=False,
        allow_null=True,
        help_text="The agent's team (its budgets and its organization's apply), or null for none",
    )

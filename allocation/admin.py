"""The back office of the allocation engine: API keys are issued and revoked here; the rest is only read.

Allocations, the audit trail and the idempotency records are written by the engine and the API, so their
admin pages are view-only. An API key is created through ``allocation.keys.api_key_issue`` (which stores
only its hash and hands the raw key back once) and is never deleted, only revoked, so it still shows
whose it was and when it stopped working.
"""

from __future__ import annotations

import json

from django import forms
from django.contrib import admin, messages
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.serializers.json import DjangoJSONEncoder
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.html import format_html

from allocation.keys import VISIBLE_CHARS, api_key_issue, api_key_revoke
from allocation.models import Allocation, ApiKey, AuditRecord, IdempotencyRecord
from ledger.admin import ViewOnlyAdmin

# Keys of a stored response body that hold a raw API key (``POST /agents`` answers with the agent's first
# key, and an idempotent replay has to be able to answer the same).
SECRET_RESPONSE_KEYS = frozenset({"api_key"})


def _units(value: int | None) -> str:
    """A resource amount with thousands separators, the way operators read limits (``3,600,000``)."""
    return "-" if value is None else f"{value:,}"


# --- API keys -------------------------------------------------------------------------------------------


class ApiKeyStateFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "state"

    def lookups(self, request: HttpRequest, model_admin):
        return (("active", "Active"), ("revoked", "Revoked"))

    def queryset(self, request: HttpRequest, queryset: QuerySet[ApiKey]):
        if self.value() == "active":
            return queryset.active()
        if self.value() == "revoked":
            return queryset.filter(revoked_at__isnull=False)
        return queryset


class ApiKeyOwnerFilter(admin.SimpleListFilter):
    title = "owner"
    parameter_name = "owner"

    def lookups(self, request: HttpRequest, model_admin):
        return (("agent", "Agent"), ("operator", "Operator"))

    def queryset(self, request: HttpRequest, queryset: QuerySet[ApiKey]):
        if self.value() == "agent":
            return queryset.filter(agent__isnull=False)
        if self.value() == "operator":
            return queryset.filter(user__isnull=False)
        return queryset


class ApiKeyAddForm(forms.ModelForm):
    """Whom the key is for. The key itself (prefix and hash) is made by ``api_key_issue`` on save."""

    class Meta:
        model = ApiKey
        fields = ("agent", "user", "name")
        labels = {"user": "operator"}
        help_texts = {
            "agent": "The key acts on this agent only.",
            "user": "Or: the key acts on every agent, as this staff user. Active staff users only.",
        }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The API refuses an operator key whose user is not active staff, so such a key would be dead on
        # arrival.
        self.fields["user"].queryset = get_user_model().objects.filter(is_staff=True, is_active=True)

    def clean(self):
        cleaned = super().clean()
        agent, user = cleaned.get("agent"), cleaned.get("user")
        # The errors go on a field rather than the form: a field with an error is left out of the model's
        # constraint check, which would otherwise add "Constraint ... is violated" beside them.
        if agent is None and user is None and not self.has_error("user"):
            self.add_error("agent", ValidationError("Choose an agent or an operator.", code="no_owner"))
        elif agent is not None and user is not None:
            self.add_error(
                "user",
                ValidationError("A key belongs to an agent or to an operator, not both.", code="two_owners"),
            )
        return cleaned


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ("visible_key", "owner", "name", "created_at", "last_used_at", "revoked_at", "active")
    list_filter = (ApiKeyStateFilter, ApiKeyOwnerFilter)
    search_fields = ("prefix", "agent__id", "user__username")
    # The owner column reads the user's name; an agent key shows only its agent id, already on the row.
    list_select_related = ("user",)
    autocomplete_fields = ("agent",)
    actions = ["revoke"]
    # key_hash appears nowhere: it cannot be turned back into the key, but no operator task needs it.
    change_fields = ("visible_key", "owner", "name", "created_at", "last_used_at", "revoked_at", "active")

    def get_form(self, request: HttpRequest, obj=None, change: bool = False, **kwargs):
        if obj is None:
            kwargs["form"] = ApiKeyAddForm
        return super().get_form(request, obj, change=change, **kwargs)

    def get_fieldsets(self, request: HttpRequest, obj=None):
        if obj is None:
            return [
                (
                    None,
                    {
                        "fields": ("agent", "user", "name"),
                        "description": "The key is shown once, on the next page, after saving. Only its "
                        "hash is kept: copy it then.",
                    },
                )
            ]
        return [(None, {"fields": self.change_fields})]

    def get_readonly_fields(self, request: HttpRequest, obj=None):
        if obj is None:
            return ()
        return tuple(field for field in self.change_fields if field != "name")

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        # Revoke instead: a revoked key still says whose it was and when it stopped working; a deleted
        # one leaves no trace of either.
        return False

    def save_model(self, request: HttpRequest, obj: ApiKey, form, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        created, raw_key = api_key_issue(agent=obj.agent, user=obj.user, name=obj.name)
        # The admin goes on with ``obj`` (the log entry, the redirect), so it must become the saved row.
        for field in ApiKey._meta.concrete_fields:
            setattr(obj, field.attname, getattr(created, field.attname))
        messages.success(request, f"New key: {raw_key} — copy it now, it will not be shown again.")

    @admin.display(description="key", ordering="prefix")
    def visible_key(self, obj: ApiKey) -> str:
        return f"{obj.prefix}…"

    @admin.display(description="owner")
    def owner(self, obj: ApiKey) -> str:
        return obj.owner_label

    @admin.display(description="active", boolean=True, ordering="revoked_at")
    def active(self, obj: ApiKey) -> bool:
        return obj.revoked_at is None

    @admin.action(description="Revoke selected keys", permissions=["change"])
    def revoke(self, request: HttpRequest, queryset: QuerySet[ApiKey]):
        revoked = 0
        for api_key in queryset.filter(revoked_at__isnull=True).select_related("user"):
            api_key_revoke(api_key=api_key)
            self.log_change(request, api_key, "Revoked.")
            revoked += 1
        already = queryset.count() - revoked
        if revoked:
            self.message_user(request, f"Revoked {revoked} key(s).", messages.SUCCESS)
        if already:
            self.message_user(request, f"{already} key(s) were already revoked.", messages.WARNING)


# --- What the engine and the API wrote: view-only -------------------------------------------------------


@admin.register(Allocation)
class AllocationAdmin(ViewOnlyAdmin):
    list_display = (
        "id",
        "agent",
        "resource_type",
        "amount_units",
        "settled_units",
        "cost_usd_money",
        "status",
        "expires_at",
        "created_at",
    )
    list_filter = ("status", "resource_type")
    search_fields = ("agent__id", "task_id")
    money_fields = {"unit_price_usd": "unit price", "cost_usd": "cost"}
    list_select_related = ("agent", "resource_type")
    date_hierarchy = "created_at"
    show_full_result_count = False

    @admin.display(description="amount", ordering="amount")
    def amount_units(self, obj: Allocation) -> str:
        return _units(obj.amount)

    @admin.display(description="settled", ordering="settled_amount")
    def settled_units(self, obj: Allocation) -> str:
        return _units(obj.settled_amount)


@admin.register(AuditRecord)
class AuditRecordAdmin(ViewOnlyAdmin):
    list_display = ("created_at", "actor", "action", "agent_id", "status_code", "outcome", "client_address")
    list_filter = ("action", "outcome", "status_code")
    search_fields = ("actor", "agent_id", "path")
    date_hierarchy = "created_at"
    # One row per state-changing call: skip the COUNT(*) of all of it on every page.
    show_full_result_count = False


@admin.register(IdempotencyRecord)
class IdempotencyRecordAdmin(ViewOnlyAdmin):
    list_display = ("principal", "key", "method", "path", "response_status", "created_at")
    search_fields = ("key", "principal")
    ordering = ("-created_at",)
    fields = (
        ("principal", "agent_id"),
        "key",
        ("method", "path"),
        "request_hash",
        "response_status",
        "stored_response",
        "created_at",
    )

    @admin.display(description="response body")
    def stored_response(self, obj: IdempotencyRecord):
        body = obj.response_body
        if body is None:
            return "-"
        if isinstance(body, dict):
            # The stored body is what a replay returns, raw keys included; the admin shows only the prefix.
            body = {
                name: f"{str(value)[:VISIBLE_CHARS]}… (hidden)" if name in SECRET_RESPONSE_KEYS else value
                for name, value in body.items()
            }
        return format_html("<pre>{}</pre>", json.dumps(body, indent=2, cls=DjangoJSONEncoder))

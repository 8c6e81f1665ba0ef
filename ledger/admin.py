"""The back office of the ledger: reference data and rules are edited here, the ledger itself is only read.

Quotas, grants and usage logs are the ledger: they change only through ``ledger.services`` (and the
allocation engine), so their admin pages are view-only. What an operator may do to an agent beyond editing
its settings (change its tier, throttle it, grant it extra quota) is an admin action that calls one service.
Organizations, teams and budgets are created and changed through ``ledger.budgets``; a budget's counters
(spent, reserved, rollover, its window) are the allocation engine's and are only shown, as of now.
"""

from __future__ import annotations

import datetime as dt

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.contrib.admin.utils import quote
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import (
    Count,
    DecimalField,
    ExpressionWrapper,
    F,
    OuterRef,
    QuerySet,
    Subquery,
    Sum,
)
from django.db.models.functions import Cast, NullIf
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join

from ledger import budgets as budget_services
from ledger import services
from ledger.errors import LedgerError
from ledger.models import (
    DEFAULT_BUDGET_THRESHOLDS,
    Agent,
    AgentLimitOverride,
    Budget,
    Grant,
    OptimizationRule,
    Organization,
    Quota,
    ResourcePrice,
    ResourceType,
    Team,
    Tier,
    TierQuota,
    UsageLog,
)
from ledger.money import cents, usd_text
from ledger.periods import month_bounds
from ledger.selectors import base_limits, current_quotas, quota_reconciliation
from ledger.services import AGENT_PLAIN_FIELDS

ACTION_FORM_TEMPLATE = "admin/ledger/agent/action_form.html"


def _units(value: int | None) -> str:
    """A resource amount with thousands separators, the way operators read limits (``3,600,000``)."""
    return "-" if value is None else f"{value:,}"


def money_column(field: str, description: str):
    """A column (of a list, or a read-only field) that shows ``field`` as money, "$0.00001" rather than the
    twelve stored decimals "0.000010000000". Callable as a model admin's method or on its own."""

    @admin.display(description=description, ordering=field)
    def column(*args) -> str:
        return usd_text(getattr(args[-1], field))

    column.__name__ = f"{field}_money"
    return column


def _money_names(fields, money_fields) -> list:
    return [
        _money_names(name, money_fields)
        if isinstance(name, list | tuple)
        else (f"{name}_money" if name in money_fields else name)
        for name in fields
    ]


class MoneyFieldsMixin:
    """Shows the money fields named in ``money_fields`` (field -> column title) as money: each gets a
    ``<field>_money`` column for ``list_display``, and a page that shows the field read-only (every page of
    a view-only admin) shows that column in its place."""

    money_fields: dict[str, str] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for field, description in cls.money_fields.items():
            setattr(cls, f"{field}_money", money_column(field, description))

    def get_fieldsets(self, request: HttpRequest, obj=None):
        fieldsets = super().get_fieldsets(request, obj)
        if self.has_change_permission(request, obj):
            return fieldsets
        return [
            (name, {**options, "fields": _money_names(options["fields"], self.money_fields)})
            for name, options in fieldsets
        ]


class ViewOnlyAdmin(MoneyFieldsMixin, admin.ModelAdmin):
    """The ledger's own rows: visible to whoever may view them, written only by services.

    Viewing stays governed by Django's permissions (``has_view_permission``), so a staff user with the
    ``view_*`` permission can audit the ledger without being able to touch it.
    """

    def has_add_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return False


# --- Reference data -------------------------------------------------------------------------------------


@admin.register(ResourceType)
class ResourceTypeAdmin(admin.ModelAdmin):
    list_display = ("code", "name", "unit", "current_price", "display_order")
    search_fields = ("code", "name", "description")
    ordering = ("display_order", "code")

    def get_readonly_fields(self, request: HttpRequest, obj=None):
        # Editing a primary key in the admin saves a second row instead of renaming the first.
        return ("code",) if obj else ()

    def get_queryset(self, request: HttpRequest):
        # The price in effect for every row in the same query, rather than one query per row.
        price_now = (
            ResourcePrice.objects.filter(resource_type=OuterRef("pk"), effective_from__lte=timezone.now())
            .order_by("-effective_from")
            .values("unit_price_usd")[:1]
        )
        return super().get_queryset(request).annotate(price_in_effect=Subquery(price_now))

    @admin.display(description="price in effect (per unit)", ordering="price_in_effect")
    def current_price(self, obj: ResourceType) -> str:
        return usd_text(obj.price_in_effect)


@admin.register(ResourcePrice)
class ResourcePriceAdmin(admin.ModelAdmin):
    list_display = ("resource_type", "unit_price", "effective_from", "note", "created_at")
    list_filter = ("resource_type",)
    search_fields = ("resource_type__code", "note")
    list_select_related = ("resource_type",)
    date_hierarchy = "effective_from"

    unit_price = money_column("unit_price_usd", "unit price")

    def _in_effect(self, obj: ResourcePrice | None) -> bool:
        return obj is not None and obj.effective_from <= timezone.now()

    def get_readonly_fields(self, request: HttpRequest, obj=None):
        # A price that has taken effect is history: a new price is a new row from a new moment. Only the
        # note stays editable; a future price can still be corrected before it applies.
        if self._in_effect(obj):
            return ("resource_type", "unit_price", "effective_from", "created_at")
        return ("created_at",)

    def get_fields(self, request: HttpRequest, obj=None):
        if self._in_effect(obj):
            # The price as money, read-only, where the form would show its twelve decimals.
            return ("resource_type", "unit_price", "effective_from", "note", "created_at")
        return super().get_fields(request, obj)

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        # Deleting the price in effect would silently bring back the previous one.
        return not self._in_effect(obj) and super().has_delete_permission(request, obj)

    def get_actions(self, request: HttpRequest):
        # The bulk delete cannot tell past prices from future ones, so it is not offered.
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)
        return actions


class TierQuotaInline(admin.TabularInline):
    model = TierQuota
    extra = 0
    fields = ("resource_type", "limit")


@admin.register(Tier)
class TierAdmin(admin.ModelAdmin):
    list_display = ("code", "name", "monthly_price", "agent_count", "display_order")
    monthly_price = money_column("monthly_price_usd", "monthly price")
    search_fields = ("code", "name")
    inlines = [TierQuotaInline]
    fieldsets = [
        (
            None,
            {
                "fields": ("code", "name", "monthly_price_usd", "description", "display_order"),
                "description": "Limits apply to quotas opened from now on. A quota already open for this "
                "period keeps its limit until the agent changes tier.",
            },
        )
    ]

    def get_queryset(self, request: HttpRequest):
        return super().get_queryset(request).annotate(agent_count=Count("agents"))

    def get_readonly_fields(self, request: HttpRequest, obj=None):
        # Editing a primary key in the admin saves a second row instead of renaming the first.
        return ("code",) if obj else ()

    @admin.display(description="agents", ordering="agent_count")
    def agent_count(self, obj: Tier) -> int:
        return obj.agent_count


# --- Agents ---------------------------------------------------------------------------------------------


class AgentLimitOverrideInline(admin.TabularInline):
    model = AgentLimitOverride
    extra = 0
    fields = ("resource_type", "limit")
    verbose_name_plural = "limit overrides (replace the tier's limits, this period included)"


class AgentAdminForm(forms.ModelForm):
    class Meta:
        model = Agent
        # The admin narrows these per page (add or change) through its fieldsets and read-only fields.
        fields = (
            "id",
            "name",
            "tier",
            "team",
            "monthly_budget_usd",
            "min_instances",
            "max_instances",
            "metadata",
        )

    def clean(self):
        cleaned = super().clean()
        # The service refuses this too, but by then the admin could only answer with an error page.
        minimum, maximum = cleaned.get("min_instances"), cleaned.get("max_instances")
        if minimum is not None and maximum is not None and minimum > maximum:
            raise ValidationError("Min instances cannot exceed max instances.")
        return cleaned


class ChangeTierForm(forms.Form):
    tier = forms.ModelChoiceField(
        queryset=Tier.objects.all(), help_text="The current period is re-based on it."
    )


class ThrottleForm(forms.Form):
    # Kept short enough that the reason and who gave it fit the agent's 300-character status reason.
    reason = forms.CharField(
        max_length=200,
        strip=True,
        help_text="Why: shown on the agent and in its refusals, and kept in the agent's history.",
    )


class GrantQuotaForm(forms.Form):
    resource_type = forms.ModelChoiceField(queryset=ResourceType.objects.all())
    # Bounded so that limit + amount stays far inside the 64-bit limit column.
    amount = forms.IntegerField(
        min_value=1,
        max_value=10**15,
        help_text="Units added to the current period's limit of each selected agent.",
    )
    note = forms.CharField(max_length=300, required=False, help_text="Why: kept on the grant.")


@admin.register(Agent)
class AgentAdmin(admin.ModelAdmin):
    form = AgentAdminForm
    list_display = (
        "id",
        "name",
        "tier",
        "team",
        "status_column",
        "monthly_budget",
        "period_spend",
        "busiest_resource",
        "instance_count",
    )
    list_filter = ("tier", "status")
    search_fields = ("id", "name", "team__id")
    list_select_related = ("tier", "team")
    # A select of every team would not scale; the team admin's search serves this field instead.
    autocomplete_fields = ("team",)
    date_hierarchy = "created_at"
    inlines = [AgentLimitOverrideInline]
    actions = ["change_tier", "throttle", "unthrottle", "grant_quota"]
    monthly_budget = money_column("monthly_budget_usd", "monthly budget")

    def get_queryset(self, request: HttpRequest):
        # This period's spend and the most used resource, from the agent's quota rows of the current period
        # (at most one per resource type, found by the quota's (period_start, agent) index): three scalar
        # subqueries in the page's one query, whatever the number of rows on it.
        start, _ = month_bounds(timezone.now())
        period = Quota.objects.filter(agent=OuterRef("pk"), period_start=start).order_by()
        spend = period.values("agent").annotate(total=Sum("spent_usd")).values("total")
        # numeric, not bigint: an integer division would drop the hundredths.
        percent_field = DecimalField(max_digits=30, decimal_places=6)
        utilization = ExpressionWrapper(
            Cast(F("used") + F("reserved"), percent_field) * 100 / NullIf(F("limit"), 0),
            output_field=percent_field,
        )
        busiest = period.annotate(utilization=utilization).order_by(
            F("utilization").desc(nulls_last=True), "resource_type_id"
        )
        return (
            super()
            .get_queryset(request)
            .annotate(
                period_spend_usd=Subquery(spend),
                busiest_utilization=Subquery(busiest.values("utilization")[:1]),
                busiest_resource_type=Subquery(busiest.values("resource_type_id")[:1]),
            )
        )

    @admin.display(description="status", ordering="status")
    def status_column(self, obj: Agent):
        if not obj.status_reason:
            return obj.get_status_display()
        return format_html("{}<br><small>{}</small>", obj.get_status_display(), obj.status_reason)

    @admin.display(description="spent this period", ordering="period_spend_usd")
    def period_spend(self, obj: Agent) -> str:
        return usd_text(obj.period_spend_usd or 0)

    @admin.display(description="most used resource", ordering="busiest_utilization")
    def busiest_resource(self, obj: Agent):
        if obj.busiest_resource_type is None:
            return "-"
        percent = "-" if obj.busiest_utilization is None else f"{cents(obj.busiest_utilization)}%"
        return format_html("{}<br><small>{}</small>", percent, obj.busiest_resource_type)

    def get_fieldsets(self, request: HttpRequest, obj=None):
        if obj is None:
            return [(None, {"fields": ("id", "name", "tier", "team", "monthly_budget_usd", "metadata")})]
        return [
            (
                None,
                {"fields": ("id", "name", "tier", "team", ("status", "status_reason"), "monthly_budget_usd")},
            ),
            ("This period's quotas", {"fields": ("resource_monitor", "period_quotas")}),
            ("Budgets that apply now", {"fields": ("budgets_now",)}),
            ("Instances", {"fields": (("instance_count", "min_instances", "max_instances"),)}),
            (None, {"fields": ("metadata", "created_at", "updated_at")}),
        ]

    def get_readonly_fields(self, request: HttpRequest, obj=None):
        if obj is None:
            return ()
        # Tier and status change through the actions, one service call per agent with the operator
        # recorded. The instance count is scaling's to change (narrower bounds clamp it).
        return (
            "id",
            "tier",
            "status",
            "status_reason",
            "instance_count",
            "created_at",
            "updated_at",
            "period_quotas",
            "resource_monitor",
            "budgets_now",
        )

    @admin.display(description="budgets")
    def budgets_now(self, obj: Agent):
        return _budget_table(budget_services.budgets_applying(agent=obj), now=timezone.now())

    @admin.display(description="resource monitor")
    def resource_monitor(self, obj: Agent):
        # Linked by URL name only: the dashboard lives in the optimization app, which ledger must not import.
        url = f"{reverse('dashboard:resources')}?agent={obj.pk}"
        return format_html('<a href="{}">Open the resource monitor of {}</a>', url, obj.pk)

    def save_model(self, request: HttpRequest, obj: Agent, form, change: bool) -> None:
        # Written in save_related instead, which also sees the overrides inline: the agent and its custom
        # limits go through one service call, which re-bases this period's quotas when the limits change.
        pass

    def save_related(self, request: HttpRequest, form, formsets, change: bool) -> None:
        (overrides,) = (formset for formset in formsets if formset.model is AgentLimitOverride)
        # commit=False writes nothing; it only lists what changed, for the admin's history message.
        overrides.save(commit=False)
        custom_limits = {
            override_form.cleaned_data["resource_type"].pk: override_form.cleaned_data["limit"]
            for override_form in overrides.forms
            if override_form.cleaned_data and not override_form.cleaned_data.get("DELETE")
        }
        agent: Agent = form.instance
        if not change:
            services.agent_create(
                agent_id=agent.id,
                tier_code=agent.tier_id,
                name=agent.name,
                monthly_budget_usd=agent.monthly_budget_usd,
                metadata=agent.metadata,
                custom_limits=custom_limits,
            )
            if agent.team_id:
                budget_services.agent_team_set(agent=agent, team_id=agent.team_id)
            # The admin goes on with this instance (the log entry, the redirect): make it the saved row.
            agent.refresh_from_db()
            return
        changes = {name: form.cleaned_data[name] for name in form.changed_data if name in AGENT_PLAIN_FIELDS}
        if overrides.has_changed():
            changes["custom_limits"] = custom_limits
        if changes:
            services.agent_update(agent=agent, actor=request.user.get_username(), **changes)
        if "team" in form.changed_data:
            team = form.cleaned_data["team"]
            budget_services.agent_team_set(agent=agent, team_id=None if team is None else team.pk)

    @admin.display(description="quotas")
    def period_quotas(self, obj: Agent):
        start, _ = month_bounds(timezone.now())
        quotas = {quota.resource_type_id: quota for quota in current_quotas(agent=obj)}
        limits = base_limits(agent=obj)
        rows = []
        # Every resource type gets a row: one the agent has not used yet this month has no quota row
        # (it is opened on first use), and shows the base limit it will open with.
        for resource_type in ResourceType.objects.all():
            quota = quotas.get(resource_type.code)
            if quota is None:
                limit = limits.get(resource_type.code, 0)
                rows.append(
                    (
                        resource_type.code,
                        "0",
                        "0",
                        _units(limit),
                        "-",
                        _units(limit),
                        "0.00",
                        "not opened yet",
                    )
                )
                continue
            rows.append(
                (
                    format_html(
                        '<a href="{}">{}</a>',
                        reverse("admin:ledger_quota_change", args=[quota.pk]),
                        resource_type.code,
                    ),
                    _units(quota.used),
                    _units(quota.reserved),
                    _units(quota.limit),
                    f"{quota.limit - quota.base_limit:+,}",
                    _units(quota.available),
                    f"{quota.utilization_percent}",
                    resource_type.unit,
                )
            )
        body = format_html_join(
            "\n",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}%</td><td>{}</td></tr>",
            rows,
        )
        return format_html(
            '<table><caption>{} (UTC) &middot; <a href="{}?agent={}">usage log</a></caption>'
            "<thead><tr><th>resource</th><th>used</th><th>reserved</th><th>limit</th><th>granted</th>"
            "<th>available</th><th>used + reserved</th><th>unit</th></tr></thead><tbody>{}</tbody></table>",
            f"{start:%B %Y}",
            reverse("admin:ledger_usagelog_changelist"),
            obj.pk,
            body,
        )

    # --- Actions: each validates its input, then calls a service per agent. ---

    def _action_form_response(
        self, request: HttpRequest, queryset: QuerySet, *, form: forms.Form, action: str, title: str
    ) -> TemplateResponse:
        context = {
            **self.admin_site.each_context(request),
            "title": title,
            "subtitle": None,
            "opts": self.opts,
            "queryset": queryset,
            "form": form,
            "action": action,
            "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
            "media": self.media + form.media,
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(request, ACTION_FORM_TEMPLATE, context)

    @admin.action(description="Change tier of selected agents", permissions=["change"])
    def change_tier(self, request: HttpRequest, queryset: QuerySet[Agent]):
        form = ChangeTierForm(request.POST if "apply" in request.POST else None)
        if not form.is_valid():
            return self._action_form_response(
                request, queryset, form=form, action="change_tier", title="Change the tier of agents"
            )
        tier = form.cleaned_data["tier"]
        actor = request.user.get_username()
        changed = 0
        # All or none; in primary-key order because each call locks its agent row.
        with transaction.atomic():
            for agent in queryset.order_by("pk"):
                if agent.tier_id == tier.pk:
                    continue
                old_tier = agent.tier_id
                services.agent_change_tier(agent=agent, tier=tier, actor=actor)
                # The tier change itself leaves no other trace of who made it.
                self.log_change(request, agent, f"Changed tier from {old_tier} to {tier.pk}.")
                changed += 1
        self.message_user(request, f"Moved {changed} agent(s) to {tier.pk}.", messages.SUCCESS)
        return None

    def _set_status(
        self,
        request: HttpRequest,
        queryset: QuerySet[Agent],
        *,
        from_status: str,
        to_status: str,
        why: str = "",
    ):
        reason = f"by {request.user.get_username()} in the admin"
        if why:
            # Never starting with "rule:": the rules' evaluation lifts only the throttles its rules set.
            reason = f"{why} ({reason})"
        changed, skipped = [], []
        for agent in queryset:
            # Only the opposite state is switched: unthrottling must not lift a suspension, and
            # throttling a suspended agent would loosen it.
            if agent.status != from_status:
                skipped.append(agent.pk)
                continue
            services.agent_set_status(agent=agent, status=to_status, reason=reason)
            self.log_change(request, agent, f"Set status to {to_status} ({reason}).")
            changed.append(agent.pk)
        if changed:
            self.message_user(
                request, f"{len(changed)} agent(s) now {to_status} ({reason}).", messages.SUCCESS
            )
        if skipped:
            self.message_user(
                request, f"Left alone (not {from_status}): {', '.join(skipped)}.", messages.WARNING
            )

    @admin.action(description="Throttle selected agents (asks why)", permissions=["change"])
    def throttle(self, request: HttpRequest, queryset: QuerySet[Agent]):
        form = ThrottleForm(request.POST if "apply" in request.POST else None)
        if not form.is_valid():
            return self._action_form_response(
                request, queryset, form=form, action="throttle", title="Throttle agents"
            )
        self._set_status(
            request,
            queryset,
            from_status=Agent.Status.ACTIVE,
            to_status=Agent.Status.THROTTLED,
            why=form.cleaned_data["reason"],
        )
        return None

    @admin.action(description="Unthrottle selected agents", permissions=["change"])
    def unthrottle(self, request: HttpRequest, queryset: QuerySet[Agent]):
        self._set_status(request, queryset, from_status=Agent.Status.THROTTLED, to_status=Agent.Status.ACTIVE)

    @admin.action(description="Grant extra quota for the period", permissions=["change"])
    def grant_quota(self, request: HttpRequest, queryset: QuerySet[Agent]):
        form = GrantQuotaForm(request.POST if "apply" in request.POST else None)
        if not form.is_valid():
            return self._action_form_response(
                request, queryset, form=form, action="grant_quota", title="Grant extra quota for this period"
            )
        resource_type = form.cleaned_data["resource_type"]
        amount = form.cleaned_data["amount"]
        actor = request.user.get_username()
        agents = list(queryset.order_by("pk"))
        current: Agent | None = None
        try:
            # All or none: an operator who granted to five agents should not have to find out which
            # three got it.
            with transaction.atomic():
                for current in agents:
                    services.quota_grant(
                        agent=current,
                        resource_type_id=resource_type.pk,
                        amount=amount,
                        reason=Grant.Reason.MANUAL,
                        actor=actor,
                        note=form.cleaned_data["note"],
                    )
        except LedgerError as error:
            messages.error(request, f"No quota was granted ({current}: {error.message}).")
            return None
        for agent in agents:
            self.log_change(request, agent, f"Granted {amount:,} {resource_type.pk} for this period.")
        self.message_user(
            request,
            f"Granted {amount:,} {resource_type.unit} of {resource_type.pk} to {len(agents)} agent(s).",
            messages.SUCCESS,
        )
        return None


# --- Organizations, teams and budgets -------------------------------------------------------------------


def _budget_table(budgets: list[Budget], *, now: dt.datetime):
    """The budgets' current windows as a reader sees them now (an ended window shown rolled), each row
    linking to its budget."""
    if not budgets:
        return "none"
    rows = []
    for budget in budgets:
        figures = budget_services.budget_figures(budget, now=now)
        rows.append(
            (
                reverse("admin:ledger_budget_change", args=[budget.pk]),
                budget.pk,
                budget.scope,
                budget.scope_id,
                budget.window,
                budget.mode,
                usd_text(budget.limit_usd),
                usd_text(figures.spent_usd),
                usd_text(figures.reserved_usd),
                usd_text(figures.rollover_usd),
                usd_text(figures.remaining_usd),
                _window_end(budget, figures),
            )
        )
    body = format_html_join(
        "\n",
        '<tr><td><a href="{}">{}</a></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>'
        "<td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
        rows,
    )
    return format_html(
        "<table><thead><tr><th>budget</th><th>scope</th><th>of</th><th>window</th><th>mode</th>"
        "<th>limit</th><th>spent</th><th>reserved</th><th>rollover</th><th>remaining</th>"
        "<th>window ends (UTC)</th></tr></thead><tbody>{}</tbody></table>",
        body,
    )


def _window_end(budget: Budget, figures: budget_services.BudgetFigures) -> str:
    if figures.window_end is not None:
        return f"{figures.window_end:%Y-%m-%d %H:%M}"
    # A run's total window has no end of its own; the run does.
    return f"run ends {budget.expires_at:%Y-%m-%d %H:%M}" if budget.expires_at else "-"


class _ServiceForm(forms.ModelForm):
    """A form whose row is written by a service, called once every field and the model's own checks have
    passed: the service is the validation, so its refusal becomes the form's error rather than an error
    page. The admin's view runs in one transaction and this is the form's last step, so nothing can
    refuse the form after the row is written; ``save_model`` then has nothing left to do."""

    # Where each service error code is shown; others are shown above the form.
    ERROR_FIELDS: dict[str, str] = {}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # An add form's row has no primary key yet (the organizations' and teams' ids are typed in it).
        self.adding = not self.instance.pk

    def service_call(self):
        raise NotImplementedError

    def _post_clean(self):
        # As Django's UserCreationForm does with its password check: after the model's validation.
        super()._post_clean()
        if self.errors:
            return
        try:
            with transaction.atomic():
                self.instance = self.service_call()
        except LedgerError as error:
            field = self.ERROR_FIELDS.get(error.code)
            self.add_error(field if field in self.fields else None, error.message)


class OrganizationAdminForm(_ServiceForm):
    ERROR_FIELDS = {"invalid_id": "id", "already_exists": "id"}

    class Meta:
        model = Organization
        fields = ("id", "name")

    def service_call(self) -> Organization:
        if self.adding:
            return budget_services.organization_create(
                id=self.cleaned_data["id"], name=self.cleaned_data["name"]
            )
        # A name is only a label: no rule beyond the field's own.
        Organization.objects.filter(pk=self.instance.pk).update(name=self.cleaned_data["name"])
        self.instance.refresh_from_db()
        return self.instance


class TeamAdminForm(_ServiceForm):
    ERROR_FIELDS = {
        "invalid_id": "id",
        "already_exists": "id",
        "organization_not_found": "organization",
    }

    class Meta:
        model = Team
        fields = ("id", "name", "organization")

    def service_call(self) -> Team:
        organization = self.cleaned_data.get("organization")
        if self.adding:
            return budget_services.team_create(
                id=self.cleaned_data["id"],
                name=self.cleaned_data["name"],
                organization_id=None if organization is None else organization.pk,
            )
        # Moving a team moves its agents' calls to the new organization's budgets from the next call;
        # what they spent stays where it was charged (as when an agent changes team).
        Team.objects.filter(pk=self.instance.pk).update(
            name=self.cleaned_data["name"], organization=organization
        )
        self.instance.refresh_from_db()
        return self.instance


@admin.register(Organization)
class OrganizationAdmin(admin.ModelAdmin):
    form = OrganizationAdminForm
    list_display = ("id", "name", "team_count", "budget_count", "created_at")
    search_fields = ("id", "name")

    def get_queryset(self, request: HttpRequest):
        # Two counts over two joins: distinct, or each would multiply the other.
        return (
            super()
            .get_queryset(request)
            .annotate(team_count=Count("teams", distinct=True), budget_count=Count("budgets", distinct=True))
        )

    def get_fields(self, request: HttpRequest, obj=None):
        return ("id", "name") if obj is None else ("id", "name", "created_at", "budgets_now")

    def get_readonly_fields(self, request: HttpRequest, obj=None):
        # Editing a primary key in the admin saves a second row instead of renaming the first.
        return () if obj is None else ("id", "created_at", "budgets_now")

    def save_model(self, request: HttpRequest, obj, form, change: bool) -> None:
        pass  # written by the service, when the form was validated

    @admin.display(description="teams", ordering="team_count")
    def team_count(self, obj: Organization):
        url = f"{reverse('admin:ledger_team_changelist')}?organization__id__exact={obj.pk}"
        return format_html('<a href="{}">{}</a>', url, obj.team_count)

    @admin.display(description="budgets", ordering="budget_count")
    def budget_count(self, obj: Organization):
        url = f"{reverse('admin:ledger_budget_changelist')}?organization__id__exact={obj.pk}"
        return format_html('<a href="{}">{}</a>', url, obj.budget_count)

    @admin.display(description="its budgets, as of now")
    def budgets_now(self, obj: Organization):
        return _budget_table(list(obj.budgets.order_by("id")), now=timezone.now())


@admin.register(Team)
class TeamAdmin(admin.ModelAdmin):
    form = TeamAdminForm
    list_display = ("id", "name", "organization", "agent_count", "budget_count", "created_at")
    list_filter = ("organization",)
    list_select_related = ("organization",)
    search_fields = ("id", "name", "organization__id")
    autocomplete_fields = ("organization",)

    def get_queryset(self, request: HttpRequest):
        return (
            super()
            .get_queryset(request)
            .annotate(
                agent_count=Count("agents", distinct=True), budget_count=Count("budgets", distinct=True)
            )
        )

    def get_fields(self, request: HttpRequest, obj=None):
        fields = ("id", "name", "organization")
        return fields if obj is None else (*fields, "created_at", "budgets_now")

    def get_readonly_fields(self, request: HttpRequest, obj=None):
        return () if obj is None else ("id", "created_at", "budgets_now")

    def save_model(self, request: HttpRequest, obj, form, change: bool) -> None:
        pass  # written by the service, when the form was validated

    @admin.display(description="agents", ordering="agent_count")
    def agent_count(self, obj: Team):
        url = f"{reverse('admin:ledger_agent_changelist')}?team__id__exact={obj.pk}"
        return format_html('<a href="{}">{}</a>', url, obj.agent_count)

    @admin.display(description="budgets", ordering="budget_count")
    def budget_count(self, obj: Team):
        url = f"{reverse('admin:ledger_budget_changelist')}?team__id__exact={obj.pk}"
        return format_html('<a href="{}">{}</a>', url, obj.budget_count)

    @admin.display(description="its budgets, as of now")
    def budgets_now(self, obj: Team):
        return _budget_table(list(obj.budgets.order_by("id")), now=timezone.now())


class ThresholdsField(forms.CharField):
    """Alert percentages typed as ``50, 80, 90, 100``; empty for no alerts. The range is the service's."""

    def prepare_value(self, value):
        if isinstance(value, list | tuple):
            return ", ".join(str(item) for item in value)
        return value

    def to_python(self, value) -> list[int]:
        text = super().to_python(value)
        if isinstance(text, list):
            return text
        try:
            return [int(item) for item in text.replace(";", ",").split(",") if item.strip()]
        except ValueError:
            raise ValidationError("Whole percentages separated by commas, e.g. 50, 80, 90, 100.") from None

    def has_changed(self, initial, data) -> bool:
        try:
            return self.to_python(self.prepare_value(initial)) != self.to_python(data)
        except ValidationError:
            return True


class BudgetAdminForm(_ServiceForm):
    ERROR_FIELDS = {
        "invalid_scope": "scope_id",
        "organization_not_found": "scope_id",
        "team_not_found": "scope_id",
        "agent_not_found": "scope_id",
        "invalid_window": "window",
        "invalid_limit": "limit_usd",
        "invalid_mode": "mode",
        "invalid_rollover": "rollover_percent",
        "invalid_thresholds": "thresholds",
    }
    # A run's budget belongs to the agent's call that names it (POST /agents/{id}/runs), and so does the
    # total window: the admin creates the standing budgets.
    scope = forms.ChoiceField(
        choices=[choice for choice in Budget.Scope.choices if choice[0] != Budget.Scope.RUN]
    )
    scope_id = forms.CharField(
        max_length=64, label="Scope id", help_text="The id of the organization, team or agent."
    )
    window = forms.ChoiceField(
        choices=[choice for choice in Budget.Window.choices if choice[0] != Budget.Window.TOTAL],
        help_text="UTC. A budget created mid-window starts with what its scope has spent in it already.",
    )
    # The model's own constraint would say it only as a violated constraint, above the form.
    rollover_percent = forms.IntegerField(
        min_value=0,
        max_value=100,
        initial=0,
        help_text="The share of the limit that the unused part of a window may add to the next one.",
    )
    thresholds = ThresholdsField(
        required=False,
        initial=", ".join(str(item) for item in DEFAULT_BUDGET_THRESHOLDS),
        help_text="Alert at these percentages of the limit, e.g. 50, 80, 90, 100. Empty: no alerts.",
    )

    class Meta:
        model = Budget
        fields = ("limit_usd", "mode", "rollover_percent", "thresholds")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not self.adding:
            # What a budget is (its scope and window) is fixed once it exists: shown, not asked.
            for name in ("scope", "scope_id", "window"):
                self.fields.pop(name, None)

    def service_call(self) -> Budget:
        data = self.cleaned_data
        if self.adding:
            return budget_services.budget_create(
                scope=data["scope"],
                scope_id=data["scope_id"],
                window=data["window"],
                limit_usd=data["limit_usd"],
                mode=data["mode"],
                rollover_percent=data["rollover_percent"],
                thresholds=data["thresholds"],
            )
        changes = {name: data[name] for name in self.changed_data if name in budget_services.EDITABLE_FIELDS}
        return budget_services.budget_update(budget=self.instance, changes=changes)


@admin.register(Budget)
class BudgetAdmin(admin.ModelAdmin):
    form = BudgetAdminForm
    list_display = (
        "id",
        "scope_column",
        "window",
        "mode",
        "limit",
        "current_window",
        "spent",
        "reserved",
        "rollover",
        "remaining",
        "refusing",
    )
    list_filter = ("scope", "window", "mode", "managed")
    search_fields = ("agent__id", "team__id", "organization__id", "run_id")
    # Every figure is computed from the row itself (budget_figures): no query per row, no join.
    show_full_result_count = False
    limit = money_column("limit_usd", "limit")

    def get_fieldsets(self, request: HttpRequest, obj=None):
        if obj is None:
            return [
                (None, {"fields": ("scope", "scope_id", "window")}),
                (None, {"fields": ("limit_usd", "mode", "rollover_percent", "thresholds")}),
            ]
        limits = {
            "fields": ("limit" if obj.managed else "limit_usd", "mode", "rollover_percent", "thresholds")
        }
        if obj.managed:
            limits["description"] = (
                f"This is agent {obj.agent_id}'s monthly budget: to change its limit, change the agent's "
                "monthly budget (monthly_budget_usd); empty it to remove this budget."
            )
        return [
            (None, {"fields": (("scope", "scope_of"), "window", "managed")}),
            ("Limit and alerts", limits),
            (
                "Current window, as of now",
                {
                    "fields": (
                        ("current_window_start", "current_window_end"),
                        ("spent", "reserved", "rollover"),
                        "remaining",
                        ("expires_at", "refused_at"),
                    ),
                    "description": "Kept by the allocations themselves; a window that has ended is shown "
                    "rolled over, as the next call will find it.",
                },
            ),
            (None, {"fields": ("created_at", "updated_at")}),
        ]

    def get_readonly_fields(self, request: HttpRequest, obj=None):
        if obj is None:
            return ()
        # What a budget is (its scope and window) is fixed; its counters are the allocations'.
        fields = [
            "scope",
            "scope_of",
            "window",
            "managed",
            "current_window_start",
            "current_window_end",
            "spent",
            "reserved",
            "rollover",
            "remaining",
            "expires_at",
            "refused_at",
            "created_at",
            "updated_at",
        ]
        if obj.managed:
            fields.append("limit")  # the limit_usd of the agent's monthly budget, as money
        return fields

    def save_model(self, request: HttpRequest, obj, form, change: bool) -> None:
        pass  # written by the service, when the form was validated

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        # The agent's monthly budget goes with its monthly_budget_usd.
        if obj is not None and obj.managed:
            return False
        return super().has_delete_permission(request, obj)

    def delete_model(self, request: HttpRequest, obj: Budget) -> None:
        budget_services.budget_delete(budget=obj)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Budget]) -> None:
        managed = [budget.pk for budget in queryset if budget.managed]
        for budget in queryset.filter(managed=False).order_by("pk"):
            budget_services.budget_delete(budget=budget)
        if managed:
            self.message_user(
                request,
                f"Kept the agents' monthly budgets {', '.join(map(str, managed))}: empty the agent's "
                "monthly budget to remove one.",
                messages.WARNING,
            )

    def _figures(self, obj: Budget) -> budget_services.BudgetFigures:
        # One page computes each row's figures at one moment, once.
        cached = getattr(obj, "_admin_figures", None)
        if cached is None:
            cached = budget_services.budget_figures(obj, now=timezone.now())
            obj._admin_figures = cached
        return cached

    @admin.display(description="of")
    def scope_of(self, obj: Budget):
        target = {
            Budget.Scope.ORGANIZATION: ("admin:ledger_organization_change", obj.organization_id),
            Budget.Scope.TEAM: ("admin:ledger_team_change", obj.team_id),
            Budget.Scope.AGENT: ("admin:ledger_agent_change", obj.agent_id),
            Budget.Scope.RUN: ("admin:ledger_agent_change", obj.agent_id),
        }[obj.scope]
        label = f"{obj.agent_id} / {obj.run_id}" if obj.scope == Budget.Scope.RUN else obj.scope_id
        return format_html('<a href="{}">{}</a>', reverse(target[0], args=[quote(target[1])]), label)

    @admin.display(description="scope", ordering="scope")
    def scope_column(self, obj: Budget):
        # The scope and whose it is in one column: the list must fit a 1280 px window.
        return format_html("{}<br>{}", obj.get_scope_display(), self.scope_of(obj))

    @admin.display(description="window start (UTC)")
    def current_window_start(self, obj: Budget) -> str:
        return f"{self._figures(obj).window_start:%Y-%m-%d %H:%M}"

    @admin.display(description="window end (UTC)")
    def current_window_end(self, obj: Budget) -> str:
        return _window_end(obj, self._figures(obj))

    @admin.display(description="current window (UTC)")
    def current_window(self, obj: Budget):
        # One column for the list, its two ends on two lines: the list must fit a 1280 px window.
        return format_html("{}<br>{}", self.current_window_start(obj), self.current_window_end(obj))

    @admin.display(description="spent")
    def spent(self, obj: Budget) -> str:
        return usd_text(self._figures(obj).spent_usd)

    @admin.display(description="reserved")
    def reserved(self, obj: Budget) -> str:
        return usd_text(self._figures(obj).reserved_usd)

    @admin.display(description="rollover")
    def rollover(self, obj: Budget) -> str:
        return usd_text(self._figures(obj).rollover_usd)

    @admin.display(description="remaining")
    def remaining(self, obj: Budget) -> str:
        return usd_text(self._figures(obj).remaining_usd)

    @admin.display(description="refusing", boolean=True)
    def refusing(self, obj: Budget) -> bool | None:
        if obj.mode != Budget.Mode.HARD:
            return None
        return obj.refused_at is not None or self._figures(obj).remaining_usd <= 0


# --- The ledger: view-only ------------------------------------------------------------------------------


class GrantInline(admin.TabularInline):
    model = Grant
    fk_name = "quota"
    extra = 0
    fields = ("created_at", "amount", "reason", "actor", "counterparty_agent", "note")
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return False


@admin.register(Quota)
class QuotaAdmin(ViewOnlyAdmin):
    list_display = (
        "agent",
        "resource_type",
        "period_start",
        "used_units",
        "reserved_units",
        "limit_units",
        "available_units",
        "utilization",
    )
    list_filter = ("resource_type", "agent__tier")
    search_fields = ("agent__id", "agent__name")
    list_select_related = ("agent", "resource_type")
    date_hierarchy = "period_start"
    inlines = [GrantInline]
    money_fields = {"spent_usd": "spent this period"}
    fields = (
        ("agent", "resource_type"),
        ("period_start", "period_end"),
        ("used", "reserved", "available_units"),
        ("base_limit", "limit"),
        "spent_usd",
        "reconciliation",
        "updated_at",
    )
    # Counters are a cache of the usage log and the grants: only the services move them.
    readonly_fields = (
        "agent",
        "resource_type",
        "period_start",
        "period_end",
        "used",
        "reserved",
        "base_limit",
        "limit",
        "available_units",
        "reconciliation",
        "updated_at",
    )

    @admin.display(description="used", ordering="used")
    def used_units(self, obj: Quota) -> str:
        return _units(obj.used)

    @admin.display(description="reserved", ordering="reserved")
    def reserved_units(self, obj: Quota) -> str:
        return _units(obj.reserved)

    @admin.display(description="limit", ordering="limit")
    def limit_units(self, obj: Quota) -> str:
        return _units(obj.limit)

    @admin.display(description="available")
    def available_units(self, obj: Quota) -> str:
        return _units(obj.available)

    @admin.display(description="used + reserved")
    def utilization(self, obj: Quota) -> str:
        return f"{obj.utilization_percent}%"

    @admin.display(description="recomputed from the ledger")
    def reconciliation(self, obj: Quota):
        expected = quota_reconciliation(quota=obj)
        actual = {"used": obj.used, "limit": obj.limit, "spent_usd": obj.spent_usd}
        verdict = "matches" if expected == actual else "DIFFERS"
        return format_html(
            'used {} &middot; limit {} &middot; {} &middot; <a href="{}?quota={}">usage log</a>',
            _units(expected["used"]),
            _units(expected["limit"]),
            verdict,
            reverse("admin:ledger_usagelog_changelist"),
            obj.pk,
        )


@admin.register(Grant)
class GrantAdmin(ViewOnlyAdmin):
    list_display = (
        "created_at",
        "agent_column",
        "resource_type_column",
        "period",
        "signed_amount",
        "reason",
        "actor",
        "note",
    )
    list_filter = ("reason", "resource_type")
    search_fields = ("agent__id", "actor", "note")
    # The agent and resource columns are the grant's own, the period its quota's: only the quota is joined.
    list_select_related = ("quota", "counterparty_agent")
    date_hierarchy = "created_at"
    show_full_result_count = False

    # Not named ``agent`` or ``resource_type``: a model field of that name would be shown instead, read
    # through its relation, one query per row.
    @admin.display(description="agent", ordering="agent_id")
    def agent_column(self, obj: Grant) -> str:
        return obj.agent_id

    @admin.display(description="resource", ordering="resource_type_id")
    def resource_type_column(self, obj: Grant) -> str:
        return obj.resource_type_id

    @admin.display(description="period", ordering="quota__period_start")
    def period(self, obj: Grant) -> str:
        return f"{obj.quota.period_start:%Y-%m}"

    @admin.display(description="amount", ordering="amount")
    def signed_amount(self, obj: Grant) -> str:
        return f"{obj.amount:+,}"


@admin.register(UsageLog)
class UsageLogAdmin(ViewOnlyAdmin):
    list_display = (
        "created_at",
        "agent",
        "resource_type",
        "kind",
        "amount_units",
        "unit_price_usd_money",
        "cost_usd_money",
        "task_id",
    )
    money_fields = {"unit_price_usd": "unit price", "cost_usd": "cost"}
    list_filter = ("kind", "resource_type", "agent__tier")
    search_fields = ("agent__id", "task_id", "idempotency_key")
    list_select_related = ("agent", "resource_type")
    date_hierarchy = "created_at"
    # The usage log is the biggest table: skip the COUNT(*) of all of it on every page.
    show_full_result_count = False

    @admin.display(description="amount", ordering="amount")
    def amount_units(self, obj: UsageLog) -> str:
        return _units(obj.amount)


# --- Rules ----------------------------------------------------------------------------------------------


@admin.register(OptimizationRule)
class OptimizationRuleAdmin(admin.ModelAdmin):
    list_display = (
        "name",
        "scope",
        "target",
        "condition",
        "duration_seconds",
        "severity",
        "action",
        "enabled",
    )
    list_filter = ("enabled", "scope", "severity", "action", "metric")
    search_fields = ("name", "description")
    list_select_related = ("tier", "agent")
    autocomplete_fields = ("agent",)
    readonly_fields = ("created_at", "updated_at")
    fieldsets = [
        (None, {"fields": ("name", "description", "enabled")}),
        ("Applies to", {"fields": ("scope", "tier", "agent")}),
        ("When", {"fields": ("metric", "operator", "threshold", "duration_seconds")}),
        ("Then", {"fields": ("severity", "action", "cooldown_seconds")}),
        (None, {"fields": ("created_at", "updated_at")}),
    ]

    @admin.display(description="target")
    def target(self, obj: OptimizationRule) -> str:
        if obj.scope == OptimizationRule.Scope.TIER:
            return f"tier {obj.tier_id}"
        if obj.scope == OptimizationRule.Scope.AGENT:
            return f"agent {obj.agent_id}"
        return "all agents"

"""Back office of the marketplace: deals and purchases, both read-only (they change through the marketplace
services only, so that ``Quota.listed`` always matches the open agent deals). Expiring deals now is an
action that calls the same service as the refresh task, and gives unsold agent quota back."""

from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from ledger.admin import MoneyFieldsMixin, money_column
from optimization.models import Deal, Purchase
from optimization.services.marketplace import deals_expire


class ReadOnlyAdmin(MoneyFieldsMixin, admin.ModelAdmin):
    def has_add_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return False


class SellerKindFilter(admin.SimpleListFilter):
    title = "seller"
    parameter_name = "seller_kind"

    def lookups(self, request, model_admin):
        return [("platform", "Platform"), ("agent", "Agents")]

    def queryset(self, request, queryset):
        if self.value() == "platform":
            return queryset.filter(seller__isnull=True)
        if self.value() == "agent":
            return queryset.filter(seller__isnull=False)
        return queryset


class PurchaseInline(admin.TabularInline):
    model = Purchase
    fields = ("buyer", "amount", "unit_price", "cost", "created_at")
    readonly_fields = fields
    unit_price = money_column("unit_price_usd", "unit price")
    cost = money_column("cost_usd", "cost")
    extra = 0
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj=None) -> bool:
        return False


@admin.register(Deal)
class DealAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "resource_type",
        "seller_display",
        "amount_left",
        "amount_total",
        "unit_price_usd_money",
        "status",
        "expires_at",
        "created_at",
    )
    list_filter = ("status", "resource_type", SellerKindFilter)
    money_fields = {"unit_price_usd": "unit price"}
    search_fields = ("seller__id",)
    list_select_related = ("resource_type", "seller")
    date_hierarchy = "created_at"
    ordering = ("-created_at",)
    inlines = [PurchaseInline]
    actions = ["expire_now"]

    @admin.display(description="seller", ordering="seller")
    def seller_display(self, obj: Deal) -> str:
        return obj.seller_id or "platform"

    def has_expire_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("optimization.change_deal")

    @admin.action(
        description="Expire now (unsold agent quota goes back to its seller)", permissions=["expire"]
    )
    def expire_now(self, request: HttpRequest, queryset: QuerySet) -> None:
        result = deals_expire(deal_ids=list(queryset.values_list("pk", flat=True)))
        self.message_user(
            request,
            f"{result['expired']} deals expired, {result['returned_units']:,} units given back to sellers.",
            messages.SUCCESS,
        )


@admin.register(Purchase)
class PurchaseAdmin(ReadOnlyAdmin):
    list_display = ("created_at", "buyer", "deal", "amount", "unit_price_usd_money", "cost_usd_money")
    money_fields = {"unit_price_usd": "unit price", "cost_usd": "cost"}
    search_fields = ("buyer__id",)
    list_select_related = ("buyer", "deal", "deal__resource_type")
    date_hierarchy = "created_at"

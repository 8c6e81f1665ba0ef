"""Routes of the agent-facing API."""

from __future__ import annotations

from django.urls import path

from allocation.api import batch, budgets, compat, exports, views
from allocation.api.shared import converters  # noqa: F401  (registers <agent_id:...>)

app_name = "api"

# URLs are tried in order: the routes agents call on every task come first.
urlpatterns = [
    path(
        "v1/agents/<agent_id:agent_id>/allocations", views.AllocationCreateView.as_view(), name="allocations"
    ),
    path("v1/agents/<agent_id:agent_id>/quota-checks", views.QuotaCheckView.as_view(), name="quota-checks"),
    *batch.urlpatterns,
    path("v1/agents", views.AgentListCreateView.as_view(), name="agents"),
    path("v1/agents/<agent_id:agent_id>", views.AgentDetailView.as_view(), name="agent"),
    path("v1/agents/<agent_id:agent_id>/quotas", views.QuotaListView.as_view(), name="quotas"),
    path(
        "v1/agents/<agent_id:agent_id>/allocations/<uuid:allocation_id>",
        views.AllocationDetailView.as_view(),
        name="allocation",
    ),
    path(
        "v1/agents/<agent_id:agent_id>/allocations/<uuid:allocation_id>/settle",
        views.AllocationSettleView.as_view(),
        name="allocation-settle",
    ),
    path(
        "v1/agents/<agent_id:agent_id>/allocations/<uuid:allocation_id>/release",
        views.AllocationReleaseView.as_view(),
        name="allocation-release",
    ),
    path("v1/agents/<agent_id:agent_id>/leases", views.LeaseCreateView.as_view(), name="leases"),
    path("v1/agents/<agent_id:agent_id>/usage", views.UsageListView.as_view(), name="usage"),
    path("v1/agents/<agent_id:agent_id>/cost", views.CostView.as_view(), name="cost"),
    path("v1/agents/<agent_id:agent_id>/shares", views.ShareCreateView.as_view(), name="shares"),
    *budgets.urlpatterns,
    *exports.urlpatterns,
    path("resources", compat.ResourcesView.as_view(), name="resources"),
]

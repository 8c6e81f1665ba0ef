"""Dashboard routes, mounted at /dashboard/."""

from __future__ import annotations

from django.urls import path

from optimization.dashboard import views

app_name = "dashboard"

urlpatterns = [
    path("", views.fleet, name="fleet"),
    path("data", views.fleet_data, name="fleet-data"),
    path("resources/", views.resources, name="resources"),
    path("resources/data", views.resources_data, name="resources-data"),
    path("resources/usage.csv", views.usage_csv, name="usage-csv"),
    path("agents", views.agent_search, name="agent-search"),
    path("resources/actions/<str:name>", views.action, name="action"),
]

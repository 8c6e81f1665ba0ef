"""Routes of the optimization endpoints, mounted under /api/ beside the allocation API."""

from __future__ import annotations

from optimization.api import alerts, analytics, executions, experiments, marketplace, scaling, trends

urlpatterns = [
    *executions.urlpatterns,
    *analytics.urlpatterns,
    *alerts.urlpatterns,
    *scaling.urlpatterns,
    *marketplace.urlpatterns,
    *experiments.urlpatterns,
    *trends.urlpatterns,
]

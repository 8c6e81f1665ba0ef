"""Root URLs: the admin, the health check, the metrics, the API and its documentation."""

from __future__ import annotations

from django.contrib import admin
from django.db import connection
from django.http import JsonResponse
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from axiom_grid.observability.exposition import MetricsView


def healthz(request):
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return JsonResponse({"status": "ok"})


admin.site.site_header = "Axiom Energy Grid"
admin.site.site_title = "Axiom Energy Grid"
admin.site.index_title = "Back office"
admin.site.site_url = "/dashboard/"  # the admin's "View site" link opens the resource monitor

# URLs are tried in order: the agents' API first, as it takes nearly every request.
urlpatterns = [
    path("api/", include("allocation.urls")),
    path("api/", include(("optimization.urls", "optimization"))),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    path("healthz", healthz, name="healthz"),
    path("metrics", MetricsView.as_view(), name="metrics"),
    path("admin/", admin.site.urls),
    path("dashboard/", include("optimization.dashboard.urls")),
]

handler404 = "allocation.api.shared.errors.json_404"
handler500 = "allocation.api.shared.errors.json_500"

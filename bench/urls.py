"""The project's URLs plus the bare baseline route the allocation endpoint is compared with."""

from __future__ import annotations

from django.urls import path

from axiom_grid.urls import handler404, handler500
from axiom_grid.urls import urlpatterns as grid_urlpatterns
from bench.baseline import BaselineAllocateView

urlpatterns = [
    path("bench/baseline/<int:quota_id>", BaselineAllocateView.as_view(), name="bench-baseline"),
    *grid_urlpatterns,
]

__all__ = ["handler404", "handler500", "urlpatterns"]

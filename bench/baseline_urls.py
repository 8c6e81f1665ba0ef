"""The bare baseline server's routes: the baseline views (one allocation, a batch), and a readiness check
that touches nothing."""

from __future__ import annotations

from django.http import HttpResponse
from django.urls import path

from bench.baseline import BaselineAllocateView, BaselineBatchView


def ready(request):
    return HttpResponse("ok")


urlpatterns = [
    path("bench/baseline/<int:quota_id>", BaselineAllocateView.as_view(), name="bench-baseline"),
    path("bench/baseline/batch", BaselineBatchView.as_view(), name="bench-baseline-batch"),
    path("healthz", ready, name="healthz"),
]

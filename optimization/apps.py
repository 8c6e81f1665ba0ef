from __future__ import annotations

from django.apps import AppConfig


class OptimizationConfig(AppConfig):
    name = "optimization"
    verbose_name = "Optimization"

    def ready(self) -> None:
        # The compatibility endpoint lives in allocation, which must not import this app: this app fills in
        # the actions it provides.
        from allocation.api.compat import COMPAT_GET_ACTIONS, COMPAT_POST_ACTIONS
        from optimization.api.analytics import compat_metrics, compat_optimize, compat_recommendations
        from optimization.api.marketplace import compat_purchase

        COMPAT_GET_ACTIONS.update({"metrics": compat_metrics, "recommendations": compat_recommendations})
        COMPAT_POST_ACTIONS.update({"optimize": compat_optimize, "purchase": compat_purchase})

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

        # A fresh grid's reference data (load_reference_data, load_demo_data, the tests' fixture) include the
        # tiers' default scaling policies; the ledger's loader announces itself, as it cannot import this app.
        from ledger.signals import reference_data_loaded

        reference_data_loaded.connect(_tier_scaling_policies_load, dispatch_uid="tier-scaling-policies")


def _tier_scaling_policies_load(**kwargs) -> dict[str, int]:
    from optimization.services.scaling import tier_scaling_policies_ensure

    return {"scaling_policies": tier_scaling_policies_ensure()}

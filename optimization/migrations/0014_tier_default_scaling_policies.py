"""Every tier gets a default scaling policy: on for PRO and ENTERPRISE, off for FREE and CUSTOM.

Only tiers without a policy get one: a policy an operator already wrote is kept. On a fresh database the
tiers do not exist yet when this runs; ``load_reference_data`` creates them and then their policies
(``optimization.services.scaling.tier_scaling_policies_ensure``). The values are written out here, as they
were when this migration was made, rather than imported: a later change of the defaults must not change
what this migration did.

Reversing it deletes the tier policies that still hold exactly these defaults; one an operator changed
since stays.
"""

from decimal import Decimal

from django.db import migrations

COMMON = {
    "metric": "resource_utilization_percent",
    "scale_up_threshold": Decimal("80"),
    "scale_down_threshold": Decimal("30"),
    "step": 1,
    "min_instances": 1,
}
DEFAULTS = {
    "FREE": {"enabled": False, "max_instances": 2, "quota_step_percent": 0, "cooldown_seconds": 600},
    "PRO": {"enabled": True, "max_instances": 10, "quota_step_percent": 0, "cooldown_seconds": 600},
    "ENTERPRISE": {"enabled": True, "max_instances": 50, "quota_step_percent": 10, "cooldown_seconds": 300},
    "CUSTOM": {"enabled": False, "max_instances": 10, "quota_step_percent": 0, "cooldown_seconds": 600},
}


def create_missing(apps, schema_editor):
    Tier = apps.get_model("ledger", "Tier")
    ScalingPolicy = apps.get_model("optimization", "ScalingPolicy")
    have = set(ScalingPolicy.objects.filter(tier__isnull=False).values_list("tier_id", flat=True))
    for code in Tier.objects.filter(code__in=list(DEFAULTS)).values_list("code", flat=True):
        if code not in have:
            ScalingPolicy.objects.create(tier_id=code, **COMMON, **DEFAULTS[code])


def delete_unchanged(apps, schema_editor):
    ScalingPolicy = apps.get_model("optimization", "ScalingPolicy")
    for code, values in DEFAULTS.items():
        ScalingPolicy.objects.filter(tier_id=code, **COMMON, **values).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("optimization", "0013_experiment_strategy"),
    ]

    operations = [migrations.RunPython(create_missing, delete_unchanged)]

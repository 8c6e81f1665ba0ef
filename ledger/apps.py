from __future__ import annotations

from django.apps import AppConfig


def _reference_saved(*, using: str | None = None, **kwargs) -> None:
    from ledger.reference_cache import reference_changed

    reference_changed(using=using)


class LedgerConfig(AppConfig):
    name = "ledger"
    verbose_name = "Ledger"

    def ready(self) -> None:
        from django.db.models.signals import post_delete, post_save

        from ledger.models import ResourcePrice, ResourceType, TierQuota

        # The rule the cache keeps (ledger.reference_cache): the saving process drops its snapshot at once.
        # The receiver is a module-level function: signals hold receivers weakly, and a function defined
        # in here would be collected as soon as ``ready`` returns, silently disconnecting it.
        for model in (ResourceType, ResourcePrice, TierQuota):
            uid = f"ledger.reference.{model._meta.label_lower}"
            post_save.connect(_reference_saved, sender=model, dispatch_uid=f"{uid}.save")
            post_delete.connect(_reference_saved, sender=model, dispatch_uid=f"{uid}.delete")

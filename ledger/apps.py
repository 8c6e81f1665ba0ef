from __future__ import annotations

from django.apps import AppConfig


class LedgerConfig(AppConfig):
    name = "ledger"
    verbose_name = "Ledger"

    def ready(self) -> None:
        from django.db.models.signals import post_delete, post_save

        from ledger.models import ResourcePrice
        from ledger.selectors import price_table

        def clear_prices(**kwargs) -> None:
            price_table.clear()

        post_save.connect(clear_prices, sender=ResourcePrice, dispatch_uid="ledger.clear_prices")
        post_delete.connect(clear_prices, sender=ResourcePrice, dispatch_uid="ledger.clear_prices_delete")

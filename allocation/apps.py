from __future__ import annotations

from django.apps import AppConfig


class AllocationConfig(AppConfig):
    name = "allocation"
    verbose_name = "Allocation"

    def ready(self) -> None:
        from allocation.api.shared import schema  # noqa: F401  (registers the OpenAPI extensions)

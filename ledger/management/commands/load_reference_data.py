"""Load the reference data (resource types, prices, tiers, seed rules). Safe to run any number of times."""

from __future__ import annotations

from django.core.management.base import BaseCommand

from ledger.services import reference_data_load


class Command(BaseCommand):
    help = "Create the resource types, list prices, tiers and seed rules that are missing."

    def handle(self, *args, **options):
        created = reference_data_load()
        summary = ", ".join(f"{count} {kind}" for kind, count in created.items())
        self.stdout.write(self.style.SUCCESS(f"Reference data loaded (created: {summary})."))

"""Load the demo admin and demo agents with three weeks of usage. Safe to run any number of times."""

from __future__ import annotations

from django.core.management.base import BaseCommand

from ledger.demo import demo_data_load
from ledger.services import reference_data_load


class Command(BaseCommand):
    help = "Create the demo admin login and demo agents with realistic usage (skips what exists)."

    def handle(self, *args, **options):
        reference_data_load()
        created = demo_data_load()
        self.stdout.write(
            self.style.SUCCESS(
                f"Demo data loaded (created: {created['admin']} admin, {created['agents']} agents)."
            )
        )

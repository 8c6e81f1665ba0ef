"""Load the demo admin and demo agents with three weeks of usage. Safe to run any number of times.

The demo admin's login is ``admin`` / ``admin``: with DEBUG off (a production-like deployment) the command
refuses unless ``--allow-demo-login`` says that is what is wanted.
"""

from __future__ import annotations

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from ledger.demo import demo_data_load
from ledger.services import reference_data_load


class Command(BaseCommand):
    help = "Create the demo admin login (admin / admin) and demo agents with three weeks of usage."

    def add_arguments(self, parser):
        parser.add_argument(
            "--allow-demo-login",
            action="store_true",
            help="Load the demo data although DEBUG is off: creates a superuser admin / admin.",
        )

    def handle(self, *args, **options):
        if not settings.DEBUG and not options["allow_demo_login"]:
            raise CommandError(
                "DEBUG is off: the demo data include a superuser admin / admin. Refusing; pass "
                "--allow-demo-login to load them anyway (and change that password)."
            )
        reference_data_load()
        created = demo_data_load()
        self.stdout.write(
            self.style.SUCCESS(
                f"Demo data loaded (created: {created['admin']} admin, {created['agents']} agents)."
            )
        )

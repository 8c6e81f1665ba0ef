"""Create or update the django-celery-beat schedules that the apps declare in their ``schedules`` module.

Idempotent: schedules are matched by name. The interval is set only when a schedule is created, so an
operator's change in the admin (interval, enabled) survives a redeploy; ``--reset`` puts them back.
"""

from __future__ import annotations

import importlib

from django.apps import apps
from django.core.management.base import BaseCommand
from django.db import transaction
from django_celery_beat.models import IntervalSchedule, PeriodicTask


def declared_schedules() -> list[tuple[str, str, int, str]]:
    found = []
    for config in apps.get_app_configs():
        try:
            module = importlib.import_module(f"{config.name}.schedules")
        except ModuleNotFoundError as exc:
            if exc.name != f"{config.name}.schedules":
                raise
            continue
        found.extend(module.SCHEDULES)
    return found


class Command(BaseCommand):
    help = "Create the periodic tasks (by name) that are missing; --reset restores their declared intervals."

    def add_arguments(self, parser):
        parser.add_argument("--reset", action="store_true", help="overwrite intervals edited in the admin")

    @transaction.atomic
    def handle(self, *args, reset: bool, **options):
        created = 0
        for name, task, seconds, description in declared_schedules():
            interval, _ = IntervalSchedule.objects.get_or_create(
                every=seconds, period=IntervalSchedule.SECONDS
            )
            periodic, was_created = PeriodicTask.objects.get_or_create(
                name=name, defaults={"task": task, "interval": interval, "description": description}
            )
            if was_created:
                created += 1
            elif reset or periodic.task != task:
                periodic.task = task
                periodic.interval = interval
                periodic.crontab = None
                periodic.description = description
                periodic.enabled = True if reset else periodic.enabled
                periodic.save()
        self.stdout.write(self.style.SUCCESS(f"Periodic tasks ready ({created} created)."))

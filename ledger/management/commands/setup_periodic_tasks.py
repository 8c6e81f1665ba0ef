"""Create or update the django-celery-beat schedules that the apps declare in their ``schedules`` module.

Idempotent: schedules are matched by name. The interval is set only when a schedule is created, so an
operator's change in the admin (interval, enabled) survives a redeploy; ``--reset`` puts them back.

Each schedule's messages expire after its interval (``expire_seconds``): with two beats running, or a worker
that fell behind, a send older than an interval is dropped instead of run late (``ledger.periodic``). A
schedule without one, or with one longer than its interval (edited in the admin), is given its interval; a
shorter one an operator chose is kept, and so is a schedule with an end date (``expires``), which
django-celery-beat does not allow together with ``expire_seconds``.
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
                name=name,
                defaults={
                    "task": task,
                    "interval": interval,
                    "description": description,
                    "expire_seconds": seconds,
                },
            )
            if was_created:
                created += 1
            elif reset or periodic.task != task:
                periodic.task = task
                periodic.interval = interval
                periodic.crontab = None
                periodic.description = description
                periodic.enabled = True if reset else periodic.enabled
                periodic.expires = None if reset else periodic.expires
                periodic.expire_seconds = None if periodic.expires else seconds
                periodic.save()
            else:
                expiry_limit(periodic)
        self.stdout.write(self.style.SUCCESS(f"Periodic tasks ready ({created} created)."))


def expiry_limit(periodic: PeriodicTask) -> None:
    """Make ``periodic``'s messages expire within its interval, as edited (a crontab's is left alone)."""
    if periodic.interval is None or periodic.expires is not None:
        return
    seconds = max(1, int(periodic.interval.schedule.run_every.total_seconds()))
    if periodic.expire_seconds is None or periodic.expire_seconds > seconds:
        periodic.expire_seconds = seconds
        periodic.save(update_fields=["expire_seconds"])

"""Build or repair the usage rollups of a range of days from the usage log, one day per transaction."""

from __future__ import annotations

import datetime as dt

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from optimization.services.rollups import usage_rollups_backfill


def _day(text: str) -> dt.datetime:
    try:
        day = dt.date.fromisoformat(text)
    except ValueError:
        raise CommandError(f"{text!r} is not a date (YYYY-MM-DD)") from None
    return dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)


class Command(BaseCommand):
    help = (
        "Recompute the hourly and daily usage rollups of the days from --since to --until (exclusive, UTC "
        "dates; default: tomorrow), latest first. Safe to run at any time and more than once."
    )

    def add_arguments(self, parser):
        parser.add_argument("--since", required=True, help="the first day, YYYY-MM-DD (UTC)")
        parser.add_argument("--until", help="the day after the last one, YYYY-MM-DD (UTC); default: tomorrow")

    def handle(self, *args, since: str, until: str | None, **options):
        start = _day(since)
        end = _day(until) if until else _day(timezone.now().date().isoformat()) + dt.timedelta(days=1)
        if start >= end:
            raise CommandError("--since must be before --until")
        result = usage_rollups_backfill(since=start, until=end)
        self.stdout.write(
            self.style.SUCCESS(
                f"Rollups recomputed: {result['chunks']} days, {result['hours_written']} hourly and "
                f"{result['days_written']} daily rows written."
            )
        )

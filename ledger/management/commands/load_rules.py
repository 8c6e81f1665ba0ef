"""Load optimization rules from a YAML file in the product description's alert format."""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from ledger.rules_yaml import RuleFileError
from ledger.services import LedgerError, rules_load_yaml


class Command(BaseCommand):
    help = "Create or update optimization rules from a YAML file; a bad file loads nothing."

    def add_arguments(self, parser):
        parser.add_argument("path", help="YAML file with a top-level 'alerts' list")

    def handle(self, *args, path: str, **options):
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise CommandError(f"cannot read {path}: {exc.strerror}") from exc
        try:
            rules = rules_load_yaml(text=text)
        except (RuleFileError, LedgerError) as exc:
            raise CommandError(f"{path}: {exc} (nothing was loaded)") from exc
        for rule in rules:
            self.stdout.write(
                f"  {rule.name}: {rule.condition} for {rule.duration_seconds}s -> {rule.action}"
            )
        self.stdout.write(self.style.SUCCESS(f"Loaded {len(rules)} rule(s) from {path}."))

"""Issue an API key for an agent or an operator; the key alone goes to standard output."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from allocation.keys import api_key_issue, operator_key_issue
from ledger.models import Agent


class Command(BaseCommand):
    help = "Print a new API key for --agent AGENT_ID or --operator USERNAME (created as staff if missing)."

    def add_arguments(self, parser):
        who = parser.add_mutually_exclusive_group(required=True)
        who.add_argument("--agent", help="the agent the key acts for (and only that agent)")
        who.add_argument("--operator", help="a staff username; the key acts on every agent")
        parser.add_argument("--name", default="", help="a label shown in the admin")

    def handle(self, *args, agent: str | None, operator: str | None, name: str, **options):
        if agent is not None:
            found = Agent.objects.filter(pk=agent).first()
            if found is None:
                raise CommandError(f"no agent {agent!r}")
            api_key, raw_key = api_key_issue(agent=found, name=name or "issued by command")
        else:
            api_key, raw_key = operator_key_issue(username=operator, name=name)
        self.stderr.write(f"Issued {api_key.prefix}… for {api_key.owner_label}; it is shown only now.")
        self.stdout.write(raw_key)

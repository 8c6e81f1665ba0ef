"""``grid``: the grid from a shell. Human tables by default, the server's JSON with ``--json``.

Configured by ``GRID_URL`` and ``GRID_API_KEY`` (or ``--url`` and ``--api-key``). Exit codes say what
happened, for scripts: 0 done; 2 refused (a quota, a dollar budget or a throttle said no, and ``check``
answering not allowed); 1 any other error (the message on standard error, never a traceback). With
``--json`` an error answered by the grid is also written to standard output as the grid's JSON
(``{"error": {"code", "message", "details"}}``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import sys
from collections.abc import Iterable, Sequence
from decimal import Decimal
from typing import Any, NoReturn

from . import __version__
from .client import Grid
from .errors import GridError, Refused
from .models import Allocation, Model

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_REFUSED = 2
DEFAULT_USAGE_ROWS = 50

_DATE_ONLY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class CliError(Exception):
    """A mistake in how ``grid`` was called or configured: exit 1 with the message."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake exits 1 (2 means "refused" here)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message}\n")


# --- Arguments ----------------------------------------------------------------------------------------------


def _amount(text: str) -> int:
    try:
        value = int(text.replace(",", "").replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of units: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"an amount cannot be negative: {text!r}")
    return value


def _moment(text: str) -> str:
    """ISO 8601 as the server takes it; a date alone is that day's midnight UTC."""
    text = text.strip()
    if _DATE_ONLY.match(text):
        return f"{text}T00:00:00Z"
    try:
        dt.datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 date or time: {text!r}") from None
    return text


def build_parser() -> Parser:
    # The options every command takes, before or after its name (SUPPRESS: a subcommand's default does
    # not overwrite what was given before it).
    common = Parser(add_help=False)
    common.add_argument("--url", default=argparse.SUPPRESS, help="the grid's URL (default: $GRID_URL)")
    common.add_argument("--api-key", default=argparse.SUPPRESS, help="an API key (default: $GRID_API_KEY)")
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print the server's JSON"
    )
    common.add_argument(
        "--timeout", type=float, default=argparse.SUPPRESS, help="seconds to wait for an answer (default 30)"
    )

    parser = Parser(
        prog="grid",
        description="Quotas, allocations, holds, usage and cost of the Axiom Energy Grid.",
        epilog="Exit codes: 0 done, 2 refused (quota, budget, throttle; check not allowed), 1 error.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help_text, description=help_text, parents=[common])

    quotas = command("quotas", "this period's quota per resource type")
    quotas.add_argument("agent", metavar="AGENT")

    check = command("check", "would AMOUNT be allocated now? (changes nothing; exit 2 if not)")
    check.add_argument("agent", metavar="AGENT")
    check.add_argument("resource_type", metavar="RESOURCE")
    check.add_argument("amount", type=_amount)
    check.add_argument("--run-id", help="the run whose budget applies too")

    allocate = command("allocate", "take AMOUNT units, committed (or held with --hold)")
    allocate.add_argument("agent", metavar="AGENT")
    allocate.add_argument("resource_type", metavar="RESOURCE")
    allocate.add_argument("amount", type=_amount)
    allocate.add_argument("--hold", action="store_true", help="hold until settled or released")
    allocate.add_argument("--ttl", type=int, help="a hold's time to live in seconds (default 15 minutes)")
    allocate.add_argument("--task-id")
    allocate.add_argument("--run-id")
    allocate.add_argument("--idempotency-key", help="the same key again replays the first answer")

    settle = command("settle", "charge a hold what was used (the rest goes back)")
    settle.add_argument("agent", metavar="AGENT")
    settle.add_argument("allocation_id", metavar="ALLOCATION_ID")
    settle.add_argument("amount", type=_amount)

    release = command("release", "give a hold back, uncharged")
    release.add_argument("agent", metavar="AGENT")
    release.add_argument("allocation_id", metavar="ALLOCATION_ID")

    usage = command("usage", "the usage log, newest first (--csv: the CSV export, oldest first)")
    usage.add_argument("agent", metavar="AGENT")
    usage.add_argument("--since", type=_moment, help="ISO 8601 date or time, inclusive")
    usage.add_argument("--until", type=_moment, help="ISO 8601 date or time, exclusive")
    usage.add_argument("--resource-type", metavar="RESOURCE")
    usage.add_argument("--csv", action="store_true", help="stream the CSV export to standard output")
    usage.add_argument(
        "--limit",
        type=int,
        default=DEFAULT_USAGE_ROWS,
        help=f"rows in the table or JSON (default {DEFAULT_USAGE_ROWS}; 0: all)",
    )

    cost = command("cost", "this period's spend per resource type, and the budget")
    cost.add_argument("agent", metavar="AGENT")

    budgets = command("budgets", "every dollar budget that applies to the agent now")
    budgets.add_argument("agent", metavar="AGENT")

    alerts = command("alerts", "the agent's alerts, newest first")
    alerts.add_argument("agent", metavar="AGENT")
    alerts.add_argument("--status", choices=["open", "acknowledged", "all"], default="open")
    return parser


# --- Output -------------------------------------------------------------------------------------------------


def units(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def usd(value: Decimal | None) -> str:
    """Dollars with thousands separators, without trailing zeros past the cents: $1,234.50, $0.000015."""
    if value is None:
        return "-"
    whole, _, fraction = format(abs(value).normalize(), ",f").partition(".")
    return f"{'-' if value < 0 else ''}${whole}.{fraction.ljust(2, '0')}"


def when(value: dt.datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, right: Iterable[int] = ()) -> str:
    """Aligned columns: ``right`` are the indexes of right-aligned (numeric) columns."""
    right = set(right)
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max([len(header), *(len(row[i]) for row in cells)]) for i, header in enumerate(headers)]

    def line(row: Sequence[str]) -> str:
        parts = [cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]) for i, cell in enumerate(row)]
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers), *(line(row) for row in cells)])


def fields(pairs: Sequence[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in pairs)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in pairs)


def allocation_text(allocation: Allocation) -> str:
    pairs = [
        ("id", allocation.id),
        ("status", allocation.status),
        ("resource", allocation.resource_type),
        ("amount", units(allocation.allocated_amount)),
        ("cost", usd(allocation.cost_usd)),
        ("unit price", usd(allocation.unit_price_usd)),
    ]
    if allocation.expires_at is not None:
        pairs.append(("expires", when(allocation.expires_at)))
    if allocation.task_id:
        pairs.append(("task", allocation.task_id))
    if allocation.run_id:
        pairs.append(("run", allocation.run_id))
    return fields(pairs)


def write_json(value: Any) -> None:
    if isinstance(value, Model):
        value = value.raw
    elif isinstance(value, list):
        value = [item.raw if isinstance(item, Model) else item for item in value]
    sys.stdout.write(json.dumps(value, indent=2) + "\n")


# --- Commands -----------------------------------------------------------------------------------------------


def run(grid: Grid, args: argparse.Namespace) -> int:
    as_json = getattr(args, "json", False)
    agent = args.agent

    if args.command == "quotas":
        quotas = grid.quotas(agent)
        if as_json:
            write_json(quotas)
        else:
            rows = [
                (
                    q.resource_type,
                    units(q.limit),
                    units(q.used),
                    units(q.reserved),
                    units(q.available),
                    f"{(q.used + q.reserved) * 100 / q.limit:.1f}%" if q.limit else "-",
                )
                for q in quotas
            ]
            print(
                table(
                    ["RESOURCE", "LIMIT", "USED", "RESERVED", "AVAILABLE", "USED %"], rows, right=range(1, 6)
                )
            )
            if quotas:
                print(f"\nperiod {when(quotas[0].period_start)} to {when(quotas[0].period_end)}")
        return EXIT_OK

    if args.command == "check":
        checked = grid.check(agent, args.resource_type, args.amount, run_id=args.run_id)
        if as_json:
            write_json(checked)
        elif checked.allowed:
            print(
                f"allowed: {units(args.amount)} {args.resource_type} ({units(checked.available)} available)"
            )
        else:
            print(
                f"not allowed ({checked.reason}): {units(args.amount)} {args.resource_type} asked, "
                f"{units(checked.available)} available"
            )
        return EXIT_OK if checked.allowed else EXIT_REFUSED

    if args.command in ("allocate", "settle", "release"):
        if args.command == "allocate":
            if args.ttl is not None and not args.hold:
                raise CliError("--ttl is a hold's time to live: use it with --hold")
            allocation = grid.allocate(
                agent,
                args.resource_type,
                args.amount,
                task_id=args.task_id,
                run_id=args.run_id,
                hold=args.hold,
                hold_ttl_seconds=args.ttl,
                idempotency_key=args.idempotency_key,
            )
        elif args.command == "settle":
            allocation = grid.settle(agent, args.allocation_id, args.amount)
        else:
            allocation = grid.release(agent, args.allocation_id)
        if as_json:
            write_json(allocation)
        else:
            print(allocation_text(allocation))
        return EXIT_OK

    if args.command == "usage":
        if args.csv:
            out = sys.stdout.buffer
            for chunk in grid.usage_csv(
                agent, since=args.since, until=args.until, resource_type=args.resource_type
            ):
                out.write(chunk)
            out.flush()
            return EXIT_OK
        records = grid.usage(agent, resource_type=args.resource_type, since=args.since, until=args.until)
        shown = []
        more = False
        for record in records:
            if args.limit and len(shown) == args.limit:
                more = True
                break
            shown.append(record)
        if as_json:
            write_json(shown)
            return EXIT_OK
        rows = [
            (when(r.created_at), r.kind, r.resource_type, units(r.amount), usd(r.cost_usd), r.task_id or "")
            for r in shown
        ]
        print(table(["TIME", "KIND", "RESOURCE", "AMOUNT", "COST", "TASK"], rows, right=(3, 4)))
        if more:
            print(f"\nthe {len(shown)} newest rows; --limit N for more, --limit 0 or --csv for all")
        return EXIT_OK

    if args.command == "cost":
        cost = grid.cost(agent)
        if as_json:
            write_json(cost)
            return EXIT_OK
        rows = [(code, usd(value)) for code, value in sorted(cost.by_resource_type.items())]
        rows.append(("TOTAL", usd(cost.total_usd)))
        print(table(["RESOURCE", "COST"], rows, right=(1,)))
        print(f"\nperiod {when(cost.period_start)} to {when(cost.period_end)}")
        if cost.monthly_budget_usd is not None:
            used = f" ({cost.budget_utilization_percent:,f}% used)" if cost.budget_utilization_percent else ""
            print(f"monthly budget {usd(cost.monthly_budget_usd)}{used}")
        return EXIT_OK

    if args.command == "budgets":
        budgets = grid.budgets(agent)
        if as_json:
            write_json(budgets)
            return EXIT_OK
        rows = [
            (
                b.id,
                b.scope,
                b.scope_id,
                b.window,
                b.mode,
                usd(b.limit_usd),
                usd(b.spent_usd),
                usd(b.reserved_usd),
                usd(b.remaining_usd),
                when(b.window_end),
            )
            for b in budgets
        ]
        headers = [
            "ID",
            "SCOPE",
            "SCOPE ID",
            "WINDOW",
            "MODE",
            "LIMIT",
            "SPENT",
            "RESERVED",
            "REMAINING",
            "ENDS",
        ]
        print(table(headers, rows, right=(0, 5, 6, 7, 8)) if rows else "no budget applies")
        return EXIT_OK

    if args.command == "alerts":
        alerts = grid.alerts(agent, status=args.status)
        if as_json:
            write_json(alerts)
            return EXIT_OK
        rows = [(a.id, when(a.created_at), a.severity, a.kind, a.status, a.title) for a in alerts]
        print(
            table(["ID", "TIME", "SEVERITY", "KIND", "STATUS", "TITLE"], rows, right=(0,))
            if rows
            else "no alerts"
        )
        return EXIT_OK

    raise CliError(f"unknown command {args.command!r}")  # argparse refuses it first


def _config(args: argparse.Namespace) -> tuple[str, str]:
    url = getattr(args, "url", None) or os.environ.get("GRID_URL", "")
    key = getattr(args, "api_key", None) or os.environ.get("GRID_API_KEY", "")
    if not url:
        raise CliError("no grid URL: set GRID_URL or pass --url (e.g. http://127.0.0.1:8000)")
    if not key:
        raise CliError("no API key: set GRID_API_KEY or pass --api-key")
    return url, key


def _error_json(error: GridError) -> dict:
    return {"error": {"code": error.code, "message": error.message, "details": error.details}}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        url, key = _config(args)
        with Grid(url, key, timeout=getattr(args, "timeout", 30.0)) as grid:
            return run(grid, args)
    except CliError as error:
        print(f"grid: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except ValueError as error:  # a URL the client cannot use
        print(f"grid: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except GridError as error:
        if getattr(args, "json", False):
            sys.stdout.write(json.dumps(_error_json(error), indent=2) + "\n")
        status = f" (HTTP {error.status})" if error.status is not None else ""
        print(f"grid: {error.code}: {error.message}{status}", file=sys.stderr)
        return EXIT_REFUSED if isinstance(error, Refused) else EXIT_ERROR
    except BrokenPipeError:  # ``grid usage --csv ... | head``: the reader has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # a bug of the client: said in one line; GRID_DEBUG=1 shows the traceback
        if os.environ.get("GRID_DEBUG"):
            raise
        print(f"grid: error: {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())

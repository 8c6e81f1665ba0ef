"""Each core rule is stated in one module; this test fails when another module states it again.

The homes: the capacity rule, amount bounds, who may allocate and hold TTL bounds in ``ledger/invariants.py``;
opening a quota period in ``ledger/services.py`` (``quotas_open``); money rounding in ``ledger/money.py``;
a budget's room and rollover in ``ledger/invariants.py`` and its windows in ``ledger/periods.py``.
The SQL of the allocation (``allocation/sql.py``) builds its text from the invariants module's fragments.
Migrations are history and are not scanned. No database is needed.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
APPS = ("ledger", "allocation", "optimization", "axiom_grid")

RULES = {
    "capacity": (
        "ledger/invariants.py",
        [
            r"used\s*\+\s*reserved\s*\+\s*listed",
            r"limit(_amount)?\s*-\s*used\s*-\s*reserved",
            r'F\("used"\)\s*\+\s*F\("reserved"\)\s*\+\s*F\("listed"\)',
            r'F\("limit"\)\s*-\s*F\("reserved"\)',
        ],
    ),
    "amount bounds": (
        "ledger/invariants.py",
        [r"2\s*\*\*\s*53", r"\b1\s*<=\s*amount\b", r"9007199254740992"],
    ),
    "who may allocate": (
        "ledger/invariants.py",
        [r"status\s*==\s*(Agent\.Status\.THROTTLED|\"throttled\")", r"status\s*=\s*'active'"],
    ),
    "hold TTL bounds": (
        "ledger/invariants.py",
        [r"(?i)hold\w*\s*=\s*(dt\.)?timedelta", r"7\s*\*\s*86400", r"604800"],
    ),
    "opening a quota period": (
        "ledger/services.py",
        [r"\bQuota\(\s*agent", r"Quota\.objects\.(bulk_)?create\(", r"INSERT INTO quotas"],
    ),
    "budget room and rollover": (
        "ledger/invariants.py",
        [
            r"spent_usd\s*\+\s*reserved_usd",
            r"limit_usd\s*\+\s*rollover_usd",
            r"rollover_percent\s*/\s*100",
            r"limit\s*\+\s*rollover\s*-\s*spent",
        ],
    ),
    "budget windows": (
        "ledger/periods.py",
        [r"timedelta\(\s*days\s*=\s*\w+\.weekday\(\)", r"date_trunc\(\s*'week'", r"interval '1 month'"],
    ),
    "money rounding": (
        "ledger/money.py",
        [
            r"quantize\(\s*COST_QUANTUM",
            r"quantize\(\s*CENT\b",
            r"0\.000000000001",
            r"quantize\(Decimal\([\"']0\.01[\"']\)",
        ],
    ),
}


def _sources() -> list[Path]:
    files = []
    for app in APPS:
        files += [path for path in (ROOT / app).rglob("*.py") if "migrations" not in path.parts]
    return files


@pytest.mark.parametrize("rule", sorted(RULES))
def test_each_core_rule_is_stated_in_one_module(rule):
    home, patterns = RULES[rule]
    restated = []
    for path in _sources():
        relative = path.relative_to(ROOT).as_posix()
        if relative == home:
            continue
        text = path.read_text()
        for pattern in patterns:
            for match in re.finditer(pattern, text):
                line = text.count("\n", 0, match.start()) + 1
                restated.append(f"{relative}:{line}: {match.group(0)}")
    assert restated == [], f"{rule} is stated outside {home}"


@pytest.mark.parametrize("rule", sorted(RULES))
def test_each_home_states_its_rule(rule):
    """The patterns above must match their home, or a renamed rule would make the scan vacuous."""
    home, patterns = RULES[rule]
    text = (ROOT / home).read_text()
    assert any(re.search(pattern, text) for pattern in patterns), home


def test_no_database_branches_remain():
    branches = [
        f"{path.relative_to(ROOT).as_posix()}:{number}"
        for path in _sources()
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "vendor" in line
    ]
    assert branches == []


def test_no_app_imports_another_apps_private_names():
    private_import = re.compile(r"^from (ledger|allocation|optimization)\.[\w.]+ import \(?([^\n]*)", re.M)
    offenders = []
    for path in _sources():
        app = path.relative_to(ROOT).parts[0]
        text = path.read_text()
        for match in private_import.finditer(text):
            if match.group(1) == app:
                continue
            start = match.start(2)
            block = (
                text[start : text.find(")", start) + 1] if match.group(2).strip() == "" else match.group(2)
            )
            names = re.findall(r"\b(\w+)\b", block)
            offenders += [f"{path.relative_to(ROOT)}: {name}" for name in names if name.startswith("_")]
    assert offenders == []

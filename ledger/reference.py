"""The reference data every grid starts with: resource types, list prices, tiers and the two seed rules."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

# (code, name, unit, list price per unit in USD, description)
RESOURCE_TYPES: list[tuple[str, str, str, Decimal, str]] = [
    ("COMPUTE_MS", "Compute", "milliseconds", Decimal("0.00001"), "Worker execution time"),
    ("AI_TOKENS", "AI tokens", "tokens", Decimal("0.000001"), "LLM inference tokens"),
    ("STORAGE_KB", "Storage", "kilobytes", Decimal("0.000001"), "Database and object storage"),
    ("NETWORK_REQS", "Network", "requests", Decimal("0.001"), "External API calls and requests"),
    ("SOLANA_LAMPORTS", "Blockchain", "lamports", Decimal("0.000001"), "Solana transaction fees"),
]
RESOURCE_CODES = [code for code, *_ in RESOURCE_TYPES]

# The first list prices apply from this moment, so that any back-dated usage has a price.
PRICES_EFFECTIVE_FROM = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)

# tier -> (monthly price in USD, {resource type: monthly limit}); CUSTOM limits are set per agent.
TIERS: dict[str, tuple[Decimal, dict[str, int]]] = {
    "FREE": (
        Decimal("0"),
        {
            "COMPUTE_MS": 180_000,
            "AI_TOKENS": 100_000,
            "STORAGE_KB": 1_048_576,
            "NETWORK_REQS": 1_000,
            "SOLANA_LAMPORTS": 1_000_000,
        },
    ),
    "PRO": (
        Decimal("10"),
        {
            "COMPUTE_MS": 3_600_000,
            "AI_TOKENS": 1_000_000,
            "STORAGE_KB": 10_485_760,
            "NETWORK_REQS": 10_000,
            "SOLANA_LAMPORTS": 10_000_000,
        },
    ),
    "ENTERPRISE": (
        Decimal("100"),
        {
            "COMPUTE_MS": 36_000_000,
            "AI_TOKENS": 10_000_000,
            "STORAGE_KB": 104_857_600,
            "NETWORK_REQS": 100_000,
            "SOLANA_LAMPORTS": 100_000_000,
        },
    ),
    "CUSTOM": (Decimal("0"), {}),
}

# The alert configuration of the product description, in the YAML rule format.
SEED_RULES_YAML = """\
alerts:
  - name: HighResourceUtilization
    condition: resource_utilization_percent > 80
    duration: 5m
    severity: warning
    action: notify

  - name: BudgetExceeded
    condition: budget_utilization_percent > 90
    duration: 1m
    severity: critical
    action: throttle
"""

"""Parsing optimization rules from YAML, in the alert format of the product description::

    alerts:
      - name: HighResourceUtilization
        condition: resource_utilization_percent > 80
        duration: 5m
        severity: warning
        action: notify

Optional keys: ``description``, ``cooldown`` (a duration, default 1h), ``enabled`` (default true),
``scope`` (global, tier or agent) with ``tier`` or ``agent``.
Parsing is all-or-nothing: the first problem raises ``RuleFileError`` naming the rule and the key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

import yaml

from ledger.models import OptimizationRule

CONDITION_RE = re.compile(r"^\s*([a-z_][a-z0-9_]*)\s*(>=|<=|==|>|<)\s*(-?\d+(?:\.\d+)?)\s*$")
DURATION_RE = re.compile(r"^\s*(\d+)\s*(s|m|h|d)?\s*$")
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
ALLOWED_KEYS = {
    "name",
    "condition",
    "duration",
    "severity",
    "action",
    "cooldown",
    "enabled",
    "description",
    "scope",
    "tier",
    "agent",
}


class RuleFileError(ValueError):
    """A rule file that cannot be loaded, with the reason in words."""


@dataclass(frozen=True)
class RuleSpec:
    name: str
    metric: str
    operator: str
    threshold: Decimal
    duration_seconds: int
    severity: str
    action: str
    cooldown_seconds: int
    enabled: bool
    description: str
    scope: str
    tier: str | None
    agent: str | None


def parse_duration(value: Any, *, where: str) -> int:
    if isinstance(value, bool):
        raise RuleFileError(f"{where}: a duration must look like 30s, 5m, 1h or 1d, not {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise RuleFileError(f"{where}: a duration cannot be negative")
        return value
    match = DURATION_RE.match(str(value))
    if not match:
        raise RuleFileError(f"{where}: a duration must look like 30s, 5m, 1h or 1d, not {value!r}")
    return int(match.group(1)) * DURATION_UNITS[match.group(2)]


def _choice(value: Any, choices: type[OptimizationRule.Severity], *, where: str) -> str:
    allowed = [choice.value for choice in choices]
    if value not in allowed:
        raise RuleFileError(f"{where}: {value!r} is not one of {', '.join(allowed)}")
    return value


def parse_rules(text: str) -> list[RuleSpec]:
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RuleFileError(f"not valid YAML: {exc}") from exc
    if not isinstance(document, dict) or not isinstance(document.get("alerts"), list):
        raise RuleFileError("the file must have a top-level 'alerts' list")
    metrics = {choice.value for choice in OptimizationRule.Metric}
    specs: list[RuleSpec] = []
    seen: set[str] = set()
    for index, item in enumerate(document["alerts"], start=1):
        where = f"alert #{index}"
        if not isinstance(item, dict):
            raise RuleFileError(f"{where}: each alert must be a mapping")
        name = item.get("name")
        if not isinstance(name, str) or not name.strip():
            raise RuleFileError(f"{where}: 'name' is required")
        name = name.strip()
        where = f"alert {name!r}"
        if name in seen:
            raise RuleFileError(f"{where}: the name is used twice")
        seen.add(name)
        unknown = set(item) - ALLOWED_KEYS
        if unknown:
            raise RuleFileError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
        condition = item.get("condition")
        match = CONDITION_RE.match(str(condition)) if isinstance(condition, str) else None
        if not match:
            raise RuleFileError(f"{where}: 'condition' must look like 'metric > 80', not {condition!r}")
        metric, operator, threshold_text = match.groups()
        if metric not in metrics:
            raise RuleFileError(f"{where}: unknown metric {metric!r}; known: {', '.join(sorted(metrics))}")
        try:
            threshold = Decimal(threshold_text)
        except InvalidOperation as exc:  # pragma: no cover - the regex admits only numbers
            raise RuleFileError(f"{where}: bad threshold {threshold_text!r}") from exc
        scope = _choice(item.get("scope", "global"), OptimizationRule.Scope, where=where)
        tier = item.get("tier")
        agent = item.get("agent")
        if (scope == "tier") != (tier is not None) or (scope == "agent") != (agent is not None):
            raise RuleFileError(f"{where}: scope {scope!r} needs exactly its own 'tier' or 'agent' key")
        enabled = item.get("enabled", True)
        if not isinstance(enabled, bool):
            raise RuleFileError(f"{where}: 'enabled' must be true or false")
        specs.append(
            RuleSpec(
                name=name,
                metric=metric,
                operator=operator,
                threshold=threshold,
                duration_seconds=parse_duration(item.get("duration", 0), where=f"{where} duration"),
                severity=_choice(item.get("severity", "warning"), OptimizationRule.Severity, where=where),
                action=_choice(item.get("action", "notify"), OptimizationRule.Action, where=where),
                cooldown_seconds=parse_duration(item.get("cooldown", "1h"), where=f"{where} cooldown"),
                enabled=enabled,
                description=str(item.get("description", "")),
                scope=scope,
                tier=str(tier) if tier is not None else None,
                agent=str(agent) if agent is not None else None,
            )
        )
    return specs

"""Budgets and alerts: the budget sweep, cost spike detection, fanning alerts out to their deliveries, and
acknowledgement.

Every alert has a ``dedup_key`` that is unique in the database, so a sweep that runs twice (or twice at the
same time) alerts once. Each new alert fans out to one ``AlertDelivery`` row per channel and target, in the
transaction that creates it; the HTTP and SMTP calls happen later, outside any transaction, in
``optimization/services/alert_delivery.py``.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable, Sequence
from decimal import Decimal

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from ledger.bulk import bulk_insert
from ledger.errors import LedgerError
from ledger.models import Agent, OptimizationRule
from ledger.money import cents, money_round
from ledger.periods import UTC, month_bounds
from optimization.models import (
    DEFAULT_BUDGET_THRESHOLDS,
    Alert,
    AlertDelivery,
    AlertSettings,
    WebhookEndpoint,
)
from optimization.selectors import SPIKE_BASELINE_HOURS, budget_utilization, cost_spike_ratio

logger = logging.getLogger(__name__)

Severity = OptimizationRule.Severity

FAN_OUT_BATCH_SIZE = 2000
THRESHOLD_MIN, THRESHOLD_MAX = 1, 1000
DEFAULT_SPIKE_RATIO = Decimal("3")
SUB_CENT = Decimal("0.0001")


# --- Creating alerts ------------------------------------------------------------------------------------


def alerts_create(*, alerts: Sequence[Alert], now: dt.datetime | None = None) -> int:
    """Insert the alerts whose dedup key is new, fan them out to their channels, and enqueue delivery after
    commit. Returns how many were new. A fixed number of queries for any number of alerts.

    The count is exact unless another sweep inserts the same key at the same moment; the unique key (and
    ``ignore_conflicts``) still keeps the alert single in that case.
    """
    unique: dict[str, Alert] = {}
    for alert in alerts:
        unique.setdefault(alert.dedup_key, alert)
    if not unique:
        return 0
    existing = set(Alert.objects.filter(dedup_key__in=list(unique)).values_list("dedup_key", flat=True))
    new = [alert for key, alert in unique.items() if key not in existing]
    if not new:
        return 0
    with transaction.atomic():
        # One INSERT ... SELECT FROM unnest(...) whatever the number of alerts (a budget sweep over a large
        # fleet makes thousands), rather than bulk_create's parameters per field per row.
        bulk_insert(
            model=Alert,
            columns={
                "agent_id": [alert.agent_id for alert in new],
                "kind": [alert.kind for alert in new],
                "severity": [alert.severity for alert in new],
                "title": [alert.title for alert in new],
                "message": [alert.message for alert in new],
                "data": [alert.data for alert in new],
                "rule_id": [alert.rule_id for alert in new],
                "dedup_key": [alert.dedup_key for alert in new],
            },
            constants={"created_at": now or timezone.now(), "acknowledged_by": ""},
            ignore_conflicts=True,
        )
        alerts_fan_out(now=now, dedup_keys=[alert.dedup_key for alert in new])
        transaction.on_commit(_delivery_enqueue)
    return len(new)


def alerts_dispatch(*, now: dt.datetime | None = None) -> None:
    """For alerts inserted set-based rather than through ``alerts_create`` (a rule's alerts, in SQL): fan
    out what is pending now, as ``alerts_create`` does, and enqueue delivery after commit. The periodic
    delivery task fans out whatever is left beyond one fan-out's batch."""
    alerts_fan_out(now=now)
    transaction.on_commit(_delivery_enqueue)


def _delivery_enqueue() -> None:
    """Ask a worker to deliver now rather than at the next periodic run. A broker that is down loses
    nothing: the deliveries are rows, and the periodic ``alerts_deliver`` picks them up."""
    from optimization.tasks.alerts import alerts_deliver_task

    try:
        alerts_deliver_task.delay()
    except Exception:  # any broker error; the periodic task is the safety net
        logger.warning("could not enqueue alert delivery; the periodic task will deliver", exc_info=True)


def _global_alert_emails() -> list[str]:
    value = getattr(settings, "ALERT_EMAILS", [])
    if isinstance(value, str):
        value = value.split(",")
    return [address.strip() for address in value if address and address.strip()]


def alerts_fan_out(
    *,
    now: dt.datetime | None = None,
    dedup_keys: Iterable[str] | None = None,
    limit: int = FAN_OUT_BATCH_SIZE,
) -> int:
    """Create the deliveries of alerts not fanned out yet: the agent's and the global enabled webhooks, the
    agent's alert email and ``settings.ALERT_EMAILS``. Returns how many deliveries were created.

    Idempotent without a claim: a delivery is unique per (alert, channel, target), so two fan-outs of one
    alert insert its rows once. An alert created elsewhere (e.g. by scaling) is fanned out by the periodic
    delivery task.
    """
    now = now or timezone.now()
    pending = Alert.objects.filter(delivery_queued_at=None)
    if dedup_keys is not None:
        pending = pending.filter(dedup_key__in=list(dedup_keys))
    alerts = list(pending.order_by("id").values_list("id", "agent_id")[:limit])
    if not alerts:
        return 0
    agent_ids = {agent_id for _, agent_id in alerts}
    webhooks = list(
        WebhookEndpoint.objects.filter(enabled=True)
        .filter(Q(agent_id__in=agent_ids) | Q(agent__isnull=True))
        .order_by("id")
        .values_list("id", "agent_id", "url")
    )
    agent_emails = dict(
        AlertSettings.objects.filter(agent_id__in=agent_ids)
        .exclude(email="")
        .values_list("agent_id", "email")
    )
    global_emails = _global_alert_emails()
    # Column lists for one INSERT ... unnest: a sweep of a large fleet fans out tens of thousands.
    columns: dict[str, list] = {"alert_id": [], "channel": [], "webhook_id": [], "target": []}

    def add(alert_id: int, channel: str, webhook_id: int | None, target: str) -> None:
        for name, value in zip(columns, (alert_id, channel, webhook_id, target), strict=True):
            columns[name].append(value)

    for alert_id, agent_id in alerts:
        targets: set[tuple[str, str]] = set()
        for webhook_id, webhook_agent_id, url in webhooks:
            if webhook_agent_id in (None, agent_id) and (AlertDelivery.Channel.WEBHOOK, url) not in targets:
                targets.add((AlertDelivery.Channel.WEBHOOK, url))
                add(alert_id, AlertDelivery.Channel.WEBHOOK, webhook_id, url)
        for address in [agent_emails.get(agent_id), *global_emails]:
            if address and (AlertDelivery.Channel.EMAIL, address) not in targets:
                targets.add((AlertDelivery.Channel.EMAIL, address))
                add(alert_id, AlertDelivery.Channel.EMAIL, None, address)
    with transaction.atomic():
        bulk_insert(
            model=AlertDelivery,
            columns=columns,
            constants={
                "status": AlertDelivery.Status.PENDING,
                "attempts": 0,
                "last_error": "",
                "next_attempt_at": now,
                "created_at": timezone.now(),
            },
            ignore_conflicts=True,
        )
        Alert.objects.filter(pk__in=[alert_id for alert_id, _ in alerts], delivery_queued_at=None).update(
            delivery_queued_at=now
        )
    return len(columns["alert_id"])


# --- Budgets --------------------------------------------------------------------------------------------


def budget_severity(threshold: int) -> str:
    if threshold >= 100:
        return Severity.CRITICAL
    if threshold >= 80:
        return Severity.WARNING
    return Severity.INFO


def budget_thresholds_clean(value) -> list[int]:
    """The usable thresholds of a stored setting: whole percentages in range, sorted, without repeats.
    An empty list is an agent's way of opting out of budget alerts."""
    if not isinstance(value, list | tuple):
        return list(DEFAULT_BUDGET_THRESHOLDS)
    return sorted(
        {
            item
            for item in value
            if isinstance(item, int) and not isinstance(item, bool) and THRESHOLD_MIN <= item <= THRESHOLD_MAX
        }
    )


def budget_sweep(*, now: dt.datetime | None = None) -> int:
    """Alert once per agent, threshold and period when this period's spend reaches a budget threshold.

    Set-based: the spend of every agent with a budget (``quotas.spent_usd``), every agent's thresholds and
    the existing alerts are one query each, whatever the number of agents. Returns the alerts created.
    """
    now = now or timezone.now()
    period_start, _ = month_bounds(now)
    utilization = budget_utilization(now=now)
    if not utilization:
        return 0
    # The agents of ``utilization`` are those with a budget: joined in SQL, not sent as a list of ids.
    settings_rows = AlertSettings.objects.filter(agent__monthly_budget_usd__gt=0)
    thresholds = {
        agent_id: budget_thresholds_clean(stored)
        for agent_id, stored in settings_rows.values_list("agent_id", "budget_thresholds")
    }
    defaults = budget_thresholds_clean(DEFAULT_BUDGET_THRESHOLDS)  # most agents keep them: cleaned once
    alerts = []
    for agent_id, row in utilization.items():
        spent, budget = row["spent_usd"], row["budget_usd"]
        spent_percents = spent * 100
        for threshold in thresholds.get(agent_id, defaults):
            # Compared exactly, not on the rounded percent: 49.996% has not reached 50%. The thresholds are
            # in ascending order, so the first one not reached ends the agent's.
            if spent_percents < budget * threshold:
                break
            alerts.append(
                Alert(
                    agent_id=agent_id,
                    kind=Alert.Kind.BUDGET,
                    severity=budget_severity(threshold),
                    title=f"Budget {threshold}% reached",
                    message=(
                        f"Agent {agent_id} has spent ${cents(spent)} of its ${budget} monthly budget "
                        f"({row['percent']}%) in {period_start:%B %Y}."
                    ),
                    data={
                        "threshold": threshold,
                        "percent": str(row["percent"]),
                        "spent_usd": str(money_round(spent)),
                        "budget_usd": str(budget),
                        "period_start": period_start.isoformat(),
                    },
                    dedup_key=f"budget:{agent_id}:{period_start:%Y-%m}:{threshold}",
                )
            )
    return alerts_create(alerts=alerts, now=now)


# --- Cost spikes ----------------------------------------------------------------------------------------


def cost_spike_sweep(
    *, now: dt.datetime | None = None, ratio_threshold: Decimal = DEFAULT_SPIKE_RATIO
) -> int:
    """Alert when an agent's last hour cost ``ratio_threshold`` times (or more) its average hour over the
    24 hours before. At most one alert per agent per clock hour. Returns the alerts created."""
    now = now or timezone.now()
    hour = now.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    alerts = []
    for agent_id, row in cost_spike_ratio(now=now).items():
        if row["ratio"] < ratio_threshold:
            continue
        alerts.append(
            Alert(
                agent_id=agent_id,
                kind=Alert.Kind.COST_SPIKE,
                severity=Severity.WARNING,
                title=f"Cost spike: {row['ratio']}x the usual hourly spend",
                message=(
                    f"Agent {agent_id} spent ${cents(row['last_hour_usd'])} in the last hour, "
                    f"{row['ratio']} times its average of ${row['baseline_hourly_usd'].quantize(SUB_CENT)} "
                    f"an hour over the {SPIKE_BASELINE_HOURS} hours before."
                ),
                data={
                    "ratio": str(row["ratio"]),
                    "ratio_threshold": str(ratio_threshold),
                    "last_hour_usd": str(money_round(row["last_hour_usd"])),
                    "baseline_hourly_usd": str(money_round(row["baseline_hourly_usd"])),
                    "hour": hour.isoformat(),
                },
                dedup_key=f"cost_spike:{agent_id}:{hour:%Y-%m-%dT%H}",
            )
        )
    return alerts_create(alerts=alerts, now=now)


# --- Acknowledgement and settings -----------------------------------------------------------------------


def alert_acknowledge(*, alert: Alert, actor: str, now: dt.datetime | None = None) -> Alert:
    """Mark the alert as seen by ``actor``. Idempotent: the first acknowledgement is the one kept."""
    Alert.objects.filter(pk=alert.pk, acknowledged_at=None).update(
        acknowledged_at=now or timezone.now(), acknowledged_by=actor[:150]
    )
    alert.refresh_from_db(fields=["acknowledged_at", "acknowledged_by"])
    return alert


def alerts_acknowledge(*, alert_ids: Iterable[int], actor: str, now: dt.datetime | None = None) -> int:
    """Acknowledge many alerts in one UPDATE; those already acknowledged keep their first acknowledgement."""
    return Alert.objects.filter(pk__in=list(alert_ids), acknowledged_at=None).update(
        acknowledged_at=now or timezone.now(), acknowledged_by=actor[:150]
    )


def alert_settings_get(*, agent: Agent) -> AlertSettings:
    """The agent's settings, or unsaved defaults when it has none."""
    return AlertSettings.objects.filter(agent=agent).first() or AlertSettings(agent=agent)


def alert_settings_update(
    *, agent: Agent, budget_thresholds: list[int] | None = None, email: str | None = None
) -> AlertSettings:
    changes: dict = {}
    if budget_thresholds is not None:
        if not all(
            isinstance(item, int) and not isinstance(item, bool) and THRESHOLD_MIN <= item <= THRESHOLD_MAX
            for item in budget_thresholds
        ):
            raise LedgerError(
                f"budget thresholds are whole percentages from {THRESHOLD_MIN} to {THRESHOLD_MAX}",
                code="invalid_thresholds",
            )
        changes["budget_thresholds"] = sorted(set(budget_thresholds))
    if email is not None:
        changes["email"] = email
    settings_row, _ = AlertSettings.objects.update_or_create(agent=agent, defaults=changes)
    return settings_row

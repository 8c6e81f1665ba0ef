"""Budgets and alerts: the budget sweep (thresholds and "resolved"), cost spike detection, fanning alerts
out to their deliveries, and acknowledgement.

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
from django.db import connection, transaction
from django.db.models import Q
from django.utils import timezone

from allocation.sql import budgets_apply
from ledger.budgets import THRESHOLD_MAX, THRESHOLD_MIN, BudgetFigures, budget_figures
from ledger.bulk import bulk_insert
from ledger.errors import LedgerError
from ledger.models import Agent, Budget, OptimizationRule
from ledger.money import cents, money_round, percent
from ledger.periods import UTC
from optimization.models import (
    DEFAULT_BUDGET_THRESHOLDS,
    Alert,
    AlertDelivery,
    AlertSettings,
    WebhookEndpoint,
)
from optimization.selectors import SPIKE_BASELINE_HOURS, agent_chunks, budgets_to_sweep, cost_spike_ratio

logger = logging.getLogger(__name__)

Severity = OptimizationRule.Severity

FAN_OUT_BATCH_SIZE = 2000
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


def alert_delivery_enqueue_on_commit() -> None:
    """Ask for delivery once the current transaction commits (at once outside one): for alerts and
    deliveries written in SQL by another service (scaling's)."""
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

BUDGET_SWEEP_CHUNK = 2000
WINDOW_ADJECTIVES = {"day": "daily", "week": "weekly", "month": "monthly"}


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


def budget_label(budget: Budget) -> str:
    """How an alert names the budget: "team t1's daily budget", "agent a1's run r1 budget"."""
    if budget.scope == Budget.Scope.RUN:
        return f"agent {budget.agent_id}'s run {budget.run_id} budget"
    window = WINDOW_ADJECTIVES.get(budget.window, budget.window)
    return f"{budget.scope} {budget.scope_id}'s {window} budget"


def _budget_alert_agent(budget: Budget) -> str | None:
    # An agent's and a run's alerts are the agent's (its webhooks, its email, its API); a team's and an
    # organization's belong to no agent and go to the global webhooks and ALERT_EMAILS only.
    return budget.agent_id if budget.scope in (Budget.Scope.AGENT, Budget.Scope.RUN) else None


def _budget_data(budget: Budget, figures: BudgetFigures) -> dict:
    return {
        "budget_id": budget.pk,
        "scope": budget.scope,
        "scope_id": budget.scope_id,
        "window": budget.window,
        "window_start": figures.window_start.isoformat(),
        "window_end": None if figures.window_end is None else figures.window_end.isoformat(),
        "mode": budget.mode,
        "limit_usd": _usd(budget.limit_usd),
        "rollover_usd": _usd(figures.rollover_usd),
        "spent_usd": _usd(figures.spent_usd),
        "reserved_usd": _usd(figures.reserved_usd),
    }


def _usd(value: Decimal) -> str:
    # Fixed-point: a zero at the column's scale reads 0.000000000000, not 0E-12.
    return format(value, "f")


def _window_text(figures: BudgetFigures) -> str:
    if figures.window_end is None:
        return f"since {figures.window_start:%Y-%m-%d %H:%M} UTC"
    return f"in the window {figures.window_start:%Y-%m-%d %H:%M} to {figures.window_end:%Y-%m-%d %H:%M} UTC"


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def budget_threshold_alerts(
    *, budget: Budget, figures: BudgetFigures, thresholds: Sequence[int]
) -> list[Alert]:
    """The alerts of every threshold (ascending) the budget's current window has reached. A soft budget
    alerts exactly as a hard one: alerting is all it does."""
    spent = figures.spent_usd
    allowed = budget.limit_usd + figures.rollover_usd
    if spent <= 0:
        return []
    label = budget_label(budget)
    used_percent = percent(spent, allowed)
    alerts = []
    for threshold in thresholds:
        # Compared exactly, not on the rounded percent: 49.996% has not reached 50%. The thresholds are
        # in ascending order, so the first one not reached ends the budget's.
        if spent * 100 < allowed * threshold:
            break
        of_what = f"${cents(allowed)}"
        if figures.rollover_usd:
            of_what += f" (${cents(budget.limit_usd)} + ${cents(figures.rollover_usd)} rolled over)"
        alerts.append(
            Alert(
                agent_id=_budget_alert_agent(budget),
                kind=Alert.Kind.BUDGET,
                severity=budget_severity(threshold),
                title=_sentence(f"{label} {threshold}% reached")[:200],
                message=(
                    f"{_sentence(label)} {threshold}% reached: ${cents(spent)} of {of_what} spent"
                    f"{'' if used_percent is None else f' ({used_percent}%)'} {_window_text(figures)}."
                ),
                data={
                    **_budget_data(budget, figures),
                    "threshold": threshold,
                    "percent": None if used_percent is None else str(used_percent),
                },
                dedup_key=f"budget:{budget.pk}:{figures.window_start.isoformat()}:{threshold}",
            )
        )
    return alerts


def _managed_thresholds(budgets: Sequence[Budget]) -> dict[str, list[int]]:
    """agent -> the thresholds its alert settings give its monthly (managed) budget. One query."""
    agent_ids = {budget.agent_id for budget in budgets if budget.managed}
    if not agent_ids:
        return {}
    rows = AlertSettings.objects.filter(agent_id__in=agent_ids).values_list("agent_id", "budget_thresholds")
    return {agent_id: budget_thresholds_clean(stored) for agent_id, stored in rows}


def budget_sweep(*, now: dt.datetime | None = None, chunk_size: int = BUDGET_SWEEP_CHUNK) -> int:
    """Alert once per budget, window and threshold reached, and once when a budget that refused calls
    has room again (``budgets_resolve``). Returns the alerts created.

    Reads the budget rows, not the usage log: set-based, ``chunk_size`` budgets by id at a time, a fixed
    number of queries per chunk. Windows that have ended are rolled first (the allocation's own rule,
    ``grid_budgets_apply``, with nothing charged), so the rows say what the API and the admin show.

    Run it outside a transaction (as its task does): each step commits on its own, so the sweep never
    holds one chunk's budget locks while it takes another's, and the lock order stays by id.
    """
    now = now or timezone.now()
    created = 0
    after_id = 0
    while True:
        budgets = budgets_to_sweep(now=now, after_id=after_id, limit=chunk_size)
        if not budgets:
            break
        after_id = budgets[-1].pk
        ended = [b.pk for b in budgets if b.window_end is not None and b.window_end <= now]
        if ended:
            budgets_apply(ended, now=now)
        managed = _managed_thresholds(budgets)
        alerts: list[Alert] = []
        for budget in budgets:
            thresholds = (
                managed[budget.agent_id]
                if budget.managed and budget.agent_id in managed
                else budget_thresholds_clean(budget.thresholds)
            )
            if thresholds:
                alerts += budget_threshold_alerts(
                    budget=budget, figures=budget_figures(budget, now=now), thresholds=thresholds
                )
        created += alerts_create(alerts=alerts, now=now)
        refused = [b.pk for b in budgets if b.refused_at is not None]
        if refused:
            created += budgets_resolve(now=now, budget_ids=refused)
        if len(budgets) < chunk_size:
            break
    return created


def budget_resolved_alert(*, budget: Budget, figures: BudgetFigures) -> Alert:
    label = budget_label(budget)
    refused_at = budget.refused_at.isoformat()
    if budget.mode == Budget.Mode.SOFT:
        why = "it is soft now and refuses nothing"
    else:
        why = f"${cents(figures.remaining_usd)} is left {_window_text(figures)}"
    return Alert(
        agent_id=_budget_alert_agent(budget),
        kind=Alert.Kind.BUDGET_RESOLVED,
        severity=Severity.INFO,
        title=_sentence(f"{label} has room again")[:200],
        message=(
            f"{_sentence(label)} refused calls from {budget.refused_at:%Y-%m-%d %H:%M:%S} UTC; "
            f"it has room again: {why}."
        ),
        data={
            **_budget_data(budget, figures),
            "remaining_usd": _usd(figures.remaining_usd),
            "refused_at": refused_at,
        },
        dedup_key=f"budget_resolved:{budget.pk}:{refused_at}",
    )


def budgets_resolve(*, now: dt.datetime | None = None, budget_ids: Iterable[int] | None = None) -> int:
    """Close the loop on budgets that refused calls and have room again (a new window, a raised limit, a
    released hold, or a switch to soft): one ``budget_resolved`` alert per refusal episode, and the
    budget's ``refused_at`` cleared so that its next refusal starts a new one. Returns the alerts created.

    ``budget_ids`` limits it to those budgets (a PATCH that raised a limit, the sweep's chunk); None looks
    at every budget that refused. Idempotent: the alert's key names the episode (``refused_at``), and the
    flag is cleared only if it still holds the value read.
    """
    now = now or timezone.now()
    candidates = Budget.objects.filter(refused_at__isnull=False).exclude(
        scope=Budget.Scope.RUN,
        expires_at__lte=now,  # a run that has ended takes no more calls
    )
    if budget_ids is not None:
        candidates = candidates.filter(pk__in=list(budget_ids))
    ids = [
        budget.pk
        for budget in candidates.order_by("pk")
        if budget.mode == Budget.Mode.SOFT or budget_figures(budget, now=now).remaining_usd > 0
    ]
    if not ids:
        return 0
    with transaction.atomic():
        # Locked in id order, like every writer of budgets, and read again under the lock: a call that
        # fills the budget meanwhile either commits before (and the room is gone) or waits for this.
        locked = list(
            Budget.objects.select_for_update(no_key=True)
            .filter(pk__in=ids, refused_at__isnull=False)
            .order_by("pk")
        )
        resolved = [
            (budget, figures)
            for budget in locked
            for figures in [budget_figures(budget, now=now)]
            if budget.mode == Budget.Mode.SOFT or figures.remaining_usd > 0
        ]
        if not resolved:
            return 0
        with connection.cursor() as cursor:
            cursor.execute(
                f'UPDATE "{Budget._meta.db_table}" AS b SET refused_at = NULL '
                "FROM unnest(%s::bigint[], %s::timestamptz[]) AS d(id, refused_at) "
                "WHERE b.id = d.id AND b.refused_at = d.refused_at RETURNING b.id",
                [[b.pk for b, _ in resolved], [b.refused_at for b, _ in resolved]],
            )
            cleared = {row[0] for row in cursor.fetchall()}
        return alerts_create(
            alerts=[
                budget_resolved_alert(budget=budget, figures=figures)
                for budget, figures in resolved
                if budget.pk in cleared
            ],
            now=now,
        )


# --- Cost spikes ----------------------------------------------------------------------------------------


COST_SPIKE_CHUNK = 5000


def cost_spike_sweep(
    *,
    now: dt.datetime | None = None,
    ratio_threshold: Decimal = DEFAULT_SPIKE_RATIO,
    chunk_size: int = COST_SPIKE_CHUNK,
) -> int:
    """Alert when an agent's last hour cost ``ratio_threshold`` times (or more) its average hour over the
    24 hours before. At most one alert per agent per clock hour. Returns the alerts created.

    Works through the fleet in chunks of ``chunk_size`` agents by id, one query for the chunk's ratios and
    its alerts written before the next chunk is read: memory is bounded by the chunk, and a sweep that
    stops part way is completed by the next (the alert's key is the agent's and the hour's).
    """
    now = now or timezone.now()
    hour = now.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    created = 0
    for agents, _ in agent_chunks(size=chunk_size):
        alerts = [
            _cost_spike_alert(agent_id, row, hour=hour, ratio_threshold=ratio_threshold)
            for agent_id, row in cost_spike_ratio(now=now, agent_ids=agents).items()
            if row["ratio"] >= ratio_threshold
        ]
        created += alerts_create(alerts=alerts, now=now)
    return created


def _cost_spike_alert(agent_id: str, row: dict, *, hour: dt.datetime, ratio_threshold: Decimal) -> Alert:
    return Alert(
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

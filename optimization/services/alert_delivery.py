"""Alert delivery: due deliveries are claimed, sent concurrently and recorded, at least once.

A run (``alerts_deliver``) holds a PostgreSQL advisory lock, so one run sends at a time, whichever worker it
is on: that is what makes an endpoint's ``max_concurrent_requests`` a bound for the whole service rather than
per worker process. Inside a run the calling thread does all the database work (reading due deliveries,
fanning out new alerts, claiming, recording) and a pool of ``DELIVERY_THREADS`` threads does the HTTP and SMTP
calls, so the database sees one connection whatever the number of requests in flight.

- Due deliveries are read in turns per endpoint (the oldest of each, then the second of each...), so a
  backlog for one endpoint never starves another; at most ``max_concurrent_requests`` requests are in flight
  to an endpoint.
- Requests are claimed shortly before they are sent (about ``PREFETCH_SECONDS`` of an endpoint's requests
  ahead), many in one transaction: ``attempts + 1``, and ``next_attempt_at`` moved to when a
  retry would be due. That is the lease that keeps other workers off the rows while they are in flight, and
  the retry time if the worker dies mid-send: the same message is then sent again with the same
  ``webhook-id``, by which the receiver knows the repeat. Delivery is at least once, never at most once.
  Answers are recorded in batches too (``RECORD_BATCH``, ``RECORD_INTERVAL_SECONDS``).
- An endpoint whose ``batch_size`` is more than 1 receives up to that many alerts per request, as a JSON
  array, each item with its own ``webhook_id``.
- An endpoint that fails ``FAILURES_BEFORE_PAUSE`` requests in a row is left alone for the rest of the run:
  its deliveries stay due, without an attempt spent, for the next run.
- A run stops starting requests after its time budget or its limit; its report's ``more`` then tells the
  task to enqueue the next run at once rather than wait for the schedule.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import time
from collections import Counter, defaultdict, deque
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from django.core.mail import send_mail
from django.db import transaction
from django.db.models import Case, DateTimeField, F, Q, Value, When, Window
from django.db.models.functions import RowNumber
from django.utils import timezone

from axiom_grid.observability.metrics import alert_delivery_count
from ledger.periodic import session_lock
from optimization.models import Alert, AlertDelivery
from optimization.services.alerts import alerts_fan_out
from optimization.webhooks import WebhookClient, WebhookResult, webhook_body, webhook_secret_key

logger = logging.getLogger(__name__)

Channel = AlertDelivery.Channel
Status = AlertDelivery.Status

MAX_ATTEMPTS = 6
BACKOFF_BASE = dt.timedelta(seconds=30)
BACKOFF_CAP = dt.timedelta(hours=1)
# Stop starting new requests after this long, well inside the task's soft time limit (240 s): what is in
# flight then still finishes (each request within the webhook timeout), and what is left is the next run's.
DELIVERY_TIME_BUDGET_SECONDS = 120
DELIVERY_RUN_LIMIT = 100_000  # deliveries one run attempts at most
DELIVERY_THREADS = 16  # requests in flight at once, over all endpoints
EMAIL_CONCURRENCY = 4  # emails are sent one SMTP connection each; this many at once
FAILURES_BEFORE_PAUSE = 3
# Read-ahead: the rows read at once, and at most this many of one endpoint's, so that a read spreads over
# the endpoints. An endpoint's next rows are read once those read before have all been claimed.
READ_AHEAD = 10_000
READ_AHEAD_PER_ENDPOINT = 5000
# Without anything in flight a run reads again at once; otherwise at most this often unless the last read
# was full, so that a run waiting on slow endpoints does not query in a loop.
READ_INTERVAL_SECONDS = 1.0
WAIT_SECONDS = 0.25
# Claims are taken ahead for about PREFETCH_SECONDS of an endpoint's requests (from its recent answer
# times; between 2 and 16 rounds of its concurrency), well inside the shortest lease (30 s); answers are
# recorded this many at a time or this often. A few statements per many requests, not per request.
PREFETCH_SECONDS = 5.0
PREFETCH_ROUNDS_MIN, PREFETCH_ROUNDS_MAX = 2, 16
RECORD_BATCH = 200
RECORD_INTERVAL_SECONDS = 0.25
# One run at a time (see the module docstring): the key of its session advisory lock, "alert-delivery".
DELIVERY_LOCK_KEY = int.from_bytes(hashlib.sha256(b"alert-delivery").digest()[:8], "big", signed=True)

Group = tuple[str, int | None]  # (channel, webhook endpoint id): whose limits a delivery falls under
# An attempt's outcome as the metrics name it (axiom_grid_alert_deliveries_total).
_OUTCOMES = {Status.DELIVERED: "delivered", Status.PENDING: "retry", Status.FAILED: "failed"}


@dataclass
class DeliveryRun:
    """What one run did. ``more``: it stopped at its time budget or limit with deliveries still due."""

    delivered: int = 0
    failed_attempts: int = 0
    requests: int = 0
    more: bool = False
    busy: bool = False  # another run held the lock: this one did nothing


@dataclass
class _Unit:
    """One request (or one email): the deliveries it carries, and the attempt number each was claimed at."""

    group: Group
    deliveries: list[AlertDelivery]
    attempts: dict[int, int] = field(default_factory=dict)


def delivery_backoff(attempts: int) -> dt.timedelta:
    """How long to wait after the ``attempts``-th failed attempt: 30 s, 1 min, 2 min, ... capped at 1 h."""
    return min(BACKOFF_BASE * 2 ** max(attempts - 1, 0), BACKOFF_CAP)


def delivery_message_id(delivery_id: int) -> str:
    """The ``webhook-id`` of one delivery: one alert to one endpoint, the same on every attempt."""
    return f"alert-delivery-{delivery_id}"


def batch_message_id(delivery_ids: Iterable[int]) -> str:
    """The ``webhook-id`` of a batch: derived from the deliveries it carries, so the same batch sent again
    has the same id, and a different batch another. A retry may group alerts differently (what is due
    changes), so a batch receiver drops repeats by each item's ``webhook_id``, which never changes."""
    joined = ",".join(str(pk) for pk in sorted(delivery_ids))
    return "alert-batch-" + hashlib.sha256(joined.encode()).hexdigest()[:32]


def alert_subject(alert: Alert) -> tuple[str | None, str | None]:
    """(scope, scope_id) the alert is about: a budget alert's budget scope (a team's or an organization's
    has no agent), else the agent's."""
    data = alert.data if isinstance(alert.data, dict) else {}
    if data.get("scope"):
        return data["scope"], data.get("scope_id")
    return ("agent", alert.agent_id) if alert.agent_id else (None, None)


def alert_payload(alert: Alert) -> dict:
    scope, scope_id = alert_subject(alert)
    return {
        "id": alert.pk,
        "agent_id": alert.agent_id,
        "scope": scope,
        "scope_id": scope_id,
        "kind": alert.kind,
        "severity": alert.severity,
        "title": alert.title,
        "message": alert.message,
        "data": alert.data,
        "created_at": alert.created_at.isoformat(),
    }


def _due(now: dt.datetime) -> Q:
    return Q(status=Status.PENDING, attempts__lt=MAX_ATTEMPTS) & (
        Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lte=now)
    )


def _group(delivery: AlertDelivery) -> Group:
    return (delivery.channel, delivery.webhook_id)


def _limits(delivery: AlertDelivery) -> tuple[int, int]:
    """(requests at once, alerts per request) for the delivery's endpoint."""
    if delivery.channel == Channel.EMAIL:
        return EMAIL_CONCURRENCY, 1
    webhook = delivery.webhook
    if webhook is None or not webhook.enabled:
        return 1, 1  # nothing is sent: each attempt fails at once
    return webhook.max_concurrent_requests, webhook.batch_size


# --- Sending (in the pool's threads: no database) --------------------------------------------------------


def _subject_name(alert: Alert) -> str:
    if alert.agent_id:
        return alert.agent_id
    scope, scope_id = alert_subject(alert)
    return f"{scope} {scope_id}" if scope else "grid"


def _email_send(delivery: AlertDelivery) -> WebhookResult:
    alert = delivery.alert
    try:
        send_mail(
            subject=f"[Axiom {alert.severity}] {_subject_name(alert)}: {alert.title}"[:200],
            message=f"{alert.message}\n\nAlert {alert.pk} ({alert.kind}), {alert.created_at.isoformat()}",
            from_email=None,
            recipient_list=[delivery.target],
        )
    except Exception as exc:  # SMTP and backend errors vary; each is one failed attempt
        return WebhookResult(ok=False, status_code=None, error=f"{type(exc).__name__}: {exc}"[:500])
    return WebhookResult(ok=True, status_code=None)


def _unit_send(client: WebhookClient, unit: _Unit) -> WebhookResult:
    first = unit.deliveries[0]
    if first.channel == Channel.EMAIL:
        return _email_send(first)
    webhook = first.webhook
    if webhook is None:
        return WebhookResult(ok=False, status_code=None, error="the webhook endpoint was deleted")
    if not webhook.enabled:
        return WebhookResult(ok=False, status_code=None, error="the webhook endpoint is disabled")
    if webhook.batch_size > 1:
        body = webhook_body(
            [
                {**alert_payload(delivery.alert), "webhook_id": delivery_message_id(delivery.pk)}
                for delivery in unit.deliveries
            ]
        )
        message_id = batch_message_id(delivery.pk for delivery in unit.deliveries)
    else:
        body = webhook_body(alert_payload(first.alert))
        message_id = delivery_message_id(first.pk)
    # The endpoint's current URL and secret: a rotated secret applies to the retries too.
    return client.post(
        url=webhook.url, key=webhook_secret_key(webhook.secret), message_id=message_id, body=body
    )


# --- A run ----------------------------------------------------------------------------------------------


class _Run:
    def __init__(self, *, now: dt.datetime, limit: int, time_budget: float):
        self.now = now
        self.started = time.monotonic()
        self.limit = limit
        self.time_budget = time_budget
        self.report = DeliveryRun()
        self.queues: dict[Group, deque[AlertDelivery]] = {}  # read, not claimed yet
        self.ready: dict[Group, deque[_Unit]] = defaultdict(deque)  # claimed, not started yet
        self.limits: dict[Group, tuple[int, int]] = {}
        self.in_flight: Counter[Group] = Counter()
        self.futures: dict[Future, tuple[_Unit, float]] = {}  # and when it started
        self.answer_seconds: dict[Group, float] = {}  # a moving average per endpoint
        self.held: set[int] = set()  # claimed by this run and not recorded: never read again meanwhile
        self.results: list[tuple[_Unit, WebhookResult]] = []  # answered, not recorded yet
        self.results_since = 0.0
        self.failure_streak: Counter[Group] = Counter()
        self.paused: set[Group] = set()
        self.claimed_deliveries = 0
        self.rotation = 0
        self.last_read = float("-inf")
        self.last_read_full = True

    def clock(self) -> dt.datetime:
        """The run's "now" moved on by the whole seconds the run has taken: a lease taken a minute into a run
        must last from then. Whole seconds, so a test's fixed "now" stays exact in a short run."""
        return self.now + dt.timedelta(seconds=int(time.monotonic() - self.started))

    def out_of_budget(self) -> bool:
        return time.monotonic() - self.started >= self.time_budget or self.claimed_deliveries >= self.limit

    def has_work(self) -> bool:
        return any(
            self.queues.get(group) or self.ready.get(group)
            for group in self.limits
            if group not in self.paused
        )

    # Reading --------------------------------------------------------------------------------------------

    def read(self, *, force: bool) -> None:
        """Queue due deliveries of the endpoints that have nothing queued, in turns per endpoint; fan out
        alerts not fanned out yet when that finds less than a full read."""
        if (
            not force
            and not self.last_read_full
            and time.monotonic() - self.last_read < READ_INTERVAL_SECONDS
        ):
            return
        if not force and all(self.queues.get(group) for group in self.limits if group not in self.paused):
            return  # every endpoint still has work queued
        self.last_read = time.monotonic()
        found = self._read_due()
        # Alerts fanned out in bounded batches (a sweep fans out one in its own transaction): as many as
        # the read falls short, a few batches at a time so that sending goes on meanwhile.
        for _ in range(3):
            if found >= READ_AHEAD or not alerts_fan_out(now=self.clock()):
                break
            found += self._read_due()
        self.last_read_full = found >= READ_AHEAD

    def _read_due(self) -> int:
        queued = [group for group, queue in self.queues.items() if queue]
        rows = AlertDelivery.objects.filter(_due(self.clock()))
        skipped = [*queued, *self.paused]
        webhook_ids = [
            webhook_id for channel, webhook_id in skipped if channel == Channel.WEBHOOK and webhook_id
        ]
        if webhook_ids:
            rows = rows.exclude(channel=Channel.WEBHOOK, webhook_id__in=webhook_ids)
        if (Channel.WEBHOOK, None) in skipped:
            rows = rows.exclude(channel=Channel.WEBHOOK, webhook__isnull=True)
        if any(channel == Channel.EMAIL for channel, _ in skipped):
            rows = rows.exclude(channel=Channel.EMAIL)
        turn = Window(
            RowNumber(),
            partition_by=[F("channel"), F("webhook_id")],
            order_by=[F("next_attempt_at").asc(nulls_first=True), F("id").asc()],
        )
        found = list(
            rows.annotate(turn=turn)
            .filter(turn__lte=READ_AHEAD_PER_ENDPOINT)
            .select_related("alert", "webhook")
            .order_by("turn", "next_attempt_at", "id")[:READ_AHEAD]
        )
        for delivery in found:
            if delivery.pk in self.held:
                continue  # a lease of this run's that ran out while waiting: still this run's
            group = _group(delivery)
            self.queues.setdefault(group, deque()).append(delivery)
            self.limits.setdefault(group, _limits(delivery))
        return len(found)

    # Claiming and starting ------------------------------------------------------------------------------

    def claim(self, units: list[_Unit]) -> list[_Unit]:
        """Take the next attempt of every delivery of ``units`` that is still due, in one transaction; keep
        the units with something claimed. Rows another worker holds or has claimed meanwhile are skipped."""
        ids = [delivery.pk for unit in units for delivery in unit.deliveries]
        if not ids:
            return []
        at = self.clock()
        with transaction.atomic():
            attempts = dict(
                AlertDelivery.objects.filter(_due(at), pk__in=ids)
                .select_for_update(skip_locked=True)
                .values_list("pk", "attempts")
            )
            if attempts:
                # The lease: when a retry would be due, which is also when a worker that dies mid-send
                # leaves the rows due again.
                lease = Case(
                    *[
                        When(attempts=count, then=Value(at + delivery_backoff(count + 1)))
                        for count in set(attempts.values())
                    ],
                    output_field=DateTimeField(),
                )
                AlertDelivery.objects.filter(pk__in=list(attempts)).update(
                    attempts=F("attempts") + 1, next_attempt_at=lease
                )
        claimed = []
        for unit in units:
            unit.deliveries = [delivery for delivery in unit.deliveries if delivery.pk in attempts]
            unit.attempts = {delivery.pk: attempts[delivery.pk] + 1 for delivery in unit.deliveries}
            if unit.deliveries:
                claimed.append(unit)
        self.held.update(attempts)
        return claimed

    def release(self, units: Iterable[_Unit]) -> None:
        """Give back claims that will not be sent in this run: the attempt is not spent, and the rows are
        due at once (for the next run; this one skips their endpoint)."""
        by_attempt: dict[int, list[int]] = defaultdict(list)
        for unit in units:
            for pk, attempt in unit.attempts.items():
                by_attempt[attempt].append(pk)
        at = self.clock()
        for attempt, ids in by_attempt.items():
            AlertDelivery.objects.filter(pk__in=ids, attempts=attempt).update(
                attempts=attempt - 1, next_attempt_at=at
            )
            self.held.difference_update(ids)

    def prefetch(self) -> None:
        """Claim ahead, in one transaction, about ``PREFETCH_SECONDS`` of requests for each endpoint that has
        none claimed: one claim per many answers rather than one per answer."""
        units: list[_Unit] = []
        for group, queue in self.queues.items():
            if group in self.paused or self.ready[group] or not queue:
                continue
            concurrency, batch_size = self.limits[group]
            seconds = self.answer_seconds.get(group, PREFETCH_SECONDS / PREFETCH_ROUNDS_MIN)
            rounds = min(
                max(int(PREFETCH_SECONDS / max(seconds, 0.001)), PREFETCH_ROUNDS_MIN), PREFETCH_ROUNDS_MAX
            )
            for _ in range(rounds * concurrency):
                if not queue or self.claimed_deliveries >= self.limit:
                    break
                taken = [
                    queue.popleft()
                    for _ in range(min(batch_size, len(queue), self.limit - self.claimed_deliveries))
                ]
                self.claimed_deliveries += len(taken)
                units.append(_Unit(group=group, deliveries=taken))
        for unit in self.claim(units):
            self.ready[unit.group].append(unit)

    def start(self, pool: ThreadPoolExecutor, client: WebhookClient) -> None:
        """Start claimed requests as far as the pool's threads and each endpoint's concurrency allow,
        endpoints taking turns from a different one each time."""
        groups = [group for group, ready in self.ready.items() if ready]
        if not groups:
            return
        self.rotation = (self.rotation + 1) % len(groups)
        groups = groups[self.rotation :] + groups[: self.rotation]
        room = DELIVERY_THREADS - len(self.futures)
        progress = True
        while progress and room > 0:
            progress = False
            for group in groups:
                if not self.ready[group] or self.in_flight[group] >= self.limits[group][0]:
                    continue
                unit = self.ready[group].popleft()
                self.futures[pool.submit(_unit_send, client, unit)] = (unit, time.monotonic())
                self.in_flight[group] += 1
                self.report.requests += 1
                room -= 1
                progress = True
                if room == 0:
                    break

    # Answers --------------------------------------------------------------------------------------------

    def collect(self, futures: Iterable[Future]) -> None:
        """Take the answers in: count them, pause an endpoint that keeps failing, keep them for ``flush``."""
        for future in futures:
            unit, started = self.futures.pop(future)
            self.in_flight[unit.group] -= 1
            seconds = time.monotonic() - started
            self.answer_seconds[unit.group] = (
                0.8 * self.answer_seconds.get(unit.group, seconds) + 0.2 * seconds
            )
            try:
                result = future.result()
            except Exception as exc:  # a failure while sending is a failed attempt, not a lost claim
                logger.exception("alert delivery %s raised", unit.deliveries[0].pk)
                result = WebhookResult(ok=False, status_code=None, error=f"{type(exc).__name__}: {exc}"[:500])
            size = len(unit.deliveries)
            if result.ok:
                self.failure_streak[unit.group] = 0
                self.report.delivered += size
            else:
                self.report.failed_attempts += size
                self.failure_streak[unit.group] += 1
                logger.info(
                    "alert delivery to %s failed (%s deliveries, first %s): %s",
                    unit.deliveries[0].target,
                    size,
                    unit.deliveries[0].pk,
                    result.error,
                )
                if self.failure_streak[unit.group] >= FAILURES_BEFORE_PAUSE and unit.group not in self.paused:
                    self.paused.add(unit.group)
                    self.queues.pop(unit.group, None)
                    self.release(self.ready.pop(unit.group, ()))
            if not self.results:
                self.results_since = time.monotonic()
            self.results.append((unit, result))

    def flush(self, *, force: bool = False) -> None:
        """Record the answers taken in, in a few statements for many answers. Until then an answer lives
        only here: a worker that dies first sends those alerts again, as at-least-once allows."""
        if self.results and (
            force
            or len(self.results) >= RECORD_BATCH
            or time.monotonic() - self.results_since >= RECORD_INTERVAL_SECONDS
        ):
            results, self.results = self.results, []
            self.record(results)
            self.held.difference_update(pk for unit, _ in results for pk in unit.attempts)

    def record(self, results: list[tuple[_Unit, WebhookResult]]) -> dict[int, str]:
        """Write the outcome of each attempt, one UPDATE per distinct outcome. Returns each delivery's new
        status. Only the attempt this run claimed is written: a lease that ran out and was claimed again
        elsewhere belongs to that claim now."""
        at = self.clock()
        outcomes: dict[tuple[str, int, int | None, str], list[int]] = defaultdict(list)
        statuses: dict[int, str] = {}
        for unit, result in results:
            for delivery in unit.deliveries:
                attempt = unit.attempts[delivery.pk]
                if result.ok:
                    status = Status.DELIVERED
                elif attempt >= MAX_ATTEMPTS:
                    status = Status.FAILED
                else:
                    status = Status.PENDING
                statuses[delivery.pk] = status
                outcomes[(status, attempt, result.status_code, result.error)].append(delivery.pk)
                alert_delivery_count(
                    channel=delivery.channel,
                    outcome=_OUTCOMES[status],
                    lag_seconds=time.time() - delivery.alert.created_at.timestamp(),
                    status_code=result.status_code,
                )
        for (status, attempt, status_code, error), ids in outcomes.items():
            this_attempt = AlertDelivery.objects.filter(pk__in=ids, attempts=attempt)
            if status == Status.DELIVERED:
                this_attempt.update(
                    status=status,
                    delivered_at=at,
                    next_attempt_at=None,
                    last_status_code=status_code,
                    last_error="",
                )
            elif status == Status.FAILED:
                this_attempt.update(
                    status=status, next_attempt_at=None, last_status_code=status_code, last_error=error
                )
            else:  # pending: next_attempt_at is already the retry time, set by the claim
                this_attempt.update(last_status_code=status_code, last_error=error)
        return statuses

    def run(self) -> DeliveryRun:
        with (
            WebhookClient() as client,
            ThreadPoolExecutor(max_workers=DELIVERY_THREADS, thread_name_prefix="alert-delivery") as pool,
        ):
            alerts_fan_out(now=self.clock())
            while True:
                stopping = self.out_of_budget()
                if not stopping:
                    self.read(force=not self.futures and not any(self.ready.values()))
                    self.prefetch()
                # Once out of budget, what is claimed is still sent (a few requests per endpoint at most).
                self.start(pool, client)
                if not self.futures:
                    if not stopping and self.has_work():
                        continue  # every claim was lost to another worker: the next rows, if any
                    break
                done, _ = wait(self.futures, timeout=WAIT_SECONDS, return_when=FIRST_COMPLETED)
                self.collect(done)
                self.flush()
            self.flush(force=True)
            self.report.more = stopping and (self.has_work() or self.last_read_full)
        return self.report


def alerts_deliver(
    *,
    now: dt.datetime | None = None,
    limit: int = DELIVERY_RUN_LIMIT,
    time_budget: float = DELIVERY_TIME_BUDGET_SECONDS,
) -> DeliveryRun:
    """Fan out alerts not fanned out yet, and send every due delivery, oldest first in turns per endpoint,
    concurrently within each endpoint's limits, until nothing is due or the time budget or ``limit`` (of
    deliveries) is used. Returns what was done; ``busy`` when another run was sending."""
    now = now or timezone.now()
    with session_lock(DELIVERY_LOCK_KEY) as acquired:
        if not acquired:
            return DeliveryRun(busy=True)
        # A worker that died during a last attempt leaves it pending with no attempts left: close it.
        AlertDelivery.objects.filter(
            status=Status.PENDING, attempts__gte=MAX_ATTEMPTS, next_attempt_at__lte=now
        ).update(status=Status.FAILED, next_attempt_at=None)
        return _Run(now=now, limit=limit, time_budget=time_budget).run()


def alert_delivery_attempt(*, delivery_id: int, now: dt.datetime | None = None) -> str | None:
    """Attempt one delivery now if it is due (for a task that targets one row). Returns its new status, or
    None when it was not due or another worker claimed it first."""
    now = now or timezone.now()
    delivery = (
        AlertDelivery.objects.select_related("alert", "webhook").filter(_due(now), pk=delivery_id).first()
    )
    if delivery is None:
        return None
    return _delivery_attempt(delivery, now=now)


def _delivery_attempt(delivery: AlertDelivery, *, now: dt.datetime) -> str | None:
    run = _Run(now=now, limit=1, time_budget=DELIVERY_TIME_BUDGET_SECONDS)
    claimed = run.claim([_Unit(group=_group(delivery), deliveries=[delivery])])
    if not claimed:
        return None
    (unit,) = claimed
    with WebhookClient() as client:
        result = _unit_send(client, unit)
    return run.record([(unit, result)])[delivery.pk]

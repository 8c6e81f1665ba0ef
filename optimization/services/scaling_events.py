"""Recording scaling decisions, and telling the world about them.

Every change of an agent's instance count or of a quota limit by scaling (the auto-scaling evaluation, a
rule's scale action, an operator through the API, the admin or the dashboard, an applied recommendation) is
written by ``scaling_events_record``, in one statement for any number of events:

* the ``ScalingEvent`` rows (the history the API and the dashboard show);
* one ``scaling`` alert per event (dedup key ``scaling:<event id>``): the notice an orchestrator acts on, with
  the event's before, after and reason in its ``data`` (the payload is in the README, *Webhooks*);
* one webhook delivery per alert and enabled endpoint (the agent's and the global ones, one per URL), which
  the alert delivery sends signed and retries like every alert.

A notice is written only for an agent that some enabled endpoint listens to: the event is the history, and
a fleet without receivers pays nothing for notices (a sweep that scales 50,000 agents would otherwise write
50,000 alert rows that go nowhere). An endpoint added later does not receive earlier events.

One statement, so a sweep's chunk writes its events, alerts and deliveries in the same number of statements
for 3 agents as for 3,000, and a crash loses all three or none of them. Scaling notices go to webhooks only,
not to alert emails: a fleet scales all day, and a mailbox is no orchestrator. The alert is recorded already
acknowledged (by ``SCALING_ACKNOWLEDGER``): it reports something done, not something to look at, so it never
counts among the open alerts; ``GET /api/v1/alerts?kind=scaling&status=all`` lists them.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from django.db import connection
from django.utils import timezone

from ledger.bulk import server_bound_cursor
from ledger.models import OptimizationRule
from optimization.models import Alert, AlertDelivery, ScalingEvent, WebhookEndpoint
from optimization.services.alerts import alert_delivery_enqueue_on_commit

SCALING_ACKNOWLEDGER = "scaling"


@dataclass
class ScalingChange:
    """One scaling decision to record: horizontal (``before``/``after`` are instance counts) or vertical
    (they are the quota limit of ``resource_type_id``)."""

    agent_id: str
    direction: str
    kind: str
    before: int
    after: int
    reason: str
    resource_type_id: str | None = None


# The events, their alerts and the alerts' webhook deliveries in one statement. The alert's data is the
# payload an orchestrator reads (README, Webhooks: "Scaling events"); its keys are stable.
_RECORD_SQL = """
WITH events AS (
    INSERT INTO {events} (agent_id, direction, kind, resource_type_id, before, after, reason, trigger, actor,
                          created_at)
    SELECT d.agent_id, d.direction, d.kind, d.resource_type_id, d.before, d.after, left(d.reason, 300),
           %(trigger)s, left(%(actor)s, 150), %(at)s
    FROM unnest(%(agent_ids)b::text[], %(directions)b::text[], %(kinds)b::text[], %(resource_types)b::text[],
                %(befores)b::bigint[], %(afters)b::bigint[], %(reasons)b::text[])
         AS d(agent_id, direction, kind, resource_type_id, before, after, reason)
    RETURNING id, agent_id, direction, kind, resource_type_id, before, after, reason, trigger, actor
), alerts AS (
    INSERT INTO {alerts} (agent_id, kind, severity, title, message, data, dedup_key, created_at,
                          delivery_queued_at, acknowledged_at, acknowledged_by)
    SELECT e.agent_id, %(alert_kind)s, %(severity)s,
           left('Scaled ' || e.direction || ': ' || CASE
               WHEN e.kind = %(horizontal)s THEN e.before || ' -> ' || e.after || ' instances'
               ELSE e.resource_type_id || ' limit ' || e.before || ' -> ' || e.after
           END, 200),
           'Agent ' || e.agent_id || ' scaled ' || e.direction || ' (' || e.kind || ', ' || e.trigger
               || CASE WHEN e.actor = '' THEN '' ELSE ' by ' || e.actor END || ') from ' || e.before
               || ' to ' || e.after
               || CASE WHEN e.kind = %(horizontal)s THEN ' instances' ELSE ' ' || e.resource_type_id END
               || ': ' || e.reason,
           jsonb_build_object(
               'event_id', e.id,
               'agent_id', e.agent_id,
               'kind', e.kind,
               'direction', e.direction,
               'trigger', e.trigger,
               'actor', e.actor,
               'resource_type', e.resource_type_id,
               'before', e.before,
               'after', e.after,
               'reason', e.reason,
               'at', %(at_iso)s::text
           ),
           'scaling:' || e.id, %(at)s, %(at)s, %(at)s, %(acknowledger)s
    FROM events e
    -- Only for an agent some enabled endpoint listens to: a notice nobody receives would be a row per
    -- event for nothing (the event itself is the history).
    WHERE EXISTS (
        SELECT 1 FROM {webhooks} w WHERE w.enabled AND (w.agent_id IS NULL OR w.agent_id = e.agent_id)
    )
    ON CONFLICT (dedup_key) DO NOTHING
    RETURNING id, agent_id
), deliveries AS (
    -- The agent's and the global enabled endpoints, one delivery per URL (the lowest endpoint id), as
    -- alerts_fan_out does for every other alert.
    INSERT INTO {deliveries} (alert_id, channel, webhook_id, target, status, attempts, last_error,
                              next_attempt_at, created_at)
    SELECT DISTINCT ON (a.id, w.url) a.id, %(webhook)s, w.id, w.url, %(pending)s, 0, '', %(at)s, %(created)s
    FROM alerts a
    JOIN {webhooks} w ON w.enabled AND (w.agent_id IS NULL OR w.agent_id = a.agent_id)
    ORDER BY a.id, w.url, w.id
    ON CONFLICT DO NOTHING
    RETURNING 1
)
SELECT e.id, e.agent_id, (SELECT count(*) FROM alerts), (SELECT count(*) FROM deliveries) FROM events e
"""


def scaling_events_record(
    *, changes: Sequence[ScalingChange], trigger: str, actor: str, now: dt.datetime
) -> list[ScalingEvent]:
    """Write ``changes`` as scaling events at ``now``, each with its ``scaling`` alert and that alert's
    webhook deliveries, in one statement; ask for delivery once the transaction commits. Returns the events
    (unsaved instances carrying their ids), in the order of ``changes``. Call it in the transaction that
    made the changes."""
    if not changes:
        return []
    quote = connection.ops.quote_name
    sql = _RECORD_SQL.format(
        events=quote(ScalingEvent._meta.db_table),
        alerts=quote(Alert._meta.db_table),
        deliveries=quote(AlertDelivery._meta.db_table),
        webhooks=quote(WebhookEndpoint._meta.db_table),
    )
    params = {
        "agent_ids": [change.agent_id for change in changes],
        "directions": [change.direction for change in changes],
        "kinds": [change.kind for change in changes],
        "resource_types": [change.resource_type_id for change in changes],
        "befores": [change.before for change in changes],
        "afters": [change.after for change in changes],
        "reasons": [change.reason for change in changes],
        "trigger": trigger,
        "actor": actor,
        "at": now,
        "at_iso": now.isoformat(),
        "alert_kind": Alert.Kind.SCALING.value,
        "severity": OptimizationRule.Severity.INFO.value,
        "horizontal": ScalingEvent.Kind.HORIZONTAL.value,
        "acknowledger": SCALING_ACKNOWLEDGER,
        "webhook": AlertDelivery.Channel.WEBHOOK.value,
        "pending": AlertDelivery.Status.PENDING.value,
        "created": timezone.now(),
    }
    with server_bound_cursor() as cursor:
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    if any(deliveries for *_, deliveries in rows):
        alert_delivery_enqueue_on_commit()
    # An agent has at most one change per call (one decision per agent in a chunk; one agent per manual
    # call), so the agent id tells which row is which change's.
    ids = {agent_id: event_id for event_id, agent_id, *_ in rows}
    return [
        ScalingEvent(
            pk=ids[change.agent_id],
            agent_id=change.agent_id,
            direction=change.direction,
            kind=change.kind,
            trigger=trigger,
            resource_type_id=change.resource_type_id,
            before=change.before,
            after=change.after,
            reason=change.reason[:300],
            actor=actor[:150],
            created_at=now,
        )
        for change in changes
    ]


__all__ = ["SCALING_ACKNOWLEDGER", "ScalingChange", "scaling_events_record"]

"""The resource monitor dashboard: staff only, CSRF-protected POST actions that call the same services as
the API and are audited like API calls."""

from __future__ import annotations

import datetime as dt
from urllib.parse import urlencode

from django.contrib import messages
from django.contrib.admin.views.decorators import staff_member_required
from django.db import transaction
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_GET, require_POST

from allocation import exports
from allocation.api.shared.audit import audit_record
from allocation.api.shared.errors import error_body
from ledger.errors import LedgerError
from ledger.models import Agent
from optimization.dashboard import data
from optimization.models import Alert


class UnknownAgent(Exception):
    def __init__(self, agent_id: str):
        super().__init__(agent_id)
        self.agent_id = agent_id


def _agent(request: HttpRequest) -> Agent:
    agent_id = (request.GET.get("agent") or request.POST.get("agent") or "").strip()
    agent = Agent.objects.select_related("tier").filter(pk=agent_id).first()
    if agent is None:
        raise UnknownAgent(agent_id)
    return agent


# Suggestions for the agent picker: the ids at and after what was typed, in the database's order (one index
# range read of at most this many rows, whatever the fleet).
SUGGESTIONS = 20


def agent_suggestions(text: str) -> list[str]:
    text = text.strip()[:64]
    ids = Agent.objects.filter(pk__gte=text).order_by("pk").values_list("pk", flat=True)[:SUGGESTIONS]
    matching = [agent_id for agent_id in ids if agent_id.startswith(text)]
    return matching or list(ids)


def _not_found(request: HttpRequest, agent_id: str) -> HttpResponse:
    """A page, not Django's error page: what was asked for, the nearest ids, and the search again."""
    return render(
        request,
        "dashboard/agent_not_found.html",
        {"agent_id": agent_id, "suggestions": agent_suggestions(agent_id) if agent_id else []},
        status=404,
    )


def _date(value: str | None) -> dt.date | None:
    try:
        return dt.date.fromisoformat(value) if value else None
    except ValueError:
        return None


def _range(request: HttpRequest) -> tuple[dt.date, dt.date, str | None]:
    """The monitor's date range from ``since`` and ``until`` (days, both included), or this period so far;
    a range that cannot be read falls back to the default and says why."""
    default_since, default_until = data.default_range(now=timezone.now())
    raw_since, raw_until = request.GET.get("since"), request.GET.get("until")
    since, until = _date(raw_since) or default_since, _date(raw_until) or default_until
    problem = None
    if (raw_since and _date(raw_since) is None) or (raw_until and _date(raw_until) is None):
        problem = "Dates are written YYYY-MM-DD; showing this period instead."
        since, until = default_since, default_until
    elif since > until:
        problem = "The range starts after it ends; showing this period instead."
        since, until = default_since, default_until
    elif (until - since).days >= data.MAX_RANGE_DAYS:
        problem = f"A range is at most {data.MAX_RANGE_DAYS} days; showing the last {data.MAX_RANGE_DAYS}."
        since = until - dt.timedelta(days=data.MAX_RANGE_DAYS - 1)
    return since, until, problem


@staff_member_required
@require_GET
def fleet(request: HttpRequest) -> HttpResponse:
    return render(request, "dashboard/fleet.html", {"fleet": data.fleet_overview()})


@staff_member_required
@require_GET
def fleet_data(request: HttpRequest) -> JsonResponse:
    return JsonResponse(data.fleet_overview())


@staff_member_required
@require_GET
def resources(request: HttpRequest) -> HttpResponse:
    if not request.GET.get("agent", "").strip():
        return redirect("dashboard:fleet")
    try:
        agent = _agent(request)
    except UnknownAgent as exc:
        return _not_found(request, exc.agent_id)
    since, until, problem = _range(request)
    monitor = data.agent_monitor(agent=agent, since=since, until=until)
    query = urlencode({"agent": agent.pk, "since": since.isoformat(), "until": until.isoformat()})
    return render(
        request,
        "dashboard/resources.html",
        {
            "agent": agent,
            "monitor": monitor,
            "range_problem": problem,
            "data_url": f"{reverse('dashboard:resources-data')}?{query}",
            "degradation": monitor["degradation"],
        },
    )


@staff_member_required
@require_GET
def resources_data(request: HttpRequest) -> JsonResponse:
    try:
        agent = _agent(request)
    except UnknownAgent as exc:
        return JsonResponse(error_body("not_found", f"no agent {exc.agent_id!r}"), status=404)
    since, until, _ = _range(request)
    return JsonResponse(data.agent_monitor(agent=agent, since=since, until=until))


@staff_member_required
@require_GET
def agent_search(request: HttpRequest) -> JsonResponse:
    """Agent ids for the picker, from what was typed."""
    return JsonResponse({"agents": agent_suggestions(request.GET.get("q", ""))})


@staff_member_required
@require_GET
def usage_csv(request: HttpRequest) -> HttpResponse:
    """The agent's usage rows over the monitor's date range as CSV: the API's export
    (``allocation.exports``), for a staff session rather than an API key."""
    try:
        agent = _agent(request)
    except UnknownAgent as exc:
        return _not_found(request, exc.agent_id)
    since, until, _ = _range(request)
    start = dt.datetime.combine(since, dt.time(), tzinfo=dt.UTC)
    end = dt.datetime.combine(until + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)
    start, end = exports.usage_export_range(since=start, until=end, now=timezone.now())
    response = StreamingHttpResponse(
        exports.usage_export_csv(since=start, until=end, agent_id=agent.pk),
        content_type="text/csv; charset=utf-8",
    )
    filename = exports.usage_export_filename(scope=agent.pk, since=start, until=end)
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


# --- Actions --------------------------------------------------------------------------------------------


def _acknowledge(request, agent: Agent, actor: str) -> str:
    from optimization.services.alerts import alert_acknowledge

    alert = Alert.objects.filter(pk=request.POST.get("alert_id") or 0, agent=agent).first()
    if alert is None:
        raise LedgerError("no such alert for this agent", code="not_found", status=404)
    alert_acknowledge(alert=alert, actor=actor)
    return f"Alert “{alert.title}” acknowledged."


def _scale(request, agent: Agent, actor: str) -> str:
    from optimization.services.scaling import scaling_apply

    direction = request.POST.get("direction", "")
    event = scaling_apply(
        agent=agent,
        direction=direction,
        trigger="manual",
        reason=f"manual scale {direction} from the dashboard",
        actor=actor,
    )
    if event is None:
        return f"Already at the {'maximum' if direction == 'up' else 'minimum'} instance count."
    return f"Scaled {direction}: {event.before} → {event.after} instances."


def _autoscaling(request, agent: Agent, actor: str) -> str:
    from optimization.services.scaling import scaling_policy_set

    enabled = request.POST.get("enabled") == "on"
    scaling_policy_set(agent=agent, enabled=enabled)
    return f"Auto-scaling turned {'on' if enabled else 'off'}."


def _apply_recommendation(request, agent: Agent, actor: str) -> str:
    from optimization.services.recommendations import recommendation_apply

    result = recommendation_apply(
        agent=agent, recommendation_id=request.POST.get("recommendation_id", ""), actor=actor
    )
    return result["message"]


ACTIONS = {
    "acknowledge": _acknowledge,
    "scale": _scale,
    "autoscaling": _autoscaling,
    "apply_recommendation": _apply_recommendation,
}


@staff_member_required
@require_POST
def action(request: HttpRequest, name: str) -> HttpResponse:
    handler = ACTIONS.get(name)
    if handler is None:
        raise Http404(f"no action {name!r}")
    try:
        agent = _agent(request)
    except UnknownAgent as exc:
        if request.headers.get("Accept", "").startswith("application/json"):
            return JsonResponse(error_body("not_found", f"no agent {exc.agent_id!r}"), status=404)
        return _not_found(request, exc.agent_id)
    actor = f"user:{request.user.get_username()}"
    body = {key: value for key, value in request.POST.items() if key != "csrfmiddlewaretoken"}
    try:
        with transaction.atomic():
            message = handler(request, agent, actor)
            audit_record(
                request=request,
                actor=actor,
                action=f"dashboard.{name}",
                agent_id=agent.pk,
                status_code=200,
                outcome="ok",
                body=body,
            )
        ok, status = True, 200
    except LedgerError as exc:
        audit_record(
            request=request,
            actor=actor,
            action=f"dashboard.{name}",
            agent_id=agent.pk,
            status_code=exc.status,
            outcome=exc.code,
            body=body,
        )
        message, ok, status = exc.message, False, exc.status
    if request.headers.get("Accept", "").startswith("application/json"):
        return JsonResponse({"ok": ok, "message": message, "at": timezone.now().isoformat()}, status=status)
    (messages.success if ok else messages.error)(request, message)
    return redirect(data.resource_url(agent.pk))

"""The resource monitor dashboard: staff only, CSRF-protected POST actions that call the same services as
the API and are audited like API calls."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.admin.views.decorators import staff_member_required
from django.db import transaction
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views.decorators.http import require_GET, require_POST

from allocation.api.shared.audit import audit_record
from ledger.errors import LedgerError
from ledger.models import Agent
from optimization.dashboard import data
from optimization.models import Alert


def _agent(request: HttpRequest) -> Agent:
    agent_id = request.GET.get("agent") or request.POST.get("agent") or ""
    agent = Agent.objects.select_related("tier").filter(pk=agent_id).first()
    if agent is None:
        raise Http404(f"no agent {agent_id!r}")
    return agent


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
    if not request.GET.get("agent"):
        return redirect("dashboard:fleet")
    agent = _agent(request)
    return render(
        request, "dashboard/resources.html", {"agent": agent, "monitor": data.agent_monitor(agent=agent)}
    )


@staff_member_required
@require_GET
def resources_data(request: HttpRequest) -> JsonResponse:
    return JsonResponse(data.agent_monitor(agent=_agent(request)))


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
    agent = _agent(request)
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

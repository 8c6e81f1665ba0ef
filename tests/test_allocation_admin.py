"""The allocation back office: every page renders, keys are issued (shown once, stored as a hash) and revoked
through ``allocation.keys``, and what the engine wrote stays read-only."""

from __future__ import annotations

import hashlib

import pytest
from django.contrib.messages import get_messages
from django.urls import reverse
from django.utils import timezone

from allocation.keys import api_key_issue, api_key_revoke
from allocation.models import Allocation, ApiKey, AuditRecord, IdempotencyRecord
from allocation.services import allocation_create
from tests.factories import AgentFactory

pytestmark = pytest.mark.django_db

MODELS = [ApiKey, AuditRecord, Allocation, IdempotencyRecord]
ENGINE_MODELS = [AuditRecord, Allocation, IdempotencyRecord]  # written by the engine and the API only
RAW_KEY_IN_RESPONSE = "axg_ThisIsTheRawKeyOfTheFirstResponse0123456789"


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def _url(model, view: str, *args) -> str:
    return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_{view}", args=args)


@pytest.fixture
def agent(reference_data):
    return AgentFactory(id="agent-keys")


@pytest.fixture
def operator_user(django_user_model):
    return django_user_model.objects.create_user("alice", is_staff=True)


@pytest.fixture
def rows(agent, operator_user):
    """One row of each allocation model, and a key of each kind."""
    allocation = allocation_create(agent=agent, resource_type_id="AI_TOKENS", amount=10, task_id="task-42")
    AuditRecord.objects.create(
        actor=f"agent:{agent.pk}",
        action="allocation.create",
        agent_id=agent.pk,
        method="POST",
        path=f"/api/v1/agents/{agent.pk}/allocations",
        request_body={"resource_type": "AI_TOKENS", "amount": 10},
        status_code=201,
        outcome="ok",
        client_address="127.0.0.1",
    )
    IdempotencyRecord.objects.create(
        principal="operator:alice",
        key="create-agent-1",
        method="POST",
        path="/api/v1/agents",
        request_hash="0" * 64,
        response_status=201,
        response_body={"id": "agent-new", "api_key": RAW_KEY_IN_RESPONSE},
        created_at=timezone.now(),
    )
    agent_key, _ = api_key_issue(agent=agent, name="agent key")
    operator_key, _ = api_key_issue(user=operator_user, name="operator key")
    return {"allocation": allocation, "agent_key": agent_key, "operator_key": operator_key}


def _messages(response) -> list[str]:
    return [str(message) for message in get_messages(response.wsgi_request)]


# --- Every page renders ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS, ids=lambda model: model.__name__)
def test_changelist_renders(model, rows, admin_client_logged_in):
    response = admin_client_logged_in.get(_url(model, "changelist"))
    assert response.status_code == 200
    assert response.context["cl"].result_count >= 1


@pytest.mark.parametrize("model", MODELS, ids=lambda model: model.__name__)
def test_change_page_renders(model, rows, admin_client_logged_in):
    obj = model._default_manager.order_by("pk").first()
    response = admin_client_logged_in.get(_url(model, "change", obj.pk))
    assert response.status_code == 200


def test_api_key_add_page_renders(rows, admin_client_logged_in):
    assert admin_client_logged_in.get(_url(ApiKey, "add")).status_code == 200


# --- API keys: listing ----------------------------------------------------------------------------------


def test_api_key_changelist_shows_the_prefix_and_owner_but_never_the_hash(rows, admin_client_logged_in):
    agent_key, operator_key = rows["agent_key"], rows["operator_key"]
    content = admin_client_logged_in.get(_url(ApiKey, "changelist")).content.decode()
    assert f"{agent_key.prefix}…" in content
    assert "agent:agent-keys" in content
    assert "operator:alice" in content
    assert agent_key.key_hash not in content
    assert operator_key.key_hash not in content


def test_api_key_change_page_never_shows_the_hash(rows, admin_client_logged_in):
    api_key = rows["agent_key"]
    content = admin_client_logged_in.get(_url(ApiKey, "change", api_key.pk)).content.decode()
    assert f"{api_key.prefix}…" in content
    assert api_key.key_hash not in content


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"state": "active"}, {"agent_key"}),
        ({"state": "revoked"}, {"operator_key"}),
        ({"owner": "agent"}, {"agent_key"}),
        ({"owner": "operator"}, {"operator_key"}),
        ({"q": "alice"}, {"operator_key"}),
        ({"q": "agent-keys"}, {"agent_key"}),
    ],
)
def test_api_key_changelist_filters_and_searches(query, expected, rows, admin_client_logged_in):
    api_key_revoke(api_key=rows["operator_key"])
    response = admin_client_logged_in.get(_url(ApiKey, "changelist"), query)
    assert response.status_code == 200
    assert {key.pk for key in response.context["cl"].result_list} == {rows[name].pk for name in expected}


def test_api_key_changelist_searches_by_prefix(rows, admin_client_logged_in):
    api_key = rows["operator_key"]
    response = admin_client_logged_in.get(_url(ApiKey, "changelist"), {"q": api_key.prefix})
    assert [key.pk for key in response.context["cl"].result_list] == [api_key.pk]


# --- API keys: revoking ---------------------------------------------------------------------------------


def test_revoke_action_sets_revoked_at(rows, admin_client_logged_in):
    api_key = rows["agent_key"]
    response = admin_client_logged_in.post(
        _url(ApiKey, "changelist"), {"action": "revoke", "_selected_action": [api_key.pk]}
    )
    assert response.status_code == 302
    api_key.refresh_from_db()
    assert api_key.revoked_at is not None
    rows["operator_key"].refresh_from_db()
    assert rows["operator_key"].revoked_at is None
    assert "Revoked 1 key(s)." in _messages(response)


def test_revoke_action_leaves_an_already_revoked_key_as_it_was(rows, admin_client_logged_in):
    api_key = rows["agent_key"]
    api_key_revoke(api_key=api_key)
    api_key.refresh_from_db()
    first_revoked_at = api_key.revoked_at
    admin_client_logged_in.post(
        _url(ApiKey, "changelist"), {"action": "revoke", "_selected_action": [api_key.pk]}
    )
    api_key.refresh_from_db()
    assert api_key.revoked_at == first_revoked_at


def test_api_keys_cannot_be_deleted(rows, admin_client_logged_in):
    api_key = rows["agent_key"]
    assert admin_client_logged_in.get(_url(ApiKey, "delete", api_key.pk)).status_code == 403
    assert admin_client_logged_in.post(_url(ApiKey, "delete", api_key.pk), {"post": "yes"}).status_code == 403
    changelist = admin_client_logged_in.get(_url(ApiKey, "changelist"))
    assert "delete_selected" not in changelist.content.decode()
    assert ApiKey.objects.filter(pk=api_key.pk).exists()


def test_api_key_change_form_edits_only_the_name(rows, admin_client_logged_in):
    api_key = rows["agent_key"]
    before = ApiKey.objects.values().get(pk=api_key.pk)
    response = admin_client_logged_in.post(
        _url(ApiKey, "change", api_key.pk),
        {"name": "renamed", "prefix": "axg_forged00", "key_hash": "f" * 64, "revoked_at": "2020-01-01 00:00"},
    )
    assert response.status_code == 302
    after = ApiKey.objects.values().get(pk=api_key.pk)
    assert after == {**before, "name": "renamed"}


# --- API keys: issuing ----------------------------------------------------------------------------------


def _raw_key_from(messages: list[str]) -> str:
    shown = [message for message in messages if message.startswith("New key: ")]
    assert len(shown) == 1
    return shown[0].removeprefix("New key: ").split(" ", 1)[0]


def test_adding_a_key_shows_the_raw_key_once_and_stores_only_its_hash(agent, admin_client_logged_in):
    data = {"agent": agent.pk, "name": "ci"}
    response = admin_client_logged_in.post(_url(ApiKey, "add"), data, follow=True)
    assert response.status_code == 200
    raw_key = _raw_key_from([str(message) for message in response.context["messages"]])

    api_key = ApiKey.objects.get()
    assert (api_key.agent_id, api_key.user_id, api_key.name) == (agent.pk, None, "ci")
    assert api_key.key_hash == hashlib.sha256(raw_key.encode()).hexdigest()
    assert raw_key.startswith(api_key.prefix)
    stored = ApiKey.objects.values().get(pk=api_key.pk)
    assert not any(raw_key in str(value) for value in stored.values())

    # Shown once: the next page no longer has it.
    again = admin_client_logged_in.get(_url(ApiKey, "changelist"))
    assert raw_key not in again.content.decode()


def test_adding_an_operator_key_for_a_staff_user(operator_user, admin_client_logged_in):
    response = admin_client_logged_in.post(_url(ApiKey, "add"), {"user": operator_user.pk}, follow=True)
    raw_key = _raw_key_from([str(message) for message in response.context["messages"]])
    api_key = ApiKey.objects.get()
    assert (api_key.agent_id, api_key.user_id) == (None, operator_user.pk)
    assert api_key.key_hash == hashlib.sha256(raw_key.encode()).hexdigest()


@pytest.mark.parametrize("owners", ["both", "neither"])
def test_add_form_refuses_both_an_agent_and_an_operator_or_neither(
    owners, agent, operator_user, admin_client_logged_in
):
    data = {"agent": agent.pk, "user": operator_user.pk} if owners == "both" else {}
    response = admin_client_logged_in.post(_url(ApiKey, "add"), {**data, "name": "x"})
    assert response.status_code == 200
    assert response.context["adminform"].form.errors
    assert "Constraint" not in response.content.decode()
    assert not ApiKey.objects.exists()
    assert not [message for message in _messages(response) if message.startswith("New key")]


def test_add_form_refuses_an_operator_key_for_a_user_who_is_not_staff(
    django_user_model, admin_client_logged_in
):
    user = django_user_model.objects.create_user("bob")
    response = admin_client_logged_in.post(_url(ApiKey, "add"), {"user": user.pk})
    assert response.status_code == 200
    assert "user" in response.context["adminform"].form.errors
    assert not ApiKey.objects.exists()


# --- The engine's rows are read-only --------------------------------------------------------------------


@pytest.mark.parametrize("model", ENGINE_MODELS, ids=lambda model: model.__name__)
def test_engine_rows_cannot_be_added(model, rows, admin_client_logged_in):
    count = model.objects.count()
    assert admin_client_logged_in.get(_url(model, "add")).status_code == 403
    response = admin_client_logged_in.post(_url(model, "add"), {"agent": "agent-keys", "amount": 5})
    assert response.status_code == 403
    assert model.objects.count() == count


def test_audit_record_change_post_is_refused_and_changes_nothing(rows, admin_client_logged_in):
    record = AuditRecord.objects.get()
    before = AuditRecord.objects.values().get(pk=record.pk)
    page = admin_client_logged_in.get(_url(AuditRecord, "change", record.pk))
    assert 'name="_save"' not in page.content.decode()
    response = admin_client_logged_in.post(
        _url(AuditRecord, "change", record.pk),
        {"actor": "someone else", "outcome": "forged", "status_code": 500},
    )
    assert response.status_code == 403
    assert AuditRecord.objects.values().get(pk=record.pk) == before


def test_allocation_change_post_is_refused_and_changes_nothing(rows, admin_client_logged_in):
    allocation = rows["allocation"]
    before = Allocation.objects.values().get(pk=allocation.pk)
    page = admin_client_logged_in.get(_url(Allocation, "change", allocation.pk))
    assert 'name="_save"' not in page.content.decode()
    response = admin_client_logged_in.post(
        _url(Allocation, "change", allocation.pk), {"amount": 1, "status": "released", "cost_usd": "0"}
    )
    assert response.status_code == 403
    assert Allocation.objects.values().get(pk=allocation.pk) == before


def test_engine_rows_cannot_be_deleted(rows, admin_client_logged_in):
    for model in ENGINE_MODELS:
        obj = model.objects.get()
        assert admin_client_logged_in.post(_url(model, "delete", obj.pk), {"post": "yes"}).status_code == 403
        assert model.objects.filter(pk=obj.pk).exists()


def test_allocation_changelist_searches_by_agent_and_task(rows, admin_client_logged_in):
    changelist = _url(Allocation, "changelist")
    for term in ("agent-keys", "task-42"):
        response = admin_client_logged_in.get(changelist, {"q": term})
        assert [row.pk for row in response.context["cl"].result_list] == [rows["allocation"].pk]
    assert not admin_client_logged_in.get(changelist, {"q": "nobody"}).context["cl"].result_list


def test_idempotency_record_page_hides_a_raw_key_in_the_stored_response(rows, admin_client_logged_in):
    record = IdempotencyRecord.objects.get()
    content = admin_client_logged_in.get(_url(IdempotencyRecord, "change", record.pk)).content.decode()
    assert "agent-new" in content
    assert RAW_KEY_IN_RESPONSE not in content
    assert RAW_KEY_IN_RESPONSE[:12] in content

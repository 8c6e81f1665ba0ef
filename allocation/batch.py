"""Batches of committed allocations: up to 1,000 items in one transaction, each with its own result.

Every item gets exactly the result the same items sent one by one as single allocations would get: items
are decided in order, each against its quota and its budgets as the items before it left them, and a
refused item refuses nothing else. A batch costs a fixed number of queries whatever its size:

1. read the agents and the current-period quota rows as last committed, without locking them, and open
   the periods not found (``ON CONFLICT DO NOTHING``), before any row is locked: an insert may wait for
   another batch opening the same period;
2. read the budgets that apply to the items (each agent's, its team's, its organization's, and the runs the
   items name), the quota rows again only if some were opened or this is not the first attempt, and,
   from the second attempt on, the results already stored under the items' idempotency keys (the first
   takes them to be unused, as they are unless the batch is a retry: step 7 finds out);
3. decide every item in Python: a key seen before with the same item replays its stored result and
   charges nothing, with another item it refuses the item (422); an item that a hard budget has no room for
   is refused with 429 ``budget_exceeded``, as a single allocation would be. The usual batch, where every
   item fits, is decided whole (per agent, resource type and amount, not per item: ``_Decider._all_fit``);
4. write one INSERT of the allocations and one of the usage rows, their foreign keys checked at once;
5. lock the budget rows the batch charges ``FOR NO KEY UPDATE`` in id order and confirm that each hard one
   still has room for what the batch charges it, then one UPDATE of the budgets (an ended window rolls
   over, as ``allocation.sql.grid_budgets_apply`` rolls it);
6. lock the quota rows the batch takes from ``FOR NO KEY UPDATE`` in ``QUOTA_LOCK_ORDER`` (agent, then id),
   like every writer that locks several, and confirm that each still has what the batch takes from it;
7. one UPDATE of the quotas, and one INSERT of the accepted items' results under their keys (the columns
   ``grid_mutation_record`` writes for a single request). A refused item, like a refused single request,
   leaves its key free for a retry.

Budget rows before quota rows: the lock order of every writer (``ledger.budgets``), so a batch and a single
allocation over the same team never wait for each other in a cycle.

The budget and quota rows are held from steps 5 and 6 to the commit only, so batches over the same agents
(an operator's ``/usage/batch`` usually spans the fleet) overlap everywhere else. When a budget or a quota
no longer has what the batch takes at step 5 or 6, or one of its keys is stored already (a retried batch,
or a concurrent one that took the key meanwhile: the INSERT waits for it to commit, then fails on the
unique index), everything after step 1 is rolled back to a savepoint and decided again; the last
attempts lock the budget and quota rows at step 2 instead, so a batch always finishes. Waiting for a key
cannot deadlock: a batch holding a key it has inserted holds all the budget and quota locks it needs
already, and keys are inserted in sorted order.

Rows go to PostgreSQL as one array per column (``unnest``), each a text parameter built by one join
(``allocation.sql.text_array``): a multi-row VALUES list of 10,000 placeholders costs psycopg more to build
client-side than the server takes to insert the rows, a JSON document costs a Python object per row to
build and a parse per row in the server, and psycopg dumps a list element by element in Python. Per item,
Python only gathers its values into the columns and builds its answer (and the API its key's fingerprint).

Holds are not supported: a batch commits allocations only (``POST .../allocations`` takes holds). An item
may name a ``run_id`` of its agent: the run's budget applies too (404 ``run_not_found``, 409 ``run_ended``
otherwise, as for a single allocation).
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import operator
import os
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from types import MappingProxyType
from typing import NamedTuple

import msgspec
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from allocation.api.shared.idempotency import (
    IDEMPOTENCY_UNIQUE,
    MAX_KEY_LENGTH,
    key_scope,
    principal_agent_id,
)
from allocation.models import Allocation, IdempotencyRecord
from allocation.representation import allocation_body, iso_datetime
from allocation.sql import BatchRows, batch_item_records_write, batch_rows_write, int_array, text_array
from axiom_grid.observability.metrics import allocation_count, refusal_count
from ledger.budgets import BudgetFigures, budget_exceeded, budget_figures
from ledger.bulk import bulk_update_columns, server_bound_cursor
from ledger.errors import (
    BudgetExceeded,
    Conflict,
    LedgerError,
    NotFound,
    QuotaExceeded,
    RunEnded,
    RunNotFound,
)
from ledger.invariants import agent_refusal, quota_available
from ledger.models import QUOTA_LOCK_ORDER, Agent, Budget, Quota, Team
from ledger.money import money_round, usage_cost
from ledger.periods import month_bounds
from ledger.reference_cache import price_table
from ledger.services import quotas_open

MAX_BATCH_ITEMS = 1000
# Item keys share the caller's key space with the Idempotency-Key header, under their own prefix.
ITEM_KEY_PREFIX = "item:"
MAX_ITEM_KEY_LENGTH = MAX_KEY_LENGTH - len(ITEM_KEY_PREFIX)
# Deciding again is needed when the batch repeats a stored key (the first attempt does not read them) or a
# concurrent batch stored one of its keys meanwhile; each attempt knows more stored keys than the one
# before, so a few always suffice in practice.
MAX_ATTEMPTS = 6
# The first attempts decide on an unlocked read and lock only to confirm; the later ones lock first, so a
# batch on quotas that keep moving under it still finishes.
OPTIMISTIC_ATTEMPTS = 3


class BatchItem(NamedTuple):
    """One item as the API read it. ``error`` is set when it was invalid: it is refused with that error,
    unless its idempotency key was used before (then it is answered as a use of that key). A named tuple,
    not a dataclass: a batch makes a thousand, and a frozen dataclass costs several times more to make."""

    agent_id: str
    resource_type_id: str = ""
    amount: int = 0
    task_id: str = ""
    run_id: str = ""
    metadata: Mapping = MappingProxyType({})  # never changed: shared by every item without metadata
    idempotency_key: str = ""
    fingerprint: str = ""  # of the item as sent, to tell a retry from another item under the same key
    error: LedgerError | None = None


@dataclass(frozen=True)
class BatchOutcome:
    results: list[dict]
    summary: dict[str, int]
    agent_ids: list[str]


def allocations_batch_create(
    *,
    items: Sequence[BatchItem],
    principal: str,
    path: str,
    agent: Agent | None = None,
    now: dt.datetime | None = None,
) -> BatchOutcome:
    """Commit each item that fits, in order, and answer every item with its own result.

    ``agent`` is the agent of every item when the batch comes from an agent's route (already resolved);
    without it each item names its agent and an unknown one refuses that item. ``principal`` and ``path``
    scope the items' idempotency keys. One transaction, a fixed number of queries.
    """
    now = now or timezone.now()
    period_start, period_end = month_bounds(now)
    prices = {
        code: price_table.unit_price(code, now)
        for code in {item.resource_type_id for item in items if item.error is None}
    }
    keys = sorted({item.idempotency_key for item in items if item.idempotency_key})
    # No savepoint of its own: an error rolls back the caller's transaction with everything in it.
    with transaction.atomic(savepoint=False):
        agents = _agents_read(items, agent)
        pairs = {
            (item.agent_id, item.resource_type_id)
            for item in items
            if item.error is None
            and item.agent_id in agents
            and agent_refusal(agent_id=item.agent_id, status=agents[item.agent_id].status, reason="") is None
            and prices[item.resource_type_id] is not None
        }
        # The first attempt decides on this read; only periods it did not find are opened (and read again).
        first_read = _quotas_read(pairs, period_start=period_start, lock=False)
        if first_read.keys() != pairs:
            tiers = {agent_id: row.tier_id for agent_id, row in agents.items()}
            quotas_open(pairs - first_read.keys(), tiers=tiers, at=now)
            first_read = None
        _constraints_immediate()
        # The first attempt takes its keys to be unused, as they are unless the batch is a retry: storing
        # them says whether one was not (``_KeyTaken``), and the next attempts read the stored ones first.
        keys_fresh = True
        for attempt in range(MAX_ATTEMPTS):
            optimistic = attempt < OPTIMISTIC_ATTEMPTS
            try:
                with transaction.atomic():
                    # Budget rows before quota rows: the lock order of every writer (ledger.budgets).
                    budgets = _budgets_read(items, agents, pairs, now=now, lock=not optimistic)
                    quotas = (
                        first_read
                        if attempt == 0 and optimistic and first_read is not None
                        else _quotas_read(pairs, period_start=period_start, lock=not optimistic)
                    )
                    stored = {} if keys_fresh else _results_read(keys, principal=principal)
                    decider = _Decider(
                        agents=agents, prices=prices, quotas=quotas, budgets=budgets, stored=stored, now=now
                    )
                    results = decider.decide_all(items)
                    if keys_fresh and decider.keyed_refused:
                        raise _KeyTaken  # a refused key may be a stored one: decide again, knowing them
                    batch_rows_write(decider.rows, at=now, period_start=period_start)
                    _budgets_charge(decider, now=now)
                    if optimistic:
                        _quotas_confirm(decider)
                    _quotas_update(decider, now=now)
                    _results_store(decider, principal=principal, path=path, now=now)
                break
            except _KeyTaken:
                keys_fresh = False
            except (_QuotaMoved, _BudgetMoved):
                continue
        else:
            raise Conflict(
                "other requests kept storing this batch's idempotency keys; try again",
                code="idempotency_in_progress",
            )
    _outcomes_count(decider)
    return BatchOutcome(
        results=results,
        summary={
            "accepted": decider.accepted,
            "refused": len(items) - decider.accepted - decider.replayed,
            "replayed": decider.replayed,
        },
        agent_ids=sorted({item.agent_id for item in items if item.agent_id}),
    )


def _outcomes_count(decider: _Decider) -> None:
    """Count the items decided against the ledger, as single allocations are counted: accepted ones and
    refused ones by reason (not replays, nor items refused as invalid before any decision)."""
    accepted = Counter(decider.rows.resource_type_ids)
    units: Counter[str] = Counter()
    for resource_type, amount in zip(decider.rows.resource_type_ids, decider.rows.amounts, strict=True):
        units[resource_type] += amount
    for resource_type, count in accepted.items():
        allocation_count(resource_type=resource_type, held=False, amount=units[resource_type], count=count)
    for (resource_type, reason), count in decider.refused.items():
        refusal_count(resource_type=resource_type, reason=reason, count=count)


class _KeyTaken(Exception):
    """A concurrent batch stored one of this batch's keys after it read them: decide again."""


class _QuotaMoved(Exception):
    """Since the unlocked read, a quota this batch takes from no longer has what it takes: decide again."""


class _BudgetMoved(Exception):
    """Since the unlocked read, a hard budget this batch charges no longer has room for it: decide again."""


def _constraints_immediate() -> None:
    """Check the foreign keys of the rows written from here on as each statement ends, not at commit: the
    checks then run before the quota rows are locked, not while they are held."""
    with connection.cursor() as cursor:
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")


# --- Reading and locking ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _AgentRow:
    status: str
    reason: str
    tier_id: str
    team_id: str | None  # whose budgets apply to the agent's items too
    organization_id: str | None


def _agents_read(items: Sequence[BatchItem], agent: Agent | None) -> dict[str, _AgentRow]:
    """Each item's agent, with its team and organization, in one query (for an agent's own route, one for
    its team's organization, if it is in a team)."""
    if agent is not None:
        organization_id = (
            Team.objects.filter(pk=agent.team_id).values_list("organization_id", flat=True).first()
            if agent.team_id
            else None
        )
        return {
            agent.pk: _AgentRow(
                agent.status, agent.status_reason, agent.tier_id, agent.team_id, organization_id
            )
        }
    ids = {item.agent_id for item in items if item.error is None}
    if not ids:
        return {}
    with server_bound_cursor() as cursor:
        cursor.execute(_AGENTS_SQL, [text_array(sorted(ids))])
        rows = cursor.fetchall()
    return {agent_id: _AgentRow(*values) for agent_id, *values in rows}


# The batch's reads of many rows by key: SQL over one array per key column (``text_array``), not the ORM,
# whose IN lists cost a Python call or two per value to build (a batch spans up to a thousand agents).
_AGENTS_SQL = f"""SELECT a.id, a.status, a.status_reason, a.tier_id, a.team_id, t.organization_id
FROM {Agent._meta.db_table} AS a LEFT JOIN {Team._meta.db_table} AS t ON t.id = a.team_id
WHERE a.id = ANY(%s::text[])"""
_QUOTA_COLUMNS = "q.id, q.agent_id, q.resource_type_id, q.limit_amount, q.used, q.reserved, q.listed"
_QUOTA_LOCK = (
    "ORDER BY " + ", ".join(f"q.{column}" for column in QUOTA_LOCK_ORDER) + " FOR NO KEY UPDATE OF q"
)
_QUOTAS_OF_PAIRS_SQL = f"""SELECT {_QUOTA_COLUMNS}
FROM unnest(%s::text[], %s::text[]) AS pair (agent_id, resource_type_id)
JOIN {Quota._meta.db_table} AS q
    ON q.agent_id = pair.agent_id AND q.resource_type_id = pair.resource_type_id AND q.period_start = %s"""
_QUOTAS_BY_ID_LOCKED_SQL = f"""SELECT {_QUOTA_COLUMNS} FROM {Quota._meta.db_table} AS q
WHERE q.id = ANY(%s::bigint[]) {_QUOTA_LOCK}"""


@dataclass
class _QuotaState:
    id: int
    available: int  # ``quota_available``, as the items decided so far left it
    taken: int = 0
    cost: Decimal = Decimal(0)


def _quotas_read(
    pairs: set[tuple[str, str]], *, period_start: dt.datetime, lock: bool
) -> dict[tuple[str, str], _QuotaState]:
    """The quota rows of ``pairs``: as last committed (``lock=False``), or locked in ``QUOTA_LOCK_ORDER``."""
    if not pairs:
        return {}
    agent_ids, resource_type_ids = zip(*sorted(pairs), strict=True)
    with server_bound_cursor() as cursor:
        cursor.execute(
            _QUOTAS_OF_PAIRS_SQL + (f" {_QUOTA_LOCK}" if lock else ""),
            [text_array(list(agent_ids)), text_array(list(resource_type_ids)), period_start],
        )
        rows = cursor.fetchall()
    return {
        (agent_id, resource_type_id): _QuotaState(
            id=pk, available=quota_available(limit=limit, used=used, reserved=reserved, listed=listed)
        )
        for pk, agent_id, resource_type_id, limit, used, reserved, listed in rows
    }


def _quotas_confirm(decider: _Decider) -> None:
    """Lock the quota rows the batch takes from, in ``QUOTA_LOCK_ORDER``, and check that each still has what
    the batch takes; raise ``_QuotaMoved`` if one does not.

    Deciding on an unlocked read and confirming here keeps the rows locked for the few statements that
    follow instead of for the whole batch. When every quota still has what the batch takes, the results are
    those of the batch running at the moment of its read: the allocations committed since then fit after
    it too (they took at most what is left now), and units freed since then it simply did not see.
    """
    taken = {quota.id: quota.taken for quota in decider.quotas.values() if quota.taken}
    if not taken:
        return
    with server_bound_cursor() as cursor:
        cursor.execute(_QUOTAS_BY_ID_LOCKED_SQL, [int_array(sorted(taken))])
        rows = cursor.fetchall()
    for pk, _, _, limit, used, reserved, listed in rows:
        if quota_available(limit=limit, used=used, reserved=reserved, listed=listed) < taken[pk]:
            raise _QuotaMoved


# --- Budgets ----------------------------------------------------------------------------------------------


@dataclass
class _BudgetState:
    """A budget as the batch read it (its window rolled to ``now`` if that has ended), and what the items
    decided so far charge it."""

    budget: Budget
    figures: BudgetFigures
    charged: Decimal = Decimal(0)

    @property
    def refuses(self) -> bool:
        return self.budget.mode == Budget.Mode.HARD

    @property
    def remaining(self) -> Decimal:
        return self.figures.remaining_usd - self.charged

    def refusal(self, cost: Decimal) -> BudgetExceeded:
        """What ``grid_budgets_apply`` reports for this budget, as the items before left it."""
        return budget_exceeded(self.budget, self.figures, requested=cost, also_spent=self.charged)


class _Budgets:
    """The budgets that apply to the batch's items, and which apply to which item."""

    def __init__(self, rows: Sequence[Budget], agents: dict[str, _AgentRow], *, now: dt.datetime):
        self.agents = agents
        self.now = now
        self.states = {budget.pk: _BudgetState(budget, budget_figures(budget, now=now)) for budget in rows}
        self.runs: dict[tuple[str, str], Budget] = {}
        self.by_scope: dict[tuple[str, str], list[int]] = {}
        for budget in rows:
            if budget.scope == Budget.Scope.RUN:
                self.runs[(budget.agent_id, budget.run_id)] = budget
            else:
                self.by_scope.setdefault((budget.scope, budget.scope_id), []).append(budget.pk)
        self._applying: dict[tuple[str, str], list[_BudgetState]] = {}

    def run_refusal(self, agent_id: str, run_id: str) -> LedgerError | None:
        """A run the item names must exist and not have ended (``grid_agent_budgets`` says the same)."""
        run = self.runs.get((agent_id, run_id))
        if run is None:
            return RunNotFound(run_id)
        if run.expires_at <= self.now:
            return RunEnded(run_id)
        return None

    def applying(self, agent_id: str, run_id: str) -> list[_BudgetState]:
        """The budgets an item of the agent naming ``run_id`` is charged to, in id order (the order
        ``grid_budgets_apply`` checks them in, so the first that refuses is the one a single call names)."""
        found = self._applying.get((agent_id, run_id))
        if found is None:
            agent = self.agents[agent_id]
            ids = list(self.by_scope.get((Budget.Scope.AGENT, agent_id), ()))
            if agent.team_id:
                ids += self.by_scope.get((Budget.Scope.TEAM, agent.team_id), ())
            if agent.organization_id:
                ids += self.by_scope.get((Budget.Scope.ORGANIZATION, agent.organization_id), ())
            if run_id:
                ids.append(self.runs[(agent_id, run_id)].pk)
            found = self._applying[(agent_id, run_id)] = [self.states[pk] for pk in sorted(ids)]
        return found


def _budgets_read(
    items: Sequence[BatchItem],
    agents: dict[str, _AgentRow],
    pairs: set[tuple[str, str]],
    *,
    now: dt.datetime,
    lock: bool,
) -> _Budgets:
    """Every budget of the agents that may take something, their teams and organizations, and the runs the
    items name: one query, as last committed (``lock=False``) or locked in id order."""
    agent_ids = {agent_id for agent_id, _ in pairs}
    if not agent_ids:
        return _Budgets([], agents, now=now)
    team_ids = {agents[agent_id].team_id for agent_id in agent_ids} - {None}
    organization_ids = {agents[agent_id].organization_id for agent_id in agent_ids} - {None}
    runs = sorted(
        {
            (item.agent_id, item.run_id)
            for item in items
            if item.error is None and item.run_id and item.agent_id in agent_ids
        }
    )
    params = [
        Budget.Scope.AGENT,
        text_array(sorted(agent_ids)),
        Budget.Scope.TEAM,
        text_array(sorted(team_ids)),
        Budget.Scope.ORGANIZATION,
        text_array(sorted(organization_ids)),
        text_array([agent_id for agent_id, _ in runs]),
        text_array([run_id for _, run_id in runs]),
        Budget.Scope.RUN,
    ]
    return _Budgets(list(Budget.objects.raw(_BUDGETS_SQL[lock], params)), agents, now=now)


# Each scope's budgets through its own index, then the rows in id order (and locked so, when asked).
_BUDGETS_SQL = {
    lock: f"""SELECT * FROM {Budget._meta.db_table} WHERE id IN (
    SELECT id FROM {Budget._meta.db_table} WHERE scope = %s AND agent_id = ANY(%s::text[])
    UNION ALL SELECT id FROM {Budget._meta.db_table} WHERE scope = %s AND team_id = ANY(%s::text[])
    UNION ALL SELECT id FROM {Budget._meta.db_table} WHERE scope = %s AND organization_id = ANY(%s::text[])
    UNION ALL SELECT b.id FROM {Budget._meta.db_table} AS b
        JOIN unnest(%s::text[], %s::text[]) AS r (agent_id, run_id)
        ON b.agent_id = r.agent_id AND b.run_id = r.run_id WHERE b.scope = %s
) ORDER BY id{" FOR NO KEY UPDATE" if lock else ""}"""
    for lock in (False, True)
}


def _budgets_charge(decider: _Decider, *, now: dt.datetime) -> None:
    """Lock the budget rows the batch charges, in id order, confirm that each hard one still has room for
    what the batch charges it (else raise ``_BudgetMoved``), and charge them; remember the hard budgets that
    refused an item (``ledger.budgets.budget_mark_refused``, for their "resolved" alert). A fixed number of
    statements: the lock, one UPDATE of the charges, one of the refusals.

    The rows are written from what was read under the lock: an ended window opens the one containing
    ``now`` with its rollover (``budget_figures``, the rolled view ``grid_budgets_apply`` also writes). The
    budgets that refused are locked with the charged ones, in the same statement: a row locked later, out
    of id order or after the quota rows, could deadlock with a single allocation.
    """
    charged = {pk: state.charged for pk, state in decider.budgets.states.items() if state.charged}
    refusing = decider.budgets_refusing
    if not charged and not refusing:
        return
    locked = (
        Budget.objects.select_for_update(no_key=True)
        .filter(pk__in=sorted(charged.keys() | refusing))
        .order_by("pk")
    )
    pks, figures = [], []
    for budget in locked:
        if budget.pk not in charged:
            continue
        current = budget_figures(budget, now=now)
        if budget.mode == Budget.Mode.HARD and current.remaining_usd < charged[budget.pk]:
            raise _BudgetMoved
        pks.append(budget.pk)
        figures.append(current)
    bulk_update_columns(
        model=Budget,
        pks=pks,
        columns={
            "window_start": [current.window_start for current in figures],
            "window_end": [current.window_end for current in figures],
            "rollover_usd": [current.rollover_usd for current in figures],
            "spent_usd": [current.spent_usd + charged[pk] for pk, current in zip(pks, figures, strict=True)],
        },
        touch=now,
    )
    if refusing:
        Budget.objects.filter(pk__in=sorted(refusing), refused_at=None).update(refused_at=now)


# --- Idempotency keys -------------------------------------------------------------------------------------


class _StoredResult(NamedTuple):
    fingerprint: str
    status: int | None
    body: dict | None


def _results_read(keys: list[str], *, principal: str) -> dict[str, _StoredResult]:
    if not keys:
        return {}
    wanted = [ITEM_KEY_PREFIX + key for key in keys]
    # One probe of the caller's key index per key, whatever the planner knows of the table: the LIMIT
    # keeps the lateral subquery from being merged into a join. Joined as a set (``IN``, ``= ANY``), a
    # table without statistics (before its first ANALYZE) was read through every record of the principal:
    # an operator's batch read all of the day's records, more with each batch.
    scope, scope_params = key_scope(principal).sql()
    with server_bound_cursor() as cursor:
        cursor.execute(
            "SELECT r.key, r.request_hash, r.response_status, r.response_body "
            "FROM unnest(%s::text[]) AS wanted(key) CROSS JOIN LATERAL ("
            f"SELECT * FROM {connection.ops.quote_name(IdempotencyRecord._meta.db_table)} "
            f"WHERE {scope} AND key = wanted.key LIMIT 1) AS r",
            [text_array(wanted), *scope_params],
        )
        rows = cursor.fetchall()
    stored = {
        key.removeprefix(ITEM_KEY_PREFIX): _StoredResult(
            request_hash, status, json.loads(body) if isinstance(body, str) else body
        )
        for key, request_hash, status, body in rows
    }
    return _bodies_expand(stored)


def _bodies_expand(stored: dict[str, _StoredResult]) -> dict[str, _StoredResult]:
    """Stored results that name their allocation (``{"allocation_id": ...}``, see ``_results_store``) with
    the body they answered, read back from the allocations: one query, only when there are such results.
    A committed allocation never changes, so the body is what the item was answered the first time."""
    compact = {key: result for key, result in stored.items() if set(result.body or ()) == {"allocation_id"}}
    if not compact:
        return stored
    allocations = Allocation.objects.in_bulk([result.body["allocation_id"] for result in compact.values()])
    for key, result in compact.items():
        allocation = allocations.get(uuid.UUID(result.body["allocation_id"]))
        body = {"allocation": allocation_body(allocation)} if allocation is not None else result.body
        stored[key] = _StoredResult(result.fingerprint, result.status, body)
    return stored


def _results_store(decider: _Decider, *, principal: str, path: str, now: dt.datetime) -> None:
    """Keep each accepted item's result under its key, in one statement; raise ``_KeyTaken`` if another
    request stored one of the keys meanwhile (the unique index says so).

    The allocation's id only, not the body: the body is the allocation row, read back on a replay
    (``_bodies_expand``), and 1,000 bodies were a third of what a batch wrote."""
    if not decider.owned:
        return
    keys = sorted(decider.owned)  # sorted: batches storing the same keys wait in one order
    owned = decider.owned
    try:
        batch_item_records_write(
            principal=principal,
            agent_id=principal_agent_id(principal),
            path=path,
            keys=[ITEM_KEY_PREFIX + key for key in keys],
            fingerprints=[owned[key].fingerprint for key in keys],
            allocation_ids=[owned[key].body["allocation"]["id"] for key in keys],
            at=now,
        )
    except IntegrityError as exc:
        if getattr(getattr(exc.__cause__, "diag", None), "constraint_name", None) in IDEMPOTENCY_UNIQUE:
            raise _KeyTaken from exc
        raise


# --- Deciding ---------------------------------------------------------------------------------------------


_ITEM_ERROR = operator.attrgetter("error")
_ITEM_RUN = operator.attrgetter("run_id")
_ITEM_KEY = operator.attrgetter("idempotency_key")
_ITEM_AGENT = operator.attrgetter("agent_id")
_ITEM_RESOURCE_TYPE = operator.attrgetter("resource_type_id")
_ITEM_AMOUNT = operator.attrgetter("amount")
_ITEM_TASK = operator.attrgetter("task_id")


class _Decider:
    """Decides the items in order against the quotas and budgets as read and collects the rows to write.

    Everything an item needs that is the same for many items (its agent's refusal, its price, its cost for
    that amount, the budgets of its agent and run) is worked out once and looked up after: a batch is
    usually a few agents and one or two amounts, a thousand times."""

    def __init__(
        self,
        *,
        agents: dict[str, _AgentRow],
        prices: dict[str, Decimal | None],
        quotas: dict[tuple[str, str], _QuotaState],
        budgets: _Budgets,
        stored: dict[str, _StoredResult],
        now: dt.datetime,
    ):
        self.agents = agents
        self.prices = prices
        self.price_texts = {code: f"{money_round(price):f}" for code, price in prices.items() if price}
        self.quotas = quotas
        self.budgets = budgets
        self.stored = stored
        self.created_at = iso_datetime(now)
        self.owned: dict[str, _StoredResult] = {}  # keys whose result this batch stores
        self.rows = BatchRows([], [], [], [], [], [], [], [], [], [], [], [])
        self.ids = _uuid7_texts()
        self.budgets_refusing: set[int] = set()  # hard budgets that refused an item
        self.refused: Counter[tuple[str, str]] = Counter()  # (resource type, reason) of refusals decided
        self.accepted = 0
        self.replayed = 0
        self.keyed_refused = 0  # items with a key that were not accepted
        self._agent_refusals: dict[str, LedgerError | None] = {}
        self._costs: dict[tuple[str, int], tuple[Decimal, str]] = {}
        self._applying: dict[tuple[str, str], tuple[list[_BudgetState], str]] = {}

    def decide_all(self, items: Sequence[BatchItem]) -> list[dict]:
        """Every item's result, in order."""
        results = self._all_fit(items)
        if results is None:
            decide = self.decide
            results = [decide(index, item) for index, item in enumerate(items)]
        return results

    def _all_fit(self, items: Sequence[BatchItem]) -> list[dict] | None:
        """The results when every item is accepted, else None (then each is decided in turn).

        Every item is accepted when none is invalid, names a run or repeats a key (its own batch's or a
        stored one), every agent may allocate and every price is in effect, and each quota and each hard
        budget has room for all that the batch takes from it: the items are then decided against more than
        they take, item after item, in any order. Worked out per agent, resource type and amount, not per
        item, and the rows and answers are built column by column."""
        if self.stored or any(map(_ITEM_ERROR, items)) or any(map(_ITEM_RUN, items)):
            return None
        keys = list(map(_ITEM_KEY, items))
        given = [key for key in keys if key]
        if len(set(given)) != len(given):
            return None
        agent_ids = list(map(_ITEM_AGENT, items))
        resource_type_ids = list(map(_ITEM_RESOURCE_TYPE, items))
        amounts = list(map(_ITEM_AMOUNT, items))
        counts = Counter(zip(agent_ids, resource_type_ids, amounts, strict=True))
        if any(self._agent_refusal(agent_id) for agent_id in set(agent_ids)):
            return None
        if any(self.prices[code] is None for code in set(resource_type_ids)):
            return None
        taken: Counter[tuple[str, str]] = Counter()
        charged: Counter[str] = Counter()  # by agent
        for (agent_id, resource_type_id, amount), count in counts.items():
            taken[(agent_id, resource_type_id)] += amount * count
            charged[agent_id] += self._cost(resource_type_id, amount)[0] * count
        if any(self.quotas[pair].available < total for pair, total in taken.items()):
            return None
        by_budget: dict[int, Decimal] = {}
        for agent_id, cost in charged.items():
            for budget in self._budgets_of(agent_id, "")[0]:
                by_budget[budget.budget.pk] = by_budget.get(budget.budget.pk, Decimal(0)) + cost
        states = self.budgets.states
        if any(
            states[pk].refuses and states[pk].remaining < cost for pk, cost in by_budget.items() if cost > 0
        ):
            return None
        for (agent_id, resource_type_id, amount), count in counts.items():
            quota = self.quotas[(agent_id, resource_type_id)]
            quota.available -= amount * count
            quota.taken += amount * count
            quota.cost += self._cost(resource_type_id, amount)[0] * count
        for pk, cost in by_budget.items():
            states[pk].charged += cost
        count = len(items)
        costs = self._costs
        quota_ids = {pair: quota.id for pair, quota in self.quotas.items()}
        budget_ids = {agent_id: self._budgets_of(agent_id, "")[1] for agent_id in charged}
        rows = self.rows
        rows.ids[:] = ids = list(itertools.islice(self.ids, count))
        rows.agent_ids[:] = agent_ids
        rows.resource_type_ids[:] = resource_type_ids
        rows.quota_ids[:] = [quota_ids[pair] for pair in zip(agent_ids, resource_type_ids, strict=True)]
        rows.amounts[:] = amounts
        rows.unit_prices[:] = unit_prices = [self.price_texts[code] for code in resource_type_ids]
        rows.costs[:] = cost_texts = [costs[pair][1] for pair in zip(resource_type_ids, amounts, strict=True)]
        rows.task_ids[:] = task_ids = list(map(_ITEM_TASK, items))
        rows.run_ids[:] = [""] * count
        rows.budget_ids[:] = [budget_ids[agent_id] for agent_id in agent_ids]
        rows.keys[:] = keys
        rows.metadata[:] = [_json_object_text(item.metadata) if item.metadata else "{}" for item in items]
        self.accepted = count
        created_at = self.created_at
        results = [
            {
                "index": index,
                "status": 201,
                "allocation": {  # AllocationOut's shape
                    "id": allocation_id,
                    "agent_id": agent_id,
                    "resource_type": resource_type_id,
                    "allocated_amount": amount,
                    "cost_usd": cost_text,
                    "unit_price_usd": unit_price,
                    "status": "committed",
                    "task_id": task_id,
                    "run_id": "",
                    "expires_at": None,
                    "settled_amount": None,
                    "created_at": created_at,
                    "finished_at": None,
                    "lease": False,
                },
            }
            for index, (
                allocation_id,
                agent_id,
                resource_type_id,
                amount,
                cost_text,
                unit_price,
                task_id,
            ) in enumerate(
                zip(
                    ids, agent_ids, resource_type_ids, amounts, cost_texts, unit_prices, task_ids, strict=True
                )
            )
        ]
        self.owned = {
            key: _StoredResult(item.fingerprint, 201, {"allocation": result["allocation"]})
            for key, item, result in zip(keys, items, results, strict=True)
            if key
        }
        return results

    def decide(self, index: int, item: BatchItem) -> dict:
        key = item.idempotency_key
        if key:
            earlier = self.owned.get(key) or self.stored.get(key)
            if earlier is not None:
                return self._replay(index, item, earlier)
        refusal = item.error or self._refusal(item)
        if refusal is None:
            return self._accept(index, item)
        if key:
            self.keyed_refused += 1
        if item.error is None:
            self.refused[(item.resource_type_id, refusal.code)] += 1
        return _refused(index, refusal)

    def _replay(self, index: int, item: BatchItem, earlier: _StoredResult) -> dict:
        if earlier.fingerprint != item.fingerprint:
            return _refused(
                index,
                LedgerError(
                    "this idempotency_key was used with a different item",
                    code="idempotency_key_reused",
                    status=422,
                ),
            )
        if earlier.status is None:  # a request-level Idempotency-Key spelt "item:..." still running
            return _refused(
                index,
                Conflict(
                    "a request with this idempotency_key is still running", code="idempotency_in_progress"
                ),
            )
        self.replayed += 1
        return {"index": index, "status": earlier.status, **earlier.body, "replayed": True}

    def _cost(self, resource_type_id: str, amount: int) -> tuple[Decimal, str]:
        found = self._costs.get((resource_type_id, amount))
        if found is None:
            cost = usage_cost(amount, self.prices[resource_type_id])
            found = self._costs[(resource_type_id, amount)] = (cost, f"{cost:f}")
        return found

    def _budgets_of(self, agent_id: str, run_id: str) -> tuple[list[_BudgetState], str]:
        """The budgets an item of the agent naming ``run_id`` is charged to, and their ids as a PostgreSQL
        array literal (the allocation's ``budget_ids``)."""
        found = self._applying.get((agent_id, run_id))
        if found is None:
            budgets = self.budgets.applying(agent_id, run_id)
            found = (budgets, "{" + ",".join(str(b.budget.pk) for b in budgets) + "}")
            self._applying[(agent_id, run_id)] = found
        return found

    def _agent_refusal(self, agent_id: str) -> LedgerError | None:
        if agent_id in self._agent_refusals:
            return self._agent_refusals[agent_id]
        agent = self.agents.get(agent_id)
        if agent is None:
            refusal = NotFound(f"agent {agent_id!r} not found")
        else:
            refusal = agent_refusal(agent_id=agent_id, status=agent.status, reason=agent.reason)
        self._agent_refusals[agent_id] = refusal
        return refusal

    def _refusal(self, item: BatchItem) -> LedgerError | None:
        refusal = self._agent_refusal(item.agent_id)
        if refusal is not None:
            return refusal
        if self.prices[item.resource_type_id] is None:
            return LedgerError(f"{item.resource_type_id} has no price in effect", code="no_price", status=409)
        # The order of a single allocation's checks: the run it names, its budgets, then its quota.
        if item.run_id:
            refusal = self.budgets.run_refusal(item.agent_id, item.run_id)
            if refusal is not None:
                return refusal
        cost = self._cost(item.resource_type_id, item.amount)[0]
        if cost > 0:
            for budget in self._budgets_of(item.agent_id, item.run_id)[0]:
                if budget.refuses and budget.remaining < cost:
                    self.budgets_refusing.add(budget.budget.pk)
                    return budget.refusal(cost)
        available = self.quotas[(item.agent_id, item.resource_type_id)].available
        if item.amount > available:
            available = max(available, 0)
            return QuotaExceeded(
                f"{item.amount:,} {item.resource_type_id} requested, {available:,} available",
                details={
                    "resource_type": item.resource_type_id,
                    "requested": item.amount,
                    "available": available,
                },
            )
        return None

    def _accept(self, index: int, item: BatchItem) -> dict:
        agent_id, resource_type_id, amount = item.agent_id, item.resource_type_id, item.amount
        quota = self.quotas[(agent_id, resource_type_id)]
        cost, cost_text = self._cost(resource_type_id, amount)
        quota.available -= amount
        quota.taken += amount
        quota.cost += cost
        budgets, budget_ids = self._budgets_of(agent_id, item.run_id)
        for budget in budgets:
            budget.charged += cost
        allocation_id = next(self.ids)
        unit_price = self.price_texts[resource_type_id]
        rows = self.rows
        rows.ids.append(allocation_id)
        rows.agent_ids.append(agent_id)
        rows.resource_type_ids.append(resource_type_id)
        rows.quota_ids.append(quota.id)
        rows.amounts.append(amount)
        rows.unit_prices.append(unit_price)
        rows.costs.append(cost_text)
        rows.task_ids.append(item.task_id)
        rows.run_ids.append(item.run_id)
        rows.budget_ids.append(budget_ids)
        rows.keys.append(item.idempotency_key)
        rows.metadata.append(_json_object_text(item.metadata))
        self.accepted += 1
        body = {
            "allocation": {  # AllocationOut's shape
                "id": allocation_id,
                "agent_id": agent_id,
                "resource_type": resource_type_id,
                "allocated_amount": amount,
                "cost_usd": cost_text,
                "unit_price_usd": unit_price,
                "status": "committed",
                "task_id": item.task_id,
                "run_id": item.run_id,
                "expires_at": None,
                "settled_amount": None,
                "created_at": self.created_at,
                "finished_at": None,
                "lease": False,
            }
        }
        if item.idempotency_key:
            self.owned[item.idempotency_key] = _StoredResult(item.fingerprint, 201, body)
        return {"index": index, "status": 201, **body}


_JSON_OBJECT = msgspec.json.Encoder()


def _json_object_text(metadata: Mapping) -> str:
    """An item's metadata as JSON text (``{}`` without any). msgspec: exact for integers of any size."""
    return _JSON_OBJECT.encode(dict(metadata)).decode() if metadata else "{}"


# Version 7 UUIDs (``ledger.ids.uuid7``), a thousand at a time: the random bits of all of them from one
# call, the version and variant bits set in C (``bytes.translate`` over every 16th byte).
_VERSION_BITS = bytes((byte & 0x0F) | 0x70 for byte in range(256))
_VARIANT_BITS = bytes((byte & 0x3F) | 0x80 for byte in range(256))
_UUID_CHUNK = 256


def _uuid7_texts() -> Iterator[str]:
    """An endless supply of version 7 UUIDs as text, drawn in chunks; the Unix milliseconds of each chunk
    are those of its drawing, so the ids of a batch still sort by time of making, like ``uuid7``'s."""
    while True:
        count = _UUID_CHUNK
        milliseconds = (time.time_ns() // 1_000_000) & ((1 << 48) - 1)
        raw = bytearray(os.urandom(16 * count))
        stamp = milliseconds.to_bytes(6, "big")
        for position in range(6):
            raw[position::16] = stamp[position : position + 1] * count
        raw[6::16] = bytes(raw[6::16]).translate(_VERSION_BITS)
        raw[8::16] = bytes(raw[8::16]).translate(_VARIANT_BITS)
        text = raw.hex()
        for start in range(0, 32 * count, 32):
            part = text[start : start + 32]
            yield f"{part[:8]}-{part[8:12]}-{part[12:16]}-{part[16:20]}-{part[20:]}"


def _refused(index: int, error: LedgerError) -> dict:
    return {
        "index": index,
        "status": error.status,
        "error": {"code": error.code, "message": error.message, "details": error.details},
    }


# --- Writing ----------------------------------------------------------------------------------------------


def _quotas_update(decider: _Decider, *, now: dt.datetime) -> None:
    """Add what the accepted items take, and their cost, to their quotas' counters: one statement."""
    taken = [quota for quota in decider.quotas.values() if quota.taken]
    bulk_update_columns(
        model=Quota,
        pks=[quota.id for quota in taken],
        columns={"used": [quota.taken for quota in taken], "spent_usd": [quota.cost for quota in taken]},
        add=True,
        touch=now,
    )


__all__ = ["MAX_BATCH_ITEMS", "MAX_ITEM_KEY_LENGTH", "BatchItem", "BatchOutcome", "allocations_batch_create"]

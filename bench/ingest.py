"""Scenario 2's floor: the operators' usage batch against a bare DRF view that does the least the same
items need (``bench.baseline.BaselineBatchView``: parse the JSON, one set-based statement that takes the
quota and writes the usage rows into the ledger's own tables).

Both sides get bodies of the same shape (1,000 items over 64 agents, a fresh key per item; the floor's over
agents of its own, so that its rows are never counted as the grid's) from the same number of clients, in
alternating rounds, so that whatever else the shared machine does meanwhile falls on both alike. The floor
runs on its own gunicorn with the grid server's worker configuration, started here. The ratio of the items
each side accepts per second is judged, the median of the rounds.
"""

from __future__ import annotations

import json
import re
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from bench.loadgen import LoadResult, python_load
from bench.report import Report, log, per_second
from bench.server import CpuMeter, GunicornServer

RESOURCE_TYPE = "AI_TOKENS"
BATCH_ITEMS = 1000
FLOOR_RATIO_TARGET = 0.5
_KEY_MARK = "@batch@"
_SUMMARY = {name: re.compile(rb'"%s"\s*:\s*(\d+)' % name.encode()) for name in ("accepted", "refused")}


@dataclass(frozen=True)
class Rounds:
    count: int
    seconds: float
    connections: int


def floor_agents_create(count: int, *, limit: int) -> list[str]:
    """The floor's own agents (``floor-000``...), with the current period's quota rows open: the floor
    writes into the ledger's tables, and its rows must not be counted as the grid's."""
    from django.utils import timezone

    from ledger.models import Agent
    from ledger.services import agent_create, quotas_open

    agent_ids = [f"floor-{index:03d}" for index in range(count)]
    existing = set(Agent.objects.filter(pk__in=agent_ids).values_list("pk", flat=True))
    for agent_id in agent_ids:
        if agent_id not in existing:
            agent_create(agent_id=agent_id, tier_code="CUSTOM", custom_limits={RESOURCE_TYPE: limit})
    tiers = dict(Agent.objects.filter(pk__in=agent_ids).values_list("pk", "tier_id"))
    quotas_open({(agent_id, RESOURCE_TYPE) for agent_id in agent_ids}, tiers=tiers, at=timezone.now())
    return agent_ids


def body_template(agent_ids: list[str], batch: int) -> str:
    """A 1,000-item body of the operators' route, its keys to be completed by ``body``."""
    items = [
        {
            "agent_id": agent_ids[(batch + i) % len(agent_ids)],
            "resource_type": RESOURCE_TYPE,
            "amount": 1,
            "idempotency_key": f"{_KEY_MARK}-{i}",
        }
        for i in range(BATCH_ITEMS)
    ]
    return json.dumps({"items": items})


def body(template: str, prefix: str) -> bytes:
    """The body with fresh keys: ``{prefix}-{item}``. A replace, not a new JSON document: the load
    generator shares the machine and must not spend it building bodies."""
    return template.replace(_KEY_MARK, prefix).encode()


@dataclass
class _Side:
    name: str
    server: GunicornServer
    path: str
    token: str | None
    results: list[tuple[LoadResult, int, int]]  # (load, items accepted, items refused) by round
    meters: list[CpuMeter] = field(default_factory=list)


def _load(side: _Side, templates: list[str], run: str, rounds: Rounds) -> tuple[LoadResult, int, int]:
    counted = {"accepted": 0, "refused": 0}
    headers = {"Content-Type": "application/json"}
    if side.token:
        headers["Authorization"] = f"Bearer {side.token}"

    def make(index: int):
        return "POST", side.path, headers, body(templates[index % len(templates)], f"{run}-{index}")

    def count(status: int, response_body: bytes) -> None:
        if 200 <= status < 300:
            for name, pattern in _SUMMARY.items():
                match = pattern.search(response_body[-400:])
                counted[name] += int(match.group(1)) if match else 0

    result = python_load(
        port=side.server.port,
        make_request=make,
        connections=rounds.connections,
        max_requests=1_000_000,
        seconds=rounds.seconds,
        on_response=count,
    )
    return result, counted["accepted"], counted["refused"]


def floor_ratio(
    report: Report,
    *,
    scenario: str,
    server: GunicornServer,
    grid_path: str,
    operator_key: str,
    agent_ids: list[str],
    limit: int,
    rounds: Rounds,
    run: str,
) -> None:
    """Alternating rounds of the floor and the grid's usage batch; report both sides' items/s and judge the
    ratio grid / floor."""
    floor_agent_ids = floor_agents_create(len(agent_ids), limit=limit)
    templates = {
        "grid": [body_template(agent_ids, batch) for batch in range(len(agent_ids))],
        "floor": [body_template(floor_agent_ids, batch) for batch in range(len(floor_agent_ids))],
    }
    with (
        tempfile.TemporaryDirectory(prefix="axiom-bench-floor-") as workdir,
        GunicornServer(
            application="bench.baseline_wsgi:application",
            workers=server.workers,
            worker_class=server.worker_class,
            threads=server.threads,
            log_path=Path(workdir) / "gunicorn-floor.log",
        ) as floor_server,
    ):
        from django.db import connection
        from django.test.utils import override_settings
        from django.urls import reverse

        database = connection.settings_dict["NAME"]

        with override_settings(ROOT_URLCONF="bench.baseline_urls"):
            floor_path = reverse("bench-baseline-batch", urlconf="bench.baseline_urls")
        sides = [
            _Side("floor", floor_server, floor_path, None, []),
            _Side("grid", server, grid_path, operator_key, []),
        ]
        for side in sides:  # warm-up: the workers' first requests load their caches
            warm = _load(
                side, templates[side.name], f"{run}-warm-{side.name}", Rounds(1, 1.0, rounds.connections)
            )
            if warm[1] == 0:
                raise RuntimeError(f"{side.name} batch warm-up accepted nothing: {dict(warm[0].statuses)}")
        for number in range(1, rounds.count + 1):
            for side in sides:
                log(f"scenario 2: round {number}/{rounds.count}, {side.name} usage batches")
                with CpuMeter(server=side.server, database_name=database) as meter:
                    side.results.append(
                        _load(side, templates[side.name], f"{run}-{number}-{side.name}", rounds)
                    )
                side.meters.append(meter)
    rates = {side.name: [accepted / load.elapsed for load, accepted, _ in side.results] for side in sides}
    for side in sides:
        loads = [load for load, _, _ in side.results]
        errors = sum(load.errors(ok=tuple(range(200, 300))) for load in loads)
        refused = sum(refused for _, _, refused in side.results)
        report.add(
            scenario,
            f"items/s {side.name} by round ({rounds.connections} conn, {rounds.seconds:.0f} s each)",
            " / ".join(per_second(rate) for rate in rates[side.name])
            + f"; failed batches {errors}, refused items {refused}",
        )
        report.add(
            scenario,
            f"server CPU per batch, {side.name}, by round",
            " / ".join(
                meter.per_request(load.requests)
                for (load, _, _), meter in zip(side.results, side.meters, strict=True)
            ),
        )
    ratios = [grid / floor for grid, floor in zip(rates["grid"], rates["floor"], strict=True) if floor]
    if not ratios:
        report.add(
            scenario, "RATIO items/s grid / floor", "no ratio: the floor accepted nothing", "-", "FAIL"
        )
        return
    ratio = statistics.median(ratios)
    grid, floor = statistics.median(rates["grid"]), statistics.median(rates["floor"])
    by_round = " / ".join(f"{value:.2f}" for value in ratios)
    report.check(
        scenario,
        "RATIO items/s grid / floor (bare DRF view, one set-based statement), median of rounds",
        f"{ratio:.2f}x ({grid:,.0f}/s / {floor:,.0f}/s; rounds {by_round})",
        f">= {FLOOR_RATIO_TARGET:.2f}x",
        ratio >= FLOOR_RATIO_TARGET,
    )

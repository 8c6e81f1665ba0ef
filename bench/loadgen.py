"""Load generators of the bench: wrk with ``bench/alloc.lua`` when it is installed, and a small asyncio
HTTP/1.1 client over raw sockets that needs nothing installed.

Both only ever talk to 127.0.0.1, and every run is bounded twice: by a number of requests and by seconds.
The Python client stops taking new requests at either bound and lets the ones in flight finish, so its
status counts are exact (the hot-agent scenario compares them with the database). wrk abandons what is in
flight when it stops, so its counts are exact for throughput and latency only.

The Python client competes with the server for the same two cores; wrk uses far less CPU per request.
docs/benchmarks.md says which one produced each figure.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"  # loopback only, whatever the caller asks
LUA_SCRIPT = Path(__file__).with_name("alloc.lua")
REQUEST_TIMEOUT_SECONDS = 30.0

# index -> (method, path, headers, body)
RequestMaker = Callable[[int], tuple[str, str, dict[str, str], bytes]]
# (status, body) of every response, for callers that read what came back
ResponseHook = Callable[[int, bytes], None]


@dataclass
class LoadResult:
    tool: str
    connections: int
    requests: int  # responses received
    elapsed: float
    statuses: Counter = field(default_factory=Counter)
    socket_errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    bodies: list[bytes] = field(default_factory=list)
    # wrk times its whole -d even when the request bound stopped its threads earlier, so its rate is only
    # a lower bound then; callers size the request bound so that the time bound is the one that binds.
    request_bound_hit: bool = False

    @property
    def rps(self) -> float:
        return self.requests / self.elapsed if self.elapsed > 0 else 0.0

    def count(self, status: int) -> int:
        return self.statuses.get(status, 0)

    def errors(self, ok: tuple[int, ...] = (200, 201)) -> int:
        """Socket errors, timeouts and every response whose status is not in ``ok``."""
        return self.socket_errors + sum(n for status, n in self.statuses.items() if status not in ok)

    def finish_percentiles(self) -> None:
        if self.latencies_ms:
            self.p50_ms = percentile(self.latencies_ms, 50)
            self.p95_ms = percentile(self.latencies_ms, 95)
            self.p99_ms = percentile(self.latencies_ms, 99)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (what wrk and most load tools report)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


# --- The asyncio client ---------------------------------------------------------------------------------


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    version, status_text = lines[0].split(" ", 2)[:2]
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(chunks)
    else:
        body = await reader.read()
        return int(status_text), body, False
    keep_alive = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
    return int(status_text), body, keep_alive


async def _client_run(
    *,
    port: int,
    make_request: RequestMaker,
    connections: int,
    max_requests: int,
    seconds: float,
    keep_bodies: int,
    on_response: ResponseHook | None,
    rate: float | None,
    until: Callable[[], bool] | None,
) -> LoadResult:
    result = LoadResult(tool="python", connections=connections, requests=0, elapsed=0.0)
    next_index = 0
    started = time.perf_counter()
    deadline = started + seconds

    def claim() -> int | None:
        nonlocal next_index
        if next_index >= max_requests or time.perf_counter() >= deadline or (until and until()):
            return None
        next_index += 1
        return next_index - 1

    async def worker() -> None:
        reader = writer = None
        while (index := claim()) is not None:
            if rate:
                # Request ``index`` is due at ``index / rate`` seconds: a steady arrival rate, whatever the
                # server's latency, as long as the connections keep up.
                await asyncio.sleep(max(0.0, started + index / rate - time.perf_counter()))
            method, path, headers, body = make_request(index)
            lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}:{port}", f"Content-Length: {len(body)}"]
            lines += [f"{name}: {value}" for name, value in headers.items()]
            payload = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
            begin = time.perf_counter()
            try:
                if writer is None:
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection(HOST, port), REQUEST_TIMEOUT_SECONDS
                    )
                writer.write(payload)
                await writer.drain()
                status, response_body, keep_alive = await asyncio.wait_for(
                    _read_response(reader), REQUEST_TIMEOUT_SECONDS
                )
            except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError):
                result.socket_errors += 1
                if writer is not None:
                    writer.close()
                reader = writer = None
                continue
            result.latencies_ms.append((time.perf_counter() - begin) * 1000)
            result.requests += 1
            result.statuses[status] += 1
            if len(result.bodies) < keep_bodies:
                result.bodies.append(response_body)
            if on_response is not None:
                on_response(status, response_body)
            if not keep_alive:
                writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(connections)))
    result.elapsed = time.perf_counter() - started
    result.finish_percentiles()
    return result


def python_load(
    *,
    port: int,
    make_request: RequestMaker,
    connections: int,
    max_requests: int,
    seconds: float,
    keep_bodies: int = 0,
    on_response: ResponseHook | None = None,
    rate: float | None = None,
    until: Callable[[], bool] | None = None,
) -> LoadResult:
    """Run ``connections`` concurrent keep-alive clients until ``max_requests`` or ``seconds``, or until
    ``until()`` is true. With ``rate``, requests start at that many per second at most (else as fast as
    the connections go)."""
    coroutine = _client_run(
        port=port,
        make_request=make_request,
        connections=connections,
        max_requests=max_requests,
        seconds=seconds,
        keep_bodies=keep_bodies,
        on_response=on_response,
        rate=rate,
        until=until,
    )
    # A hard cap above the soft one: requests in flight get REQUEST_TIMEOUT_SECONDS to finish.
    return asyncio.run(asyncio.wait_for(coroutine, seconds + 2 * REQUEST_TIMEOUT_SECONDS))


# --- wrk ------------------------------------------------------------------------------------------------


def wrk_load(
    *,
    port: int,
    targets: list[tuple[str, str | None]],
    body: str,
    connections: int,
    max_requests: int,
    seconds: float,
    idempotency: bool,
    run_id: str,
) -> LoadResult:
    """wrk with bench/alloc.lua: POST ``body`` to ``targets`` (path, bearer token or None), round-robin."""
    threads = max(1, min(2, connections))
    with tempfile.NamedTemporaryFile("w", suffix=".targets", delete=False) as handle:
        for path, token in targets:
            handle.write(f"{path} {token or '-'}\n")
        targets_file = handle.name
    env = {
        **os.environ,
        "BENCH_TARGETS": targets_file,
        "BENCH_BODY": body,
        "BENCH_IDEMPOTENCY": "1" if idempotency else "0",
        "BENCH_RUN_ID": run_id,
        "BENCH_MAX_REQUESTS_PER_THREAD": str(math.ceil(max_requests / threads)),
    }
    command = [
        "wrk",
        "-t",
        str(threads),
        "-c",
        str(connections),
        "-d",
        f"{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(LUA_SCRIPT),
        f"http://{HOST}:{port}/",
    ]
    try:
        completed = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=seconds + 60, check=False
        )
    finally:
        os.unlink(targets_file)
    line = next((ln for ln in completed.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if completed.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({completed.returncode}): {completed.stderr.strip()[-500:]}")
    data = json.loads(line.removeprefix("BENCH_JSON "))
    statuses = Counter(
        {
            201: data["status_201"],
            200: data["status_2xx"],  # any other 2xx, counted as success
            409: data["status_409"],
            429: data["status_429"],
            400: data["status_4xx"],  # any other 4xx
            500: data["status_5xx"],
            0: data["status_other"],
        }
    )
    statuses = +statuses  # drop the zero counts
    return LoadResult(
        tool="wrk",
        connections=connections,
        requests=data["requests"],
        elapsed=data["duration_us"] / 1e6,
        statuses=statuses,
        socket_errors=data["connect_errors"] + data["read_errors"] + data["write_errors"] + data["timeouts"],
        p50_ms=data["p50_us"] / 1000,
        p95_ms=data["p95_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        request_bound_hit=data["requests"] >= threads * math.ceil(max_requests / threads),
    )

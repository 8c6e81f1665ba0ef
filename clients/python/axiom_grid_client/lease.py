"""Leases: exact limits without a network call per check.

An agent that checks thousands of times a second cannot ask the grid each time. A lease takes a hold of
``amount`` units once (``POST /api/v1/agents/{id}/leases``); ``take(n)`` then answers on the client, under a
lock, from what the hold still has: ``True`` (and counts ``n``) while it has ``n``, else ``False``. It never
grants more than the hold, so the agent's quota and budgets are never exceeded. ``renew()`` opens a fresh
hold and settles the old one with what was taken from it; ``close()`` (or leaving the ``with`` block)
settles exactly what was taken and gives the rest back.

On the server a lease is a hold of its own kind: if its client never comes back, the grid cannot know what
was used, so when a lease expires it is charged in full (a plain hold is released). A client that closes or
renews before the expiry settles the truth. Close leases you are done with, and keep ``ttl`` to what the
work needs.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from .errors import Conflict, HoldNotOpen
from .models import Allocation

if TYPE_CHECKING:
    import datetime as dt

    from .async_client import AsyncGrid
    from .client import Grid


class LeaseExpired(HoldNotOpen):
    """The lease expired before its client settled it: the grid charged its whole amount."""


class _Counter:
    """The local count of one lease, shared by its threads. ``take`` is the hot path: one lock, two
    integer operations."""

    __slots__ = ("_lock", "_limit", "_taken")

    def __init__(self, limit: int) -> None:
        self._lock = threading.Lock()
        self._limit = limit
        self._taken = 0

    def take(self, n: int = 1) -> bool:
        if n < 1:
            raise ValueError("take(n) needs a whole number n >= 1")
        with self._lock:
            taken = self._taken + n
            if taken > self._limit:
                return False
            self._taken = taken
            return True

    def swap(self, limit: int) -> int:
        """Start counting against a new hold of ``limit``; what was taken from the old one."""
        with self._lock:
            taken, self._taken, self._limit = self._taken, 0, limit
            return taken

    @property
    def taken(self) -> int:
        return self._taken

    @property
    def remaining(self) -> int:
        return max(self._limit - self._taken, 0)


def _lease_body(resource_type: str, amount: int, ttl: int | None, options: dict[str, Any]) -> dict:
    body: dict[str, Any] = {"resource_type": resource_type, "amount": amount}
    if ttl is not None:
        body["ttl_seconds"] = ttl
    for name in ("task_id", "run_id"):
        if options.get(name) is not None:
            body[name] = options[name]
    unknown = set(options) - {"task_id", "run_id"}
    if unknown:
        raise TypeError(f"unknown lease option(s): {', '.join(sorted(unknown))}")
    return body


def _settle_path(agent_id: str, allocation: Allocation, taken: int) -> tuple[str, dict]:
    base = f"/api/v1/agents/{agent_id}/allocations/{allocation.id}"
    if taken:
        return f"{base}/settle", {"amount": taken}
    return f"{base}/release", {}


def _expired(error: Conflict, allocation: Allocation, taken: int) -> Conflict:
    """The error to raise when settling a lease is refused: ``LeaseExpired`` when it had expired."""
    if (error.details or {}).get("status") != "expired":
        return error
    return LeaseExpired(
        code=error.code,
        message=f"lease {allocation.id} expired before it was settled: the grid charged all "
        f"{allocation.allocated_amount:,} units ({taken:,} were taken)",
        details={**(error.details or {}), "allocation_id": allocation.id, "taken": taken},
        status=error.status,
    )


class _LeaseBase:
    def __init__(
        self,
        *,
        agent_id: str,
        resource_type: str,
        allocation: Allocation,
        ttl: int | None,
        options: dict[str, Any],
    ) -> None:
        self.agent_id = agent_id
        self.resource_type = resource_type
        self.allocation = allocation
        self.amount = allocation.allocated_amount
        self.ttl = ttl
        self._options = options
        self._counter = _Counter(allocation.allocated_amount)
        self._settled = 0  # taken from holds already settled by renew()
        self._closed: Allocation | None = None
        self._turn = threading.Lock()  # renew and close, one at a time
        # Bound once: ``lease.take`` is then a plain function call, the cheapest Python offers.
        self.take = self._counter.take

    def take(self, n: int = 1) -> bool:  # replaced per instance in __init__; documents the signature
        """Count ``n`` units as used if the lease still has them (``True``), else ``False``. Local,
        thread-safe, never beyond the hold."""
        return self._counter.take(n)

    @property
    def taken(self) -> int:
        """Units taken over the lease's life, across renewals."""
        return self._settled + self._counter.taken

    @property
    def remaining(self) -> int:
        """Units the current hold still has."""
        return self._counter.remaining

    @property
    def expires_at(self) -> dt.datetime | None:
        return self.allocation.expires_at

    @property
    def closed(self) -> bool:
        return self._closed is not None

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.remaining:,} of {self.amount:,} left"
        return f"<Lease {self.allocation.id} {self.agent_id} {self.resource_type}: {state}>"


class Lease(_LeaseBase):
    """A lease of a ``Grid`` (``grid.lease(...)``). Use it as a context manager, or call ``close()``."""

    def __init__(self, grid: Grid, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._grid = grid

    @classmethod
    def open(
        cls, grid: Grid, agent_id: str, resource_type: str, amount: int, *, ttl: int | None = None, **options
    ) -> Lease:
        body = _lease_body(resource_type, amount, ttl, options)
        allocation = Allocation.from_dict(
            grid.request("POST", f"/api/v1/agents/{agent_id}/leases", json=body)
        )
        return cls(
            grid,
            agent_id=agent_id,
            resource_type=resource_type,
            allocation=allocation,
            ttl=ttl,
            options=options,
        )

    def renew(self, amount: int | None = None, *, ttl: int | None = None) -> Lease:
        """Top the lease up: hold ``amount`` (by default the lease's amount) afresh, then settle the old hold
        with what was taken from it. Takes go on meanwhile; a refused new hold leaves the lease as it was."""
        with self._turn:
            if self.closed:
                raise RuntimeError("the lease is closed")
            amount = self.amount if amount is None else amount
            ttl = self.ttl if ttl is None else ttl
            body = _lease_body(self.resource_type, amount, ttl, self._options)
            fresh = Allocation.from_dict(
                self._grid.request("POST", f"/api/v1/agents/{self.agent_id}/leases", json=body)
            )
            old = self.allocation
            taken = self._counter.swap(fresh.allocated_amount)
            self.allocation, self.amount, self.ttl = fresh, fresh.allocated_amount, ttl
            self._settled += taken
            self._finish(old, taken)
            return self

    def close(self) -> Allocation:
        """Settle what was taken and give the rest back. Later takes answer ``False``; closing again
        answers the same allocation."""
        with self._turn:
            if self._closed is None:
                taken = self._counter.swap(0)
                self._settled += taken
                self._closed = self._finish(self.allocation, taken)
            return self._closed

    def _finish(self, allocation: Allocation, taken: int) -> Allocation:
        path, body = _settle_path(self.agent_id, allocation, taken)
        try:
            return Allocation.from_dict(self._grid.request("POST", path, json=body))
        except Conflict as error:
            raise _expired(error, allocation, taken) from error

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncLease(_LeaseBase):
    """A lease of an ``AsyncGrid`` (``await grid.lease(...)``): ``take`` is the same local call; opening,
    ``renew`` and ``close`` are awaited. Use it with ``async with``."""

    def __init__(self, grid: AsyncGrid, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._grid = grid

    @classmethod
    async def open(
        cls,
        grid: AsyncGrid,
        agent_id: str,
        resource_type: str,
        amount: int,
        *,
        ttl: int | None = None,
        **options,
    ) -> AsyncLease:
        body = _lease_body(resource_type, amount, ttl, options)
        data = await grid.request("POST", f"/api/v1/agents/{agent_id}/leases", json=body)
        allocation = Allocation.from_dict(data)
        return cls(
            grid,
            agent_id=agent_id,
            resource_type=resource_type,
            allocation=allocation,
            ttl=ttl,
            options=options,
        )

    async def renew(self, amount: int | None = None, *, ttl: int | None = None) -> AsyncLease:
        if self.closed:
            raise RuntimeError("the lease is closed")
        amount = self.amount if amount is None else amount
        ttl = self.ttl if ttl is None else ttl
        body = _lease_body(self.resource_type, amount, ttl, self._options)
        fresh = Allocation.from_dict(
            await self._grid.request("POST", f"/api/v1/agents/{self.agent_id}/leases", json=body)
        )
        old = self.allocation
        taken = self._counter.swap(fresh.allocated_amount)
        self.allocation, self.amount, self.ttl = fresh, fresh.allocated_amount, ttl
        self._settled += taken
        await self._finish(old, taken)
        return self

    async def close(self) -> Allocation:
        if self._closed is None:
            taken = self._counter.swap(0)
            self._settled += taken
            self._closed = await self._finish(self.allocation, taken)
        return self._closed

    async def _finish(self, allocation: Allocation, taken: int) -> Allocation:
        path, body = _settle_path(self.agent_id, allocation, taken)
        try:
            return Allocation.from_dict(await self._grid.request("POST", path, json=body))
        except Conflict as error:
            raise _expired(error, allocation, taken) from error

    async def __aenter__(self) -> AsyncLease:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

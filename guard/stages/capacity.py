"""Certification capacity of one process, shared fairly between clients.

A certification costs ``rows × (n0 + n)`` model evaluations: a client asking for
certificates on every query can take every worker thread and every sample the
process can draw. :class:`Capacity` admits a certification only when both the
stage's totals (``max_concurrent``, ``max_samples_per_second``) and the client's
share of them (``client_max_concurrent``, ``client_samples_per_second``) allow
it, and charges its samples to both.

The shares are kept in this process's memory, not in the state store: what they
protect is this process's CPU (its worker threads and its model copy), so a
replica's shares are its own, and a round trip to Redis per certification would
buy nothing. Client buckets are bounded: past ``max_clients`` the least recently
seen is forgotten (its bucket refills in at most one second anyway).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import OrderedDict
from collections.abc import Callable

MAX_CLIENTS = 10_000


class SampleBudget:
    """Token bucket of noisy samples: refills at ``rate`` per second up to one second's worth.

    A certification is admitted while the bucket is not in debt and then spends
    its whole cost, so one large request is never starved; over any window the
    samples admitted stay below ``rate`` per second plus one request's cost.
    """

    def __init__(self, rate: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.clock = clock
        self.tokens = rate
        self.updated = clock()

    def admits(self) -> bool:
        """Whether a certification may spend now (the bucket is not in debt)."""
        now = self.clock()
        self.tokens = min(self.rate, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        return self.tokens >= 0

    def spend(self, cost: int) -> None:
        self.tokens -= cost

    def try_spend(self, cost: int) -> bool:
        if not self.admits():
            return False
        self.spend(cost)
        return True


class Capacity:
    """Admission of certifications: the stage's totals and each client's share of them.

    ``None`` rates are unlimited. Every method runs on the event loop only, so
    a check and the spend that follows it are one atomic step.
    """

    def __init__(
        self,
        *,
        max_concurrent: int,
        samples_per_second: float | None,
        client_max_concurrent: int,
        client_samples_per_second: float | None,
        clock: Callable[[], float] = time.monotonic,
        max_clients: int = MAX_CLIENTS,
    ) -> None:
        self.max_concurrent = max_concurrent
        self.client_max_concurrent = client_max_concurrent
        self.client_rate = client_samples_per_second
        self.clock = clock
        self.max_clients = max_clients
        self.budget = SampleBudget(samples_per_second, clock=clock) if samples_per_second else None
        self.running = 0
        self._running: dict[str, int] = {}  # client -> certifications running
        self._buckets: OrderedDict[str, SampleBudget] = OrderedDict()
        self._freed: asyncio.Event | None = None  # set when a certification ends

    def refusal(self, client: str) -> str | None:
        """Why a certification for ``client`` would be refused now (None: it would start);
        spends nothing."""
        if self.running >= self.max_concurrent:
            return f"{self.running} certifications running"
        mine = self._running.get(client, 0)
        if mine >= self.client_max_concurrent:
            return f"{mine} certifications of this client running"
        bucket = self._bucket(client)
        if bucket is not None and not bucket.admits():
            return "this client's sample share spent"
        if self.budget is not None and not self.budget.admits():
            return "sample budget spent"
        return None

    async def acquire(self, client: str, cost: int, wait: float = 0.0) -> str | None:
        """:meth:`try_acquire`, waiting up to ``wait`` seconds for a slot to free or the
        buckets to refill. A waiting request costs a sleeping coroutine, not a worker: a
        client sending more than its share waits its turn instead of retrying at once."""
        deadline = self.clock() + wait
        while True:
            refusal = self.try_acquire(client, cost)
            left = deadline - self.clock()
            if refusal is None or left <= 0:
                return refusal
            if self._freed is None:
                self._freed = asyncio.Event()
            freed = self._freed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(freed.wait(), min(left, self._refill_time(client)))

    def try_acquire(self, client: str, cost: int) -> str | None:
        """Start a certification of ``cost`` samples for ``client``, charging both budgets
        and taking a slot (give it back with :meth:`release`); or say why not."""
        refusal = self.refusal(client)
        if refusal is not None:
            return refusal
        bucket = self._bucket(client)
        if bucket is not None:
            bucket.spend(cost)
        if self.budget is not None:
            self.budget.spend(cost)
        self.running += 1
        self._running[client] = self._running.get(client, 0) + 1
        return None

    def release(self, client: str) -> None:
        self.running -= 1
        if self._freed is not None:  # wake the waiters: one of them may start now
            self._freed.set()
            self._freed = None
        left = self._running.get(client, 0) - 1
        if left > 0:
            self._running[client] = left
        else:
            self._running.pop(client, None)

    def refund(self, client: str, samples: int) -> None:
        """Give back ``samples`` charged but not drawn (a sequential certification that
        stopped early): the client's bucket and the stage's, each up to its size."""
        for bucket in (self._buckets.get(client), self.budget):
            if bucket is not None and samples > 0:
                bucket.tokens = min(bucket.rate, bucket.tokens + samples)

    def _refill_time(self, client: str) -> float:
        """Seconds until the buckets ``client`` draws on are out of debt; infinite when
        none is (the wait is for a slot)."""
        buckets = (self._buckets.get(client), self.budget)
        debts = [-b.tokens / b.rate for b in buckets if b is not None and b.tokens < 0]
        return max(debts) + 0.001 if debts else math.inf

    def _bucket(self, client: str) -> SampleBudget | None:
        if self.client_rate is None:
            return None
        bucket = self._buckets.get(client)
        if bucket is None:
            bucket = self._buckets[client] = SampleBudget(self.client_rate, clock=self.clock)
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(client)
        return bucket

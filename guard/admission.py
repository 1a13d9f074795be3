"""What one client may take of the guard: requests at once, and bytes to decode.

A request holds a slot of its client from its headers to its answer. Past
``limits.max_in_flight_per_client`` slots the client is answered 429 at once,
before its body is read, so a client that opens a thousand connections and
sends no body (or sends it a byte at a time) holds its own slots, never
everyone's. The guard-wide ``max_in_flight`` counts only requests whose body has
arrived: a stalled sender does not use it.

Decoding is the costliest thing a client can make the guard do per byte (an
8 MiB JSON body takes a tenth of a second and more). Every body a client sends,
accepted or refused, is paid from the client's token bucket of
``limits.parse_bytes_per_second``; a client past it is answered 429 with
``Retry-After`` before its body is decoded. The buckets are per process and
bounded (least recently seen clients are forgotten first): this is protection
for the process, not a quota (the ``budget`` stage is the quota).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from guard.errors import RateLimited

__all__ = ["ClientSlots", "DecodeMeter"]

MAX_METERED_CLIENTS = 65_536


class ClientSlots:
    """Requests in progress per client, each client up to a limit."""

    def __init__(self) -> None:
        self._held: dict[str, int] = {}

    @contextmanager
    def hold(self, client: str, limit: int) -> Iterator[None]:
        held = self._held.get(client, 0)
        if held >= limit:
            raise RateLimited(
                f"this client has {held} requests in progress, the most it may have at once",
                retry_after=1.0,
            )
        self._held[client] = held + 1
        try:
            yield
        finally:
            left = self._held[client] - 1
            if left:
                self._held[client] = left
            else:
                del self._held[client]


class DecodeMeter:
    """A token bucket of body bytes per client: ``rate`` a second, holding ``burst``."""

    def __init__(
        self,
        *,
        max_clients: int = MAX_METERED_CLIENTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_clients = max_clients
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, time

    def spend(self, client: str, nbytes: int, *, rate: float, burst: float) -> None:
        """Take ``nbytes`` from the client's bucket, which may go into debt; raise
        :class:`RateLimited` when the bucket is already empty."""
        now = self.clock()
        tokens, then = self._buckets.pop(client, (burst, now))
        tokens = min(burst, tokens + (now - then) * rate)
        if tokens <= 0:
            self._buckets[client] = (tokens, now)
            raise RateLimited(
                "this client sent more bytes than the guard decodes for one client per second",
                retry_after=-tokens / rate,
            )
        # A body larger than what is left is still decoded, once: the debt delays the next.
        self._buckets[client] = (tokens - nbytes, now)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)

    def debit(self, client: str, nbytes: int) -> None:
        """Take ``nbytes`` more without refusing (bytes learnt of only once read)."""
        if nbytes > 0 and client in self._buckets:
            tokens, then = self._buckets[client]
            self._buckets[client] = (tokens - nbytes, then)

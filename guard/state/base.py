"""The state store protocol: the few primitives detectors and budgets share.

Every operation is atomic on its own (a Lua script or a single command in
Redis, one uninterrupted step of the event loop in memory) and works in integer
units: counters and budgets never go through floats.

Keys name their client in a hash tag, ``{alice}:budget:digits:60``
(:func:`client_key`), so one client's keys share a Redis Cluster slot and the
memory store can evict clients least recently used as a whole. A fingerprint
table is tagged by its own name instead: it is shared by every client.

A backend failure raises :class:`~guard.errors.StateUnavailable`; the stage that
called applies its ``on_error`` (closed: 503, open: serve and flag).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "LOG_START_BITS",
    "FingerprintMatch",
    "StateStore",
    "client_key",
    "hash_tag",
    "together",
]

# An offset log's random start (``append_log``): below 2**44, offsets stay exact in the
# doubles of Redis's Lua however much is appended in a log's lifetime.
LOG_START_BITS = 44


@dataclass(frozen=True, slots=True)
class FingerprintMatch:
    """How one fingerprint compares with the earlier ones still in its table.

    ``matches`` counts earlier queries (live: inserted less than ``ttl_s`` ago)
    sharing more than ``threshold`` hashes with it, ``client_matches`` those of
    them sent by the same client, and ``best`` is the most hashes it shares with
    any earlier query still indexed (0 for none). ``repeat``: the query's exact
    digest is already in the table (live), so it was neither compared nor
    inserted and every count is 0: an exact repeat carries no new information.
    """

    matches: int
    client_matches: int
    best: int
    repeat: bool = False


@runtime_checkable
class StateStore(Protocol):
    """Shared, bounded, expiring state. Implementations: memory, Redis, and the memory
    of a ``--workers`` master's state process (:mod:`guard.state.local`)."""

    backend: str  # "memory" or "redis": the metric label
    shared: bool  # True when several guard processes see the same state
    # True when every process that sees it was forked by one master after the master drew
    # its per-process secrets (blacklight's key), so they hash alike without a configured key
    same_master: bool

    async def incr(self, key: str, amount: int, window_s: float) -> tuple[int, float]:
        """Add ``amount`` to a fixed-window counter.

        The window opens at the first increment and lasts ``window_s``; returns
        the count after the increment and the seconds until the window resets.
        """
        ...

    async def spend(
        self, key: str, amount: int, limit: int, window_s: float | None
    ) -> tuple[bool, int]:
        """Spend ``amount`` from a budget of ``limit``, all or nothing.

        If ``used + amount <= limit`` adds it and returns ``(True, used_after)``;
        otherwise leaves it and returns ``(False, used)``. ``window_s`` ``None``:
        the budget never resets; else it resets ``window_s`` after its first spend.
        """
        ...

    async def mark(self, key: str, ttl_s: float) -> None:
        """Set a flag that expires after ``ttl_s`` (setting it again renews it)."""
        ...

    async def marked(self, key: str) -> bool:
        """Whether the flag is set and not expired."""
        ...

    async def push(self, key: str, items: Sequence[bytes], cap: int, ttl_s: float) -> int:
        """Append ``items`` to a history keeping its newest ``cap``; return its length.

        The history expires ``ttl_s`` after its last push.
        """
        ...

    async def items(self, key: str) -> list[bytes]:
        """A history's items, oldest first (empty when absent or expired)."""
        ...

    async def match_fingerprints(
        self,
        table: str,
        client: str,
        fingerprints: Sequence[Sequence[int]],
        *,
        threshold: int,
        max_queries: int,
        ttl_s: float,
        max_per_hash: int,
        digests: Sequence[bytes] | None = None,
        max_per_client: int | None = None,
    ) -> list[FingerprintMatch]:
        """Compare each fingerprint (distinct 64-bit hashes) with the table, then insert it.

        In order, so a later fingerprint of the batch is compared with the
        earlier ones. ``digests`` (one per fingerprint, at most 32 bytes): the
        keyed digest of each query's exact bytes; a query whose digest is in the
        table and live is an exact repeat (see :class:`FingerprintMatch`).

        Bounds, so that no client can evict another's history: each client
        keeps at most ``max_per_client`` queries (default ``max_queries``; past
        it, the client's own oldest goes); the table keeps at most
        ``max_queries`` (past it, the oldest query of the client holding the
        most goes); each query lives ``ttl_s``; each hash indexes at most its
        newest ``max_per_hash`` queries (a hash in very many queries says
        little, and would cost every lookup).
        """
        ...

    async def close(self) -> None:
        """Release connections; idempotent."""
        ...

    async def append_bytes(self, key: str, data: bytes, max_bytes: int, ttl_s: float) -> int:
        """Append ``data`` to a byte log keeping at least its newest ``max_bytes``; return
        its length.

        Once the log holds a quarter more than ``max_bytes`` its front is trimmed to them
        (a trim copies the log, so it happens once per many appends): a reader keeps the
        newest records it needs. One value, read whole by :meth:`read_bytes`: a history of
        many small fixed-size records costs one round trip and one reply instead of one
        reply item per record. The log expires ``ttl_s`` after its last append.
        """
        ...

    async def read_bytes(self, key: str) -> bytes:
        """A byte log's content (empty when absent or expired)."""
        ...

    async def append_log(
        self, key: str, data: bytes, max_bytes: int, ttl_s: float, since: int | None
    ) -> tuple[int, bytes]:
        """Append ``data`` to an *offset log* and return what the caller has not seen of it.

        An offset log is a byte log (kept, trimmed and expired as by :meth:`append_bytes`)
        whose bytes have offsets: every byte ever appended has one, counted from a random
        start drawn when the log is created (again after it expired), so offsets of two
        lifetimes of one key practically never meet. Returns ``(end, tail)``: ``end`` the
        offset just past the log's last byte, ``tail`` the kept bytes from offset ``since``
        to ``end`` (``data`` last), or every kept byte when ``since`` is None or not in
        the log (trimmed away, from an expired lifetime, or never). ``end - len(tail) ==
        since`` tells the caller its copy of the log up to ``since`` is still the log's
        front: :class:`~guard.state.views.LogViews` keeps such copies decoded, so that a
        request costs one round trip and the records it adds, not the whole history.
        ``data`` empty reads the tail. The caller appends whole records and keeps
        ``max_bytes`` a multiple of their size, so the log always starts on a record.
        """
        ...


async def together(store: StateStore, *operations: Awaitable[Any]) -> list[Any]:
    """The results of ``operations`` on ``store``, in order: gathered (their round trips
    overlap) when the store is remote, awaited in turn when it is this process's memory,
    whose operations never wait (a task per operation would cost more than the operation).
    """
    if store.shared:
        return list(await asyncio.gather(*operations))
    return [await operation for operation in operations]


@functools.lru_cache(maxsize=4096)
@functools.lru_cache(maxsize=4096)  # a request asks for a few keys of one client
def hash_tag(name: str) -> str:
    """``name`` as a Redis hash tag, escaped so that distinct names give distinct tags."""
    escaped = name.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")
    return "{" + escaped + "}"


def client_key(client: str, *parts: str) -> str:
    """A key of ``client``'s own state: ``{client}:part:part``."""
    return ":".join((hash_tag(client), *parts))

"""The in-process state store: the default, for a single guard process.

Bounded: clients (the hash tag of a key, see :func:`guard.state.base.client_key`)
are evicted least recently used as a whole once there are more than
``max_clients`` of them or their histories hold more than ``max_bytes``;
histories keep their newest ``cap`` items; everything expires. Eviction forgets:
an evicted client's counters, budgets and histories start again from zero, so
budgets that must never reset belong in Redis (with a ``noeviction`` policy).

Every operation completes without awaiting, so each is atomic on the event loop.
"""

from __future__ import annotations

import heapq
import random
import time
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from guard import _native
from guard.state.base import LOG_START_BITS, FingerprintMatch

__all__ = ["MemoryStore"]

_GLOBAL = ""  # the bucket of keys without a hash tag: never evicted
_ENTRY_BYTES = 64  # rough overhead of one key, for the byte bound
# Queries evicted for age per insert beyond the ones over capacity: bounded work per call.
EXPIRE_PER_INSERT = 8


@dataclass(slots=True)
class _Entry:
    value: Any  # int (counter, budget), True (mark) or deque[bytes] (history)
    expires: float | None
    nbytes: int = 0


class _Bucket:
    __slots__ = ("entries", "nbytes")

    def __init__(self) -> None:
        self.entries: dict[str, _Entry] = {}
        self.nbytes = 0


@dataclass(slots=True)
class _Query:
    at: float
    client: str
    hashes: array[int]  # uint64: 8 bytes a hash, not a Python int each
    digest: bytes | None  # keyed digest of the query's exact bytes (exact repeats)


@dataclass(slots=True)
class _Table:
    """Earlier fingerprints, an inverted index from hash to the queries holding it
    (:class:`guard._native.PostingIndex`: compiled, its per-hash work never touches a
    Python object), the exact digests, and each client's queries oldest first (its share).

    A full table of 10,000 digits queries holds about 370,000 distinct hashes.
    """

    seq: int = 0
    head: int = 1  # the age sweep's position: queries below it are gone
    used_at: float = 0.0
    queries: dict[int, _Query] = field(default_factory=dict)
    index: Any = field(default_factory=_native.PostingIndex)
    digests: dict[bytes, int] = field(default_factory=dict)
    owners: dict[str, deque[int]] = field(default_factory=dict)
    # (-share, client), lazily updated: the largest holder is on top once stale entries go.
    sizes: list[tuple[int, str]] = field(default_factory=list)

    def add(self, query: _Query, max_per_hash: int) -> None:
        self.seq += 1
        qid = self.seq
        self.queries[qid] = query
        self.index.add(query.hashes, qid, max_per_hash)
        if query.digest is not None:
            self.digests[query.digest] = qid
        owned = self.owners.get(query.client)
        if owned is None:
            owned = self.owners[query.client] = deque()
        owned.append(qid)
        self._resized(query.client, len(owned))

    def _resized(self, client: str, size: int) -> None:
        if size:
            heapq.heappush(self.sizes, (-size, client))
        if len(self.sizes) > 2 * len(self.owners) + 64:  # drop the stale entries
            self.sizes = [(-len(q), c) for c, q in self.owners.items()]
            heapq.heapify(self.sizes)

    def largest(self) -> str | None:
        """The client holding the most queries."""
        while self.sizes:
            size, client = self.sizes[0]
            owned = self.owners.get(client)
            if owned is not None and len(owned) == -size:
                return client
            heapq.heappop(self.sizes)
        return None

    def evict(self, qid: int) -> None:
        """Forget query ``qid``: its postings, its digest, its place in its client's share."""
        query = self.queries.pop(qid, None)
        if query is None:
            return
        self.index.remove(query.hashes, qid)
        if query.digest is not None and self.digests.get(query.digest) == qid:
            del self.digests[query.digest]
        owned = self.owners.get(query.client)
        if owned is not None:
            if owned and owned[0] == qid:
                owned.popleft()
            else:
                owned.remove(qid)
            if owned:
                self._resized(query.client, len(owned))
            else:
                del self.owners[query.client]


class MemoryStore:
    """:class:`~guard.state.base.StateStore` in this process's memory."""

    backend = "memory"
    shared = False
    same_master = True  # one process

    def __init__(
        self,
        *,
        max_clients: int = 10_000,
        max_bytes: int = 64 << 20,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_clients < 1 or max_bytes < 1:
            raise ValueError("max_clients and max_bytes must be positive")
        self.max_clients = max_clients
        self.max_bytes = max_bytes
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._global = _Bucket()
        self._nbytes = 0
        self._tables: dict[str, _Table] = {}

    # -- counters, budgets, marks ------------------------------------------------
    async def incr(self, key: str, amount: int, window_s: float) -> tuple[int, float]:
        now = self._clock()
        entry = self._live(key, now) or self._put(key, 0, now + window_s)
        entry.value += amount
        return entry.value, max(0.0, (entry.expires or now) - now)

    async def spend(
        self, key: str, amount: int, limit: int, window_s: float | None
    ) -> tuple[bool, int]:
        now = self._clock()
        entry = self._live(key, now)
        used: int = 0 if entry is None else entry.value
        if used + amount > limit:
            return False, used
        if entry is None:
            entry = self._put(key, 0, None if window_s is None else now + window_s)
        entry.value = used + amount
        return True, entry.value

    async def mark(self, key: str, ttl_s: float) -> None:
        now = self._clock()
        entry = self._live(key, now) or self._put(key, True, now + ttl_s)
        entry.expires = now + ttl_s

    async def marked(self, key: str) -> bool:
        return self._live(key, self._clock()) is not None

    # -- histories ----------------------------------------------------------------
    async def push(self, key: str, items: Sequence[bytes], cap: int, ttl_s: float) -> int:
        now = self._clock()
        entry = self._live(key, now) or self._put(key, deque(), now)
        history: deque[bytes] = entry.value
        added = 0
        for item in items:
            history.append(bytes(item))
            added += len(item)
        while len(history) > cap:
            added -= len(history.popleft())
        entry.expires = now + ttl_s
        self._grow(key, entry, added)
        return len(history)

    async def items(self, key: str) -> list[bytes]:
        entry = self._live(key, self._clock())
        return [] if entry is None else list(entry.value)

    # -- fingerprints ---------------------------------------------------------------
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
        now = self._clock()
        state = self._tables.get(table)
        if state is None or state.used_at <= now - ttl_s:
            state = self._tables[table] = _Table()  # idle past its ttl: start afresh
        state.used_at = now
        share = max_queries if max_per_client is None else min(max_per_client, max_queries)
        return [
            self._match_one(
                state,
                client,
                array("Q", hashes),
                None if digests is None else bytes(digests[i]),
                now,
                threshold,
                max_queries,
                share,
                ttl_s,
                max_per_hash,
            )
            for i, hashes in enumerate(fingerprints)
        ]

    @staticmethod
    def _match_one(
        state: _Table,
        client: str,
        hashes: array[int],
        digest: bytes | None,
        now: float,
        threshold: int,
        max_queries: int,
        share: int,
        ttl_s: float,
        max_per_hash: int,
    ) -> FingerprintMatch:
        if digest is not None:
            seen = state.digests.get(digest)
            if seen is not None:
                if state.queries[seen].at > now - ttl_s:
                    return FingerprintMatch(0, 0, 0, repeat=True)
                state.evict(seen)
        over, best = state.index.shared(hashes, threshold)
        matches = own = 0
        for qid, _ in over:
            query = state.queries[qid]
            if query.at > now - ttl_s:
                matches += 1
                own += query.client == client
        state.add(_Query(now, client, hashes, digest), max_per_hash)
        owned = state.owners[client]
        while len(owned) > share:
            state.evict(owned[0])
        while len(state.queries) > max_queries:
            largest = state.largest()
            if largest is None:
                break
            state.evict(state.owners[largest][0])
        for _ in range(EXPIRE_PER_INSERT):
            if state.head >= state.seq:
                break
            oldest = state.queries.get(state.head)
            if oldest is not None and oldest.at > now - ttl_s:
                break
            state.evict(state.head)
            state.head += 1
        return FingerprintMatch(matches, own, best)

    async def close(self) -> None:
        self._buckets.clear()
        self._global = _Bucket()
        self._tables.clear()
        self._nbytes = 0

    # -- buckets --------------------------------------------------------------------
    def _bucket(self, key: str, *, create: bool) -> _Bucket | None:
        """The bucket of ``key``'s client, now the most recently used."""
        tag = _tag(key)
        if tag == _GLOBAL:
            return self._global
        bucket = self._buckets.get(tag)
        if bucket is not None:
            self._buckets.move_to_end(tag)
        elif create:
            bucket = self._buckets[tag] = _Bucket()
        return bucket

    def _live(self, key: str, now: float) -> _Entry | None:
        """The entry of ``key`` unless absent or expired (an expired one is dropped)."""
        bucket = self._bucket(key, create=False)
        entry = None if bucket is None else bucket.entries.get(key)
        if bucket is None or entry is None:
            return None
        if entry.expires is not None and entry.expires <= now:
            del bucket.entries[key]
            bucket.nbytes -= entry.nbytes
            if bucket is not self._global:
                self._nbytes -= entry.nbytes
            return None
        return entry

    def _put(self, key: str, value: Any, expires: float | None) -> _Entry:
        entry = _Entry(value, expires)
        self._grow(key, entry, _ENTRY_BYTES + len(key), new=True)
        return entry

    def _grow(self, key: str, entry: _Entry, nbytes: int, *, new: bool = False) -> None:
        """Account ``nbytes`` more to ``entry`` (stored under ``key`` when ``new``), then evict."""
        bucket = self._bucket(key, create=True) or self._global
        if new:
            bucket.entries[key] = entry
        entry.nbytes += nbytes
        bucket.nbytes += nbytes
        if bucket is not self._global:
            self._nbytes += nbytes
            self._evict()

    def _evict(self) -> None:
        """Drop least recently used clients past either bound; the newest one stays."""
        while len(self._buckets) > 1 and (
            len(self._buckets) > self.max_clients or self._nbytes > self.max_bytes
        ):
            _, bucket = self._buckets.popitem(last=False)
            self._nbytes -= bucket.nbytes

    @property
    def clients(self) -> int:
        """Clients with state held."""
        return len(self._buckets)

    @property
    def nbytes(self) -> int:
        """Approximate bytes held by per-client state (fingerprint tables excluded)."""
        return self._nbytes

    # -- byte logs --------------------------------------------------------------------
    async def append_bytes(self, key: str, data: bytes, max_bytes: int, ttl_s: float) -> int:
        now = self._clock()
        entry = self._live(key, now) or self._put(key, bytearray(), now)
        log: bytearray = entry.value
        before = len(log)
        log += data
        if len(log) > max_bytes + max_bytes // 4:  # trimming copies: amortized
            del log[: len(log) - max_bytes]
        entry.expires = now + ttl_s
        self._grow(key, entry, len(log) - before)
        return len(log)

    async def read_bytes(self, key: str) -> bytes:
        entry = self._live(key, self._clock())
        return b"" if entry is None else bytes(entry.value)

    async def append_log(
        self, key: str, data: bytes, max_bytes: int, ttl_s: float, since: int | None
    ) -> tuple[int, bytes]:
        now = self._clock()
        entry = self._live(key, now) or self._put(key, _OffsetLog(), now)
        log: _OffsetLog = entry.value
        before = len(log.data)
        log.data += data
        log.end += len(data)
        if len(log.data) > max_bytes + max_bytes // 4:
            del log.data[: len(log.data) - max_bytes]
        entry.expires = now + ttl_s
        self._grow(key, entry, len(log.data) - before)
        start = log.end - len(log.data)
        if since is None or not start <= since <= log.end:
            since = start
        return log.end, bytes(log.data[since - start :])


class _OffsetLog:
    """An offset log's kept bytes and the offset past them (see ``append_log``)."""

    __slots__ = ("data", "end")

    def __init__(self) -> None:
        self.data = bytearray()
        self.end = random.getrandbits(LOG_START_BITS)


def _tag(key: str) -> str:
    """The hash tag of ``key`` (``{...}`` at its start) or ``""``."""
    if key.startswith("{"):
        end = key.find("}")
        if end > 0:
            return key[: end + 1]
    return _GLOBAL

"""This process's decoded copies of offset logs: per request, the new records only.

A detector keeps a client's recent queries in an offset log
(:meth:`~guard.state.base.StateStore.append_log`) and needs them decoded, with
what it derives from them (chains, nearest neighbours, counts), on every request.
Reading and decoding the whole log each time costs the history, not the request.
:class:`LogViews` keeps, per key, a *view* (the stage's own decoded structure) and
the log offset it has folded up to; each append returns the records the view has
not seen (those of other replicas, then the request's own), which the view folds
in order. A view whose offset is no longer the log's (trimmed past it, expired,
evicted here) is rebuilt from the kept log, which the same call returned.

So every replica folds the same records in the same order (the log's), and a
stage that derives its state from the records alone decides as one replica would.
Views are bounded by ``max_bytes`` (their own ``nbytes``), least recently used
first: an evicted view costs one rebuild, never a wrong answer.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from guard.state.base import StateStore

__all__ = ["LogView", "LogViews"]


class LogView(Protocol):
    """A stage's decoded copy of one log."""

    @property
    def nbytes(self) -> int:
        """Bytes this view holds (its bound in :class:`LogViews`)."""
        ...

    def fold(self, records: bytes) -> None:
        """Take in ``records``, whole records appended to the log after what it holds."""
        ...


V = TypeVar("V", bound=LogView)


class _Held(Generic[V]):
    __slots__ = ("view", "end", "nbytes")

    def __init__(self, view: V, end: int) -> None:
        self.view, self.end, self.nbytes = view, end, 0


class LogViews(Generic[V]):
    """Views of many logs (one per key), made by ``make`` and kept up to date by
    :meth:`append`."""

    def __init__(self, make: Callable[[], V], *, max_bytes: int = 64 << 20) -> None:
        self._make = make
        self.max_bytes = max_bytes
        self._held: OrderedDict[str, _Held[V]] = OrderedDict()
        self._nbytes = 0

    async def append(
        self, store: StateStore, key: str, data: bytes, max_bytes: int, ttl_s: float
    ) -> V:
        """Append ``data`` to the log ``key`` and return its view, which has folded every
        record of the log up to ``data``. Empty ``data`` brings the view up to date.

        Concurrent appends to one key (a remote store) return in any order: each folds
        only what the view has not folded yet, so every record is folded once, in order.
        """
        before = self._held.get(key)
        since = None if before is None else before.end
        end, tail = await store.append_log(key, data, max_bytes, ttl_s, since)
        start = end - len(tail)
        held = self._held.get(key)  # another request may have moved or replaced it meanwhile
        untouched = held is not None and held is before and held.end == since
        if held is None or (untouched and start != since) or held.end < start:
            held = self._replace(key, _Held(self._make(), start))  # tail: the whole kept log
        if held.end < end:  # else a later append already folded past this one
            held.view.fold(tail[held.end - start :])
            held.end = end
        self._held.move_to_end(key)
        size = held.view.nbytes
        self._nbytes += size - held.nbytes
        held.nbytes = size
        while self._nbytes > self.max_bytes and len(self._held) > 1:
            _, dropped = self._held.popitem(last=False)
            self._nbytes -= dropped.nbytes
        return held.view

    def _replace(self, key: str, held: _Held[V]) -> _Held[V]:
        self.forget(key)
        self._held[key] = held
        return held

    def peek(self, key: str) -> V | None:
        """``key``'s view as this process holds it (perhaps behind the log), or None."""
        held = self._held.get(key)
        return None if held is None else held.view

    def forget(self, key: str) -> None:
        """Drop ``key``'s view (the next append rebuilds it from the log)."""
        held = self._held.pop(key, None)
        if held is not None:
            self._nbytes -= held.nbytes

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def __len__(self) -> int:
        return len(self._held)

"""Pure-Python twin of the ``guard._ext.postings`` kernel: Blacklight's inverted index.

:class:`PostingIndex` maps each 64-bit fingerprint hash to the ids of the queries
holding it (its *postings*, ascending: ids are given in increasing order), keeping
at most ``max_per_hash`` per hash (past it, the oldest goes). The memory state store
(:mod:`guard.state.memory`) keeps everything else about a query (client, age,
digest) and asks the index only the per-hash questions, which are the per-request
cost: insert a query's hashes, remove them, and count, for a new fingerprint, the
hashes each earlier query shares with it. The kernel answers the same: equal
postings after every operation, equal :meth:`PostingIndex.shared` results.

Hashes are given as a sequence of ``uint64`` values (a ``numpy`` array or an
``array('Q')``); a fingerprint's hashes are distinct (:mod:`guard._py.fingerprint`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["PostingIndex"]


class PostingIndex:
    """Hash -> ascending query ids; most hashes belong to one query, so a posting is a bare
    id until a second query shares it (then a list)."""

    __slots__ = ("_index",)

    def __init__(self) -> None:
        self._index: dict[int, Any] = {}  # a bare id (int) or an ascending list of ids

    def __len__(self) -> int:
        """Distinct hashes indexed."""
        return len(self._index)

    def add(self, hashes: Sequence[int], qid: int, max_per_hash: int) -> None:
        """Index query ``qid`` (larger than every id indexed) under each of ``hashes``."""
        index = self._index
        for h in map(int, hashes):
            found = index.get(h)
            if found is None or max_per_hash == 1:
                index[h] = qid
            elif found.__class__ is int:
                index[h] = [found, qid]
            else:
                found.append(qid)
                if len(found) > max_per_hash:
                    del found[0]

    def remove(self, hashes: Sequence[int], qid: int) -> None:
        """Forget query ``qid`` under each of ``hashes`` (where it is still indexed)."""
        index = self._index
        for h in map(int, hashes):
            found = index.get(h)
            if found is None:
                continue
            if found.__class__ is int:
                if found == qid:
                    del index[h]
                continue
            if qid in found:
                found.remove(qid)
            if len(found) <= 1:
                if found:
                    index[h] = found[0]
                else:
                    del index[h]

    def postings(self, h: int) -> list[int]:
        """The ids indexed under ``h``, ascending."""
        found = self._index.get(int(h))
        if found is None:
            return []
        return [found] if found.__class__ is int else list(found)

    def shared(self, hashes: Sequence[int], threshold: int) -> tuple[list[tuple[int, int]], int]:
        """``(over, best)``: each query sharing more than ``threshold`` of ``hashes`` as
        ``(id, shared)``, ascending by id, and the most any query shares (0: none)."""
        counts: dict[int, int] = {}
        index, count = self._index, counts.get
        for h in map(int, hashes):
            found = index.get(h)
            if found is None:
                continue
            if found.__class__ is int:
                counts[found] = count(found, 0) + 1
            else:
                for qid in found:
                    counts[qid] = count(qid, 0) + 1
        best = max(counts.values(), default=0)
        over = sorted((qid, n) for qid, n in counts.items() if n > threshold)
        return over, best

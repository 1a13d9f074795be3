"""Query provenance: link each query to the client's most similar earlier query.

After QPA (Li et al., "Query Provenance Analysis for Robust and Efficient
Query-based Black-box Attack Defense", IEEE S&P 2024): an attack's queries
descend from one another (each is a small step, or a random transform, away
from an earlier one), while a client's honest queries are mostly unrelated
inputs. Hash fingerprints (Blacklight) break under fresh random transforms
(OARS, Feng et al., CCS 2023); distances in input space do not break unless the
transform moves the query farther than the link distance, and then the attack's
own progress suffers.

Per client the guard keeps its recent rows (oldest first), each with the id of
its *chain*. A new row is

* a *repeat* when an earlier row is identical (distance 0): no evidence, and not
  stored again;
* *linked* when its nearest earlier row lies within ``distance`` (L2, input
  units): it joins that row's chain;
* otherwise the first row of a new chain.

The decision is on the chains, not on single links: a client is flagged when
one of its chains holds ``links`` rows. An honest client's chains stay short
(a jittered retry, a few re-encodings of one input); an attack walking around
one input grows one chain with nearly every query.

:func:`link_rows` is the exhaustive reference: every row against every earlier one.
The stage keeps a :class:`ChainView` per client instead, folded one row at a time from
the client's log of rows: its cost per row is one float32 matrix-vector product over the
kept rows (BLAS; 128 rows of 3,072 values: about 400k flops) and a few exact distances,
plus a constant bookkeeping, never a pass over the history in Python.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["ROW", "ChainView", "Link", "canonical", "link_rows"]


@dataclass(frozen=True, slots=True)
class Link:
    """How one row relates to the earlier rows."""

    nearest: float  # L2 distance to the nearest earlier row (inf when there is none)
    parent: int  # index of that row among the earlier rows (history, then batch); -1: none
    repeat: bool  # identical to an earlier row
    linked: bool  # within the link distance (and not a repeat)


def link_rows(history: np.ndarray, rows: np.ndarray, distance: float) -> list[Link]:
    """Link each row of ``rows`` (``[N, D]``) to ``history`` (``[H, D]``) and to the rows
    of the batch before it (index ``H + i`` for batch row ``i``)."""
    rows = np.asarray(rows, dtype=np.float32)
    known = np.asarray(history, dtype=np.float32).reshape(-1, rows.shape[1])
    links = []
    for i, row in enumerate(rows):
        earlier = known if i == 0 else np.concatenate([known, rows[:i]])
        if len(earlier) == 0:
            links.append(Link(float("inf"), -1, False, False))
            continue
        diff = earlier - row
        d2 = np.einsum("ij,ij->i", diff, diff)
        parent = int(np.argmin(d2))
        nearest = float(np.sqrt(d2[parent]))
        repeat = nearest == 0.0
        links.append(Link(nearest, parent, repeat, not repeat and nearest <= distance))
    return links


ROW = np.dtype("<f2")  # a record's values
_EPS = float(np.finfo(np.float32).eps)
_COLUMNS = ("rows", "halves")  # numpy, grown by doubling
_SLOTS = ("seqs", "chains", "nearest", "linked")  # lists: a value per kept row


def canonical(rows: np.ndarray) -> np.ndarray:
    """``rows`` rounded to ``float16`` (a record's values), ``-0`` written ``0`` so that
    rows of equal values have equal bytes."""
    return (np.asarray(rows, dtype=np.float32) + np.float32(0)).astype(ROW)  # -0 + 0 == +0


class ChainView:
    """A client's recent rows and their chains, folded one record (one row) at a time.

    The records are the rows themselves (``float16``, :func:`canonical`) in the order of
    the client's log; everything here is derived from them, so two views that folded the
    same records hold the same state, whichever process folded them. Per record:

    * a *repeat* (equal to a kept row) changes nothing;
    * otherwise the row enters the window of the last ``cap`` rows (the oldest leaves),
      *linked* when its nearest kept row lies within ``distance`` (it joins that row's
      chain), else the first row of a new chain, named by the row's sequence number in
      this view (the count of records folded before it);
    * a row that ``float16`` cannot hold (NaN, beyond +-65504) is neither kept nor linked.

    Per chain the view counts the kept rows in it, updated as rows enter and leave; per
    kept row it keeps its chain, its nearest distance and whether it was linked, which a
    stage reads back for its own rows (:meth:`find`).

    Nearest row: ``|b|^2 / 2 - a.b`` against all kept rows ``b`` in one float32
    matrix-vector product (their norms kept), then the float32 distance ``|a - b|`` of
    every row that rounding may have put ahead of the nearest (a bound of ``(4 w + 8) eps
    (|a|^2 + max |b|^2)`` on the rounding, ``w`` values a row; usually one row): the
    nearest row of the exhaustive scan (:func:`link_rows`, up to rounding at ties), ties
    to the oldest. Memory: the window grows by doubling up to ``cap`` rows of float32, and
    each kept row's record is kept too (the index that finds rows by their bytes): about
    ``6 w`` bytes a kept row.
    """

    __slots__ = (
        *_COLUMNS,
        *_SLOTS,
        *("width", "cap", "distance", "counts", "index", "keys", "held", "head", "folded"),
        *("top", "_slack", "_columns", "__weakref__"),
    )

    def __init__(self, width: int, cap: int, distance: float) -> None:
        self.width, self.cap, self.distance = width, cap, float(distance)
        self.counts: dict[int, int] = {}  # chain -> kept rows in it
        self.index: dict[bytes, int] = {}  # a kept row's record -> its slot
        self.held = 0  # kept rows (<= cap); slots [0, held) are in use
        self.head = 0  # the slot the next row takes
        self.folded = 0  # records folded: the next one's sequence number
        self.keys: list[bytes] = []  # per slot, its row's record
        self.top = 0.0  # the largest |row|^2 kept (bounds the rounding)
        self._slack = (4 * width + 8) * _EPS
        self.rows = np.empty((0, width), dtype=np.float32)
        self.halves = np.empty(0, dtype=np.float32)  # |row|^2 / 2
        self.seqs: list[int] = []  # per slot: its row's sequence number
        self.chains: list[int] = []  # its chain
        self.nearest: list[float] = []  # L2 to its nearest earlier row
        self.linked: list[bool] = []  # whether that was within ``distance``
        self._grow()

    def _grow(self) -> None:
        """Room for twice the rows (at least 16, at most ``cap``), the kept ones kept."""
        size = min(self.cap, max(16, 2 * len(self.halves)))
        for name in _COLUMNS:
            old = getattr(self, name)
            new = np.empty((size, *old.shape[1:]), dtype=old.dtype)
            new[: self.held] = old[: self.held]
            setattr(self, name, new)
        self._columns = sum(getattr(self, name).nbytes for name in _COLUMNS)

    @property
    def nbytes(self) -> int:
        record = 2 * self.width + 100  # a record's bytes and its entry in the index
        return self._columns + record * self.held + 100 * len(self.counts)

    def fold(self, records: bytes) -> None:
        """Take in ``records``: whole rows (``width`` float16 values each), oldest first."""
        size = self.width * ROW.itemsize
        if len(records) == size:  # one row (most requests)
            self.add(np.frombuffer(records, dtype=ROW).astype(np.float32), records)
            return
        if len(records) % size:
            raise ValueError(f"records of {size} bytes expected; got {len(records)} bytes")
        wide = np.frombuffer(records, dtype=ROW).reshape(-1, self.width).astype(np.float32)
        for i, row in enumerate(wide):
            self.add(row, records[i * size : (i + 1) * size])

    def find(self, record: bytes) -> int:
        """The slot of the kept row whose record is ``record``, else -1."""
        return self.index.get(record, -1)

    def chain_rows(self, slot: int) -> int:
        """How many kept rows the chain of the row in ``slot`` holds."""
        return self.counts[self.chains[slot]]

    def add(self, row: np.ndarray, record: bytes) -> Link:
        """Fold one record: ``row`` its values as float32, ``record`` its bytes. The link's
        ``parent`` is the slot of the nearest kept row (its values: ``rows[parent]`` until a
        later row takes the slot)."""
        seq = self.folded
        self.folded += 1
        norm = float(np.dot(row, row))
        if not math.isfinite(norm):
            return Link(float("nan"), -1, False, False)
        parent, nearest = self._nearest(row, norm) if self.held else (-1, math.inf)
        if nearest == 0.0:
            return Link(0.0, parent, True, False)
        linked = nearest <= self.distance
        chain = self.chains[parent] if linked else seq
        if self.held == self.cap:  # the oldest row leaves (its slot is the head)
            slot = self.head
            left = self.chains[slot]
            if self.counts[left] == 1:
                del self.counts[left]
            else:
                self.counts[left] -= 1
            if self.index.get(self.keys[slot]) == slot:
                del self.index[self.keys[slot]]
            if 2 * float(self.halves[slot]) >= self.top:
                self.halves[slot] = 0.0
                self.top = 2 * float(self.halves[: self.held].max())
        else:
            if self.held == len(self.halves):
                self._grow()
            slot = self.held
            self.held += 1
            for column in (self.keys, self.seqs, self.chains, self.nearest, self.linked):
                column.append(None)  # type: ignore[arg-type]  # set below
        self.head = (slot + 1) % self.cap
        self.rows[slot] = row
        self.halves[slot] = norm / 2
        self.seqs[slot] = seq
        self.chains[slot] = chain
        self.nearest[slot] = nearest
        self.linked[slot] = linked
        self.index[record] = slot
        self.keys[slot] = record
        self.counts[chain] = self.counts.get(chain, 0) + 1
        self.top = max(self.top, norm)
        return Link(nearest, parent, False, linked)

    def _nearest(self, row: np.ndarray, norm: float) -> tuple[int, float]:
        """The slot of the kept row nearest to ``row`` (the oldest of equals) and their L2
        distance (float32 arithmetic)."""
        n = self.held
        full = n == len(self.halves)
        rows = self.rows if full else self.rows[:n]
        halves = self.halves if full else self.halves[:n]
        approx = halves - rows @ row  # (|b|^2 - 2 a.b) / 2: the order of |a - b|^2
        first = int(approx.argmin())
        slack = self._slack * (self.top + norm)  # bounds the rounding of 2 x approx
        near = np.flatnonzero(approx <= approx[first] + slack)
        if len(near) == 1:
            diff = rows[first] - row
            return first, float(np.sqrt(np.dot(diff, diff)))
        exact = [np.dot(d, d) for d in rows[near] - row]  # as above, row by row
        least = min(exact)
        ties = [slot for slot, d2 in zip(near.tolist(), exact, strict=True) if d2 == least]
        return min(ties, key=lambda slot: self.seqs[slot]), float(np.sqrt(least))

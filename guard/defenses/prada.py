"""PRADA (Juuti, Szyller, Marchal, Asokan, "PRADA: Protecting Against DNN Model
Stealing Attacks", EuroS&P 2019).

Natural queries from one client, taken in order, lie at distances from each
other whose minima look normally distributed; the synthetic queries of a model
extraction attack (JbDA and its variants, and the perturbations of evasion
attacks) do not. Per client, for each query ``x`` of predicted class ``c``:

1. ``d = min_{y ∈ G_c} ||x - y||₂``, the distance to the client's *growing
   set* ``G_c`` of earlier class-``c`` queries (the first query of a class only
   starts ``G_c``); ``d`` joins the client's distances ``D``.
2. When ``d > T_c``, ``x`` joins ``G_c``, ``d`` joins ``D_{G_c}``, and
   ``T_c ← max(T_c, mean(D_{G_c}) - std(D_{G_c}))``.
3. Once ``D`` holds enough distances, the Shapiro-Wilk statistic ``W`` of
   ``D`` (``scipy.stats.shapiro``) below ``δ`` (0.9 in the paper) flags an attack.

What we bound and the paper does not: ``G_c`` keeps its newest members (``T_c``
is recomputed from them), and ``D`` its newest distances; the test runs on
that window. The reference code keeps one global state; here the state is per
client: :class:`History` derives it by folding the client's queries in order
(each with its predicted class, the raw facts a log keeps), one query at a time,
so that a batch of queries decides as the same queries sent one by one.

Cost per query: one pass of the compiled ``prada_scan`` kernel over the query's
growing set, held in preallocated rows (:class:`GrowingSet`) and read in place
(distance and ``T_c`` together, :mod:`guard._py.prada` states the arithmetic:
squared distances summed in float64), and, every ``every`` queries, Shapiro-Wilk's
W from coefficients computed once per window size (:func:`shapiro_w`, bit for bit
``scipy.stats.shapiro``'s statistic). Nothing grows with the history but the scan,
bounded by ``max_per_class`` members.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from guard import _native
from guard._py.prada import threshold as _threshold

__all__ = [
    "GrowingSet",
    "History",
    "Observation",
    "class_threshold",
    "observe",
    "record_dtype",
    "shapiro_w",
]


# Sets of at least this many values (members x width) are compared in float32 first.
FILTER_VALUES = 1 << 14
# What a Python object (with a small NumPy array's header) holds beyond its data, roughly:
# a History counts it for itself, its set dict and each growing set's objects.
OBJECT_BYTES = 256


@functools.lru_cache(maxsize=64)
def record_dtype(dim: int) -> np.dtype:
    """One query as the client's log keeps it: the class the model predicted (little-endian
    int64), then the query's ``dim`` values (little-endian float32). Raw facts only: what
    PRADA derives from them (growing sets, distances) is folded by :class:`History`."""
    return np.dtype([("label", "<i8"), ("x", "<f4", (dim,))])


class GrowingSet:
    """A growing set ``G_c``: its newest ``cap`` members, oldest first, their values one
    contiguous float32 table ``[k, D]`` that the ``prada_nearest`` kernel reads in place,
    the distance each joined at (NaN for the first) beside it, and ``T_c``, recomputed
    (``prada_threshold``, ``O(k)``) only when the set changes.

    Rows are preallocated (doubling up to a quarter over ``cap``); once full, the oldest
    member goes and the kept ones move to the front once per ``cap // 4`` growths: a
    growth costs its own row, amortized, never a copy of the set.
    """

    __slots__ = (
        "_values",
        "_joined",
        "_norms",
        "_largest",
        "_start",
        "_size",
        "cap",
        "threshold",
    )

    def __init__(self, dim: int, cap: int) -> None:
        if cap < 1:
            raise ValueError(f"a growing set needs cap >= 1; got {cap}")
        self.cap = cap
        self._values = np.empty((min(cap, 4), dim), np.float32)
        self._joined = np.empty(min(cap, 4), np.float32)
        self._norms = np.empty(min(cap, 4), np.float64)  # each member's squared norm
        self._largest = 0.0  # the largest member norm
        self._start = self._size = 0
        self.threshold = 0.0  # T_c

    @property
    def members(self) -> np.ndarray:
        """``[k, D]``: the members' values, oldest first (a view)."""
        return self._values[self._start : self._start + self._size]

    @property
    def joined(self) -> np.ndarray:
        """``[k]``: the distance each member joined at (a view)."""
        return self._joined[self._start : self._start + self._size]

    @property
    def table(self) -> np.ndarray:
        """``[k, 1 + D]``: the set as :func:`guard._native.prada_scan` reads it (a copy)."""
        return np.concatenate((self.joined[:, None], self.members), axis=1)

    @property
    def nbytes(self) -> int:
        return int(self._values.nbytes + self._joined.nbytes + self._norms.nbytes)

    def __len__(self) -> int:
        return self._size

    def nearest(self, x: np.ndarray) -> float:
        """The least squared distance from ``x`` (float32 ``[D]``) to a member, as the
        ``prada_nearest`` kernel computes it over every member (the set must not be empty).

        A large set (``k·D >= FILTER_VALUES``) goes to ``prada_nearest_pruned``: every
        member compared in float32 first (one dot product each, the members' squared
        norms kept here), and only those that can be nearest within the float32 error
        bound computed exactly. The result is bit for bit the full scan's, at about a
        tenth of its arithmetic (and no BLAS threads).
        """
        s, e = self._start, self._start + self._size
        members = self._values[s:e]
        k, d = members.shape
        if k < 8 or k * d < FILTER_VALUES:
            return _native.prada_nearest(members, x)
        return _native.prada_nearest_pruned(members, self._norms[s:e], self._largest, x)

    def add(self, x: np.ndarray, joined: float) -> None:
        """``x`` joins at distance ``joined``; the oldest member goes when the set is full."""
        if self._size == self.cap:
            self._start += 1
            self._size -= 1
        end = self._start + self._size
        values, distances, norms = self._values, self._joined, self._norms
        if end == values.shape[0]:  # no room after the members: grow, or move them to the front
            limit = self.cap + max(1, self.cap // 4)
            if values.shape[0] < limit:
                rows = min(limit, 2 * values.shape[0])
                values = np.empty((rows, values.shape[1]), np.float32)
                distances = np.empty(rows, np.float32)
                norms = np.empty(rows, np.float64)
            values[: self._size] = self._values[self._start : end]
            distances[: self._size] = self._joined[self._start : end]
            norms[: self._size] = self._norms[self._start : end]
            self._values, self._joined, self._norms = values, distances, norms
            self._start, end = 0, self._size
        values[end] = x
        distances[end] = joined
        x64 = values[end].astype(np.float64)
        norms[end] = x64 @ x64
        self._size += 1
        self._largest = math.sqrt(float(norms[self._start : end + 1].max()))
        self.threshold = _native.prada_threshold(distances[self._start : end + 1])


@dataclass(frozen=True, slots=True)
class Observation:
    """One query seen: its distance to the growing set (None: first of its class), and
    whether it joined the set."""

    distance: float | None
    grows: bool


def class_threshold(joined: np.ndarray) -> float:
    """``T_c``: the running maximum of ``mean - std`` over the distances ``G_c`` grew at."""
    return _threshold(joined)


def observe(growing: GrowingSet, x: np.ndarray) -> Observation:
    """Steps 1 and 2 for query ``x`` (float32 row); updates ``growing`` in place."""
    if len(growing) == 0:
        growing.add(x, float("nan"))
        return Observation(None, True)
    distance = float(np.float32(math.sqrt(growing.nearest(x))))
    grows = distance > growing.threshold
    if grows:
        growing.add(x, distance)
    return Observation(distance, grows)


class History:
    """A client's PRADA state, derived from its log of queries (a
    :class:`~guard.state.views.LogView`): per class its growing set, the newest
    ``max_distances`` distances ``D``, and ``count``, the queries folded.

    :meth:`fold` takes the log's records (:func:`record_dtype`) in order and applies
    steps 1 and 2 to each, as :func:`observe` does: a query at distance 0 from its
    growing set (an exact repeat of a kept query) adds nothing but the count. Every
    replica folding the same records derives the same state; a request costs the scan
    of its own rows, never a decode of the history.
    """

    def __init__(self, dim: int, *, max_per_class: int, max_distances: int, floor: int = 0) -> None:
        self.dim = dim
        self.dtype = record_dtype(dim)
        self.max_per_class = max_per_class
        self.max_distances = max_distances
        self.floor = floor  # the least this view counts as (a bound on how many are kept)
        self.sets: dict[int, GrowingSet] = {}
        self._distances = np.empty(min(16, max_distances), np.float32)  # grows to 5/4 max
        self._start = self._size = 0
        self.count = 0
        self._set_bytes = 0  # the growing sets' bytes, kept as they grow

    @staticmethod
    def encode(x: np.ndarray, labels: np.ndarray) -> bytes:
        """The records of queries ``x`` (``[n, D]``) predicted as ``labels`` (``[n]``)."""
        records = np.empty(x.shape[0], record_dtype(x.shape[1]))
        records["label"] = labels
        records["x"] = x
        return records.tobytes()

    @property
    def nbytes(self) -> int:
        """Its arrays' bytes and an estimate of its objects' (:data:`OBJECT_BYTES` each),
        at least ``floor``."""
        objects = OBJECT_BYTES * (2 + 2 * len(self.sets))
        return max(self.floor, int(self._distances.nbytes) + self._set_bytes + objects)

    @property
    def distances(self) -> np.ndarray:
        """The newest distances, at most ``max_distances``, oldest first (a view)."""
        return self._distances[self._start : self._start + self._size]

    def fold(self, records: bytes) -> None:
        queries = np.frombuffer(records, self.dtype)
        rows = queries["x"]
        for i, label in enumerate(queries["label"].tolist()):
            x = rows[i]
            growing = self.sets.get(label)
            if growing is None:  # the first of its class only starts G_c
                growing = self.sets[label] = GrowingSet(self.dim, self.max_per_class)
                growing.add(x, math.nan)
                self._set_bytes += growing.nbytes
                continue
            distance = float(np.float32(math.sqrt(growing.nearest(x))))
            if distance == 0.0:  # an exact repeat of a kept query: no new information
                continue
            self._record(distance)
            if distance > growing.threshold:
                before = growing.nbytes
                growing.add(x, distance)
                self._set_bytes += growing.nbytes - before
        self.count += queries.shape[0]

    def _record(self, distance: float) -> None:
        if self._size == self.max_distances:
            self._start += 1
            self._size -= 1
        end = self._start + self._size
        if end == self._distances.shape[0]:  # grow, or move the kept ones to the front
            held = self._distances[self._start : end].copy()
            limit = self.max_distances + max(1, self.max_distances // 4)
            if self._distances.shape[0] < limit:
                self._distances = np.empty(min(limit, 2 * end), np.float32)
            self._distances[: self._size] = held
            self._start, end = 0, self._size
        self._distances[end] = distance
        self._size += 1


def shapiro_w(distances: np.ndarray) -> float:
    """The Shapiro-Wilk statistic of ``distances`` (1.0 when they are all equal: no evidence).

    Bit for bit ``scipy.stats.shapiro(distances).statistic``: the same sorted, centred data
    through scipy's own AS R94 routine, given the coefficients ``a`` it computed for this
    size before (they depend on the size only), without the per-call argument handling
    that cost ten times the statistic. Falls back to ``scipy.stats.shapiro`` where that
    routine is not importable.
    """
    d = np.asarray(distances, dtype=np.float64).ravel()
    if d.size < 3:
        raise ValueError("shapiro_w needs at least 3 distances")
    if np.ptp(d) == 0:
        return 1.0
    swilk = _swilk()
    if swilk is None:
        from scipy.stats import shapiro

        return float(shapiro(d).statistic)
    y = np.sort(d)
    y -= d[d.size // 2]  # as scipy.stats.shapiro: subtract the median or a nearby value
    w, _, _ = swilk(y, _coefficients(d.size, swilk), 1)
    return float(w)


@functools.cache
def _swilk() -> Callable[..., Any] | None:
    try:
        from scipy.stats._ansari_swilk_statistics import swilk
    except ImportError:  # pragma: no cover - a scipy without the routine: the public call
        return None
    return swilk


@functools.lru_cache(maxsize=16)
def _coefficients(n: int, swilk: Callable[..., Any]) -> np.ndarray:
    """Shapiro-Wilk's ``a`` for ``n`` values (they depend on ``n`` only), computed by scipy's
    routine once per size. Never written to: the routine only reads it when told it is set."""
    a = np.zeros(n // 2, dtype=np.float64)
    swilk(np.arange(n, dtype=np.float64), a, 0)  # init 0: fills ``a``
    return a

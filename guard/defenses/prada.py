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
client, kept by the caller (:class:`ClassSet` is what it stores per class).

Cost per query: one pass of the compiled ``prada_scan`` kernel over the stored
growing set, read in place (distance and ``T_c`` together, :mod:`guard._py.prada`
states the arithmetic: squared distances summed in float64), and, every
``every`` queries, Shapiro-Wilk's W from coefficients computed once per window
size (:func:`shapiro_w`, bit for bit ``scipy.stats.shapiro``'s statistic).
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

__all__ = ["ClassSet", "Observation", "class_threshold", "observe", "shapiro_w"]

_HEADER = np.dtype("<f4")


@dataclass(slots=True)
class ClassSet:
    """A growing set ``G_c`` as stored: one float32 row per member, the distance it joined
    at (NaN: the first) then its values."""

    table: np.ndarray  # [k, 1 + D] float32, read-only when decoded from the store

    @classmethod
    def empty(cls, dim: int) -> ClassSet:
        return cls(np.empty((0, dim + 1), np.float32))

    @classmethod
    def decode(cls, items: list[bytes], dim: int) -> ClassSet:
        """From stored items (:meth:`encode`), without copying them again; items of another
        dimension are skipped."""
        size = (dim + 1) * _HEADER.itemsize
        if len(set(map(len, items))) > 1 or (items and len(items[0]) != size):
            items = [item for item in items if len(item) == size]
        if not items:
            return cls.empty(dim)
        joined = items[0] if len(items) == 1 else b"".join(items)
        return cls(np.frombuffer(joined, dtype=_HEADER).reshape(len(items), dim + 1))

    @staticmethod
    def encode(x: np.ndarray, joined: float) -> bytes:
        """One member as stored: the distance it joined at, then its values (little-endian f4)."""
        return np.concatenate(([joined], x)).astype(_HEADER).tobytes()

    @property
    def members(self) -> np.ndarray:
        """``[k, D]``: the members' values."""
        return self.table[:, 1:]

    @property
    def joined(self) -> np.ndarray:
        """``[k]``: the distance each member joined at."""
        return self.table[:, 0]

    def add(self, x: np.ndarray, joined: float) -> None:
        row = np.empty((1, self.table.shape[1]), np.float32)
        row[0, 0] = joined
        row[0, 1:] = x
        self.table = np.concatenate((self.table, row))


@dataclass(frozen=True, slots=True)
class Observation:
    """One query seen: its distance to the growing set (None: first of its class), and
    whether it joined the set."""

    distance: float | None
    grows: bool


def class_threshold(joined: np.ndarray) -> float:
    """``T_c``: the running maximum of ``mean - std`` over the distances ``G_c`` grew at."""
    return _threshold(joined)


def observe(growing: ClassSet, x: np.ndarray) -> Observation:
    """Steps 1 and 2 for query ``x`` (float32 row); updates ``growing`` in place."""
    if growing.table.shape[0] == 0:
        growing.add(x, float("nan"))
        return Observation(None, True)
    d2, threshold = _native.prada_scan(growing.table, x)
    distance = float(np.float32(math.sqrt(d2)))
    grows = distance > threshold
    if grows:
        growing.add(x, distance)
    return Observation(distance, grows)


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

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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ClassSet", "Observation", "class_threshold", "observe", "shapiro_w"]

_HEADER = np.dtype("<f4")


@dataclass(slots=True)
class ClassSet:
    """A growing set ``G_c``: its members (rows), the distance each joined at (NaN: the first)."""

    members: np.ndarray  # [k, D] float32
    joined: np.ndarray  # [k] float32

    @classmethod
    def empty(cls, dim: int) -> ClassSet:
        return cls(np.empty((0, dim), np.float32), np.empty(0, np.float32))

    @classmethod
    def decode(cls, items: list[bytes], dim: int) -> ClassSet:
        """From stored items (:meth:`encode`); items of another dimension are skipped."""
        size = (dim + 1) * _HEADER.itemsize
        rows = [item for item in items if len(item) == size]
        if not rows:
            return cls.empty(dim)
        table = np.frombuffer(b"".join(rows), dtype=_HEADER).reshape(len(rows), dim + 1)
        return cls(table[:, 1:].copy(), table[:, 0].copy())

    @staticmethod
    def encode(x: np.ndarray, joined: float) -> bytes:
        """One member as stored: the distance it joined at, then its values (little-endian f4)."""
        return np.concatenate(([joined], x)).astype(_HEADER).tobytes()

    def add(self, x: np.ndarray, joined: float) -> None:
        self.members = np.vstack((self.members, x[None, :].astype(np.float32)))
        self.joined = np.append(self.joined, np.float32(joined))


@dataclass(frozen=True, slots=True)
class Observation:
    """One query seen: its distance to the growing set (None: first of its class), and
    whether it joined the set."""

    distance: float | None
    grows: bool


def class_threshold(joined: np.ndarray) -> float:
    """``T_c``: the running maximum of ``mean - std`` over the distances ``G_c`` grew at."""
    d = joined[~np.isnan(joined)].astype(np.float64)
    if d.size == 0:
        return 0.0
    n = np.arange(1, d.size + 1)
    mean = np.cumsum(d) / n
    var = np.maximum(np.cumsum(d * d) / n - mean * mean, 0.0)
    return float(max(0.0, np.max(mean - np.sqrt(var))))


def observe(growing: ClassSet, x: np.ndarray) -> Observation:
    """Steps 1 and 2 for query ``x`` (float32 row); updates ``growing`` in place."""
    if growing.members.shape[0] == 0:
        growing.add(x, float("nan"))
        return Observation(None, True)
    diff = growing.members - x
    distance = float(np.sqrt(np.min(np.einsum("ij,ij->i", diff, diff))))
    grows = distance > class_threshold(growing.joined)
    if grows:
        growing.add(x, distance)
    return Observation(distance, grows)


def shapiro_w(distances: np.ndarray) -> float:
    """The Shapiro-Wilk statistic of ``distances`` (1.0 when they are all equal: no evidence)."""
    from scipy.stats import shapiro

    d = np.asarray(distances, dtype=np.float64)
    if d.size < 3:
        raise ValueError("shapiro_w needs at least 3 distances")
    if np.ptp(d) == 0:
        return 1.0
    return float(shapiro(d).statistic)

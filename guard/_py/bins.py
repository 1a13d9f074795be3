"""Pure-numpy twin of the ``guard._ext.bins`` kernel: the privacy stage's confidence bins.

:func:`release` defines the semantics; the Cython kernel returns the same bits. Given
``scores`` ``[N, C]`` (floating point, C-contiguous, ``C >= 2``) and a setting's tables
(:func:`tables`: ascending ``edges``, one more ``levels``, the ``C - 1`` ``shares`` of the
classes after the top, and ``ordered``, the number of leading shares that differ from
the last), it returns ``(released, code)``:

* ``code`` 1 when a value is not in ``[0, 1]`` (NaN and infinities included), else 2
  when a row's sum, in float64 from left to right, is not within ``[lo, hi]``, else 0.
  With a non-zero code ``released`` is ``scores`` untouched.
* Per row: the *top* class is the lowest index holding the row's largest value; its
  *level* is ``levels[k]``, ``k`` the number of edges at or below that value (in
  float64). The other classes, in decreasing order of value (equal values: lower index
  first), get ``(1 - level) * shares[i]`` for the ``i``-th of them, the top gets the
  level; computed in float64, rounded once to ``scores``'s dtype.

Only the first ``ordered`` places after the top need sorting: every later place gets
the same share, so the kernel selects those few and the rest take the last share.
"""

from __future__ import annotations

import numpy as np

__all__ = ["binned", "release", "tables"]

RANGE, SUM = 1, 2  # codes of the two ways ``scores`` are not probabilities


def tables(
    cuts: tuple[float, ...], confidences: tuple[float, ...], ranked: int | None, classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """``(edges, levels, shares, ordered)`` of a setting for ``classes`` classes: each of
    the ``ranked`` classes after the top (None: all) gets half the share of the one
    before it, the classes after them share evenly."""
    edges = np.asarray(cuts, dtype=np.float64)
    levels = np.asarray(confidences, dtype=np.float64)
    steps = np.arange(classes - 1)
    weights = 0.5 ** (steps if ranked is None else np.minimum(steps, ranked))
    shares = weights / weights.sum()
    ordered = len(shares) - 1 if len(shares) else 0
    while ordered > 0 and shares[ordered - 1] == shares[-1]:
        ordered -= 1
    for table in (edges, levels, shares):
        table.flags.writeable = False
    return edges, levels, shares, ordered


def binned(
    scores: np.ndarray, edges: np.ndarray, levels: np.ndarray, shares: np.ndarray
) -> np.ndarray:
    """The released rows in float64 (no checks, no rounding to ``scores``'s dtype)."""
    p = scores.astype(np.float64)
    rows = np.arange(p.shape[0])[:, None]
    order = np.argsort(-p, axis=1, kind="stable")
    top = order[:, 0]
    level = levels[np.searchsorted(edges, p[rows[:, 0], top], side="right")]
    out = np.empty_like(p)
    out[rows, order[:, 1:]] = (1.0 - level)[:, None] * shares
    out[rows[:, 0], top] = level
    return out


def release(
    scores: np.ndarray,
    edges: np.ndarray,
    levels: np.ndarray,
    shares: np.ndarray,
    ordered: int,
    lo: float,
    hi: float,
) -> tuple[np.ndarray, int]:
    """``(released, code)`` as the module docstring states (``ordered`` changes nothing
    here: the twin sorts every place)."""
    if scores.size == 0:
        return scores.copy(), 0
    if not (scores.min() >= 0.0 and scores.max() <= 1.0):  # NaN fails both
        return scores, RANGE
    sums = np.cumsum(scores, axis=1, dtype=np.float64)[:, -1]  # left to right, as the kernel
    if not (sums.min() >= lo and sums.max() <= hi):
        return scores, SUM
    return binned(scores, edges, levels, shares).astype(scores.dtype), 0

"""Pure-numpy twin of the ``guard._ext.coverage`` kernel: is any remembered query near?

:func:`within` defines the semantics; the Cython kernel returns the same answer. ``rows``
is a client's window of fixed-point sketches as the ``coverage`` stage keeps them, int16
``[m, D]`` (C-contiguous), of which the first ``count`` are live; ``x`` is a query in the
same units (int16 ``[D]``). It returns whether some live row ``y`` has
``Σ_j (y_j - x_j)² <= limit``, the squares summed in exact integer arithmetic (int64: a
difference is at most 65,535, so ``D`` up to 4,096 never overflows), so the answer
never depends on rounding or on the order rows are visited in.
"""

from __future__ import annotations

import numpy as np

__all__ = ["validate_args", "within"]


def validate_args(rows: np.ndarray, count: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` and ``x`` as C-contiguous int16, once their shapes and ``count`` agree."""
    rows = np.ascontiguousarray(rows, dtype=np.int16)
    x = np.ascontiguousarray(x, dtype=np.int16)
    if rows.ndim != 2 or x.ndim != 1 or rows.shape[1] != x.shape[0]:
        raise ValueError(f"coverage within: rows must be [m, {x.shape}]; got {rows.shape}")
    if not 0 <= count <= rows.shape[0]:
        raise ValueError(f"coverage within: count must be in [0, {rows.shape[0]}]; got {count}")
    return rows, x


def within(rows: np.ndarray, count: int, x: np.ndarray, limit: int) -> bool:
    """Whether one of ``rows[:count]`` lies within squared distance ``limit`` of ``x``."""
    rows, x = validate_args(rows, count, x)
    if count == 0:
        return False
    diff = rows[:count].astype(np.int64) - x.astype(np.int64)
    return bool(np.min(np.einsum("ij,ij->i", diff, diff)) <= limit)

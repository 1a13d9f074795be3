"""Pure-numpy twin of the ``guard._ext.prada`` kernel: one PRADA observation's arithmetic.

:func:`scan` defines the semantics; the Cython kernel matches it bit for bit. ``table``
is a class's growing set as stored, float32 ``[k, 1 + D]`` with ``k >= 1``: column 0 the
distance each member joined at (NaN: it joined first), columns ``1..D`` its values.
For a query ``x`` (float32 ``[D]``) it returns ``(d2, threshold)``:

``d2``
    ``min_i Σ_j diff_ij²`` with ``diff_ij = float32(table[i, 1 + j] - x[j])`` (the
    difference rounded to float32), each square taken in float64 and summed in float64
    in :data:`LANES` (8) interleaved partial sums, lane ``l`` adding the squares of
    ``j ≡ l (mod 8)`` in index order (``np.cumsum``), combined as
    ``((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))``: a C loop does the same
    additions with eight independent accumulators (no chain of dependent additions).
``threshold``
    ``T_c``: with ``d`` the non-NaN joined distances in row order (float64), the maximum
    of ``0`` and of ``mean_n - sqrt(max(0, Σd²/n - mean_n²))`` over the prefixes
    ``n = 1..len(d)``, sums in order. ``0`` when ``d`` is empty.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "LANES",
    "nearest",
    "nearest_pruned",
    "scan",
    "squared_distances",
    "threshold",
    "validate_args",
    "validate_joined",
    "validate_members",
]

LANES = 8


def validate_args(table: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``table`` and ``x`` as C-contiguous float32, once their shapes agree."""
    table = np.ascontiguousarray(table, dtype=np.float32)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if table.ndim != 2 or x.ndim != 1:
        raise ValueError(
            f"prada scan: table must be 2-D and x 1-D; got {table.shape} and {x.shape}"
        )
    if table.shape[0] < 1 or table.shape[1] != x.shape[0] + 1:
        raise ValueError(f"prada scan: table must be [k >= 1, {x.shape[0] + 1}]; got {table.shape}")
    return table, x


def validate_members(members: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``members`` (``[k >= 1, D]``, no joined column) and ``x`` as C-contiguous float32."""
    members = np.ascontiguousarray(members, dtype=np.float32)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if members.ndim != 2 or x.ndim != 1 or members.shape[0] < 1 or members.shape[1] != x.size:
        raise ValueError(
            f"prada nearest: members must be [k >= 1, {x.size}] and x 1-D; "
            f"got {members.shape} and {x.shape}"
        )
    return members, x


def validate_joined(joined: np.ndarray) -> np.ndarray:
    """``joined`` as C-contiguous 1-D float32."""
    joined = np.ascontiguousarray(joined, dtype=np.float32)
    if joined.ndim != 1:
        raise ValueError(f"prada threshold: joined must be 1-D; got {joined.shape}")
    return joined


def threshold(joined: np.ndarray) -> float:
    """``T_c`` of the joined distances (float32 or float64, NaN skipped); see the module."""
    d = np.asarray(joined, dtype=np.float64)
    d = d[~np.isnan(d)]
    if d.size == 0:
        return 0.0
    n = np.arange(1, d.size + 1)
    mean = np.cumsum(d) / n
    var = np.maximum(np.cumsum(d * d) / n - mean * mean, 0.0)
    return float(max(0.0, np.max(mean - np.sqrt(var))))


def squared_distances(table: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Each member's squared distance to ``x`` (float64 ``[k]``), summed as the module says."""
    diff = (table[:, 1:] - x).astype(np.float64)
    k, d = diff.shape
    squares = np.zeros((k, d + (-d) % LANES))  # zero padding: adding +0.0 changes no sum
    np.multiply(diff, diff, out=squares[:, :d])
    lanes = np.cumsum(squares.reshape(k, -1, LANES), axis=1)[:, -1, :]  # each lane in order
    pairs = lanes[:, 0::2] + lanes[:, 1::2]
    quads = pairs[:, 0::2] + pairs[:, 1::2]
    return quads[:, 0] + quads[:, 1]


def nearest(members: np.ndarray, x: np.ndarray) -> float:
    """``d2`` of query ``x`` against ``members`` (``[k, D]``, no joined column): what
    :func:`scan` returns first for the table of these members."""
    members, x = validate_members(members, x)
    k, d = members.shape
    table = np.empty((k, d + 1), np.float32)
    table[:, 1:] = members
    return float(np.min(squared_distances(table, x)))


def nearest_pruned(members: np.ndarray, norms: np.ndarray, largest: float, x: np.ndarray) -> float:
    """:func:`nearest`'s value. The kernel compares every member in float32 first
    (``norms``: each member's squared norm, ``largest``: at least the largest member
    norm) and computes only the members that can be nearest; the value is the same."""
    members, x = validate_members(members, x)
    if np.shape(norms) != (members.shape[0],):
        raise ValueError("prada nearest_pruned: one norm per member")
    return nearest(members, x)


def scan(table: np.ndarray, x: np.ndarray) -> tuple[float, float]:
    """``(d2, threshold)`` of query ``x`` against the growing set ``table``; see the module."""
    table, x = validate_args(table, x)
    return float(np.min(squared_distances(table, x))), threshold(table[:, 0])

"""Pure-numpy twin of the ``guard._ext.fingerprint`` kernel: Blacklight's query fingerprints.

:func:`fingerprint` defines the semantics; the Cython kernel matches it bit for
bit. For each row ``x`` of a batch (C order, any numeric dtype, read as float64):

1. Quantize: ``q[i] = floor((x[i] + offsets[i]) / step)``, computed in float64;
   NaN becomes 0 and values beyond ±2**62 saturate there; ``q`` is read as
   uint64 (two's complement).
2. Mix each value with a keyed bijection: ``e[i] = fmix64(q[i] + k1)`` (the
   MurmurHash3 finalizer; arithmetic mod 2**64).
3. Hash every window of ``w = min(window, D)`` values starting at ``0, stride,
   2·stride, …`` (as long as the window fits) with the polynomial
   ``Σ_j e[s+j]·P**(w-1-j)`` mod 2**64 and a keyed finalizer ``fmix64(h ^ k2)``.
   ``P`` (the multiplier) must be odd.
4. Keep the ``top`` largest distinct hashes, in decreasing order.

Returns ``(hashes, sizes)``: ``hashes`` uint64 ``[N, top]`` with row ``r``'s
fingerprint in ``hashes[r, :sizes[r]]`` and zeros after it, ``sizes`` int64
``[N]`` (fewer than ``top`` when a row has fewer distinct windows). An empty row
has an empty fingerprint.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["SATURATE", "fingerprint", "fmix64", "validate_args"]

SATURATE = float(2**62)
_M1 = np.uint64(0xFF51AFD7ED558CCD)
_M2 = np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)


def fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer, elementwise on uint64 (a bijection)."""
    h = h ^ (h >> _S33)
    h = h * _M1
    h = h ^ (h >> _S33)
    h = h * _M2
    return h ^ (h >> _S33)


def validate_args(
    x: np.ndarray,
    offsets: np.ndarray,
    step: float,
    window: int,
    stride: int,
    top: int,
    multiplier: int,
) -> tuple[np.ndarray, np.ndarray]:
    """``x`` as a 2-D batch and ``offsets`` as float64, once every argument is known good."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"fingerprint: x must be a 2-D batch; got shape {x.shape}")
    if x.dtype.kind not in "biuf":
        raise TypeError(f"fingerprint: x must be numeric; got {x.dtype}")
    if not (
        offsets.__class__ is np.ndarray
        and offsets.dtype == np.float64
        and offsets.flags.c_contiguous
    ):
        offsets = np.ascontiguousarray(offsets, dtype=np.float64)
    if offsets.shape != (x.shape[1],):
        raise ValueError(
            f"fingerprint: offsets must have shape ({x.shape[1]},); got {offsets.shape}"
        )
    if not step > 0 or not math.isfinite(step):
        raise ValueError(f"fingerprint: step must be a positive number; got {step}")
    if window < 1 or stride < 1 or top < 1:
        raise ValueError("fingerprint: window, stride and top must be >= 1")
    if not multiplier & 1 or not 0 < multiplier < 2**64:
        raise ValueError("fingerprint: multiplier must be an odd 64-bit integer")
    return x, offsets


def fingerprint(
    x: np.ndarray,
    offsets: np.ndarray,
    step: float,
    window: int,
    stride: int,
    top: int,
    multiplier: int,
    k1: int,
    k2: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The Blacklight fingerprint of every row of ``x``; see the module docstring."""
    x, offsets = validate_args(x, offsets, step, window, stride, top, multiplier)
    n, d = x.shape
    hashes = np.zeros((n, top), dtype=np.uint64)
    sizes = np.zeros(n, dtype=np.int64)
    if n == 0 or d == 0:
        return hashes, sizes
    w = min(window, d)
    starts = np.arange(0, d - w + 1, stride)
    with np.errstate(invalid="ignore"):
        q = np.floor((x.astype(np.float64) + offsets) / np.float64(step))
    q = np.clip(np.where(np.isnan(q), 0.0, q), -SATURATE, SATURATE).astype(np.int64)
    e = fmix64(q.view(np.uint64) + np.uint64(k1))
    p = np.uint64(multiplier)
    h = np.zeros((n, starts.size), dtype=np.uint64)
    for j in range(w):
        h = h * p + e[:, starts + j]
    h = fmix64(h ^ np.uint64(k2))
    for row in range(n):
        kept = np.unique(h[row])[::-1][:top]
        hashes[row, : kept.size] = kept
        sizes[row] = kept.size
    return hashes, sizes

"""Pure-numpy twin of the ``guard._ext.check`` kernel: check a tensor and cast it.

:func:`check_and_cast` defines the semantics; the Cython kernel matches it bit
for bit. The twin takes any numeric (bool, integer, float) input and output
dtype, and the kernel hands it the combinations it does not specialise.

Rules, for every element ``v`` of ``x`` in C order:

1. A NaN or an infinity is a violation (``NAN``, ``INF``) unless
   ``allow_nonfinite`` is set *and* the output dtype is a float; allowed
   non-finite values skip the range checks. Integer and bool outputs cannot hold
   them, so for those ``allow_nonfinite`` has no effect.
2. ``v < lo`` is ``BELOW`` and ``v > hi`` is ``ABOVE``: the bounds are inclusive
   and compared in float64 (an int64 beyond 2**53 is rounded first, as in C).
3. A value the output dtype cannot hold is ``BELOW`` or ``ABOVE`` too: a float
   whose truncation falls outside an integer dtype, an integer outside a smaller
   integer dtype, a finite value that overflows to infinity in a smaller float.
   Bool outputs hold every value (non-zero is ``True``).

The first violating element wins; its code is the first of ``NAN``, ``INF``,
``BELOW``, ``ABOVE`` that applies. The returned array is always new, C-contiguous, of ``x``'s shape,
and holds the cast of every element, violating or not: numpy's conversions
(round to nearest between floats, truncation toward zero from float to
integer), with saturation where C leaves them undefined (NaN becomes 0, a value
beyond an integer dtype's range becomes its minimum or maximum).
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

import numpy as np

__all__ = ["Violation", "check_and_cast", "validate_args"]

_NUMERIC_KINDS = frozenset("biuf")


class Violation(IntEnum):
    """Why a tensor failed the check; ``OK`` when it did not."""

    OK = 0
    NAN = 1
    INF = 2
    BELOW = 3
    ABOVE = 4


def check_and_cast(
    x: np.ndarray,
    out_dtype: Any,
    lo: float | None,
    hi: float | None,
    allow_nonfinite: bool,
) -> tuple[np.ndarray, int, Violation]:
    """Cast ``x`` to ``out_dtype`` and find its first violation.

    Returns ``(out, index, code)``: the cast array (new, C-contiguous, ``x``'s
    shape), the flat C-order index of the first violating element or -1, and
    its :class:`Violation` (``OK`` with -1). Raises :class:`TypeError` for a
    non-numeric dtype and :class:`ValueError` for a NaN bound.
    """
    x = np.asarray(x, order="C")
    dtype = validate_args(x.dtype, out_dtype, lo, hi)
    flat = x.reshape(-1)
    out = _cast(flat, dtype)
    if flat.size and _may_violate(flat, dtype, lo, hi):
        index, code = _first_violation(flat, out, lo, hi, allow_nonfinite)
    else:
        index, code = -1, Violation.OK
    return out.reshape(x.shape), index, code


def validate_args(
    in_dtype: np.dtype[Any], out_dtype: Any, lo: float | None, hi: float | None
) -> np.dtype[Any]:
    """``out_dtype`` as a ``np.dtype``, once both dtypes and the bounds are known good."""
    dtype = np.dtype(out_dtype)
    for role, dt in (("input", in_dtype), ("output", dtype)):
        if dt.kind not in _NUMERIC_KINDS:
            raise TypeError(
                f"check_and_cast: {role} dtype must be bool, integer or float; got {dt}"
            )
    for name, bound in (("lo", lo), ("hi", hi)):
        if bound is not None and bound != bound:
            raise ValueError(f"check_and_cast: {name} must not be NaN")
    return dtype


def _cast(x: np.ndarray, dtype: np.dtype[Any]) -> np.ndarray:
    """``x`` (flat) as ``dtype``, saturating where a C cast is undefined."""
    if dtype.kind in "iu" and x.dtype.kind == "f":
        info = np.iinfo(dtype)
        low, high = _truncation_out_of_range(x, dtype)
        undefined = low | high | np.isnan(x)
        if undefined.any():
            out = np.where(undefined, 0, x).astype(dtype)
            out[low] = info.min
            out[high] = info.max
            return out
    elif dtype.kind in "iu" and x.dtype.kind in "iu":
        src, dst = np.iinfo(x.dtype), np.iinfo(dtype)
        if src.min < dst.min:
            x = np.maximum(x, x.dtype.type(dst.min))
        if src.max > dst.max:
            x = np.minimum(x, x.dtype.type(dst.max))
    with np.errstate(over="ignore", invalid="ignore"):
        return x.astype(dtype)


def _truncation_out_of_range(x: np.ndarray, dtype: np.dtype[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Masks of floats whose truncation lies below / above integer ``dtype``'s range."""
    info = np.iinfo(dtype)
    t = np.trunc(x.astype(np.float64, copy=False))
    # Both limits are 0 or a power of two, hence exact in float64.
    return t < float(info.min), t >= float(info.max + 1)


def _may_violate(x: np.ndarray, dtype: np.dtype[Any], lo: float | None, hi: float | None) -> bool:
    """False only if no element of non-empty ``x`` violates. Every range rule is
    monotone in the value, so the extremes decide; a NaN or an infinity among
    them answers True even where allowed, leaving the decision to the full check."""
    ends = np.array([x.min(), x.max()], dtype=x.dtype)
    return _first_violation(ends, _cast(ends, dtype), lo, hi, allow_nonfinite=False)[0] >= 0


def _first_violation(
    x: np.ndarray, out: np.ndarray, lo: float | None, hi: float | None, allow_nonfinite: bool
) -> tuple[int, Violation]:
    """Index and code of the first violating element of ``x`` (flat), or ``(-1, OK)``."""
    rules = _rules(x, out, lo, hi, allow_nonfinite)
    if not rules:
        return -1, Violation.OK
    bad = np.logical_or.reduce([mask for _, mask in rules])
    first = int(np.argmax(bad))
    if not bad[first]:
        return -1, Violation.OK
    return first, next(code for code, mask in rules if mask[first])


def _rules(
    x: np.ndarray, out: np.ndarray, lo: float | None, hi: float | None, allow_nonfinite: bool
) -> list[tuple[Violation, np.ndarray]]:
    """``(code, mask)`` per rule in priority order; rules that cannot fire are left out."""
    rules: list[tuple[Violation, np.ndarray]] = []
    finite: np.ndarray | None = None
    if x.dtype.kind == "f":
        if allow_nonfinite and out.dtype.kind == "f":
            finite = np.isfinite(x)
        else:
            rules += [(Violation.NAN, np.isnan(x)), (Violation.INF, np.isinf(x))]

    below: list[np.ndarray] = [] if lo is None else [x < np.float64(lo)]
    above: list[np.ndarray] = [] if hi is None else [x > np.float64(hi)]
    if out.dtype.kind in "iu" and x.dtype.kind == "f":
        low, high = _truncation_out_of_range(x, out.dtype)
        below.append(low)
        above.append(high)
    elif out.dtype.kind in "iu" and x.dtype.kind in "iu":
        src, dst = np.iinfo(x.dtype), np.iinfo(out.dtype)
        if src.min < dst.min:
            below.append(x < x.dtype.type(dst.min))
        if src.max > dst.max:
            above.append(x > x.dtype.type(dst.max))
    elif out.dtype.kind == "f" and x.dtype.kind != "b":
        overflow = np.isinf(out) & ~np.isinf(x)
        below.append(overflow & (out < 0))
        above.append(overflow & (out > 0))

    for code, masks in ((Violation.BELOW, below), (Violation.ABOVE, above)):
        if masks:
            mask = np.logical_or.reduce(masks)
            rules.append((code, mask if finite is None else mask & finite))
    return rules

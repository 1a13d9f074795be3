# cython: language_level=3, embedsignature=True
"""One-pass input check of the ``validate`` stage: finite, within bounds, cast.

Semantics are those of :func:`guard._py.check.check_and_cast` (its module
docstring states them); this kernel matches it bit for bit. It specialises
input dtypes float32, float64, int32, int64, uint8 and output dtypes float32,
float64, int64 (native byte order) and hands every other combination to it.

One pass: each block of ``BLOCK`` elements is cast and checked in the same
branch-free loop, which the compiler vectorises (on x86-64 given SSE4.2, see
setup.py); only the block holding the first violation is scanned again to
locate it, and the rest is only cast. Clamping the bounds to finite values
lets the two range comparisons reject NaN and infinities as well.
"""

cimport cython
from libc.float cimport DBL_MAX
from libc.math cimport INFINITY, fabs, nextafter
from libc.stdint cimport INT64_MAX, INT64_MIN, int32_t, int64_t, uint8_t

import numpy as np

from guard._py.check import Violation, validate_args
from guard._py.check import check_and_cast as _twin

ctypedef fused in_t:
    float
    double
    int32_t
    int64_t
    uint8_t

ctypedef fused out_t:
    float
    double
    int64_t

cdef enum:
    BLOCK = 256

cdef int OK = Violation.OK
cdef int NAN_ = Violation.NAN
cdef int INF_ = Violation.INF
cdef int BELOW = Violation.BELOW
cdef int ABOVE = Violation.ABOVE
cdef tuple CODES = tuple(Violation)

# A float converts to int64 iff -2**63 <= v < 2**63; a float64 rounds to a
# finite float32 iff |v| < FLT_MAX + half an ulp = 2**128 - 2**103.
cdef double TWO_63 = 2.0 ** 63
cdef double FLOAT32_OVERFLOW = 2.0 ** 128 - 2.0 ** 103

_NATIVE_IN = frozenset(map(np.dtype, ("float32", "float64", "int32", "int64", "uint8")))
_NATIVE_OUT = frozenset(map(np.dtype, ("float32", "float64", "int64")))


def check_and_cast(x, out_dtype, lo, hi, bint allow_nonfinite):
    """Cast ``x`` to ``out_dtype`` and find its first violation.

    Returns ``(out, index, code)`` exactly as the pure-Python twin does.
    """
    x = np.asarray(x, order="C")
    dtype = np.dtype(out_dtype)
    if x.dtype not in _NATIVE_IN or dtype not in _NATIVE_OUT:
        return _twin(x, dtype, lo, hi, allow_nonfinite)
    cdef double lo_ = -INFINITY if lo is None else lo
    cdef double hi_ = INFINITY if hi is None else hi
    if lo_ != lo_ or hi_ != hi_:
        validate_args(x.dtype, dtype, lo, hi)  # raises the twin's ValueError
    if not x.flags.aligned:
        x = x.copy()
    flat = x.reshape(-1)
    out = np.empty(flat.shape[0], dtype=dtype)
    first, code = _check(flat, out, lo_, hi_, allow_nonfinite)
    return out.reshape(x.shape), first, CODES[code]


@cython.boundscheck(False)
@cython.wraparound(False)
def _check(const in_t[::1] x, out_t[::1] out, double lo, double hi, bint allow_nonfinite):
    """Fill ``out`` with ``x`` cast; return (index, code) of the first violation."""
    cdef Py_ssize_t n = x.shape[0]
    cdef Py_ssize_t start = 0
    cdef Py_ssize_t stop
    cdef Py_ssize_t first = -1
    cdef int code = OK
    cdef bint reject_nonfinite = not allow_nonfinite
    # Fold the output's representable range into the bounds.
    if (in_t is float or in_t is double) and out_t is int64_t:
        reject_nonfinite = True
        lo = max(lo, -TWO_63)
        hi = min(hi, nextafter(TWO_63, 0.0))
    if in_t is double and out_t is float:
        lo = max(lo, -nextafter(FLOAT32_OVERFLOW, 0.0))
        hi = min(hi, nextafter(FLOAT32_OVERFLOW, 0.0))
    if reject_nonfinite:
        lo = max(lo, -DBL_MAX)
        hi = min(hi, DBL_MAX)
    with nogil:
        while first < 0 and start < n:
            stop = min(start + BLOCK, n)
            if _cast_and_check(x, out, start, stop, lo, hi, reject_nonfinite):
                first = _first_violation(x, start, stop, lo, hi, reject_nonfinite)
                code = _code(x[first], lo, hi, reject_nonfinite)
            start = stop
        _cast(x, out, start, n)
    return first, code


@cython.boundscheck(False)
@cython.wraparound(False)
cdef inline bint _cast_and_check(
    const in_t[::1] x, out_t[::1] out, Py_ssize_t start, Py_ssize_t stop,
    double lo, double hi, bint reject_nonfinite,
) noexcept nogil:
    """Cast ``x[start:stop]`` into ``out``; True if any of it violates."""
    cdef bint bad = False
    cdef Py_ssize_t i
    for i in range(start, stop):
        if (in_t is float or in_t is double) and out_t is int64_t:
            out[i] = _saturate(x[i])
        else:
            out[i] = <out_t>x[i]
        bad |= _violates(x[i], lo, hi, reject_nonfinite)
    return bad


@cython.boundscheck(False)
@cython.wraparound(False)
cdef inline void _cast(const in_t[::1] x, out_t[::1] out, Py_ssize_t start, Py_ssize_t stop) noexcept nogil:
    """Cast ``x[start:stop]`` into ``out``, unchecked."""
    cdef Py_ssize_t i
    for i in range(start, stop):
        if (in_t is float or in_t is double) and out_t is int64_t:
            out[i] = _saturate(x[i])
        else:
            out[i] = <out_t>x[i]


@cython.boundscheck(False)
@cython.wraparound(False)
cdef inline Py_ssize_t _first_violation(
    const in_t[::1] x, Py_ssize_t start, Py_ssize_t stop,
    double lo, double hi, bint reject_nonfinite,
) noexcept nogil:
    """Index of the first violating element of ``x[start:stop]``, or -1."""
    cdef Py_ssize_t i
    for i in range(start, stop):
        if _violates(x[i], lo, hi, reject_nonfinite):
            return i
    return -1


cdef inline bint _violates(in_t v, double lo, double hi, bint reject_nonfinite) noexcept nogil:
    """Branch-free ``_code(v, ...) != OK``. With finite bounds a NaN or an
    infinity fails them, so rejecting non-finite values costs no extra test."""
    cdef double d = <double>v
    if in_t is float or in_t is double:
        if not reject_nonfinite:
            return ((d < lo) | (d > hi)) & (fabs(d) != INFINITY)
    return (not d >= lo) | (not d <= hi)


cdef inline int _code(in_t v, double lo, double hi, bint reject_nonfinite) noexcept nogil:
    """The violation code of one value; the bounds include the output's range."""
    cdef double d = <double>v
    if in_t is float or in_t is double:
        if d != d:
            return NAN_ if reject_nonfinite else OK
        if fabs(d) == INFINITY:
            return INF_ if reject_nonfinite else OK
    if d < lo:
        return BELOW
    if d > hi:
        return ABOVE
    return OK


cdef inline int64_t _saturate(double d) noexcept nogil:
    """``d`` truncated to int64; NaN gives 0 and out-of-range values saturate."""
    if d != d:
        return 0
    if d < -TWO_63:
        return INT64_MIN
    if d >= TWO_63:
        return INT64_MAX
    return <int64_t>d

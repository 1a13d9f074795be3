# cython: language_level=3, embedsignature=True
# distutils: language = c++
"""The privacy stage's confidence bins: check a batch of probability rows and release it.

Semantics are those of :func:`guard._py.bins.release` (its module docstring states
them); this kernel returns the same bits. It specialises C-contiguous float32 and
float64 scores and hands anything else to the twin. Two passes: the checks (every
value, each row's sum from left to right), then per row its top class and level and
the ``ordered`` places after it, picked one at a time (a few: the usual ``ranked``) or
by sorting the row (many), every other place taking the last share.

The sort orders (key, index) pairs, the key a value's bits reversed: the bits of a
non-negative double (-0 made +0) rise with it, so ascending keys are descending values,
and equal values fall back on the lower index, as ``np.argsort(-p, kind="stable")``.
"""

cimport cython
from libc.stdint cimport uint64_t
from libc.string cimport memcpy
from libcpp.algorithm cimport sort
from libcpp.pair cimport pair
from libcpp.vector cimport vector

import numpy as np

from guard._py import bins as twin

ctypedef pair[uint64_t, Py_ssize_t] Entry

cdef enum:
    SELECT = 8  # up to this many ordered places: picked by scans, beyond: a sort

_NATIVE = frozenset(map(np.dtype, ("float32", "float64")))
_FLOAT64 = np.dtype("float64")


def release(scores, edges, levels, shares, Py_ssize_t ordered, double lo, double hi):
    """``(released, code)`` exactly as the pure-numpy twin returns them."""
    if not (  # the usual call, checked here; anything else through the twin
        type(scores) is np.ndarray and scores.ndim == 2 and scores.dtype in _NATIVE
        and scores.flags.c_contiguous and scores.shape[1] >= 2
        and _table(edges) and _table(levels) and _table(shares)
        and levels.shape[0] == edges.shape[0] + 1 and shares.shape[0] == scores.shape[1] - 1
        and 0 <= ordered < shares.shape[0]
    ):
        return twin.release(scores, edges, levels, shares, ordered, lo, hi)
    cdef int code
    out = np.empty_like(scores)
    cdef const float[:, ::1] pf
    cdef const double[:, ::1] pd
    cdef float[:, ::1] of
    cdef double[:, ::1] od
    cdef const double[::1] e = edges, v = levels, s = shares
    cdef vector[Entry] scratch
    scratch.resize(scores.shape[1])
    if scores.dtype == np.float32:
        pf, of = scores, out
        with nogil:
            code = _release(pf, of, e, v, s, ordered, lo, hi, scratch)
    else:
        pd, od = scores, out
        with nogil:
            code = _release(pd, od, e, v, s, ordered, lo, hi, scratch)
    return (scores, code) if code else (out, 0)


cdef bint _table(a):
    return type(a) is np.ndarray and a.ndim == 1 and a.dtype == _FLOAT64 and a.flags.c_contiguous


ctypedef fused real:
    float
    double


@cython.boundscheck(False)
@cython.wraparound(False)
cdef int _release(const real[:, ::1] p, real[:, ::1] out, const double[::1] edges,
                  const double[::1] levels, const double[::1] shares, Py_ssize_t ordered,
                  double lo, double hi, vector[Entry]& scratch) noexcept nogil:
    cdef Py_ssize_t n = p.shape[0], c = p.shape[1], i, j
    cdef double total
    cdef bint outside = False, off = False
    for i in range(n):
        total = 0.0
        for j in range(c):
            if not (p[i, j] >= 0 and p[i, j] <= 1):  # NaN fails both
                outside = True
            total = total + p[i, j]
        if not (total >= lo and total <= hi):
            off = True
    if outside:
        return 1  # twin.RANGE
    if off:
        return 2  # twin.SUM
    for i in range(n):
        _row(&p[i, 0], &out[i, 0], c, edges, levels, shares, ordered, scratch)
    return 0


@cython.boundscheck(False)
@cython.wraparound(False)
cdef inline void _row(const real* p, real* out, Py_ssize_t c, const double[::1] edges,
                      const double[::1] levels, const double[::1] shares, Py_ssize_t ordered,
                      vector[Entry]& scratch) noexcept nogil:
    cdef Py_ssize_t top = 0, j, r, k = 0, best, m = 0
    for j in range(1, c):
        if p[j] > p[top]:  # strictly: the lowest index among equals
            top = j
    cdef double value = p[top]
    while k < edges.shape[0] and edges[k] <= value:
        k += 1
    cdef double level = levels[k]
    cdef double rest = 1.0 - level
    cdef real fill = <real>(rest * shares[shares.shape[0] - 1])
    for j in range(c):
        out[j] = fill
    out[top] = <real>level
    if ordered == 0:
        return
    if ordered <= SELECT:  # pick each place by a scan over the classes not yet placed
        for j in range(c):
            scratch[j].second = 0  # 1: placed
        scratch[top].second = 1
        for r in range(ordered):
            best = -1
            for j in range(c):
                if scratch[j].second == 0 and (best < 0 or p[j] > p[best]):
                    best = j
            scratch[best].second = 1
            out[best] = <real>(rest * shares[r])
        return
    for j in range(c):  # sort the other classes: larger value first, then lower index
        if j != top:
            scratch[m].first = ~_bits(<double>p[j] + 0.0)
            scratch[m].second = j
            m += 1
    sort(scratch.begin(), scratch.begin() + m)
    for r in range(ordered):
        out[scratch[r].second] = <real>(rest * shares[r])


cdef inline uint64_t _bits(double value) noexcept nogil:
    cdef uint64_t bits
    memcpy(&bits, &value, sizeof(bits))
    return bits

# cython: language_level=3, embedsignature=True
"""One PRADA observation's arithmetic: the nearest member of a growing set and ``T_c``.

Semantics are those of :func:`guard._py.prada.scan` (its module docstring states
them); this kernel matches it bit for bit. One pass over the stored table, read in
place (no decoded copy): each member's squared distance summed in float64 in eight
independent lanes (no chain of dependent additions; the compiler may vectorise them),
abandoned once its partial sum exceeds the best so far (every lane only grows and
rounding is monotone, so the minimum is unchanged); then the running mean and
standard deviation of the joined distances.
"""

cimport cython
from libc.math cimport INFINITY, isfinite, isnan, sqrt
from libc.stdlib cimport free, malloc

import numpy as np

from guard._py.prada import validate_args, validate_joined, validate_members


def scan(table, x):
    """``(d2, threshold)`` of query ``x`` against the growing set ``table``."""
    table, x = validate_args(table, x)
    cdef double d2 = 0.0, t = 0.0
    _scan(table, x, 1, &d2, &t)
    return d2, t


def nearest(members, x):
    """``d2`` of query ``x`` against ``members`` (float32 ``[k >= 1, D]``, C-contiguous, no
    joined column): :func:`scan`'s first value for the table of these members."""
    members, x = validate_members(members, x)
    cdef double d2 = 0.0, t = 0.0
    _scan(members, x, 0, &d2, &t)
    return d2


def nearest_pruned(members, norms, double largest, x):
    """:func:`nearest`'s value, found by comparing every member in float32 first.

    ``norms``: each member's squared norm (float64 ``[k]``), ``largest``: at least the
    largest member norm. A float32 dot product per member (eight lanes) estimates
    ``a_i = ‖y_i‖² - 2·x·y_i``, within ``B = 2·γ·‖x‖·‖y‖ + 4u·(‖x‖ + ‖y‖)²`` of the
    kernel's ``d2_i - ‖x‖²`` (``u = 2⁻²⁴``, ``γ = (D + 2)·u / (1 - (D + 2)·u)``: any
    order of the float32 additions, and the kernel's rounding of each difference), taken
    twice over; only members within ``2B`` of the least estimate can be nearest, and
    only theirs is computed exactly. Bit for bit :func:`nearest`.
    """
    members, x = validate_members(members, x)
    cdef const double[::1] n = np.ascontiguousarray(norms, dtype=np.float64)
    if n.shape[0] != members.shape[0]:
        raise ValueError("prada nearest_pruned: one norm per member")
    cdef const float[:, ::1] m = members
    cdef const float[::1] xs = x
    cdef Py_ssize_t k = m.shape[0], d = m.shape[1]
    cdef double* a = <double*>malloc(k * sizeof(double))
    cdef double best = 0.0
    if a == NULL:
        raise MemoryError()
    try:
        with nogil:
            best = _pruned(m, n, largest, xs, a)
    finally:
        free(a)
    return best


def threshold(joined):
    """``T_c`` of the joined distances (float32 ``[k]``, NaN skipped): :func:`scan`'s second
    value for a table whose column 0 is ``joined``."""
    cdef const float[::1] d = validate_joined(joined)
    return _threshold(&d[0] if d.shape[0] else NULL, d.shape[0], 1)


cdef enum:
    LANES = 8  # guard._py.prada.LANES
    CHECK = 64  # values between two early-abandon checks (a multiple of LANES)


cdef inline double _sq(float a, float b) noexcept nogil:
    """The square, in float64, of the difference rounded to float32."""
    cdef float f = a - b
    cdef double d = f
    return d * d


@cython.boundscheck(False)
@cython.wraparound(False)
@cython.cdivision(True)
cdef void _scan(const float[:, ::1] table, const float[::1] x, int first, double* d2_out,
                double* t_out):
    """``first``: the column of the values (1: column 0 holds the joined distances, whose
    threshold goes to ``t_out``; 0: members only, ``t_out`` untouched)."""
    cdef Py_ssize_t k = table.shape[0], d = x.shape[0], i
    cdef double best = 0.0, s, t = 0.0
    cdef const float* xs = &x[0] if d else NULL
    with nogil:
        for i in range(k):
            # past the first member, one that cannot be nearest is abandoned (INFINITY)
            s = _d2_below(&table[i, first] if d else NULL, xs, d, best if i else INFINITY)
            if i == 0 or s < best:
                best = s
        if first:
            t = _threshold(&table[0, 0], k, table.shape[1])
    d2_out[0] = best
    if first:
        t_out[0] = t


@cython.cdivision(True)
cdef inline double _threshold(const float* joined, Py_ssize_t k, Py_ssize_t stride) noexcept nogil:
    """The running maximum of ``mean - std`` over the prefixes of ``joined[0], joined[stride],
    ...`` (``k`` values, NaN skipped), and ``0``."""
    cdef double v, n = 0.0, s1 = 0.0, s2 = 0.0, mean, var, t = 0.0
    cdef Py_ssize_t i
    for i in range(k):
        v = joined[i * stride]
        if isnan(v):
            continue
        n += 1.0
        s1 = s1 + v
        s2 = s2 + v * v
        mean = s1 / n
        var = s2 / n - mean * mean
        if var < 0.0:
            var = 0.0
        v = mean - sqrt(var)
        if v > t:
            t = v
    return t


@cython.boundscheck(False)
@cython.wraparound(False)
cdef inline float _dot(const float* row, const float* xs, Py_ssize_t d) noexcept nogil:
    """``x·y`` in float32, in eight independent lanes (lane ``l`` adds the products of
    ``j ≡ l (mod 8)`` in order; the compiler vectorises them), then the tail."""
    cdef float acc[LANES]
    cdef Py_ssize_t j = 0, l
    for l in range(LANES):
        acc[l] = 0
    while j + LANES <= d:
        for l in range(LANES):
            acc[l] = acc[l] + row[j + l] * xs[j + l]
        j += LANES
    while j < d:
        acc[0] = acc[0] + row[j] * xs[j]
        j += 1
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))


@cython.boundscheck(False)
@cython.wraparound(False)
@cython.cdivision(True)
cdef inline double _d2_below(const float* row, const float* xs, Py_ssize_t d,
                             double limit) noexcept nogil:
    """One member's squared distance, summed in eight independent lanes (kept in
    registers; lane ``l`` adds ``j ≡ l (mod 8)`` in order), then the tail, then the lanes
    pairwise. Every ``CHECK`` values, a partial sum above ``limit`` abandons the member:
    INFINITY (a sum is never changed by the checks, only cut short)."""
    cdef double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0, a4 = 0.0, a5 = 0.0, a6 = 0.0
    cdef double a7 = 0.0
    cdef double tail[LANES]
    cdef Py_ssize_t j = 0, l
    while j + LANES <= d:
        a0 = a0 + _sq(row[j], xs[j])
        a1 = a1 + _sq(row[j + 1], xs[j + 1])
        a2 = a2 + _sq(row[j + 2], xs[j + 2])
        a3 = a3 + _sq(row[j + 3], xs[j + 3])
        a4 = a4 + _sq(row[j + 4], xs[j + 4])
        a5 = a5 + _sq(row[j + 5], xs[j + 5])
        a6 = a6 + _sq(row[j + 6], xs[j + 6])
        a7 = a7 + _sq(row[j + 7], xs[j + 7])
        j += LANES
        if j % CHECK == 0 and ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)) > limit:
            return INFINITY
    tail[0] = a0
    tail[1] = a1
    tail[2] = a2
    tail[3] = a3
    tail[4] = a4
    tail[5] = a5
    tail[6] = a6
    tail[7] = a7
    for l in range(d - j):
        tail[l] = tail[l] + _sq(row[j + l], xs[j + l])
    return (((tail[0] + tail[1]) + (tail[2] + tail[3]))
            + ((tail[4] + tail[5]) + (tail[6] + tail[7])))


@cython.boundscheck(False)
@cython.wraparound(False)
@cython.cdivision(True)
cdef double _pruned(const float[:, ::1] m, const double[::1] norms, double largest,
                    const float[::1] x, double* a) noexcept nogil:
    cdef Py_ssize_t k = m.shape[0], d = m.shape[1], i, j
    cdef const float* xs = &x[0]
    cdef double xx = 0.0, least = 0.0, u = 1.0 / 16777216.0, gamma, nx, bound, s, best = 0.0
    cdef bint found = False
    for j in range(d):
        xx = xx + <double>xs[j] * xs[j]
    gamma = (d + 2) * u / (1.0 - (d + 2) * u)
    nx = sqrt(xx) * (1.0 + 4.0 * u)  # at least ‖x‖
    bound = 2.0 * (2.0 * gamma * nx * largest + 4.0 * u * (nx + largest) * (nx + largest))
    cdef bint finite = isfinite(bound)
    for i in range(k):
        a[i] = norms[i] - 2.0 * <double>_dot(&m[i, 0], xs, d)
        finite = finite and isfinite(a[i])
        if i == 0 or a[i] < least:
            least = a[i]
    for i in range(k):
        if finite and a[i] > least + 2.0 * bound:
            continue  # cannot be the nearest
        s = _d2_below(&m[i, 0], xs, d, INFINITY)
        if not found or s < best:  # as _scan: the first member, then any nearer one
            best = s
            found = True
    return best

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
from libc.math cimport isnan, sqrt

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
    cdef Py_ssize_t k = table.shape[0], d = x.shape[0], i, j, l
    cdef double best = 0.0, s, t = 0.0
    cdef double a0, a1, a2, a3, a4, a5, a6, a7
    cdef double tail[LANES]
    cdef const float* row
    cdef const float* xs = &x[0] if d else NULL
    cdef bint abandoned
    with nogil:
        for i in range(k):
            row = &table[i, first] if d else NULL
            a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
            abandoned = False
            j = 0
            while j + LANES <= d:  # eight independent chains, kept in registers
                a0 = a0 + _sq(row[j], xs[j])
                a1 = a1 + _sq(row[j + 1], xs[j + 1])
                a2 = a2 + _sq(row[j + 2], xs[j + 2])
                a3 = a3 + _sq(row[j + 3], xs[j + 3])
                a4 = a4 + _sq(row[j + 4], xs[j + 4])
                a5 = a5 + _sq(row[j + 5], xs[j + 5])
                a6 = a6 + _sq(row[j + 6], xs[j + 6])
                a7 = a7 + _sq(row[j + 7], xs[j + 7])
                j += LANES
                if i and j % CHECK == 0:
                    if ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)) > best:
                        abandoned = True
                        break
            if abandoned:
                continue
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
            s = (((tail[0] + tail[1]) + (tail[2] + tail[3]))
                 + ((tail[4] + tail[5]) + (tail[6] + tail[7])))
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

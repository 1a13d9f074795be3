# cython: language_level=3, embedsignature=True
"""One PRADA observation's arithmetic: the nearest member of a growing set and ``T_c``.

Semantics are those of :func:`guard._py.prada.scan` (its module docstring states
them); this kernel matches it bit for bit. One pass over the stored table, read in
place (no decoded copy): each member's squared distance summed in float64 in index
order, abandoned once it exceeds the best so far (its sum can only grow, so the
minimum is unchanged); then the running mean and standard deviation of the joined
distances.
"""

cimport cython
from libc.math cimport isnan, sqrt

from guard._py.prada import validate_args


def scan(table, x):
    """``(d2, threshold)`` of query ``x`` against the growing set ``table``."""
    table, x = validate_args(table, x)
    cdef double d2 = 0.0, t = 0.0
    _scan(table, x, &d2, &t)
    return d2, t


@cython.boundscheck(False)
@cython.wraparound(False)
@cython.cdivision(True)
cdef void _scan(const float[:, ::1] table, const float[::1] x, double* d2_out,
                double* t_out):
    cdef Py_ssize_t k = table.shape[0], d = x.shape[0], i, j
    cdef double best = 0.0, s, v, diff, n = 0.0, s1 = 0.0, s2 = 0.0, mean, var, t = 0.0
    cdef float f
    with nogil:
        for i in range(k):
            s = 0.0
            for j in range(d):
                f = table[i, j + 1] - x[j]
                diff = f
                s = s + diff * diff
                if i and s > best:
                    break
            if i == 0 or s < best:
                best = s
        for i in range(k):
            v = table[i, 0]
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
    d2_out[0] = best
    t_out[0] = t

# cython: language_level=3, embedsignature=True
"""The ``coverage`` stage's novelty test: is any remembered query within the radius?

Semantics are those of :func:`guard._py.coverage.within` (its module docstring states
them); this kernel returns the same answer. One pass over the live rows, read in place:
each row's squared distance summed exactly in int64, abandoned once its partial sum
exceeds ``limit`` (every term is non-negative), and the scan stops at the first row
within ``limit``. The newest rows are visited first: a near query is most often a retry
or a jittered copy of a recent one.
"""

cimport cython
from libc.stdint cimport int16_t, int64_t

import numpy as np

from guard._py.coverage import validate_args

_INT16 = np.dtype("int16")

cdef enum:
    CHECK = 2  # values between two early-abandon checks


def within(rows, Py_ssize_t count, x, int64_t limit):
    """Whether one of ``rows[:count]`` lies within squared distance ``limit`` of ``x``."""
    if not (  # the usual call (the stage's own window), checked here; else the twin's checks
        type(rows) is np.ndarray and type(x) is np.ndarray
        and rows.dtype == _INT16 and x.dtype == _INT16 and rows.ndim == 2 and x.ndim == 1
        and rows.shape[1] == x.shape[0] and 0 <= count <= rows.shape[0]
        and rows.flags.c_contiguous and x.flags.c_contiguous
    ):
        rows, x = validate_args(rows, count, x)
    return _within(rows, count, x, limit)


cdef inline int64_t _sq(int16_t a, int16_t b) noexcept nogil:
    cdef int64_t v = <int64_t>a - <int64_t>b
    return v * v


@cython.boundscheck(False)
@cython.wraparound(False)
cdef bint _within(const int16_t[:, ::1] rows, Py_ssize_t count, const int16_t[::1] x,
                  int64_t limit) noexcept:
    cdef Py_ssize_t d = x.shape[0], i, j, stop
    cdef int64_t s
    cdef const int16_t* row
    cdef const int16_t* xs = &x[0] if d else NULL
    cdef bint found = False
    if count == 0:
        return False
    if d == 0:
        return 0 <= limit
    with nogil:
        for i in range(count - 1, -1, -1):
            row = &rows[i, 0]
            s = 0
            j = 0
            while j < d:  # blocks of CHECK values, then the early-abandon check
                stop = j + CHECK if j + CHECK < d else d
                while j < stop:
                    s += _sq(row[j], xs[j])
                    j += 1
                if s > limit:
                    break
            if s <= limit:
                found = True
                break
    return found

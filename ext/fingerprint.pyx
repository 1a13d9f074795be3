# cython: language_level=3, embedsignature=True
"""Blacklight's query fingerprints: quantize, hash every window, keep the top hashes.

Semantics are those of :func:`guard._py.fingerprint.fingerprint` (its module
docstring states them); this kernel matches it bit for bit. It specialises
float32 and float64 input and hands other dtypes to the twin after casting.

One pass per row: each value quantized and mixed once, then the window hash rolls
(one multiply-add and one subtraction per value, whatever the window), and the ``top`` largest distinct hashes are
kept in a min-heap, so a row of ``D`` values costs O(D log top) with no
temporary arrays. The heap is emptied in increasing order into the output's
tail first, which leaves each fingerprint sorted in decreasing order.
"""

cimport cython
from libc.math cimport INFINITY, floor
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport free, malloc

import numpy as np

from guard._py.fingerprint import SATURATE, validate_args

ctypedef fused in_t:
    float
    double

cdef double SAT = SATURATE
cdef uint64_t M1 = 0xFF51AFD7ED558CCDULL
cdef uint64_t M2 = 0xC4CEB9FE1A85EC53ULL

_NATIVE = frozenset(map(np.dtype, ("float32", "float64")))
_FLOAT64 = np.dtype("float64")


def fingerprint(x, offsets, double step, Py_ssize_t window, Py_ssize_t stride, Py_ssize_t top,
                multiplier, k1, k2):
    """The Blacklight fingerprint of every row of ``x``.

    Returns ``(hashes, sizes)`` exactly as the pure-Python twin does.
    """
    if not (  # the usual call, checked here; anything else through the twin's checks
        type(x) is np.ndarray and x.ndim == 2 and x.dtype in _NATIVE
        and x.flags.c_contiguous and x.flags.aligned
        and type(offsets) is np.ndarray and offsets.dtype == _FLOAT64
        and offsets.flags.c_contiguous and offsets.ndim == 1
        and offsets.shape[0] == x.shape[1] and step > 0 and step < INFINITY
        and window >= 1 and stride >= 1 and top >= 1
        and type(multiplier) is int and multiplier & 1 and 0 < multiplier < 2**64
    ):
        x, offsets = validate_args(x, offsets, step, window, stride, top, multiplier)
        x = np.ascontiguousarray(x if x.dtype in _NATIVE else x.astype(np.float64))
        if not x.flags.aligned:
            x = x.copy()
    hashes = np.zeros((x.shape[0], top), dtype=np.uint64)
    sizes = np.zeros(x.shape[0], dtype=np.int64)
    if not (x.shape[0] and x.shape[1]):
        return hashes, sizes
    # Typed views picked here, not by a fused ``def`` (whose dispatch per call cost more
    # than fingerprinting a row of 64 values).
    cdef const float[:, ::1] xf
    cdef const double[:, ::1] xd
    cdef const double[::1] o = offsets
    cdef uint64_t[:, ::1] out = hashes
    cdef int64_t[::1] n = sizes
    cdef uint64_t p = <uint64_t>int(multiplier), a = <uint64_t>int(k1), b = <uint64_t>int(k2)
    cdef uint64_t* mixed = <uint64_t*>malloc(x.shape[1] * sizeof(uint64_t))
    if mixed == NULL:
        raise MemoryError()
    try:
        if x.dtype == np.float32:
            xf = x
            with nogil:
                _fingerprint(xf, o, out, n, step, window, stride, p, a, b, mixed)
        else:
            xd = x
            with nogil:
                _fingerprint(xd, o, out, n, step, window, stride, p, a, b, mixed)
    finally:
        free(mixed)
    return hashes, sizes


@cython.boundscheck(False)
@cython.wraparound(False)
cdef void _fingerprint(const in_t[:, ::1] x, const double[::1] offsets, uint64_t[:, ::1] hashes,
                       int64_t[::1] sizes, double step, Py_ssize_t window, Py_ssize_t stride,
                       uint64_t p, uint64_t k1, uint64_t k2, uint64_t* mixed) noexcept nogil:
    cdef Py_ssize_t n = x.shape[0], d = x.shape[1], top = hashes.shape[1]
    cdef Py_ssize_t w = min(window, d)
    cdef Py_ssize_t r
    for r in range(n):
        sizes[r] = _row(x, r, offsets, hashes, step, w, stride, p, k1, k2, d, top, mixed)


@cython.boundscheck(False)
@cython.wraparound(False)
cdef inline Py_ssize_t _row(
    const in_t[:, ::1] x, Py_ssize_t r, const double[::1] offsets, uint64_t[:, ::1] out,
    double step, Py_ssize_t w, Py_ssize_t stride, uint64_t p, uint64_t k1, uint64_t k2,
    Py_ssize_t d, Py_ssize_t top, uint64_t* mixed,
) noexcept nogil:
    """Fingerprint row ``r`` into ``out[r]``; return its size. ``mixed``: room for ``d``
    values, each value's keyed mix computed once (a value enters and leaves the window)."""
    cdef uint64_t pw = 1  # P ** (w - 1), to drop the value leaving the window
    cdef uint64_t h = 0
    cdef Py_ssize_t i, start = 0, size = 0, k
    for i in range(d):
        mixed[i] = _element(x[r, i], offsets[i], step, k1)
    for i in range(w - 1):
        pw *= p
    for i in range(w):
        h = h * p + mixed[i]
    while True:
        size = _keep(out, r, size, top, _fmix64(h ^ k2))
        if start + stride + w > d:
            break
        for i in range(start, start + stride):
            h = (h - mixed[i] * pw) * p + mixed[i + w]
        start += stride
    # Pop the min-heap into out[r, size-1], ..., out[r, 0]: decreasing order.
    for k in range(size - 1, 0, -1):
        h = out[r, 0]
        out[r, 0] = out[r, k]
        _sift_down(out, r, 0, k)
        out[r, k] = h
    return size


cdef inline uint64_t _element(in_t v, double offset, double step, uint64_t k1) noexcept nogil:
    """The keyed mix of one quantized value."""
    cdef double q = floor((<double>v + offset) / step)
    if q != q:
        q = 0.0
    elif q < -SAT:
        q = -SAT
    elif q > SAT:
        q = SAT
    return _fmix64(<uint64_t><int64_t>q + k1)


cdef inline uint64_t _fmix64(uint64_t h) noexcept nogil:
    h ^= h >> 33
    h *= M1
    h ^= h >> 33
    h *= M2
    h ^= h >> 33
    return h


@cython.boundscheck(False)
@cython.wraparound(False)
cdef inline Py_ssize_t _keep(uint64_t[:, ::1] heap, Py_ssize_t r, Py_ssize_t size,
                             Py_ssize_t top, uint64_t h) noexcept nogil:
    """Offer ``h`` to the min-heap ``heap[r, :size]`` of the ``top`` largest; return its size."""
    cdef Py_ssize_t i, parent
    if size == top and h <= heap[r, 0]:
        return size
    for i in range(size):  # distinct hashes only
        if heap[r, i] == h:
            return size
    if size < top:
        i = size
        while i > 0:
            parent = (i - 1) >> 1
            if heap[r, parent] <= h:
                break
            heap[r, i] = heap[r, parent]
            i = parent
        heap[r, i] = h
        return size + 1
    heap[r, 0] = h
    _sift_down(heap, r, 0, size)
    return size


@cython.boundscheck(False)
@cython.wraparound(False)
cdef inline void _sift_down(uint64_t[:, ::1] heap, Py_ssize_t r, Py_ssize_t i,
                            Py_ssize_t size) noexcept nogil:
    cdef uint64_t h = heap[r, i]
    cdef Py_ssize_t child
    while True:
        child = 2 * i + 1
        if child >= size:
            break
        if child + 1 < size and heap[r, child + 1] < heap[r, child]:
            child += 1
        if heap[r, child] >= h:
            break
        heap[r, i] = heap[r, child]
        i = child
    heap[r, i] = h

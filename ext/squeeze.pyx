# cython: language_level=3, embedsignature=True
"""Feature squeezers (Xu, Evans, Qi, NDSS 2018): bit depth, median smoothing, clipping.

Semantics are those of :mod:`guard._py.squeeze` (its module docstring states
them); these kernels match it bit for bit, and share its argument checks.

Median smoothing copies each image channel once into a buffer extended by
reflection, so every window is a k x k block of that buffer. 2x2 and 3x3
windows, the sizes feature squeezing uses, take a fixed network of min/max
operations per pixel (Devillard's 19-exchange median of 9; 5 operations for
the upper median of 4) that the compiler vectorises across a row. Other sizes,
and channels holding a NaN, go through a selection (Wirth's algorithm) under
numpy's order, NaN above every number.
"""

cimport cython
from libc.math cimport rint
from libc.stdlib cimport free, malloc

import numpy as np

from guard._py.squeeze import check_bits, check_float, check_image, check_range

ctypedef fused real:
    float
    double

_F32 = np.dtype(np.float32)


def reduce_bits(x, bits, lo, hi):
    """``x`` reduced to ``bits`` bits over ``[lo, hi]``; see :func:`guard._py.squeeze.reduce_bits`."""
    x = _contiguous(check_float(x, "reduce_bits"))
    cdef double levels = <double>((1 << check_bits(bits)) - 1)
    lo, hi = check_range(lo, hi, "reduce_bits")
    out = np.empty(x.size, dtype=x.dtype)
    if x.dtype == _F32:
        _reduce_bits[float](x.reshape(-1), out, levels, lo, hi)
    else:
        _reduce_bits[double](x.reshape(-1), out, levels, lo, hi)
    return out.reshape(x.shape)


def clip(x, lo, hi):
    """``x`` clipped to ``[lo, hi]``; see :func:`guard._py.squeeze.clip`."""
    x = _contiguous(check_float(x, "clip"))
    lo, hi = check_range(lo, hi, "clip")
    out = np.empty(x.size, dtype=x.dtype)
    if x.dtype == _F32:
        _clip[float](x.reshape(-1), out, lo, hi)
    else:
        _clip[double](x.reshape(-1), out, lo, hi)
    return out.reshape(x.shape)


def median_smooth(x, size, height, width, channels=1, layout="HWC"):
    """The k x k median of each image channel; see :func:`guard._py.squeeze.median_smooth`."""
    x = _contiguous(check_float(x, "median_smooth"))
    cdef Py_ssize_t batch = check_image(x.shape, size, height, width, channels, layout)
    out = np.empty(x.size, dtype=x.dtype)
    cdef bint chw = layout == "CHW"
    if x.dtype == _F32:
        _median[float](x.reshape(-1), out, batch, size, height, width, channels, chw)
    else:
        _median[double](x.reshape(-1), out, batch, size, height, width, channels, chw)
    return out.reshape(x.shape)


def _contiguous(x):
    """``x`` C-contiguous and aligned, as typed memoryviews need it."""
    x = np.ascontiguousarray(x)
    return x if x.flags.aligned else x.copy()


# --- bit depth and clipping ---------------------------------------------------------


@cython.boundscheck(False)
@cython.wraparound(False)
cdef void _reduce_bits(const real[::1] x, real[::1] out, double levels, double lo, double hi):
    cdef double scale = levels / (hi - lo)
    cdef double q, v
    cdef Py_ssize_t i
    with nogil:
        for i in range(x.shape[0]):
            q = rint((<double>x[i] - lo) * scale)
            q = 0.0 if q < 0.0 else (levels if q > levels else q)
            v = lo + q / scale
            out[i] = <real>(lo if v < lo else (hi if v > hi else v))


@cython.boundscheck(False)
@cython.wraparound(False)
cdef void _clip(const real[::1] x, real[::1] out, double lo, double hi):
    cdef real low = <real>lo
    cdef real high = <real>hi
    cdef Py_ssize_t i
    with nogil:
        for i in range(x.shape[0]):
            out[i] = low if x[i] < low else (high if x[i] > high else x[i])


# --- median smoothing ---------------------------------------------------------------


@cython.boundscheck(False)
@cython.wraparound(False)
cdef void _median(
    const real[::1] x, real[::1] out, Py_ssize_t batch, Py_ssize_t size,
    Py_ssize_t height, Py_ssize_t width, Py_ssize_t channels, bint chw,
):
    cdef Py_ssize_t wp = width + size - 1
    cdef Py_ssize_t plane = height * width
    # Scratch: the reflected channel, its smoothed copy, one window.
    cdef real* pad = <real*>malloc(((height + size - 1) * wp + plane + size * size) * sizeof(real))
    if pad == NULL:
        raise MemoryError()
    cdef real* smooth = pad + (height + size - 1) * wp
    cdef real* window = smooth + plane
    # Pixel (i, j) of channel c of image n is at n * plane * channels + base(c) + i * row + j * col.
    cdef Py_ssize_t row = width if chw else width * channels
    cdef Py_ssize_t col = 1 if chw else channels
    cdef Py_ssize_t n, c, start
    cdef bint has_nan
    with nogil:
        for n in range(batch):
            for c in range(channels):
                start = n * plane * channels + (c * plane if chw else c)
                has_nan = _reflect(&x[start], row, col, pad, height, width, size)
                if size == 3 and not has_nan:
                    _median3x3(pad, wp, smooth, height, width)
                elif size == 2 and not has_nan:
                    _median2x2(pad, wp, smooth, height, width)
                else:
                    _median_any(pad, wp, smooth, window, height, width, size)
                _scatter(smooth, &out[start], row, col, height, width)
        free(pad)


@cython.boundscheck(False)
@cython.wraparound(False)
cdef inline bint _reflect(
    const real* src, Py_ssize_t row, Py_ssize_t col, real* pad,
    Py_ssize_t height, Py_ssize_t width, Py_ssize_t size,
) noexcept nogil:
    """Copy one channel into ``pad``, extended by ``size//2`` pixels up and left and
    ``size - 1 - size//2`` down and right by reflection (scipy's ``reflect``, numpy's
    ``symmetric``); True if it holds a NaN."""
    cdef Py_ssize_t before = size // 2
    cdef Py_ssize_t after = size - 1 - before
    cdef Py_ssize_t wp = width + size - 1
    cdef Py_ssize_t i, j
    cdef const real* line
    cdef real* dst
    cdef real v
    cdef bint nan = False
    for i in range(height + size - 1):
        line = src + _mirror(i - before, height) * row
        dst = pad + i * wp + before  # column 0 of the image
        for j in range(width):
            v = line[j * col]
            nan |= v != v
            dst[j] = v
        for j in range(before):  # column -1 - j mirrors column j
            dst[-1 - j] = dst[j]
        for j in range(after):  # column width + j mirrors column width - 1 - j
            dst[width + j] = dst[width - 1 - j]
    return nan


cdef inline Py_ssize_t _mirror(Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    """Index ``i`` in ``[-n, 2n)`` reflected into ``[0, n)``."""
    if i < 0:
        return -i - 1
    if i >= n:
        return 2 * n - i - 1
    return i


@cython.boundscheck(False)
@cython.wraparound(False)
cdef inline void _scatter(
    const real* smooth, real* dst, Py_ssize_t row, Py_ssize_t col, Py_ssize_t height, Py_ssize_t width,
) noexcept nogil:
    """Write one smoothed channel into its place in the output; a zero becomes +0.0."""
    cdef Py_ssize_t i, j
    for i in range(height):
        for j in range(width):
            dst[i * row + j * col] = smooth[i * width + j] + <real>0


cdef inline real _min(real a, real b) noexcept nogil:
    return a if a < b else b


cdef inline real _max(real a, real b) noexcept nogil:
    return b if a < b else a


@cython.boundscheck(False)
@cython.wraparound(False)
cdef inline void _median2x2(const real* pad, Py_ssize_t wp, real* out, Py_ssize_t height, Py_ssize_t width) noexcept nogil:
    """Upper median (2nd largest) of each 2x2 block: of two sorted pairs, the larger
    of the smaller maximum and the larger minimum."""
    cdef const real* top
    cdef const real* bottom
    cdef real a, b, c, d
    cdef Py_ssize_t i, j
    for i in range(height):
        top = pad + i * wp
        bottom = top + wp
        for j in range(width):
            a = top[j]
            b = top[j + 1]
            c = bottom[j]
            d = bottom[j + 1]
            out[i * width + j] = _max(_min(_max(a, b), _max(c, d)), _max(_min(a, b), _min(c, d)))


@cython.boundscheck(False)
@cython.wraparound(False)
cdef inline void _median3x3(const real* pad, Py_ssize_t wp, real* out, Py_ssize_t height, Py_ssize_t width) noexcept nogil:
    """Median of each 3x3 block by Devillard's 19-exchange network (``opt_med9``)."""
    cdef const real* r0
    cdef const real* r1
    cdef const real* r2
    cdef real p0, p1, p2, p3, p4, p5, p6, p7, p8
    cdef Py_ssize_t i, j
    for i in range(height):
        r0 = pad + i * wp
        r1 = r0 + wp
        r2 = r1 + wp
        for j in range(width):
            p0 = r0[j]; p1 = r0[j + 1]; p2 = r0[j + 2]
            p3 = r1[j]; p4 = r1[j + 1]; p5 = r1[j + 2]
            p6 = r2[j]; p7 = r2[j + 1]; p8 = r2[j + 2]
            p1, p2 = _min(p1, p2), _max(p1, p2)
            p4, p5 = _min(p4, p5), _max(p4, p5)
            p7, p8 = _min(p7, p8), _max(p7, p8)
            p0, p1 = _min(p0, p1), _max(p0, p1)
            p3, p4 = _min(p3, p4), _max(p3, p4)
            p6, p7 = _min(p6, p7), _max(p6, p7)
            p1, p2 = _min(p1, p2), _max(p1, p2)
            p4, p5 = _min(p4, p5), _max(p4, p5)
            p7, p8 = _min(p7, p8), _max(p7, p8)
            p3 = _max(p0, p3)
            p5 = _min(p5, p8)
            p4, p7 = _min(p4, p7), _max(p4, p7)
            p6 = _max(p3, p6)
            p4 = _max(p1, p4)
            p2 = _min(p2, p5)
            p4 = _min(p4, p7)
            p4, p2 = _min(p4, p2), _max(p4, p2)
            p4 = _max(p6, p4)
            out[i * width + j] = _min(p4, p2)


@cython.boundscheck(False)
@cython.wraparound(False)
cdef inline void _median_any(
    const real* pad, Py_ssize_t wp, real* out, real* window,
    Py_ssize_t height, Py_ssize_t width, Py_ssize_t size,
) noexcept nogil:
    """The ``(size*size)//2``-th smallest of each window, NaN above every number."""
    cdef Py_ssize_t i, j, di, dj
    for i in range(height):
        for j in range(width):
            for di in range(size):
                for dj in range(size):
                    window[di * size + dj] = pad[(i + di) * wp + j + dj]
            out[i * width + j] = _select(window, size * size, size * size // 2)


cdef inline bint _before(real a, real b) noexcept nogil:
    """``a`` sorts before ``b`` in numpy's order: numbers ascending, then NaN."""
    return a < b or (a == a and b != b)


cdef inline real _select(real* a, Py_ssize_t n, Py_ssize_t k) noexcept nogil:
    """The ``k``-th smallest of ``a[:n]`` (Wirth's selection; reorders ``a``)."""
    cdef Py_ssize_t lo = 0, hi = n - 1, i, j
    cdef real pivot, t
    while lo < hi:
        pivot = a[k]
        i = lo
        j = hi
        while i <= j:
            while _before(a[i], pivot):
                i += 1
            while _before(pivot, a[j]):
                j -= 1
            if i <= j:
                t = a[i]; a[i] = a[j]; a[j] = t
                i += 1
                j -= 1
        if j < k:
            lo = i
        if k < i:
            hi = j
    return a[k]

"""Pure-numpy twins of the ``guard._ext.squeeze`` kernels: the feature squeezers.

Xu, Evans, Qi, "Feature Squeezing: Detecting Adversarial Examples in Deep
Neural Networks", NDSS 2018. These functions define the semantics; the Cython
kernels match them bit for bit. Every function takes a native-endian float32 or
float64 array of any layout (``TypeError`` for other dtypes) and returns a new
C-contiguous array of the same shape and dtype. Bad arguments and shapes raise
``ValueError`` with a message that names the problem.

:func:`reduce_bits`
    ``bits``-bit colour depth over the value range ``[lo, hi]``: with
    ``L = 2**bits - 1`` and ``scale = L / (hi - lo)``, computed in float64,
    ``q = clamp(rint((v - lo) * scale), 0, L)`` (round half to even) and the
    result is ``clamp(lo + q / scale, lo, hi)`` cast back to the input dtype.
    For ``[lo, hi] = [0, 1]`` this is the paper's ``round(v * L) / L``. Values
    outside the range land on its ends; NaN stays NaN.
:func:`median_smooth`
    The k x k median of every image channel, equal to
    ``scipy.ndimage.median_filter(image, size=(k, k), mode="reflect")`` on each
    channel: the input is extended by reflecting about the edge
    (``d c b a | a b c d | d c b a``), the window of output pixel ``(i, j)``
    covers rows ``i - k//2 .. i - k//2 + k - 1`` (likewise columns), so an even
    window reaches one pixel further up and left than down and right, and the
    value kept is the ``(k*k)//2``-th smallest (0-based; the upper median for
    even ``k``). NaN sorts above every number, as in ``numpy.sort``; a zero
    result is always ``+0.0``. ``k`` may not exceed the image's height or width.
:func:`clip`
    ``lo`` where ``v < lo``, ``hi`` where ``v > hi``, else ``v``; the bounds are
    first rounded to the input dtype, and NaN stays NaN.

A batch of images is an array whose first axis is the batch and whose other
axes hold one image each: ``[H*W*C]`` (flat), ``[H, W, C]`` for layout ``HWC``,
``[C, H, W]`` for ``CHW``, or ``[H, W]`` when ``C == 1``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

__all__ = [
    "LAYOUTS",
    "MAX_BITS",
    "check_bits",
    "check_float",
    "check_image",
    "check_range",
    "clip",
    "median_smooth",
    "reduce_bits",
]

LAYOUTS = ("HWC", "CHW")
MAX_BITS = 16
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
# Elements of (batch, H, W, C, k*k) windows the twin builds at a time.
_CHUNK_VALUES = 1 << 22


def check_float(x: Any, fn: str) -> np.ndarray:
    """``x`` as an array, once it is known to be native float32 or float64."""
    x = np.asarray(x)
    if x.dtype not in _FLOATS or not x.dtype.isnative:
        raise TypeError(f"{fn}: x must be native float32 or float64; got {x.dtype}")
    return x


def check_range(lo: float, hi: float, fn: str) -> tuple[float, float]:
    """``(lo, hi)`` as floats, once they are finite with ``lo < hi`` and ``hi - lo`` finite."""
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi and math.isfinite(hi - lo)):
        raise ValueError(f"{fn}: the range needs finite lo < hi; got [{lo!r}, {hi!r}]")
    return lo, hi


def check_bits(bits: int) -> int:
    if (
        isinstance(bits, bool)
        or not isinstance(bits, (int, np.integer))
        or not 1 <= bits <= MAX_BITS
    ):
        raise ValueError(f"reduce_bits: bits must be an integer from 1 to {MAX_BITS}; got {bits!r}")
    return int(bits)


def check_image(
    shape: tuple[int, ...], size: int, height: int, width: int, channels: int, layout: str
) -> int:
    """The batch size of an array of ``shape`` holding ``height x width x channels`` images.

    Raises ``ValueError`` when the image, the window ``size`` or ``shape`` is not valid.
    """
    accepted = _sample_shapes(size, height, width, channels, layout)
    if len(shape) < 2 or tuple(shape[1:]) not in accepted:
        shapes = " or ".join(str(["batch", *s]) for s in accepted)
        raise ValueError(
            f"shape {list(shape)} is not a batch of {height}x{width}x{channels} ({layout}) images; "
            f"expected {shapes}"
        )
    return int(shape[0])


@functools.lru_cache(maxsize=64)
def _sample_shapes(
    size: int, height: int, width: int, channels: int, layout: str
) -> tuple[tuple[int, ...], ...]:
    """The per-sample shapes that hold one image; ``ValueError`` for an invalid image or window."""
    for name, value in (
        ("size", size),
        ("height", height),
        ("width", width),
        ("channels", channels),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"median_smooth: {name} must be a positive integer; got {value!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"median_smooth: layout must be HWC or CHW; got {layout!r}")
    if size > min(height, width):
        raise ValueError(
            f"median_smooth: a {size}x{size} window does not fit a {height}x{width} image"
        )
    image = (height, width, channels) if layout == "HWC" else (channels, height, width)
    shapes = [(height * width * channels,), image]
    if channels == 1:
        shapes.append((height, width))
    return tuple(tuple(int(d) for d in s) for s in shapes)


def reduce_bits(x: np.ndarray, bits: int, lo: float, hi: float) -> np.ndarray:
    """``x`` reduced to ``bits`` bits over ``[lo, hi]`` (see the module docstring)."""
    x = check_float(x, "reduce_bits")
    levels = float((1 << check_bits(bits)) - 1)
    lo, hi = check_range(lo, hi, "reduce_bits")
    scale = levels / (hi - lo)
    with np.errstate(invalid="ignore"):
        q = np.rint((x.astype(np.float64) - lo) * scale)
        q = np.where(q < 0.0, 0.0, np.where(q > levels, levels, q))
        out = lo + q / scale
        out = np.where(out < lo, lo, np.where(out > hi, hi, out))
    return np.ascontiguousarray(out.astype(x.dtype))


def median_smooth(
    x: np.ndarray, size: int, height: int, width: int, channels: int = 1, layout: str = "HWC"
) -> np.ndarray:
    """The ``size`` x ``size`` median of each channel of each image (see the module docstring)."""
    x = check_float(x, "median_smooth")
    batch = check_image(x.shape, size, height, width, channels, layout)
    if layout == "HWC":
        images = x.reshape(batch, height, width, channels)
    else:
        images = x.reshape(batch, channels, height, width).transpose(0, 2, 3, 1)
    before, after = size // 2, size - 1 - size // 2
    rank = size * size // 2
    out = np.empty_like(images)  # same axes as ``images``
    step = max(1, _CHUNK_VALUES // (height * width * channels * size * size))
    for start in range(0, batch, step):
        chunk = images[start : start + step]
        padded = np.pad(chunk, ((0, 0), (before, after), (before, after), (0, 0)), mode="symmetric")
        windows = np.lib.stride_tricks.sliding_window_view(padded, (size, size), axis=(1, 2))
        values = windows.reshape(*chunk.shape, size * size)
        out[start : start + step] = np.partition(values, rank, axis=-1)[..., rank]
    out += 0.0  # -0.0 becomes +0.0, whichever zero the selection kept
    if layout == "CHW":
        out = out.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(out).reshape(x.shape)


def clip(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``x`` clipped to ``[lo, hi]`` rounded to its dtype (see the module docstring)."""
    x = check_float(x, "clip")
    lo, hi = check_range(lo, hi, "clip")
    low, high = x.dtype.type(lo), x.dtype.type(hi)
    return np.ascontiguousarray(np.where(x < low, low, np.where(x > high, high, x)))

"""The feature squeezers: the Cython kernels, their numpy twins, and what both promise.

Three layers of evidence, as for ``check_and_cast``:

* the twin's median equals ``scipy.ndimage.median_filter(mode="reflect")``, and its
  bit-depth reduction and clipping equal a per-element restatement in plain Python;
* hand-written cases pin the documented edges (even windows, NaN, signed zeros);
* the kernels agree with the twins bit for bit over dtypes, layouts, window sizes,
  image shapes and memory layouts.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from scipy import ndimage

from guard import _native
from guard._py import squeeze as twin

try:
    from guard._ext import squeeze as ext
except ImportError:
    ext = None

needs_ext = pytest.mark.skipif(
    ext is None, reason="guard._ext.squeeze is not built (installed without a C compiler)"
)
FLOATS = [np.float32, np.float64]
IMPLS = [
    pytest.param(twin, id="twin"),
    pytest.param(ext, id="ext", marks=needs_ext),
]
# (height, width, channels)
IMAGES = [(8, 8, 1), (5, 7, 2), (28, 28, 1), (6, 4, 3), (1, 9, 1)]


def assert_identical(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    assert got.flags.c_contiguous
    assert got.tobytes() == want.tobytes()


def both(fn: str, x: np.ndarray, *args: Any) -> np.ndarray:
    """The twin's result, after checking the kernel (when built) agrees bit for bit."""
    want: np.ndarray = getattr(twin, fn)(x, *args)
    if ext is not None:
        assert_identical(getattr(ext, fn)(x, *args), want)
    return want


def layouts(x: np.ndarray) -> dict[str, np.ndarray]:
    """``x`` itself and views with the same values in other memory layouts."""
    views = {"contiguous": x, "fortran": np.asfortranarray(x)}
    doubled = np.repeat(x, 2, axis=-1)
    views["strided"] = doubled[..., ::2]
    raw = b"\x00" + x.tobytes()  # as in a binary request body: any offset, read-only
    views["unaligned"] = np.frombuffer(raw, dtype=x.dtype, offset=1).reshape(x.shape)
    return views


def images(
    rng: np.random.Generator, batch: int, shape: tuple[int, int, int], dtype: Any, *, ties: bool
) -> np.ndarray:
    values = (
        rng.integers(0, 5, size=(batch, *shape)) if ties else rng.normal(0, 3, size=(batch, *shape))
    )
    return values.astype(dtype)


def scipy_median(x: np.ndarray, k: int, layout: str) -> np.ndarray:
    size = (1, k, k, 1) if layout == "HWC" else (1, 1, k, k)
    return ndimage.median_filter(x, size=size, mode="reflect")


# --- median smoothing --------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("image", IMAGES, ids=str)
@pytest.mark.parametrize("layout", ["HWC", "CHW"])
@pytest.mark.parametrize("ties", [True, False], ids=["ties", "distinct"])
def test_median_equals_scipy_reflect(
    dtype: Any, image: tuple[int, int, int], layout: str, ties: bool
) -> None:
    h, w, c = image
    shaped = (h, w, c) if layout == "HWC" else (c, h, w)
    rng = np.random.default_rng(h * 100 + w * 10 + c)
    x = images(rng, 3, shaped, dtype, ties=ties)
    for k in range(1, min(h, w, 6) + 1):
        got = both("median_smooth", x, k, h, w, c, layout)
        assert np.array_equal(got, scipy_median(x, k, layout)), k


@pytest.mark.parametrize("impl", IMPLS)
def test_even_window_reaches_up_and_left(impl: Any) -> None:
    x = np.arange(9.0).reshape(1, 3, 3)
    # Window of (i, j) is rows i-1..i, columns j-1..j; the kept value is the upper median.
    # Row -1 and column -1 reflect to rows/columns 0.
    want = [[0, 1, 2], [3, 3, 4], [6, 6, 7]]
    assert impl.median_smooth(x, 2, 3, 3).tolist() == [want]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_nan_sorts_above_every_number(impl: Any, k: int) -> None:
    x = np.random.default_rng(k).normal(size=(2, 6, 6))
    x[0, 2, 3] = np.nan
    x[1, :3, :] = np.nan
    got = impl.median_smooth(x, k, 6, 6)
    windows = np.lib.stride_tricks.sliding_window_view(
        np.pad(x, ((0, 0), (k // 2, k - 1 - k // 2), (k // 2, k - 1 - k // 2)), mode="symmetric"),
        (k, k),
        axis=(1, 2),
    ).reshape(2, 6, 6, k * k)
    want = np.sort(windows, axis=-1)[..., k * k // 2]
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", FLOATS)
def test_zero_results_are_positive(impl: Any, dtype: Any) -> None:
    x = np.array([[-0.0, 0.0, -0.0, 0.0] * 4], dtype=dtype)
    for k in (1, 2, 3, 4):
        out = impl.median_smooth(x, k, 4, 4)
        assert not np.signbit(out).any(), k


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("image", IMAGES, ids=str)
@pytest.mark.parametrize("layout", ["HWC", "CHW"])
def test_median_kernel_matches_twin_over_layouts_and_sample_shapes(
    dtype: Any, image: tuple[int, int, int], layout: str
) -> None:
    h, w, c = image
    rng = np.random.default_rng(7)
    x = images(rng, 4, (h, w, c) if layout == "HWC" else (c, h, w), dtype, ties=True)
    shapes = [x.shape, (4, h * w * c)] + ([(4, h, w)] if c == 1 else [])
    for shape in shapes:
        for name, view in layouts(x.reshape(shape)).items():
            for k in range(1, min(h, w, 5) + 1):
                out = both("median_smooth", view, k, h, w, c, layout)
                assert out.shape == view.shape, (name, k)
                assert not np.shares_memory(out, view)


@needs_ext
@pytest.mark.parametrize("seed", range(40))
def test_median_kernel_matches_twin_on_random_images(seed: int) -> None:
    rng = np.random.default_rng(seed)
    h, w, c = (int(v) for v in rng.integers(1, 12, size=3))
    k = int(rng.integers(1, min(h, w) + 1))
    layout = str(rng.choice(["HWC", "CHW"]))
    x = rng.normal(size=(int(rng.integers(0, 5)), h * w * c)).astype(rng.choice(FLOATS))
    specials = rng.random(x.shape) < rng.choice([0.0, 0.05])
    x[specials] = rng.choice([np.nan, np.inf, -np.inf, 0.0, -0.0], size=int(specials.sum()))
    both("median_smooth", x, k, h, w, c, layout)


# --- bit depth and clipping ----------------------------------------------------------


def reference_bits(v: float, bits: int, lo: float, hi: float) -> float:
    """The documented rule for one value, in plain Python floats (``round`` is half-even)."""
    levels = float(2**bits - 1)
    scale = levels / (hi - lo)
    if math.isnan(v):
        return v
    t = (v - lo) * scale
    q = t if math.isinf(t) else float(round(t))
    q = min(max(q, 0.0), levels)
    return min(max(lo + q / scale, lo), hi)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8, 16])
@pytest.mark.parametrize(
    ("lo", "hi"), [(0.0, 1.0), (0.0, 16.0), (0.0, 255.0), (-1.0, 1.0), (-0.1, 0.3)]
)
def test_bits_follow_the_rule(dtype: Any, bits: int, lo: float, hi: float) -> None:
    rng = np.random.default_rng(bits)
    x = rng.uniform(lo - 0.2 * (hi - lo), hi + 0.2 * (hi - lo), size=500)
    # Exact half-way points between levels, where rounding half to even decides.
    x[:40] = lo + (np.arange(40) + 0.5) / (2**bits - 1) * (hi - lo)
    x[40:46] = [np.nan, np.inf, -np.inf, lo, hi, -0.0]
    x = x.astype(dtype)
    got = both("reduce_bits", x, bits, lo, hi)
    want = np.array([reference_bits(float(v), bits, lo, hi) for v in x], dtype=np.float64).astype(
        dtype
    )
    np.testing.assert_array_equal(got, want)
    finite = got[~np.isnan(got)]
    assert len(np.unique(finite)) <= 2**bits
    assert finite.min() >= dtype(lo) and finite.max() <= dtype(hi)


@pytest.mark.parametrize("impl", IMPLS)
def test_bits_over_unit_range_is_the_papers_formula(impl: Any) -> None:
    x = np.random.default_rng(0).random((10, 784))
    for bits in (1, 4, 8):
        levels = 2**bits - 1
        np.testing.assert_array_equal(impl.reduce_bits(x, bits, 0, 1), np.rint(x * levels) / levels)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", FLOATS)
def test_clip_rounds_bounds_to_the_dtype_and_keeps_nan(impl: Any, dtype: Any) -> None:
    x = np.array([-1.0, 0.1, 0.2, 5.0, np.nan, -np.inf, np.inf], dtype=dtype)
    out = impl.clip(x, 0.1, 1.0)
    low = dtype(0.1)
    np.testing.assert_array_equal(
        out, np.array([low, low, 0.2, 1.0, np.nan, low, 1.0], dtype=dtype)
    )


@pytest.mark.parametrize("fn", ["reduce_bits", "clip"])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(0,), (1,), (3, 64), (2, 8, 8, 1), (5, 3, 32, 32)], ids=str)
def test_elementwise_kernels_match_twin_over_layouts(
    fn: str, dtype: Any, shape: tuple[int, ...]
) -> None:
    x = np.random.default_rng(len(shape)).normal(8, 8, size=shape).astype(dtype)
    args = (4, 0.0, 16.0) if fn == "reduce_bits" else (0.0, 16.0)
    for name, view in layouts(x).items():
        out = both(fn, view, *args)
        assert out.shape == view.shape, name


@pytest.mark.parametrize("impl", IMPLS)
def test_median_commutes_with_bits_and_clip(impl: Any) -> None:
    """Why the squeezer's fixed order loses nothing: the median picks an element, and
    bit-depth reduction and clipping are non-decreasing maps."""
    x = np.random.default_rng(3).normal(8, 5, size=(6, 64)).astype(np.float32)
    for scalar in (lambda v: impl.reduce_bits(v, 3, 0, 16), lambda v: impl.clip(v, 2, 12)):
        for k in (2, 3):
            assert_identical(
                scalar(impl.median_smooth(x, k, 8, 8)), impl.median_smooth(scalar(x), k, 8, 8)
            )


# --- refusals ------------------------------------------------------------------------

Call = Callable[[Any], Any]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda m: m.median_smooth(np.zeros((2, 63)), 2, 8, 8),
            ValueError,
            r"shape \[2, 63\] is not a batch of 8x8x1 \(HWC\) images; expected \['batch', 64\]",
        ),
        (
            lambda m: m.median_smooth(np.zeros(64), 2, 8, 8),
            ValueError,
            r"shape \[64\] is not a batch",
        ),
        (
            lambda m: m.median_smooth(np.zeros((1, 8, 8, 3)), 2, 8, 8, 3, "CHW"),
            ValueError,
            r"expected \['batch', 192\] or \['batch', 3, 8, 8\]",
        ),
        (lambda m: m.median_smooth(np.zeros((1, 64)), 9, 8, 8), ValueError, "window does not fit"),
        (
            lambda m: m.median_smooth(np.zeros((1, 64)), 0, 8, 8),
            ValueError,
            "size must be a positive",
        ),
        (
            lambda m: m.median_smooth(np.zeros((1, 64)), 2, 8, 8, 1, "NHWC"),
            ValueError,
            "layout must be",
        ),
        (
            lambda m: m.median_smooth(np.zeros((1, 64), np.int64), 2, 8, 8),
            TypeError,
            "float32 or float64; got int64",
        ),
        (lambda m: m.reduce_bits(np.zeros(3, ">f4"), 2, 0, 1), TypeError, "native float32"),
        (
            lambda m: m.reduce_bits(np.zeros(3), 0, 0, 1),
            ValueError,
            "bits must be an integer from 1 to 16",
        ),
        (lambda m: m.reduce_bits(np.zeros(3), 17, 0, 1), ValueError, "bits must be"),
        (lambda m: m.reduce_bits(np.zeros(3), 2, 1, 1), ValueError, "needs finite lo < hi"),
        (lambda m: m.clip(np.zeros(3), 0, np.nan), ValueError, "needs finite lo < hi"),
        (lambda m: m.clip(np.zeros(3, np.float16), 0, 1), TypeError, "got float16"),
    ],
)
def test_bad_arguments_are_refused(impl: Any, call: Call, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        call(impl)


# --- module selection ----------------------------------------------------------------


def test_native_picks_the_kernels_when_built() -> None:
    chosen = ext if _native.USING_EXTENSIONS else twin
    for fn in ("reduce_bits", "median_smooth", "clip"):
        assert getattr(_native, fn) is getattr(chosen, fn)


def test_no_extensions_env_forces_the_twins() -> None:
    environ = {**os.environ, "GUARD_NO_EXTENSIONS": "1"}
    code = "import guard._native as n; print(n.median_smooth.__module__, n.reduce_bits.__module__)"
    result = subprocess.run(
        [sys.executable, "-c", code], env=environ, capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == ["guard._py.squeeze", "guard._py.squeeze"]

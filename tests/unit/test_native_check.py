"""``check_and_cast``: the Cython kernel, its pure-numpy twin, and the rules both follow.

Three layers of evidence:

* hand-written cases derived from the rules in :mod:`guard._py.check`, run on both;
* a per-element restatement of those rules in plain Python (:func:`reference`),
  against which the twin is checked on seeded random tensors;
* bit-for-bit agreement of the kernel with the twin over dtype pairs, shapes,
  layouts, violation positions and the same random tensors.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import zlib
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import numpy as np
import pytest

from guard import _native
from guard._py import check as twin
from guard._py.check import Violation

try:
    from guard._ext import check as ext
except ImportError:
    ext = None

needs_ext = pytest.mark.skipif(
    ext is None, reason="guard._ext.check is not built (installed without a C compiler)"
)

CheckFn = Callable[..., tuple[np.ndarray, int, Violation]]

NATIVE_IN = [np.dtype(t) for t in ("float32", "float64", "int32", "int64", "uint8")]
NATIVE_OUT = [np.dtype(t) for t in ("float32", "float64", "int64")]
NATIVE_PAIRS = [(i, o) for i in NATIVE_IN for o in NATIVE_OUT]
# Handled by the twin, also when called through the kernel's entry point.
FALLBACK_PAIRS = [
    (np.dtype(i), np.dtype(o))
    for i, o in [
        ("float16", "float32"),
        ("float32", "float16"),
        ("bool", "float32"),
        ("float64", "bool"),
        ("int8", "int64"),
        ("int16", "float16"),
        ("uint16", "float32"),
        ("uint32", "int64"),
        ("uint64", "int64"),
        ("float64", "int32"),
        ("float32", "uint8"),
        ("int64", "int32"),
        ("int32", "uint16"),
        (">f8", "float32"),
        ("float64", ">f4"),
    ]
]
ALL_PAIRS = NATIVE_PAIRS + FALLBACK_PAIRS
BLOCK = 256  # the kernel's block length; violations around its edges are worth testing

IMPLS = [
    pytest.param(twin.check_and_cast, id="twin"),
    pytest.param(getattr(ext, "check_and_cast", None), id="ext", marks=needs_ext),
]


def pair_id(pair: tuple[np.dtype[Any], np.dtype[Any]]) -> str:
    return f"{pair[0].str}->{pair[1].str}"


def assert_identical(got: tuple[Any, ...], want: tuple[Any, ...]) -> None:
    """Same dtype, shape, C-contiguity and bytes; same index and code."""
    (g_out, g_index, g_code), (w_out, w_index, w_code) = got, want
    assert g_out.dtype == w_out.dtype
    assert g_out.shape == w_out.shape
    assert g_out.flags.c_contiguous
    assert g_out.tobytes() == w_out.tobytes()
    assert (g_index, g_code) == (w_index, w_code)
    assert isinstance(g_code, Violation)


def check_both(x: np.ndarray, out_dtype: Any, lo: Any, hi: Any, allow: bool) -> tuple[Any, ...]:
    """The twin's result, after checking the kernel (when built) agrees bit for bit."""
    want = twin.check_and_cast(x, out_dtype, lo, hi, allow)
    if ext is not None:
        assert_identical(ext.check_and_cast(x, out_dtype, lo, hi, allow), want)
    return want


# --- an independent restatement of the rules -------------------------------------


def _float_overflow_threshold(dtype: np.dtype[Any]) -> Fraction:
    """Smallest magnitude that rounds to infinity in float ``dtype`` (max + half an ulp)."""
    top = np.finfo(dtype).max
    ulp = Fraction(float(top)) - Fraction(float(np.nextafter(top, top.dtype.type(0))))
    return Fraction(float(top)) + ulp / 2  # the ulp below the maximum is the ulp at it


def classify(
    v: Any, x_dtype: np.dtype[Any], out: np.dtype[Any], lo: Any, hi: Any, allow: bool
) -> Violation:
    if x_dtype.kind == "f":
        nonfinite_ok = allow and out.kind == "f"
        if math.isnan(v):
            return Violation.OK if nonfinite_ok else Violation.NAN
        if math.isinf(v):
            return Violation.OK if nonfinite_ok else Violation.INF
    below = lo is not None and float(v) < lo
    above = hi is not None and float(v) > hi
    if out.kind in "iu":
        whole = math.trunc(v) if x_dtype.kind == "f" else int(v)
        below |= whole < np.iinfo(out).min
        above |= whole > np.iinfo(out).max
    elif out.kind == "f" and abs(Fraction(v)) >= _float_overflow_threshold(out):
        below |= v < 0
        above |= v > 0
    if below:
        return Violation.BELOW
    return Violation.ABOVE if above else Violation.OK


def expected_value(v: Any, x_dtype: np.dtype[Any], out: np.dtype[Any]) -> Any:
    """The documented cast of one element: saturating into integers, numpy's otherwise."""
    if out.kind in "iu" and x_dtype.kind in "fiu":
        if x_dtype.kind == "f" and math.isnan(v):
            return 0
        info = np.iinfo(out)
        whole = v if math.isinf(v) else math.trunc(v)
        return int(min(max(whole, info.min), info.max))
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(v, dtype=x_dtype).astype(out)[()]


def reference(
    x: np.ndarray, out_dtype: Any, lo: Any, hi: Any, allow: bool
) -> tuple[np.ndarray, int, Violation]:
    out = np.dtype(out_dtype)
    values = np.asarray(x).reshape(-1).tolist()  # C order, Python scalars
    cast = np.array([expected_value(v, x.dtype, out) for v in values], dtype=out).reshape(x.shape)
    for i, v in enumerate(values):
        code = classify(v, x.dtype, out, lo, hi, allow)
        if code:
            return cast, i, code
    return cast, -1, Violation.OK


def assert_matches_reference(got: tuple[Any, ...], want: tuple[Any, ...]) -> None:
    (g_out, g_index, g_code), (w_out, w_index, w_code) = got, want
    assert (g_index, g_code) == (w_index, w_code)
    assert g_out.dtype == w_out.dtype
    assert g_out.shape == w_out.shape
    assert np.array_equal(g_out, w_out, equal_nan=g_out.dtype.kind == "f")
    if g_out.dtype.kind == "f":
        assert np.array_equal(np.signbit(g_out), np.signbit(w_out))


# --- random tensors ---------------------------------------------------------------

# fmt: off
FLOAT_SPECIALS = [
    np.nan, -np.nan, np.inf, -np.inf, -0.0, 0.0, 1e39, -1e39, 1e300, -1e300,
    2.0**63, -(2.0**63), 2.0**63 - 1024, -(2.0**63) - 2048, 2.0**128 - 2.0**103, 65520.0, 0.1,
]
# fmt: on


def random_values(rng: np.random.Generator, dtype: np.dtype[Any], size: int) -> np.ndarray:
    """Mostly ordinary values, with extremes sprinkled at a random rate (often none)."""
    rare = rng.random(size) < rng.choice([0.0, 0.001, 0.01, 0.2])
    if dtype.kind == "b":
        return rng.random(size) < 0.5
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        small = rng.integers(max(info.min, -300), min(info.max, 300), size=size, endpoint=True)
        wide = rng.integers(info.min, info.max, size=size, dtype=dtype, endpoint=True)
        return np.where(rare, wide, small.astype(dtype))
    values = rng.normal(0.0, 10.0 ** rng.integers(0, 6), size=size)
    values[rare] = rng.choice(FLOAT_SPECIALS, size=int(rare.sum()))
    with np.errstate(over="ignore"):
        return values.astype(dtype)


def random_bound(rng: np.random.Generator, values: np.ndarray, quantile: float) -> float | None:
    """None, an arbitrary number, or a value of the data near ``quantile`` (tests inclusiveness)."""
    finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values.astype(np.float64)
    if rng.random() < 0.3:
        return None
    if finite.size == 0 or rng.random() < 0.1:
        return float(rng.normal(0.0, 100.0))
    return float(np.quantile(finite, quantile, method="nearest"))


def random_case(seed: int) -> tuple[np.ndarray, np.dtype[Any], float | None, float | None, bool]:
    rng = np.random.default_rng(seed)
    in_dtype, out_dtype = ALL_PAIRS[rng.integers(len(ALL_PAIRS))]
    shape = [(), (0,), (int(rng.integers(1, 700)),), (3, int(rng.integers(1, 300))), (2, 3, 5, 7)][
        rng.integers(5)
    ]
    size = math.prod(shape)
    base = random_values(rng, in_dtype, 2 * size)
    x = [
        base[:size].reshape(shape),
        base[::2].reshape(shape),  # a strided view
        np.asfortranarray(base[:size].reshape(shape)),
    ][rng.integers(3)]
    lo = random_bound(rng, base, rng.uniform(0.0, 0.01))
    hi = random_bound(rng, base, rng.uniform(0.99, 1.0))
    return x, out_dtype, lo, hi, bool(rng.random() < 0.5)


@pytest.mark.parametrize("seed", range(300))
def test_twin_follows_the_rules_on_random_tensors(seed: int) -> None:
    x, out_dtype, lo, hi, allow = random_case(seed)
    got = twin.check_and_cast(x, out_dtype, lo, hi, allow)
    assert_matches_reference(got, reference(x, out_dtype, lo, hi, allow))


@needs_ext
@pytest.mark.parametrize("seed", range(300))
def test_kernel_matches_twin_on_random_tensors(seed: int) -> None:
    check_both(*random_case(seed))


# --- hand-written cases, run on both implementations ------------------------------

nan, inf = np.nan, np.inf
F32_OVERFLOW = 2.0**128 - 2.0**103  # rounds to infinity in float32; the float below it does not
# fmt: off
CASES = [
    # (values, in dtype, out dtype, lo, hi, allow_nonfinite, index, code)
    ([0.0, 0.5, 1.0], "float64", "float32", 0.0, 1.0, False, -1, Violation.OK),  # inclusive
    ([0.5, nan, 2.0], "float64", "float32", 0.0, 1.0, False, 1, Violation.NAN),
    ([0.5, 2.0, nan], "float64", "float32", 0.0, 1.0, False, 1, Violation.ABOVE),
    ([0.5, -inf, 0.5], "float32", "float64", None, None, False, 1, Violation.INF),
    ([inf], "float64", "float64", 0.0, 1.0, False, 0, Violation.INF),  # INF before ABOVE
    ([-1.0, 5.0], "float32", "float32", 0.0, 1.0, False, 0, Violation.BELOW),
    ([nan, inf, -inf, 0.5, 2.0], "float64", "float32", 0.0, 1.0, True, 4, Violation.ABOVE),
    ([nan, inf, -inf], "float32", "float32", 0.0, 1.0, True, -1, Violation.OK),
    ([1.0, nan], "float64", "int64", None, None, True, 1, Violation.NAN),  # ints hold no NaN
    ([1.0, -inf], "float32", "int64", None, None, True, 1, Violation.INF),
    ([5, 300, -7], "int64", "float32", -10, 100, False, 1, Violation.ABOVE),
    ([0, 255], "uint8", "float64", 1.0, None, False, 0, Violation.BELOW),
    ([2**31 - 1, -(2**31)], "int32", "int64", None, None, False, -1, Violation.OK),
    # float32(0.1) > 0.1 in float64: bounds are compared exactly, not in float32.
    ([0.1], "float32", "float64", None, 0.1, False, 0, Violation.ABOVE),
    # int64: -2**63 fits, 2**63 does not; 2**63 - 1024 is the largest float below it.
    ([-(2.0**63), 2.0**63 - 1024, 2.0**63], "float64", "int64", None, None, False,
     2, Violation.ABOVE),
    ([-(2.0**63) - 2048], "float64", "int64", None, None, False, 0, Violation.BELOW),
    ([-1e19], "float32", "int64", None, None, False, 0, Violation.BELOW),
    ([np.nextafter(F32_OVERFLOW, 0), F32_OVERFLOW], "float64", "float32", None, None, False,
     1, Violation.ABOVE),
    ([-1e39], "float64", "float32", None, None, True, 0, Violation.BELOW),  # finite, not allowed
    ([65519.0, 65520.0], "float32", "float16", None, None, False, 1, Violation.ABOVE),
    ([2**31], "int64", "int32", None, None, False, 0, Violation.ABOVE),
    ([-1, 3], "int32", "uint16", None, None, False, 0, Violation.BELOW),
    ([2**63 - 1, 2**63], "uint64", "int64", None, None, False, 1, Violation.ABOVE),
    ([True, False], "bool", "float32", 0.5, None, False, 1, Violation.BELOW),
    ([3.7, -3.7, 255.9, 256.0], "float32", "uint8", None, None, False, 1, Violation.BELOW),
]
# fmt: on


@pytest.mark.parametrize("check", IMPLS)
@pytest.mark.parametrize(
    ("values", "in_dtype", "out_dtype", "lo", "hi", "allow", "index", "code"), CASES
)
def test_hand_written_cases(
    check: CheckFn,
    values: list[Any],
    in_dtype: str,
    out_dtype: str,
    lo: Any,
    hi: Any,
    allow: bool,
    index: int,
    code: Violation,
) -> None:
    x = np.array(values, dtype=in_dtype)
    out, got_index, got_code = check(x, out_dtype, lo, hi, allow)
    assert (got_index, got_code) == (index, code)
    assert out.dtype == np.dtype(out_dtype)
    assert out.shape == x.shape


@pytest.mark.parametrize("check", IMPLS)
@pytest.mark.parametrize("in_dtype", ["float32", "float64"])
def test_float_to_int64_saturates(check: CheckFn, in_dtype: str) -> None:
    x = np.array([nan, -inf, inf, 1e19, -1e19, 3.7, -3.7, -(2.0**63)], dtype=in_dtype)
    out, _, _ = check(x, np.int64, None, None, False)
    lo, hi = np.iinfo(np.int64).min, np.iinfo(np.int64).max
    assert out.tolist() == [0, lo, hi, hi, lo, 3, -3, lo]


@pytest.mark.parametrize("check", IMPLS)
def test_allowed_nonfinite_values_are_cast_through(check: CheckFn) -> None:
    x = np.array([nan, inf, -inf, -0.0])
    out, index, code = check(x, np.float32, -1.0, 1.0, True)
    assert (index, code) == (-1, Violation.OK)
    assert np.isnan(out[0])
    assert out[1:3].tolist() == [inf, -inf]
    assert out[3] == 0
    assert np.signbit(out[3])


@pytest.mark.parametrize("check", IMPLS)
@pytest.mark.parametrize(("lo", "hi"), [(nan, None), (None, nan)])
def test_nan_bound_is_rejected(check: CheckFn, lo: Any, hi: Any) -> None:
    with pytest.raises(ValueError, match="must not be NaN"):
        check(np.zeros(3), np.float32, lo, hi, False)


@pytest.mark.parametrize("check", IMPLS)
@pytest.mark.parametrize(
    ("x", "out_dtype"),
    [
        (np.array([b"1.5"], dtype=object), np.float32),
        (np.array(["1.5"]), np.float32),
        (np.array([1 + 2j]), np.float64),
        (np.zeros(2), np.complex64),
        (np.zeros(2), object),
    ],
)
def test_non_numeric_dtypes_are_rejected(check: CheckFn, x: np.ndarray, out_dtype: Any) -> None:
    with pytest.raises(TypeError, match="must be bool, integer or float"):
        check(x, out_dtype, None, None, False)


# --- the kernel against the twin ---------------------------------------------------

SHAPES = [(), (0,), (1,), (64,), (BLOCK,), (BLOCK + 1,), (3, 1031), (0, 5), (2, 3, 8, 8)]


def _layouts(x: np.ndarray) -> dict[str, np.ndarray]:
    """``x`` as is, and non-contiguous views with the same values pattern."""
    views = {"contiguous": x}
    if x.ndim >= 1:
        views["reversed"] = x[::-1]
        views["strided"] = np.repeat(x, 2, axis=-1)[..., ::2]
    if x.ndim >= 2:
        views["fortran"] = np.asfortranarray(x)
        views["transposed"] = x.T
    return views


@needs_ext
@pytest.mark.parametrize("pair", ALL_PAIRS, ids=pair_id)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernel_matches_twin_over_shapes_and_layouts(
    pair: tuple[np.dtype[Any], np.dtype[Any]], shape: tuple[int, ...]
) -> None:
    rng = np.random.default_rng(zlib.crc32(f"{pair_id(pair)}{shape}".encode()))
    x = random_values(rng, pair[0], math.prod(shape)).reshape(shape)
    for layout, view in _layouts(x).items():
        for lo, hi in [(None, None), (-5.0, 5.0), (0.0, None), (None, 100.0)]:
            for allow in (False, True):
                out, _, _ = check_both(view, pair[1], lo, hi, allow)
                assert out.shape == view.shape, layout
                assert not np.shares_memory(out, view), layout


@needs_ext
@pytest.mark.parametrize("pair", [p for p in ALL_PAIRS if p[0].kind == "f"], ids=pair_id)
@pytest.mark.parametrize("first", [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK, 995])
@pytest.mark.parametrize("bad", [nan, inf, -inf, -50.0, 50.0])
def test_first_violation_wins_at_any_position(
    pair: tuple[np.dtype[Any], np.dtype[Any]], first: int, bad: float
) -> None:
    x = np.linspace(0.0, 1.0, 1000).astype(pair[0])
    x[first] = bad
    x[min(first + 3, 999)] = nan  # a later violation must not win
    x[-1] = 99.0
    for allow in (False, True):
        _, index, code = check_both(x, pair[1], -10.0, 10.0, allow)
        if allow and pair[1].kind == "f" and not np.isfinite(bad):
            assert (index, code) == (999, Violation.ABOVE)
        else:
            assert index == first
            assert code == classify(float(x[first]), pair[0], pair[1], -10.0, 10.0, allow)


@needs_ext
@pytest.mark.parametrize("pair", NATIVE_PAIRS, ids=pair_id)
def test_kernel_accepts_read_only_and_unaligned_buffers(
    pair: tuple[np.dtype[Any], np.dtype[Any]],
) -> None:
    values = random_values(np.random.default_rng(7), pair[0], 100)
    raw = b"\x00" + values.tobytes()  # as in a binary request body: any offset
    unaligned = np.frombuffer(raw, dtype=pair[0], offset=1)
    assert not unaligned.flags.writeable
    check_both(unaligned, pair[1], -100.0, 100.0, False)
    check_both(np.frombuffer(values.tobytes(), dtype=pair[0]), pair[1], None, None, True)


@needs_ext
def test_kernel_hands_only_unsupported_pairs_to_the_twin(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[np.dtype[Any], np.dtype[Any]]] = []

    def recording_twin(x: np.ndarray, out_dtype: Any, *args: Any) -> Any:
        calls.append((x.dtype, np.dtype(out_dtype)))
        return twin.check_and_cast(x, out_dtype, *args)

    monkeypatch.setattr(ext, "_twin", recording_twin)
    for in_dtype, out_dtype in ALL_PAIRS:
        ext.check_and_cast(np.zeros(4, dtype=in_dtype), out_dtype, None, None, False)
    assert calls == FALLBACK_PAIRS


# --- module selection ----------------------------------------------------------------


def test_violation_is_defined_once() -> None:
    assert _native.Violation is Violation
    assert [int(v) for v in Violation] == [0, 1, 2, 3, 4]
    assert [v.name for v in Violation] == ["OK", "NAN", "INF", "BELOW", "ABOVE"]


def test_native_picks_the_kernel_when_built() -> None:
    forced_off = os.environ.get("GUARD_NO_EXTENSIONS", "") not in ("", "0")
    assert _native.USING_EXTENSIONS is (ext is not None and not forced_off)
    chosen = ext if _native.USING_EXTENSIONS else twin
    assert _native.check_and_cast is chosen.check_and_cast


def _using_extensions(**env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if k != "GUARD_NO_EXTENSIONS"} | env
    code = "import guard._native as n; print(n.USING_EXTENSIONS, n.check_and_cast.__module__)"
    result = subprocess.run(
        [sys.executable, "-c", code], env=environ, capture_output=True, text=True, check=True
    )
    return result.stdout.strip()


def test_no_extensions_env_forces_the_twin() -> None:
    assert _using_extensions(GUARD_NO_EXTENSIONS="1") == "False guard._py.check"


@needs_ext
def test_extensions_are_used_by_default_and_with_zero() -> None:
    assert _using_extensions() == "True guard._ext.check"
    assert _using_extensions(GUARD_NO_EXTENSIONS="0") == "True guard._ext.check"

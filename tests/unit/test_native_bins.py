"""``release_bins``: the Cython kernel, its pure-numpy twin, and the rules both follow.

The twin is checked against a per-row restatement of the rules in plain Python
(:func:`reference`), and the kernel against the twin, bit for bit, over dtypes, class
counts, ``ranked`` settings (places picked by scans and by a sort), ties, and inputs that
are not probabilities.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from guard._py import bins as twin

try:
    from guard._ext import bins as ext
except ImportError:
    ext = None

needs_ext = pytest.mark.skipif(
    ext is None, reason="guard._ext.bins is not built (installed without a C compiler)"
)
LO, HI = 1.0 - 1e-3, 1.0 + 1e-3


def reference(scores: np.ndarray, cuts: tuple[float, ...], levels: tuple[float, ...],
              ranked: int | None) -> np.ndarray:  # fmt: skip
    """The rules row by row in plain Python (no numpy sort, no tables)."""
    classes = scores.shape[1]
    weights = [0.5 ** (k if ranked is None else min(k, ranked)) for k in range(classes - 1)]
    shares = [w / sum(weights) for w in weights]
    out = np.empty_like(scores)
    for i, row in enumerate(scores.tolist()):
        order = sorted(range(classes), key=lambda j: (-row[j], j))
        top = order[0]
        level = levels[sum(1 for cut in cuts if cut <= row[top])]
        values = [0.0] * classes
        values[top] = level
        for place, j in enumerate(order[1:]):
            values[j] = (1.0 - level) * shares[place]
        out[i] = np.asarray(values, dtype=np.float64).astype(scores.dtype)
    return out


def batch(rng: np.random.Generator, rows: int, classes: int, dtype: str) -> np.ndarray:
    scores = rng.dirichlet(np.full(classes, 0.3), rows).astype(dtype)
    scores /= scores.sum(axis=1, keepdims=True, dtype=np.float64).astype(dtype)
    if rows >= 6:
        scores[:2] = np.asarray(1.0 / classes, dtype)  # every class tied
        scores[2:4, :2] = scores[2:4, :2].mean(axis=1, keepdims=True)  # the top two tied
        scores[4, :] = 0
        scores[4, classes - 1] = 1  # one-hot, the rest all tied at 0
        scores[5, 0] = -0.0 if scores[5, 0] == 0 else scores[5, 0]
    return np.ascontiguousarray(scores)


SETTINGS = [((), (0.9,), None), ((0.5,), (0.48, 0.975), 1), ((0.3, 0.6, 0.9), (0.2, 0.5, 0.8, 0.99), 3),
            ((0.5,), (0.4, 0.95), 0), ((0.5,), (0.4, 0.95), None)]  # fmt: skip


@pytest.mark.parametrize("classes", [2, 3, 10, 40])
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
@pytest.mark.parametrize("setting", SETTINGS)
def test_the_twin_follows_the_rules(classes: int, dtype: str, setting: Any) -> None:
    cuts, levels, ranked = setting
    scores = batch(np.random.default_rng(classes), 40, classes, dtype)
    tables = twin.tables(cuts, levels, ranked, classes)
    released, code = twin.release(scores, *tables, LO, 1.0 + 2e-2)
    assert code == 0 and released.dtype == scores.dtype
    np.testing.assert_array_equal(released, reference(scores, cuts, levels, ranked))


def test_tables_order_only_the_places_whose_shares_differ() -> None:
    assert twin.tables((), (0.9,), 1, 10)[3] == 1  # the runner-up, then an even share
    assert twin.tables((), (0.9,), 0, 10)[3] == 0  # every place the same share
    assert twin.tables((), (0.9,), None, 10)[3] == 8  # halving all the way: 9 places, 8 sorted
    assert twin.tables((), (0.9,), 3, 2)[3] == 0  # one place only


@needs_ext
@pytest.mark.parametrize("classes", [2, 3, 10, 17, 100])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("setting", SETTINGS)
def test_the_kernel_gives_the_twins_bits(classes: int, dtype: str, setting: Any) -> None:
    # ranked None over 17 and 100 classes orders more than SELECT places: the sort path.
    cuts, levels, ranked = setting
    rng = np.random.default_rng(classes * 7)
    tables = twin.tables(cuts, levels, ranked, classes)
    for rows in (0, 1, 2, 64):
        scores = batch(rng, rows, classes, dtype)
        got, code = ext.release(scores, *tables, LO, 1.0 + 2e-2)
        want, want_code = twin.release(scores, *tables, LO, 1.0 + 2e-2)
        assert code == want_code == 0 and got.dtype == want.dtype and got.shape == want.shape
        assert got.tobytes() == want.tobytes()


@needs_ext
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(
    ("row", "code"),
    [
        ([0.5, 0.5, 0.0], 0),
        ([0.6, 0.5, -0.1], twin.RANGE),  # sums to 1, one value below 0
        ([1.5, -0.25, -0.25], twin.RANGE),
        ([np.nan, 0.5, 0.5], twin.RANGE),
        ([np.inf, 0.0, 0.0], twin.RANGE),
        ([0.5, 0.4, 0.0], twin.SUM),
        ([0.5, 0.5, 0.01], twin.SUM),
        ([0.0, 0.0, 0.0], twin.SUM),
    ],
)
def test_what_is_not_probabilities_is_refused_alike(
    dtype: str, row: list[float], code: int
) -> None:
    good = np.array([[0.2, 0.3, 0.5]], dtype)
    tables = twin.tables((0.5,), (0.4, 0.9), 1, 3)
    for scores in (np.array([row], dtype), np.concatenate([good, np.array([row], dtype)])):
        for release in (ext.release, twin.release):
            released, got = release(scores, *tables, LO, HI)
            assert got == code
            if code:
                assert released is scores  # untouched: nothing to release


@needs_ext
def test_a_range_fault_outranks_a_sum_fault_in_any_row() -> None:
    scores = np.array([[0.5, 0.4, 0.0], [0.7, 0.5, -0.2]], np.float32)  # row 0: sum, row 1: range
    tables = twin.tables((), (0.9,), 1, 3)
    assert ext.release(scores, *tables, LO, HI)[1] == twin.release(scores, *tables, LO, HI)[1]
    assert ext.release(scores, *tables, LO, HI)[1] == twin.RANGE


@needs_ext
def test_other_layouts_go_through_the_twin() -> None:
    rng = np.random.default_rng(3)
    tables = twin.tables((0.5,), (0.4, 0.9), 1, 10)
    wide = np.zeros((8, 20), np.float32)
    wide[:, ::2] = batch(rng, 8, 10, "float32")
    for scores in (
        batch(rng, 8, 10, "float16"),  # a dtype the kernel does not specialise
        wide[:, ::2],  # every other column: not contiguous
        np.asfortranarray(batch(rng, 8, 10, "float64")),
    ):
        got, code = ext.release(scores, *tables, LO, 1.02)
        want, _ = twin.release(scores, *tables, LO, 1.02)
        assert code == 0 and got.dtype == scores.dtype
        assert got.tobytes() == want.tobytes()


@needs_ext
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_sort_places_negative_zero_as_zero_and_ties_by_index(dtype: str) -> None:
    # 20 classes ranked all the way: the sort path. -0.0 and 0.0 are one value, so the
    # zeros keep their index order whichever sign they carry.
    row = np.zeros(20, dtype)
    row[[3, 11]] = 0.3
    row[7] = 0.4
    row[[0, 5, 9, 14]] = -0.0
    tables = twin.tables((), (0.9,), None, 20)
    got, code = ext.release(row[None], *tables, LO, HI)
    want, _ = twin.release(row[None], *tables, LO, HI)
    assert code == 0 and got.tobytes() == want.tobytes()
    np.testing.assert_array_equal(got, reference(row[None], (), (0.9,), None))

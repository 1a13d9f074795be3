"""Square draws spatial windows over every channel of an image target; flat rows as before."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from guard.attacks import adaptive
from guard.attacks.evasion import SquareL2, SquareLinf, run_evasion
from guard.attacks.evasion.square import Grid, _side, p_selection
from guard.attacks.extraction import augment
from guard.attacks.targets import Answers, OnnxTarget, Target, TargetSpec
from guard.defenses.squeeze import Image
from guard.models import load_samples

BUDGET = 40


class Recording(Target):
    """The real shapes model (onnxruntime), keeping every row it was sent, flat; with
    ``chw``, a model that takes ``[3, 32, 32]`` inputs (transposed for the real one)."""

    def __init__(self, inner: Target, *, chw: bool = False) -> None:
        shape = (3, 32, 32) if chw else inner.spec.input_shape
        super().__init__(replace(inner.spec, input_shape=shape), batch_size=1)
        self.inner = inner
        self.chw = chw
        self.sent: list[np.ndarray] = []

    def _send(self, x: np.ndarray) -> tuple[Answers, int, str | None]:
        self.sent.extend(np.asarray(x, dtype=np.float64).reshape(len(x), -1))
        return self.inner.query(x.transpose(0, 2, 3, 1) if self.chw else x), 200, "allow"


@pytest.fixture(scope="module")
def shapes() -> tuple[np.ndarray, np.ndarray]:
    x, y = load_samples("shapes")
    return 0.25 + 0.5 * x[:1], y[:1]  # inside the range: no value clips at a step of 0.05


def _run(
    attack: object, x: np.ndarray, y: np.ndarray, layout: str = "HWC"
) -> tuple[Recording, Grid]:
    target = Recording(OnnxTarget.builtin("shapes"), chw=layout == "CHW")
    if layout == "CHW":
        x = x.reshape(-1, 32, 32, 3).transpose(0, 3, 1, 2).reshape(len(x), -1)
    run_evasion(attack, target, x, y, budget=BUDGET, rng=np.random.default_rng(3))  # type: ignore[arg-type]
    return target, _pixels(target.spec)


def _pixels(spec: TargetSpec) -> Grid:
    """The shapes model's pixels, read from its input shape, not from the code under test."""
    layouts = {(32, 32, 3): "HWC", (3, 32, 32): "CHW"}
    assert spec.input_shape in layouts
    return Grid(32, 32, 3, layouts[spec.input_shape])


def _full_windows(changed: np.ndarray, s: int) -> list[tuple[int, int]]:
    """The corners of every ``s x s`` window of the 2-D mask ``changed`` that is all True."""
    sums = np.pad(changed.astype(int).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    area = sums[s:, s:] - sums[:-s, s:] - sums[s:, :-s] + sums[:-s, :-s]
    return [(int(r), int(c)) for r, c in np.argwhere(area == s * s)]


def test_image_layouts_follow_the_squeeze_rule() -> None:
    assert Image.from_shape((32, 32, 3)) == Image(32, 32, 3, "HWC")
    assert Image.from_shape((3, 32, 32)) == Image(32, 32, 3, "CHW")
    assert Image.from_shape((8, 8)) == Image(8, 8, 1, "HWC")
    assert Image.from_shape((64,)) is None and Image.from_shape(None) is None
    assert Grid.of(OnnxTarget.builtin("shapes").spec) == Grid(32, 32, 3, "HWC")
    assert Grid.of(OnnxTarget.builtin("digits").spec) == Grid(8, 8, 1, "HWC")
    flat = TargetSpec(3072, 4, np.asarray(0.0), np.asarray(1.0))
    assert Grid.of(flat) == Grid(48, 64, 1, "HWC")  # no image shape: today's fold


def test_chw_rows_round_trip_through_the_grid() -> None:
    grid = Grid(4, 5, 3, "CHW")
    row = np.arange(60.0)
    image = grid.to_hwc(row)
    assert image.shape == (4, 5, 3) and image[1, 2, 2] == row.reshape(3, 4, 5)[2, 1, 2]
    assert np.array_equal(grid.to_row(image)[0], row)


@pytest.mark.parametrize("layout", ["HWC", "CHW"])
def test_square_linf_step_is_a_spatial_window_over_every_channel(shapes, layout) -> None:
    x, y = shapes
    eps = 0.05
    target, grid = _run(SquareLinf(epsilon=eps), x, y, layout)
    h, w, c = grid.height, grid.width, grid.channels
    start, stripes, first_step = (grid.to_hwc(row) for row in target.sent[:3])
    s = _side(p_selection(0.3, 0, BUDGET), h, w, smallest=1)
    assert s > 1
    # Outside one s x s window the step kept the stripes; inside, each channel moved by
    # one sign, +eps or -eps, on every pixel of the window.
    fits = []
    for r in range(h - s + 1):
        for col in range(w - s + 1):
            inside = np.zeros((h, w), dtype=bool)
            inside[r : r + s, col : col + s] = True
            if not np.allclose(first_step[~inside], stripes[~inside], atol=1e-6):
                continue
            moved = first_step[inside] - start[inside]  # [s * s, c]
            if np.allclose(moved, moved[:1], atol=1e-6) and np.allclose(
                np.abs(moved), eps, atol=1e-6
            ):
                fits.append((r, col))
    assert fits, "the first step is not one spatial window with a sign per channel"
    assert c == 3
    # Signs are drawn per channel: some window of the run moved channels apart.
    signs = [np.sign(grid.to_hwc(a) - start) for a in target.sent[2:]]
    assert any(len({tuple(v) for v in sign.reshape(-1, c)}) > 1 for sign in signs)


@pytest.mark.parametrize("layout", ["HWC", "CHW"])
def test_square_l2_step_changes_whole_pixels_in_spatial_windows(shapes, layout) -> None:
    x, y = shapes
    target, grid = _run(SquareL2(epsilon=0.5), x, y, layout)
    h, w = grid.height, grid.width
    start, init, first_step = (grid.to_hwc(row) for row in target.sent[:3])
    s = _side(p_selection(0.3, 0, BUDGET), h, w, smallest=3)
    s = s + 1 if s % 2 == 0 and s + 1 < min(h, w) else s
    before, after = init - start, first_step - start
    scale = np.linalg.norm(after) / np.linalg.norm(before)  # 1: both on the ball's surface
    assert scale == pytest.approx(1.0, rel=1e-4)
    changed = ~np.isclose(after, before, atol=1e-7)  # [h, w, c]
    assert np.array_equal(changed.any(axis=-1), changed.all(axis=-1))  # every channel or none
    assert s * s <= changed.any(axis=-1).sum() <= 2 * s * s
    assert _full_windows(changed.all(axis=-1), s)  # the first window, wholly rewritten


def test_flat_digits_give_the_same_runs_as_before() -> None:
    """Numbers recorded with the single-channel code this change replaced (seed 0, six
    digits, budget 300): on flat rows the new code draws the same numbers in the same
    order and must reproduce them."""
    x, y = load_samples("digits")
    expected = {
        "square-linf": ([42, 49, 8, 27, 35, 21], 21.817424229271428),
        "square-l2": ([300, 140, 8, 182, 294, 87], 13.567164889434991),
    }
    for attack in (SquareLinf(epsilon=3.0), SquareL2(epsilon=14.0)):
        run = run_evasion(
            attack,
            OnnxTarget.builtin("digits"),
            x[:6],
            y[:6],
            budget=300,
            rng=np.random.default_rng(0),
        )
        queries, l2 = expected[attack.name]
        assert [sample.queries for sample in run.samples] == queries
        adv = next(sample for sample in run.samples if sample.x_adv is not None)
        index = run.samples.index(adv)
        assert float(np.linalg.norm(adv.x_adv - x[index])) == pytest.approx(l2, rel=1e-9)


def test_adaptive_square_on_flat_digits_is_unchanged() -> None:
    x, y = load_samples("digits")
    run = run_evasion(
        adaptive.ResamplingSquareLinf(epsilon=3.0),
        OnnxTarget.builtin("digits"),
        x[:6],
        y[:6],
        budget=300,
        rng=np.random.default_rng(0),
    )
    assert [sample.queries for sample in run.samples] == [52, 104, 26, 66, 46, 15]


def test_shifts_move_whole_pixels_of_an_image() -> None:
    spec = OnnxTarget.builtin("shapes").spec
    grid = _pixels(spec)
    image = np.zeros((32, 32, 3))
    image[10:20, 10:20] = [0.2, 0.5, 0.9]
    rows = np.repeat(grid.to_row(image), 30, axis=0)
    out = augment(rows, spec, np.random.default_rng(0), noise=0.0, shift=1, shape=Grid.of(spec))
    moved = [grid.to_hwc(row) for row in out]
    assert len({m.tobytes() for m in moved}) > 1
    for m in moved:  # the square moved as a whole: every pixel keeps its three channels
        lit = m.any(axis=-1)
        assert lit.sum() == 100 and np.allclose(m[lit], [0.2, 0.5, 0.9])

"""Square Attack, L-inf and L2, untargeted: a score-based random search.

Andriushchenko, Croce, Flammarion, Hein. "Square Attack: a query-efficient
black-box adversarial attack via random search." ECCV 2020. Reference code:
``max-andr/square-attack`` (``attack.py``).

The input is viewed as an ``h x w`` image of ``c`` channels: the target's image
(``TargetSpec.image``: ``[H, W, C]`` or ``[C, H, W]``; shapes: 32 x 32 x 3), else
one channel on the most square factorisation of the feature count (digits: 8 x 8).
Each iteration changes one random spatial square window of side ``s`` (from the
fraction ``p`` of pixels, halved on the paper's schedule ``p_selection``) across
every channel, and keeps the change only if the margin loss
``log p_y - max_{j != y} log p_j`` (the logit margin) drops. L-inf: the window
gets a random ``±epsilon`` per channel, starting from random vertical stripes
per channel. L2: the window gets the paper's "meta pseudo-Gaussian" pattern with
a random sign per channel, mass moved from a second window so the total norm
stays ``epsilon``.

Goal: any misclassified input within the ``epsilon`` ball (input units); every
query is inside the ball and the target's range. A refused query is never an
improvement.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from guard.attacks.budget import Oracle
from guard.attacks.evasion.base import Progress, margin
from guard.attacks.targets import TargetSpec

MAX_RESAMPLES = 100


def p_selection(p_init: float, it: int, n_iters: int) -> float:
    """The paper's schedule for the fraction of pixels changed at iteration ``it``."""
    it = int(it / n_iters * 10000)
    for bound, divisor in (
        (10, 1),
        (50, 2),
        (200, 4),
        (500, 8),
        (1000, 16),
        (2000, 32),
        (4000, 64),
        (6000, 128),
        (8000, 256),
        (10000, 512),
    ):
        if it <= bound:
            return p_init / divisor
    return p_init


def image_shape(n_features: int, shape: tuple[int, int] | None) -> tuple[int, int]:
    if shape is not None:
        if shape[0] * shape[1] != n_features:
            raise ValueError(f"shape {shape} does not hold {n_features} features")
        return shape
    h = int(np.sqrt(n_features))
    while n_features % h:
        h -= 1
    return h, n_features // h


@dataclass(frozen=True, slots=True)
class Grid:
    """Where the windows are drawn: ``height x width`` pixels of ``channels`` values,
    stored HWC or CHW in a row."""

    height: int
    width: int
    channels: int = 1
    layout: str = "HWC"

    @classmethod
    def of(cls, spec: TargetSpec, shape: tuple[int, int] | None = None) -> Grid:
        """The spec's image, else (or when ``shape`` is given) the row folded into
        ``image_shape`` with one channel."""
        image = spec.image if shape is None else None
        if image is not None:
            return cls(image.height, image.width, image.channels, image.layout)
        return cls(*image_shape(spec.n_features, shape))

    def to_hwc(self, row: np.ndarray) -> np.ndarray:
        h, w, c = self.height, self.width, self.channels
        if self.layout == "CHW":
            return row.reshape(c, h, w).transpose(1, 2, 0)
        return row.reshape(h, w, c)

    def to_row(self, image: np.ndarray) -> np.ndarray:
        """``[1, F]`` in the row's order."""
        return (image.transpose(2, 0, 1) if self.layout == "CHW" else image).reshape(1, -1)


@dataclass(frozen=True, kw_only=True, slots=True)
class SquareLinf:
    epsilon: float  # L-inf radius, input units
    p_init: float = 0.3
    shape: tuple[int, int] | None = None
    name: ClassVar[str] = "square-linf"

    def __post_init__(self) -> None:
        if self.epsilon <= 0 or not 0 < self.p_init <= 1:
            raise ValueError(f"invalid Square parameters: {self}")

    def run(
        self,
        oracle: Oracle,
        x0: np.ndarray,
        y0: int,
        scores0: np.ndarray,
        rng: np.random.Generator,
        progress: Progress,
    ) -> None:
        grid = Grid.of(oracle.spec, self.shape)
        h, w, c = grid.height, grid.width, grid.channels
        image, lo, hi = _as_image(x0, oracle, grid)
        eps = self.epsilon
        # Vertical stripes, one sign per column and channel.
        best = np.clip(image + rng.choice([-eps, eps], size=(1, w, c)), lo, hi)
        loss = margin(oracle.ask(grid.to_row(best)).scores, y0)[0]
        for i in itertools.count():  # until success; the budget ends it otherwise
            if loss < 0:
                progress.found(grid.to_row(best)[0], success=True)
                return
            delta = best - image
            s = _side(p_selection(self.p_init, i, oracle.budget), h, w, smallest=1)
            window = _window(rng, h, w, s)
            for _ in range(MAX_RESAMPLES):  # a window left as it was would waste the query
                changed = np.clip(image[window] + delta[window], lo[window], hi[window])
                if np.any(np.abs(changed - best[window]) >= 1e-7):
                    break
                delta[window] = rng.choice([-eps, eps], size=(1, 1, c))  # a sign per channel
            candidate = np.clip(image + delta, lo, hi)
            new = margin(oracle.ask(grid.to_row(candidate)).scores, y0)[0]
            if new < loss:
                best, loss = candidate, new


@dataclass(frozen=True, kw_only=True, slots=True)
class SquareL2:
    epsilon: float  # L2 radius, input units
    p_init: float = 0.3
    shape: tuple[int, int] | None = None
    name: ClassVar[str] = "square-l2"

    def __post_init__(self) -> None:
        if self.epsilon <= 0 or not 0 < self.p_init <= 1:
            raise ValueError(f"invalid Square parameters: {self}")

    def run(
        self,
        oracle: Oracle,
        x0: np.ndarray,
        y0: int,
        scores0: np.ndarray,
        rng: np.random.Generator,
        progress: Progress,
    ) -> None:
        grid = Grid.of(oracle.spec, self.shape)
        h, w, c = grid.height, grid.width, grid.channels
        if min(h, w) < 4:
            raise ValueError(f"square-l2 needs an image of at least 4 x 4; got {h} x {w}")
        image, lo, hi = _as_image(x0, oracle, grid)
        eps = self.epsilon
        best = np.clip(image + eps * _unit(_initial_l2(rng, h, w, c)), lo, hi)
        loss = margin(oracle.ask(grid.to_row(best)).scores, y0)[0]
        for i in itertools.count():  # until success; the budget ends it otherwise
            if loss < 0:
                progress.found(grid.to_row(best)[0], success=True)
                return
            delta = best - image
            s = _side(p_selection(self.p_init, i, oracle.budget), h, w, smallest=3)
            if s % 2 == 0 and s + 1 < min(h, w):
                s += 1  # odd, as in the reference
            first, second = _window(rng, h, w, s), _window(rng, h, w, s)
            both = np.zeros((h, w), dtype=bool)
            both[first] = both[second] = True
            # Norms per channel, as in the reference.
            norm_first = _channel_norms(delta[first])
            norm_all = float(np.linalg.norm(delta))
            norm_both = _channel_norms(delta[both])
            update = _meta_pseudo_gaussian(rng, s)[..., None] * rng.choice([-1.0, 1.0], (1, 1, c))
            update += delta[first] / (1e-10 + norm_first)
            # Each channel's windows get the norm they hold now plus its share of whatever
            # the ball has left.
            room = np.sqrt(max(eps**2 - norm_all**2, 0.0) / c + norm_both**2)
            update *= room / _channel_norms(update)
            delta[second] = 0.0
            delta[first] = update
            candidate = np.clip(image + eps * _unit(delta), lo, hi)
            new = margin(oracle.ask(grid.to_row(candidate)).scores, y0)[0]
            if new < loss:
                best, loss = candidate, new


def _as_image(x0: np.ndarray, oracle: Oracle, grid: Grid) -> tuple[np.ndarray, ...]:
    """The row, its low and its high ends as ``[h, w, c]`` images."""
    spec = oracle.spec
    lo = grid.to_hwc(np.broadcast_to(spec.lo, x0.shape))
    hi = grid.to_hwc(np.broadcast_to(spec.hi, x0.shape))
    return grid.to_hwc(x0), lo, hi


def _channel_norms(values: np.ndarray) -> np.ndarray:
    """The L2 norm of each channel (the last axis) of ``values``."""
    return np.array([np.linalg.norm(values[..., k]) for k in range(values.shape[-1])])


def _side(p: float, h: int, w: int, *, smallest: int) -> int:
    """Window side for a fraction ``p`` of the pixels, kept inside the image."""
    return min(max(round(float(np.sqrt(p * h * w))), smallest), min(h, w) - 1)


def _window(rng: np.random.Generator, h: int, w: int, s: int) -> tuple[slice, slice]:
    """A random ``s x s`` window. (The reference draws corners from ``[0, h - s)``, so
    it never touches the last row and column; on 8 x 8 digits that matters.)"""
    r, c = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
    return slice(r, r + s), slice(c, c + s)


def _unit(delta: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(delta)
    return delta / norm if norm > 0 else delta


def _pseudo_gaussian(h: int, w: int) -> np.ndarray:
    """Nested rectangles with weight ``1 / (k + 1)^2`` around the centre, unit L2 norm."""
    delta = np.zeros((h, w))
    ch, cw = h // 2 + 1, w // 2 + 1
    r, c = ch - 1, cw - 1
    for k in range(max(ch, cw)):
        delta[max(r, 0) : min(r + 2 * k + 1, h), max(c, 0) : min(c + 2 * k + 1, w)] += (
            1.0 / (k + 1) ** 2
        )
        r -= 1
        c -= 1
    return delta / np.linalg.norm(delta)


def _meta_pseudo_gaussian(rng: np.random.Generator, s: int) -> np.ndarray:
    """Two opposite-signed pseudo-Gaussian halves of an ``s x s`` square, randomly transposed."""
    delta = np.zeros((s, s))
    delta[: s // 2] = _pseudo_gaussian(s // 2, s)
    delta[s // 2 :] = -_pseudo_gaussian(s - s // 2, s)
    delta /= np.linalg.norm(delta)
    return delta.T if rng.random() > 0.5 else delta


def _initial_l2(rng: np.random.Generator, h: int, w: int, c: int = 1) -> np.ndarray:
    """The reference's start: a grid of pseudo-Gaussian squares, a random sign per channel."""
    s = max(min(h, w) // 5, 2)
    delta = np.zeros((h, w, c))
    top, left = (h - s * (h // s)) // 2, (w - s * (w // s)) // 2
    for i in range(h // s):
        for j in range(w // s):
            r, col = top + i * s, left + j * s
            square = _meta_pseudo_gaussian(rng, s)[..., None]
            delta[r : r + s, col : col + s] += square * rng.choice([-1.0, 1.0], (1, 1, c))
    return delta

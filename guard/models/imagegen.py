"""Procedural 32x32 colour images of ten shapes and textures: the ``shapes`` data set.

No image data set may be downloaded at run time, so the built-in image model is trained on
pictures drawn here, with numpy only::

    from guard.models.imagegen import CLASS_NAMES, generate
    x, y = generate(1000, np.random.default_rng(0))   # x uint8 [1000, 32, 32, 3], y int64

Each image is one object of class ``y`` (:data:`CLASS_NAMES`) drawn over a clutter of its
own: a two-colour gradient background with a faint random wave texture, an optional
distractor line, a random foreground colour (sometimes close to the background), a random
size, position and rotation, anti-aliased edges, a lighting gradient and Gaussian pixel
noise. Small, low-contrast or noisy draws are genuinely ambiguous (a small ring looks like a
circle, a small star like a cross), so a model trained on them is good but not perfect.

Guarantees:

* the same generator state gives the same bytes (everything is drawn from ``rng`` in a
  fixed order; no global random state);
* classes are balanced: each class appears ``n // 10`` or ``n // 10 + 1`` times, in a
  random order;
* it is fast: thousands of images per second on one core.
"""

from __future__ import annotations

import numpy as np

__all__ = ["CHUNK", "CLASS_NAMES", "SIZE", "dataset", "generate"]

CLASS_NAMES = (
    "circle",
    "square",
    "triangle",
    "ring",
    "cross",
    "star",
    "frame",
    "stripes",
    "checker",
    "dots",
)
SIZE = 32
CHUNK = 1000  # images per generator seed in :func:`dataset`

_DATA_STREAM = 3
_COORD = np.arange(SIZE, dtype=np.float32) + 0.5  # pixel centres


def generate(
    n: int, rng: np.random.Generator, *, classes: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images and their labels: ``(x uint8 [n, 32, 32, 3], y int64 [n])``.

    ``classes``, if given, are the labels to draw (``n`` of them, each in ``0..9``);
    otherwise a balanced, shuffled set of labels is drawn from ``rng``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0; got {n}")
    if classes is None:
        y = rng.permutation(np.arange(n) % len(CLASS_NAMES)).astype(np.int64)
    else:
        y = np.asarray(classes, dtype=np.int64)
        if y.shape != (n,) or np.any((y < 0) | (y >= len(CLASS_NAMES))):
            raise ValueError(f"classes must be {n} labels in 0..{len(CLASS_NAMES) - 1}")
    p = _Draws(n, rng)
    image = _background(p)
    image = _paint(image, _distractor(p), p.line_colour[:, None, None, :])
    alpha, texture = _object(p, y)
    image = _paint(image, alpha * texture, p.colour[:, None, None, :])
    image = image * _lighting(p)[..., None] + p.noise[:, None, None, None] * p.pixel_noise
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8), y


def dataset(seed: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``start .. stop - 1`` of the data set of ``seed``, as :func:`generate` returns them.

    The data set is drawn in chunks of :data:`CHUNK` images, chunk ``i`` from
    ``numpy.random.default_rng([seed, 3, i])``, so any rows can be redrawn from their chunks
    alone; the built-in ``shapes`` model was trained on rows ``0 .. 19999`` of seed 0.
    """
    if not 0 <= start <= stop:
        raise ValueError(f"need 0 <= start <= stop; got {start}, {stop}")
    xs = [np.empty((0, SIZE, SIZE, 3), np.uint8)]
    ys = [np.empty(0, np.int64)]
    for chunk in range(start // CHUNK, -(-stop // CHUNK)):
        x, y = generate(CHUNK, np.random.default_rng([seed, _DATA_STREAM, chunk]))
        lo, hi = max(start - chunk * CHUNK, 0), min(stop - chunk * CHUNK, CHUNK)
        xs.append(x[lo:hi])
        ys.append(y[lo:hi])
    return np.concatenate(xs), np.concatenate(ys)


class _Draws:
    """Every random parameter of ``n`` images, drawn in one fixed order."""

    def __init__(self, n: int, rng: np.random.Generator) -> None:
        u = rng.random
        self.bg = u((n, 2, 3), dtype=np.float32)  # gradient end colours
        self.bg_angle = u(n, dtype=np.float32) * 2 * np.pi
        self.wave = u((n, 4), dtype=np.float32)  # amplitude, frequency, angle, phase
        self.colour = u((n, 3), dtype=np.float32)
        self.min_contrast = u(n, dtype=np.float32)
        self.radius = 5.0 + 7.0 * u(n, dtype=np.float32)  # object half-size, pixels
        self.centre = u((n, 2), dtype=np.float32)
        self.angle = u(n, dtype=np.float32) * 2 * np.pi
        self.aspect = u(n, dtype=np.float32)  # thickness / spacing / texture period knob
        self.soft = 0.5 + 0.7 * u(n, dtype=np.float32)  # edge softness, pixels
        self.line = u((n, 5), dtype=np.float32)  # on?, two end points
        self.line_colour = u((n, 3), dtype=np.float32)
        self.light = u((n, 3), dtype=np.float32)  # gain, slope, angle
        self.noise = 0.06 * u(n, dtype=np.float32)  # pixel noise sigma, [0, 1] units
        self.pixel_noise = rng.standard_normal((n, SIZE, SIZE, 3), dtype=np.float32)
        # A colour too close to the background gets pushed away from it, by a random amount:
        # most objects stand out, a few are faint.
        mean_bg = self.bg.mean(axis=1)
        gap = self.colour - mean_bg
        norm = np.linalg.norm(gap, axis=1)
        want = 0.2 + 0.45 * self.min_contrast
        push = np.where(norm < want, want / np.maximum(norm, 1e-3), 1.0)
        self.colour = np.clip(mean_bg + gap * push[:, None], 0.0, 1.0)


def _grid(p: _Draws, angle: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per image: rotated object coordinates ``u, v`` (pixels) and polar ``r, theta``."""
    margin = p.radius + 1.0
    cx = margin + p.centre[:, 0] * np.maximum(SIZE - 2 * margin, 0.0)
    cy = margin + p.centre[:, 1] * np.maximum(SIZE - 2 * margin, 0.0)
    dx = _COORD[None, None, :] - cx[:, None, None]
    dy = _COORD[None, :, None] - cy[:, None, None]
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    u = cos * dx + sin * dy
    v = -sin * dx + cos * dy
    return u, v, np.hypot(u, v), np.arctan2(v, u)


def _background(p: _Draws) -> np.ndarray:
    """A linear two-colour gradient plus a faint sinusoidal wave."""
    cos, sin = np.cos(p.bg_angle), np.sin(p.bg_angle)
    t = (
        cos[:, None, None] * (_COORD[None, None, :] - 16)
        + sin[:, None, None] * (_COORD[None, :, None] - 16)
    ) / 32 + 0.5
    t = np.clip(t, 0.0, 1.0)[..., None]
    image = p.bg[:, None, None, 0, :] * (1 - t) + p.bg[:, None, None, 1, :] * t
    amp, freq, angle, phase = (p.wave[:, i, None, None] for i in range(4))
    w = np.sin(
        (0.2 + 0.6 * freq)
        * (
            np.cos(2 * np.pi * angle) * _COORD[None, None, :]
            + np.sin(2 * np.pi * angle) * _COORD[None, :, None]
        )
        + 2 * np.pi * phase
    )
    return image + (0.08 * amp * w)[..., None]


def _distractor(p: _Draws) -> np.ndarray:
    """Coverage ``[n, 32, 32]`` of a thin straight line, drawn in about a third of images."""
    on = p.line[:, 0] < 0.35
    a = p.line[:, 1:3] * SIZE
    b = p.line[:, 3:5] * SIZE
    ab = b - a
    px = _COORD[None, None, :] - a[:, 0, None, None]
    py = _COORD[None, :, None] - a[:, 1, None, None]
    length2 = np.maximum((ab**2).sum(axis=1), 1e-6)[:, None, None]
    t = np.clip((px * ab[:, 0, None, None] + py * ab[:, 1, None, None]) / length2, 0.0, 1.0)
    dist = np.hypot(px - t * ab[:, 0, None, None], py - t * ab[:, 1, None, None])
    return np.clip(1.2 - dist, 0.0, 1.0) * on[:, None, None]


def _object(p: _Draws, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coverage ``alpha`` ``[n, 32, 32]`` of each object, and its texture (1 where painted)."""
    u, v, r, theta = _grid(p, p.angle)
    R = p.radius[:, None, None]
    k = p.aspect[:, None, None]
    au, av = np.abs(u), np.abs(v)
    # Signed distances (negative inside), one per class; only the row's own class is kept.
    sdf = np.empty_like(u)
    texture = np.ones_like(u)
    for label in range(len(CLASS_NAMES)):
        rows = y == label
        if not rows.any():
            continue
        uu, vv, rr, tt, RR, kk = u[rows], v[rows], r[rows], theta[rows], R[rows], k[rows]
        auu, avv = au[rows], av[rows]
        name = CLASS_NAMES[label]
        if name == "circle":
            d = rr - RR
        elif name == "square":
            d = np.maximum(auu, avv) - 0.8 * RR
        elif name == "triangle":
            d = np.full_like(uu, -np.inf)
            for corner in range(3):
                phi = 2 * np.pi * corner / 3 + np.pi / 2
                d = np.maximum(d, np.cos(phi) * uu + np.sin(phi) * vv - 0.55 * RR)
        elif name == "ring":
            width = 0.18 + 0.15 * kk
            d = np.abs(rr - (1 - width) * RR) - width * RR
        elif name == "cross":
            arm = (0.2 + 0.12 * kk) * RR
            d = np.minimum(np.maximum(auu - RR, avv - arm), np.maximum(avv - RR, auu - arm))
        elif name == "star":
            d = rr - RR * (0.62 + 0.38 * np.cos(5 * tt)) * (1 - 0.2 * kk) - 0.5
        elif name == "frame":
            width = 0.15 + 0.12 * kk
            d = np.abs(np.maximum(auu, avv) - (1 - width) * 0.85 * RR) - width * 0.85 * RR
        else:  # textures fill a rotated square patch
            d = np.maximum(auu, avv) - (0.75 + 0.25 * kk) * RR - 3.0
            period = 3.0 + 2.5 * kk
            phase = 2 * np.pi / period
            if name == "stripes":
                pattern = np.sin(phase * uu)
            elif name == "checker":
                pattern = np.sin(phase * uu) * np.sin(phase * vv)
            else:  # dots
                fu = (uu / period) % 1.0 - 0.5
                fv = (vv / period) % 1.0 - 0.5
                pattern = 0.3 - np.hypot(fu, fv)
            texture[rows] = np.clip(0.5 + 4.0 * pattern, 0.0, 1.0)
        sdf[rows] = d
    alpha = np.clip(0.5 - sdf / p.soft[:, None, None], 0.0, 1.0)
    return alpha, texture


def _lighting(p: _Draws) -> np.ndarray:
    """A multiplicative illumination gradient ``[n, 32, 32]`` (gain 0.6 .. 1.3)."""
    gain, slope, angle = (p.light[:, i, None, None] for i in range(3))
    a = 2 * np.pi * angle
    t = (np.cos(a) * (_COORD[None, None, :] - 16) + np.sin(a) * (_COORD[None, :, None] - 16)) / 16
    return 0.7 + 0.4 * gain + 0.25 * slope * t


def _paint(image: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> np.ndarray:
    a = alpha[..., None]
    return image * (1 - a) + colour * a

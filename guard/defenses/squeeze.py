"""Feature squeezing: squeezers, the detector's score, and its calibration.

Xu, Evans, Qi, "Feature Squeezing: Detecting Adversarial Examples in Deep
Neural Networks", NDSS 2018. A squeezer maps many inputs to one (fewer colour
bits, a median over a small window), removing room an adversary needs. The
detector compares the model's prediction vector on an input with its
predictions on squeezed copies: ``score(x) = max_i ||f(x) - f(s_i(x))||_1``,
and an input scoring above a threshold chosen on benign data is flagged
(the paper's "joint detection"; its threshold is picked at a target false
positive rate on legitimate inputs, as :func:`calibrate_threshold` does).

A :class:`Squeezer` applies its transforms in the fixed order clip → bits →
median. Only clip and bits can disagree about order; the median commutes with
both, because it picks an element and they are non-decreasing maps.

Known limits (Xu et al. section 6; He et al., "Adversarial Example Defenses:
Ensembles of Weak Defenses are not Strong", WOOT 2017): an adaptive attacker
who optimises against the squeezed model and the detector together evades
it. Present squeezing as raising the cost of off-the-shelf attacks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from guard import _native
from guard._py.squeeze import LAYOUTS, check_bits, check_image, check_range

__all__ = [
    "LAYOUTS",
    "TECHNIQUE",
    "Image",
    "Squeezer",
    "calibrate_threshold",
    "distances_from_scores",
    "l1_distances",
    "squeeze_warnings",
    "squeezed_batch",
]

TECHNIQUE = "AML.T0043"  # MITRE ATLAS: Craft Adversarial Data

ScoresFn = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True, slots=True)
class Image:
    """How each sample of an input lays out one image."""

    height: int
    width: int
    channels: int = 1
    layout: str = "HWC"

    def __post_init__(self) -> None:
        check_image((0, self.size), 1, self.height, self.width, self.channels, self.layout)

    @property
    def size(self) -> int:
        return self.height * self.width * self.channels

    def __str__(self) -> str:
        return f"{self.height}x{self.width}x{self.channels} {self.layout}"

    @classmethod
    def from_shape(cls, shape: Sequence[int] | None) -> Image | None:
        """The image one sample of ``shape`` holds, else None: ``[H, W]`` (one channel),
        ``[H, W, C]`` (HWC, ``C`` in 1, 3, 4) or ``[C, H, W]`` (CHW: ``C`` in 1, 3, 4 and
        the last dimension not), with ``H`` and ``W`` above 1."""
        shape = tuple(int(d) for d in shape or ())
        if len(shape) == 2 and min(shape) > 1:
            return cls(shape[0], shape[1], 1, "HWC")
        if len(shape) == 3 and shape[2] in (1, 3, 4) and min(shape[:2]) > 1:
            return cls(shape[0], shape[1], shape[2], "HWC")
        if len(shape) == 3 and shape[0] in (1, 3, 4) and min(shape[1:]) > 1:
            return cls(shape[1], shape[2], shape[0], "CHW")
        return None


@dataclass(frozen=True, kw_only=True, slots=True)
class Squeezer:
    """clip → bits → median, each optional; at least one is set.

    ``bits`` reduces the colour depth over ``value_range``; ``median`` is the
    window size of a median over each channel of ``image``. Calling the
    squeezer returns a new array of the input's shape and dtype (float32 or
    float64); a batch that does not hold ``image`` raises ``ValueError``.
    """

    clip: tuple[float, float] | None = None
    bits: int | None = None
    median: int | None = None
    value_range: tuple[float, float] | None = None
    image: Image | None = None

    def __post_init__(self) -> None:
        if self.clip is None and self.bits is None and self.median is None:
            raise ValueError("a squeezer needs at least one of clip, bits, median")
        if self.clip is not None:
            check_range(*self.clip, "clip")
        if self.bits is not None:
            if self.value_range is None:
                raise ValueError("bits needs the value range")
            check_range(*self.value_range, "reduce_bits")
            check_bits(self.bits)
        if self.median is not None:
            if self.image is None:
                raise ValueError("median needs the image shape")
            check_image(
                (0, self.image.size),
                self.median,
                self.image.height,
                self.image.width,
                self.image.channels,
                self.image.layout,
            )

    @property
    def name(self) -> str:
        parts = []
        if self.clip is not None:
            parts.append(f"clip=[{self.clip[0]:g}, {self.clip[1]:g}]")
        if self.bits is not None:
            parts.append(f"bits={self.bits}")
        if self.median is not None:
            parts.append(f"median={self.median}x{self.median}")
        return "+".join(parts)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.clip is not None:
            x = _native.clip(x, *self.clip)
        if self.bits is not None and self.value_range is not None:
            x = _native.reduce_bits(x, self.bits, *self.value_range)
        if self.median is not None and self.image is not None:
            image = self.image
            x = _native.median_smooth(
                x, self.median, image.height, image.width, image.channels, image.layout
            )
        return x


def l1_distances(scores_fn: ScoresFn, x: np.ndarray, squeezers: Sequence[Squeezer]) -> np.ndarray:
    """``[N, S]`` L1 distances between the scores of ``x`` and of each squeezed copy.

    ``scores_fn`` is called once, on ``x`` followed by its ``S`` squeezed copies
    (``(S + 1) * N`` samples), and must return one score vector per sample.
    """
    return distances_from_scores(scores_fn(squeezed_batch(x, squeezers)), len(x), len(squeezers))


def squeezed_batch(x: np.ndarray, squeezers: Sequence[Squeezer]) -> np.ndarray:
    """``x`` followed by each squeezed copy of it, along the batch axis."""
    return np.concatenate([x, *(squeeze(x) for squeeze in squeezers)])


def distances_from_scores(scores: np.ndarray, n: int, squeezers: int) -> np.ndarray:
    """``[n, squeezers]`` L1 distances from the scores of a :func:`squeezed_batch`."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim == 0 or scores.shape[0] != (squeezers + 1) * n:
        raise ValueError(
            f"expected scores for {(squeezers + 1) * n} samples; got shape {list(scores.shape)}"
        )
    if n == 0:
        return np.zeros((0, squeezers))
    groups = scores.reshape(squeezers + 1, n, -1)
    return np.abs(groups[1:] - groups[0]).sum(axis=2).T


def calibrate_threshold(
    scores_fn: ScoresFn,
    benign_x: np.ndarray,
    squeezers: Sequence[Squeezer],
    fpr: float,
    *,
    batch_size: int = 256,
) -> float:
    """The detection threshold for a target false positive rate on benign inputs.

    Scores every benign input (the max over ``squeezers`` of its L1 distance)
    and returns the smallest score ``t`` such that at most ``floor(fpr * N)`` of
    the ``N`` inputs score above ``t``: the detector flags ``score > t``, so its
    false positive rate on ``benign_x`` is at most ``fpr``. On new benign data
    it is ``fpr`` only in expectation; use a large ``benign_x``. ``scores_fn``
    is called once per ``batch_size`` inputs.
    """
    if not 0.0 <= fpr < 1.0:
        raise ValueError(f"fpr must be in [0, 1); got {fpr}")
    if len(benign_x) == 0 or not squeezers:
        raise ValueError("calibration needs benign inputs and at least one squeezer")
    scores = np.concatenate(
        [
            l1_distances(scores_fn, benign_x[start : start + batch_size], squeezers).max(axis=1)
            for start in range(0, len(benign_x), batch_size)
        ]
    )
    scores.sort()
    allowed = int(np.floor(fpr * len(scores)))
    return float(scores[len(scores) - 1 - allowed])


def squeeze_warnings(stage_names: Sequence[str]) -> list[str]:
    """Stage orders that load but change what a later stage means.

    * ``squeeze`` before ``certify``: the certificate is about the squeezed
      input, and bit-depth reduction moves an input by up to a whole
      quantisation step for an arbitrarily small change, so the certified
      radius says nothing about changes to what the client sent.
    * ``squeeze`` before ``squeeze_detect``: the detector compares an input that
      is already squeezed with its re-squeezed copies; scores collapse to 0.
    """
    warnings = []
    if "squeeze" in stage_names:
        first = list(stage_names).index("squeeze")
        later = list(stage_names)[first + 1 :]
        if "certify" in later:
            warnings.append(
                "squeeze runs before certify: the certificate covers the squeezed input, not the "
                "client's; bit-depth reduction can move an input a whole quantisation step for an "
                "arbitrarily small change, so the radius does not bound changes to the request. "
                "Put certify first, or certify a model that squeezes inside (noise, then squeeze)"
            )
        if "squeeze_detect" in later:
            warnings.append(
                "squeeze runs before squeeze_detect: the detector sees inputs that are already "
                "squeezed, so its scores collapse toward 0 and it flags nothing. "
                "Put squeeze_detect first"
            )
    return warnings

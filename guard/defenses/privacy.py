"""Output-privacy mechanisms: what a model's score vector becomes before it is released.

Every function takes a batch of probability rows ``scores`` ``[N, C]`` (each row
in ``[0, 1]`` and summing to 1) and returns a released batch of the same shape
and dtype. Randomness comes from a :class:`numpy.random.Generator`, or one per
row (:func:`consistent_generators`: the same row always gets the same noise).

What the noisy mechanisms protect (output-range differential privacy)
----------------------------------------------------------------------
The mechanism ``M`` maps the model's score vector ``p`` to a released vector.
Its guarantee compares any two score vectors the model could produce, not two
training sets: for every pair ``p, p'`` on the probability simplex and every set
of releases ``S``, ``Pr[M(p) ∈ S] <= e^ε Pr[M(p') ∈ S]`` (plus ``δ`` for the
Gaussian). An observer of one answer learns about ``p`` (the decision function
at that input, and whatever ``p`` reveals about training membership) at most
what ε allows. It is not differential privacy of the training data.

* :class:`Laplace`: ``p + Lap(Δ₁/ε)`` per coordinate, with ``Δ₁ = 2``, the L1
  diameter of the simplex (``‖p - p'‖₁ <= 2``; one coordinate alone moves by at
  most 1). ε-DP per answer; ε adds up over answers (basic composition).
* :class:`Gaussian`: ``p + N(0, σ²)`` per coordinate, with ``Δ₂ = √2``. ρ-zCDP
  with ``ρ = Δ₂²/(2σ²) = 1/σ²`` per answer (Bun & Steinke, TCC 2016); ρ adds
  up; see :mod:`guard.defenses.accountant` for the (ε, δ) conversion.

Clipping at 0 and renormalising (:func:`to_simplex`) is post-processing
and keeps the guarantee. ``keep_argmax`` releases the true top-1 label exactly
(the released argmax equals ``argmax p``): the guarantee then holds between
score vectors with the same top-1 label, and the label itself is disclosed.
Label-only answers are therefore what ε does not cover, and membership attacks
that read labels alone (Choquette-Choo et al., ICML 2021) are untouched by any
score perturbation that keeps the label.

The deterministic mechanisms (:class:`Rounding`, :class:`TopK`,
:class:`LabelOnly`, :class:`ReverseSigmoid`, :class:`ConfidenceBins`) carry no
ε: they reduce what one answer reveals but do not bound it.

:class:`ConfidenceBins` is the utility-preserving one: it keeps the label and the
order of the classes, and releases the top probability as one of a few calibrated
levels (histogram binning, Zadrozny & Elkan, ICML 2001), the rest of the mass
shared among the other classes by rank alone. An answer is then a function of
the label, the order of the classes and the bin: the fine differences of
confidence that separate training members (the model is surest on them) from
other inputs do not leave, nor do the magnitudes an inversion or extraction
attack would climb (MemGuard, Jia et al., CCS 2019,
shapes the vector against an attack model to the same end; this is its
attack-model-free, deterministic cousin).

References: Dwork, McSherry, Nissim, Smith, TCC 2006 (Laplace mechanism); Bun &
Steinke, TCC 2016 (zCDP); Lee, Edraki, Zhu, Qi, "Defending Against NN Model
Stealing Attacks Using Deceptive Perturbations", IEEE S&P Workshops 2019
(reverse sigmoid; arXiv:1806.00054).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

import numpy as np

from guard import _native
from guard._py import bins as bins_twin

L1_SENSITIVITY = 2.0  # max ‖p - p'‖₁ over probability vectors
L2_SENSITIVITY = math.sqrt(2.0)  # max ‖p - p'‖₂ over probability vectors
SUM_TOLERANCE = 1e-3  # how far a row of FP32 probabilities may sum from 1

Rng = np.random.Generator | Sequence[np.random.Generator]
Unit = Literal["epsilon", "rho"]


@dataclass(frozen=True, slots=True)
class Cost:
    """Privacy loss of one answer: ``epsilon`` (pure ε-DP) or ``rho`` (ρ-zCDP)."""

    unit: Unit
    amount: float


# -- calibration ----------------------------------------------------------------


def laplace_scale(epsilon: float, sensitivity: float = L1_SENSITIVITY) -> float:
    """The Laplace scale ``b = Δ₁/ε`` that makes one answer ε-DP."""
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0; got {epsilon}")
    return sensitivity / epsilon


def gaussian_rho(sigma: float, sensitivity: float = L2_SENSITIVITY) -> float:
    """The zCDP cost ``ρ = Δ₂²/(2σ²)`` of one answer with Gaussian noise ``σ``."""
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0; got {sigma}")
    return sensitivity**2 / (2.0 * sigma**2)


def gaussian_sigma(rho: float, sensitivity: float = L2_SENSITIVITY) -> float:
    """The ``σ`` whose answers cost ``ρ`` each (inverse of :func:`gaussian_rho`)."""
    if not rho > 0:
        raise ValueError(f"rho must be > 0; got {rho}")
    return sensitivity / math.sqrt(2.0 * rho)


# -- pure transforms -------------------------------------------------------------


def check_scores(scores: np.ndarray) -> None:
    """Refuse anything but a batch of probability rows (the sensitivities assume them)."""
    check_layout(scores)
    if scores.size == 0:
        return
    # NaN fails both comparisons (min and max propagate it), and so does an infinity.
    if not (scores.min() >= 0.0 and scores.max() <= 1.0):
        raise ValueError(_NOT_PROBABILITIES[bins_twin.RANGE])
    sums = scores.sum(axis=1, dtype=np.float64)
    if not (sums.min() >= _SUM_LO and sums.max() <= _SUM_HI):
        raise ValueError(_NOT_PROBABILITIES[bins_twin.SUM])


def check_layout(scores: np.ndarray) -> None:
    """Refuse anything but a batch of floating-point rows of two classes or more."""
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(
            f"scores must be a batch of probability rows [N, C>=2]; got shape {scores.shape}"
        )
    if scores.dtype.kind != "f":
        raise ValueError(f"scores must be floating point; got {scores.dtype}")


_SUM_LO, _SUM_HI = 1.0 - SUM_TOLERANCE, 1.0 + SUM_TOLERANCE
_NOT_PROBABILITIES = {
    bins_twin.RANGE: "scores must be probabilities in [0, 1] (logits are not supported)",
    bins_twin.SUM: "each row of scores must sum to 1 (softmax probabilities)",
}


def add_laplace(scores: np.ndarray, scale: float, rng: Rng) -> np.ndarray:
    """``scores + Lap(scale)`` per coordinate, float64, unclipped."""
    return scores + _draw(rng, scores.shape, lambda g, shape: g.laplace(0.0, scale, shape))


def add_gaussian(scores: np.ndarray, sigma: float, rng: Rng) -> np.ndarray:
    """``scores + N(0, sigma²)`` per coordinate, float64, unclipped."""
    return scores + _draw(rng, scores.shape, lambda g, shape: g.normal(0.0, sigma, shape))


def to_simplex(values: np.ndarray) -> np.ndarray:
    """Clip negative values to 0 and renormalise each row to sum to 1 (post-processing).

    Values above 1 are not clipped first: that would flatten every coordinate
    the noise pushed past 1 into a tie. A row clipped to all zeros becomes
    one-hot at its largest value, so every released row is a probability vector.
    """
    clipped = np.maximum(values, 0.0)
    sums = clipped.sum(axis=1, keepdims=True)
    empty = sums[:, 0] <= 0.0
    if empty.any():
        clipped[empty] = one_hot(np.argmax(values[empty], axis=1), values.shape[1], clipped.dtype)
        sums[empty] = 1.0
    return clipped / sums


def keep_top1(released: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """``released`` with its argmax moved to ``argmax(scores)`` by swapping two values.

    The swap keeps each row's values (and sum); a tie left at the top is broken
    by raising the true top-1 value by one ulp, so ``np.argmax`` of every row of
    the result equals ``np.argmax`` of the same row of ``scores``.
    """
    out = np.array(released, copy=True)
    rows = np.arange(out.shape[0])
    true = np.argmax(scores, axis=1)
    top = np.argmax(out, axis=1)
    out[rows, true], out[rows, top] = out[rows, top], out[rows, true]
    tied = np.argmax(out, axis=1) != true
    if tied.any():
        bumped = out[tied, true[tied]]
        out[tied, true[tied]] = np.nextafter(bumped, np.inf, dtype=out.dtype)
    return out


def round_scores(scores: np.ndarray, decimals: int) -> np.ndarray:
    """Scores rounded to ``decimals`` decimal places (rows need not sum to 1 after)."""
    return np.round(scores, decimals)


def top_k(scores: np.ndarray, k: int, *, renormalize: bool = True) -> np.ndarray:
    """The ``k`` largest scores of each row, zeros elsewhere.

    Ties are resolved towards lower class indices (as ``np.argmax`` does), so
    the top-1 class is always kept. ``renormalize`` rescales the kept scores to
    sum to 1; otherwise they are released as the model gave them.
    """
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    out = np.zeros_like(scores)
    np.put_along_axis(out, order, np.take_along_axis(scores, order, axis=1), axis=1)
    if renormalize:
        out /= out.sum(axis=1, keepdims=True)
    return out


def one_hot(labels: np.ndarray, classes: int, dtype: Any) -> np.ndarray:
    """One row per label, 1 at the label and 0 elsewhere (correct on batches)."""
    out = np.zeros((labels.shape[0], classes), dtype=dtype)
    out[np.arange(labels.shape[0]), labels] = 1
    return out


def label_only(scores: np.ndarray) -> np.ndarray:
    """One-hot of each row's top-1 class: the answer carries the label and nothing else."""
    return one_hot(np.argmax(scores, axis=1), scores.shape[1], scores.dtype)


def reverse_sigmoid(scores: np.ndarray, beta: float, gamma: float) -> np.ndarray:
    """Lee et al.'s reverse sigmoid: ``α (y - β (s(γ s⁻¹(y)) - 1/2))``, renormalised.

    ``s`` is the logistic function and ``s⁻¹`` its inverse (the logit, on ``y``
    clipped to ``[1e-9, 1 - 1e-9]``); negative results are clipped to 0 and
    ``α`` makes each row sum to 1. The map is not monotonic near 0 and 1 (a
    score of 1e-9 can end above one of 0.3), so it can change the top-1 class:
    :class:`ReverseSigmoid` swaps it back unless told not to.
    """
    clipped = np.clip(scores.astype(np.float64), 1e-9, 1.0 - 1e-9)
    logit = np.log(clipped) - np.log1p(-clipped)
    perturbation = beta * (_sigmoid(gamma * logit) - 0.5)
    return to_simplex(scores - perturbation)


def bin_confidence(
    scores: np.ndarray,
    cuts: Sequence[float],
    confidences: Sequence[float],
    ranked: int | None = None,
) -> np.ndarray:
    """Each row's top probability replaced by ``confidences[i]``, ``i`` the number of
    ``cuts`` at or below it; the other classes share the rest by rank alone, each of
    the ``ranked`` next classes (default: all) half the one before, the classes after
    them evenly (ties in the model's order go to the lower class index). A row then
    depends on its label, the order of its first ``ranked + 1`` classes and its bin,
    nothing else. That order is kept, except that a level below the second class's
    share swaps with it (:func:`keep_top1` puts the label back). Float64, unchecked:
    :class:`ConfidenceBins` checks, and releases in the scores' dtype."""
    edges, levels, shares, _ = bin_tables(tuple(cuts), tuple(confidences), ranked, scores.shape[1])
    return bins_twin.binned(scores, edges, levels, shares)


# The tables of a setting and class count, made once (a request's rows are few: making
# them would cost more than binning).
bin_tables = functools.lru_cache(maxsize=64)(bins_twin.tables)


@functools.lru_cache(maxsize=64)
def levels_lead(
    confidences: tuple[float, ...], ranked: int | None, classes: int, dtype: np.dtype[Any]
) -> bool:
    """Whether every level stays strictly above the second class's share once cast to
    ``dtype``: then :func:`bin_confidence`'s top is the model's argmax already (both
    take the lowest index among ties) and :func:`keep_top1` would change nothing."""
    _, _, shares, _ = bin_tables((), (1.0,), ranked, classes)
    kind = dtype.type
    return all(kind(level) > kind((1.0 - level) * shares[0]) for level in confidences)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free logistic


def _draw(
    rng: Rng,
    shape: tuple[int, ...],
    sample: Callable[[np.random.Generator, tuple[int, ...]], np.ndarray],
) -> np.ndarray:
    if isinstance(rng, np.random.Generator):
        return sample(rng, shape)
    if len(rng) != shape[0]:
        raise ValueError(f"one generator per row is needed: {shape[0]} rows, {len(rng)} generators")
    if shape[0] == 0:
        return np.zeros(shape)
    return np.stack([sample(g, shape[1:]) for g in rng])


# -- mechanisms -------------------------------------------------------------------


class Mechanism(Protocol):
    """A configured output defence.

    ``apply`` is a pure function of the scores and the generator(s); ``cost`` is
    the privacy loss of one answer (``None``: no ε guarantee); ``fingerprint``
    names the mechanism and every parameter, so noise keyed on it differs
    whenever a parameter does.
    """

    kind: ClassVar[str]
    noisy: ClassVar[bool]

    def apply(self, scores: np.ndarray, rng: Rng | None = None) -> np.ndarray: ...

    @property
    def cost(self) -> Cost | None: ...

    def fingerprint(self) -> str: ...

    def describe(self) -> dict[str, Any]: ...


def _fingerprint(mechanism: Any) -> str:
    fields = ",".join(f"{k}={v!r}" for k, v in sorted(mechanism.describe().items()))
    return f"{mechanism.kind}({fields})"


def _finish(released: np.ndarray, scores: np.ndarray, keep_argmax: bool) -> np.ndarray:
    released = released.astype(scores.dtype, copy=False)  # before the tie-break: it is one ulp
    return keep_top1(released, scores) if keep_argmax else released


def _need_rng(rng: Rng | None, kind: str) -> Rng:
    if rng is None:
        raise ValueError(f"the {kind} mechanism needs a random generator")
    return rng


@dataclass(frozen=True, kw_only=True, slots=True)
class Laplace:
    """ε-DP per answer (output range): Laplace noise of scale ``2/ε``, clipped, renormalised."""

    kind: ClassVar[str] = "laplace"
    noisy: ClassVar[bool] = True
    epsilon: float
    keep_argmax: bool = True

    def __post_init__(self) -> None:
        laplace_scale(self.epsilon)  # validates

    @property
    def scale(self) -> float:
        return laplace_scale(self.epsilon)

    @property
    def cost(self) -> Cost:
        return Cost("epsilon", self.epsilon)

    def apply(self, scores: np.ndarray, rng: Rng | None = None) -> np.ndarray:
        check_scores(scores)
        noisy = add_laplace(scores.astype(np.float64), self.scale, _need_rng(rng, self.kind))
        return _finish(to_simplex(noisy), scores, self.keep_argmax)

    def fingerprint(self) -> str:
        return _fingerprint(self)

    def describe(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon, "scale": self.scale, "keep_argmax": self.keep_argmax}


@dataclass(frozen=True, kw_only=True, slots=True)
class Gaussian:
    """ρ-zCDP per answer (output range), ``ρ = 1/σ²``: Gaussian noise, clipped, renormalised."""

    kind: ClassVar[str] = "gaussian"
    noisy: ClassVar[bool] = True
    sigma: float
    keep_argmax: bool = True

    def __post_init__(self) -> None:
        gaussian_rho(self.sigma)  # validates

    @property
    def cost(self) -> Cost:
        return Cost("rho", gaussian_rho(self.sigma))

    def apply(self, scores: np.ndarray, rng: Rng | None = None) -> np.ndarray:
        check_scores(scores)
        noisy = add_gaussian(scores.astype(np.float64), self.sigma, _need_rng(rng, self.kind))
        return _finish(to_simplex(noisy), scores, self.keep_argmax)

    def fingerprint(self) -> str:
        return _fingerprint(self)

    def describe(self) -> dict[str, Any]:
        rho = gaussian_rho(self.sigma)
        return {"sigma": self.sigma, "rho": rho, "keep_argmax": self.keep_argmax}


@dataclass(frozen=True, kw_only=True, slots=True)
class Rounding:
    """Scores rounded to ``decimals`` places. No ε: small differences vanish, large ones stay."""

    kind: ClassVar[str] = "round"
    noisy: ClassVar[bool] = False
    decimals: int
    keep_argmax: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.decimals <= 8:
            raise ValueError(f"decimals must be between 0 and 8; got {self.decimals}")

    @property
    def cost(self) -> None:
        return None

    def apply(self, scores: np.ndarray, rng: Rng | None = None) -> np.ndarray:
        check_scores(scores)
        return _finish(round_scores(scores, self.decimals), scores, self.keep_argmax)

    def fingerprint(self) -> str:
        return _fingerprint(self)

    def describe(self) -> dict[str, Any]:
        return {"decimals": self.decimals, "keep_argmax": self.keep_argmax}


@dataclass(frozen=True, kw_only=True, slots=True)
class TopK:
    """The ``k`` largest scores, the rest zeroed; the top-1 class is always kept."""

    kind: ClassVar[str] = "topk"
    noisy: ClassVar[bool] = False
    k: int
    renormalize: bool = True

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1; got {self.k}")

    @property
    def cost(self) -> None:
        return None

    def apply(self, scores: np.ndarray, rng: Rng | None = None) -> np.ndarray:
        check_scores(scores)
        return top_k(scores, min(self.k, scores.shape[1]), renormalize=self.renormalize)

    def fingerprint(self) -> str:
        return _fingerprint(self)

    def describe(self) -> dict[str, Any]:
        return {"k": self.k, "renormalize": self.renormalize}


@dataclass(frozen=True, kw_only=True, slots=True)
class LabelOnly:
    """One-hot of the top-1 class: nothing but the label leaves."""

    kind: ClassVar[str] = "label_only"
    noisy: ClassVar[bool] = False

    @property
    def cost(self) -> None:
        return None

    def apply(self, scores: np.ndarray, rng: Rng | None = None) -> np.ndarray:
        check_scores(scores)
        return label_only(scores)

    def fingerprint(self) -> str:
        return _fingerprint(self)

    def describe(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True, kw_only=True, slots=True)
class ReverseSigmoid:
    """Lee et al.'s deceptive perturbation; ``keep_argmax`` (default) undoes its top-1 flips."""

    kind: ClassVar[str] = "reverse_sigmoid"
    noisy: ClassVar[bool] = False
    beta: float = 1.0
    gamma: float = 0.1
    keep_argmax: bool = True

    def __post_init__(self) -> None:
        if not self.beta > 0 or not self.gamma > 0:
            raise ValueError(f"beta and gamma must be > 0; got {self.beta}, {self.gamma}")

    @property
    def cost(self) -> None:
        return None

    def apply(self, scores: np.ndarray, rng: Rng | None = None) -> np.ndarray:
        check_scores(scores)
        released = reverse_sigmoid(scores, self.beta, self.gamma)
        return _finish(released, scores, self.keep_argmax)

    def fingerprint(self) -> str:
        return _fingerprint(self)

    def describe(self) -> dict[str, Any]:
        return {"beta": self.beta, "gamma": self.gamma, "keep_argmax": self.keep_argmax}


@dataclass(frozen=True, kw_only=True, slots=True)
class ConfidenceBins:
    """The label and class order kept; the top probability released as the level of
    its bin (``cuts`` ascending, one more ``confidences``), the rest shared by rank
    (``ranked`` classes after the top keep their place; None: all). No ε: what leaves
    is the label, that order and the bin.

    Set each level to the model's held-out accuracy in that bin and the answers are
    calibrated; one bin (no cuts) releases the same confidence for every answer.
    """

    kind: ClassVar[str] = "bins"
    noisy: ClassVar[bool] = False
    cuts: tuple[float, ...] = ()
    confidences: tuple[float, ...]
    ranked: int | None = None  # classes after the top that keep their place; None: all

    def __post_init__(self) -> None:
        cuts, levels = self.cuts, self.confidences
        if len(levels) != len(cuts) + 1:
            raise ValueError(
                f"confidences needs one level more than cuts ({len(cuts) + 1}); got {len(levels)}"
            )
        if any(not 0.0 < c < 1.0 for c in cuts) or any(b <= a for a, b in itertools.pairwise(cuts)):
            raise ValueError(f"cuts must rise strictly within (0, 1); got {list(cuts)}")
        if any(not 0.0 < v <= 1.0 for v in levels):
            raise ValueError(f"confidences must lie in (0, 1]; got {list(levels)}")
        if self.ranked is not None and self.ranked < 0:
            raise ValueError(f"ranked must be >= 0; got {self.ranked}")

    @property
    def cost(self) -> None:
        return None

    def apply(self, scores: np.ndarray, rng: Rng | None = None) -> np.ndarray:
        check_layout(scores)
        classes = scores.shape[1]
        tables = bin_tables(self.cuts, self.confidences, self.ranked, classes)
        released, code = _native.release_bins(scores, *tables, _SUM_LO, _SUM_HI)
        if code:
            raise ValueError(_NOT_PROBABILITIES[code])
        if levels_lead(self.confidences, self.ranked, classes, scores.dtype):
            return released
        return keep_top1(released, scores)

    def fingerprint(self) -> str:
        return _fingerprint(self)

    def describe(self) -> dict[str, Any]:
        return {
            "cuts": list(self.cuts),
            "confidences": list(self.confidences),
            "ranked": self.ranked,
        }


MECHANISMS: dict[str, type[Any]] = {
    m.kind: m
    for m in (Laplace, Gaussian, Rounding, TopK, LabelOnly, ReverseSigmoid, ConfidenceBins)
}


# -- consistent noise ---------------------------------------------------------------


def consistent_generators(
    secret: bytes, scope: Sequence[str], inputs: Mapping[str, np.ndarray]
) -> list[np.random.Generator]:
    """One generator per row, seeded by HMAC-SHA256(secret, scope, the row's inputs).

    The same row (same values of every input, same ``scope``) always gets the
    same generator, whatever batch it arrives in and at whatever position, so
    asking again returns the same answer and averaging repeats gains nothing.
    ``scope`` must name everything the noise must not be shared across: the
    model (and its version) and the mechanism's :meth:`Mechanism.fingerprint`.
    Two answers with the same draws at different scales would reveal the scores.

    Rows are hashed in a canonical form: inputs in name order, each with its
    dtype and per-row shape, floating-point ``-0.0`` folded into ``0.0``. Inputs
    that differ in bytes the model cannot see (an FP64 row that casts to the
    same FP32 row) get different noise: cast inputs to the model's dtype first
    (the ``validate`` stage does). A nearby but different input gets fresh
    noise; only the budget limits what averaging many of them reveals.
    """
    base = hmac.new(secret, digestmod=hashlib.sha256)
    for part in scope:
        _update_framed(base, part.encode("utf-8"))
    rows: int | None = None
    parts: list[tuple[bytes, list[bytes] | np.ndarray]] = []
    for name in sorted(inputs):
        array = np.asarray(inputs[name])
        if array.ndim == 0:
            raise ValueError(f"input {name!r} has no batch dimension")
        if rows is None:
            rows = array.shape[0]
        elif array.shape[0] != rows:
            raise ValueError(f"inputs disagree on the batch size ({rows} and {array.shape[0]})")
        flat = _canonical_rows(array)
        kind = "bytes" if isinstance(flat, list) else flat.dtype.str
        parts.append((f"{name}|{kind}|{array.shape[1:]}".encode(), flat))
    generators = []
    for i in range(rows or 0):
        digest = base.copy()
        for header, flat in parts:
            _update_framed(digest, header)
            _update_framed(digest, flat[i] if isinstance(flat, list) else flat[i].tobytes())
        words = np.frombuffer(digest.digest(), dtype="<u4")
        generators.append(np.random.default_rng(words))
    return generators


def _canonical_rows(array: np.ndarray) -> list[bytes] | np.ndarray:
    if array.dtype.kind == "O":  # BYTES: length-framed elements
        return [
            b"".join(len(v).to_bytes(8, "little") + bytes(v) for v in row.reshape(-1))
            for row in array
        ]
    flat = np.ascontiguousarray(array.reshape(array.shape[0], -1))
    if flat.dtype.kind in "fc":
        flat = flat + flat.dtype.type(0)  # -0.0 + 0.0 == +0.0
    return flat.astype(flat.dtype.newbyteorder("<"), copy=False)


def _update_framed(digest: Any, data: bytes) -> None:
    digest.update(len(data).to_bytes(8, "little"))
    digest.update(data)


# -- degraded answers ---------------------------------------------------------------


def degrade_outputs(
    outputs: Mapping[str, np.ndarray],
    *,
    scores: str = "probabilities",
    label: str | None = "label",
    mechanism: Mechanism | None = None,
    rng: Rng | None = None,
) -> dict[str, np.ndarray]:
    """Outputs with ``scores`` replaced by ``mechanism``'s release (default: label-only).

    Returns a new dict; other outputs are passed through unchanged (degrade every
    score-like output you serve). When ``label`` names an output, it is set to
    the argmax of the released scores, so the two never disagree. Absent outputs
    are left absent. Noisy mechanisms need ``rng`` (one generator per row for
    consistent noise).
    """
    result = dict(outputs)
    if scores not in result:
        return result
    chosen = mechanism if mechanism is not None else LabelOnly()
    released = chosen.apply(np.asarray(result[scores]), rng)
    result[scores] = released
    if label is not None and label in result:
        result[label] = np.argmax(released, axis=1).astype(result[label].dtype, copy=False)
    return result

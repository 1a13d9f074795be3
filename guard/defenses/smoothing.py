"""Randomized smoothing: predictions with a certified L2 radius.

Cohen, Rosenfeld and Kolter, "Certified Adversarial Robustness via Randomized
Smoothing", ICML 2019 (reference code: locuslab/smoothing, ``code/core.py``).

The smoothed classifier of a base classifier f is
g(x) = argmax_c P(f(x + ε) = c), ε ~ N(0, σ²I). If its top class has probability
pA ≥ pABar > 1/2, then g(x + δ) = g(x) for every ‖δ‖₂ < σ·Φ⁻¹(pABar)
(Theorem 1 with pB ≤ 1 − pA). g cannot be evaluated exactly; the paper's two
Monte Carlo procedures, kept here with its notation:

CERTIFY   ``n0`` selection samples choose ``cAHat``; ``n`` fresh samples count
          ``nA`` votes for it; ``pABar`` is the one-sided (1 − α) Clopper–Pearson
          lower bound of nA / n. Abstain when pABar < 1/2, else return cAHat with
          radius σ·Φ⁻¹(pABar). Guarantee: with probability ≥ 1 − α over the noise,
          a returned radius is no larger than g's true robust radius at x, and g
          returns cAHat everywhere inside it.
PREDICT   ``n`` samples; top two counts nA, nB; two-sided binomial test of nA
          successes in nA + nB trials at p = 1/2. Abstain when its p-value > α.
          Guarantee: returns a class other than g(x) with probability ≤ α.

Statistics are delegated to SciPy: Clopper–Pearson through
``scipy.special.betaincinv`` (the Beta quantile ``scipy.stats.beta.ppf`` computes,
about ten times faster), Φ⁻¹ through ``scipy.special.ndtri``, the binomial test
through ``scipy.stats.binomtest``. Sampling (chunked, memory flat in n) is
:mod:`guard.defenses.sampling`; the base classifier and the random generator are
injected, so nothing here picks a device or touches a global RNG.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import betaincinv, ndtri

from guard.defenses.sampling import AsyncLabelFn, LabelFn, NoiseSampler

PROCEDURES = ("certify", "predict")


@dataclass(frozen=True, slots=True)
class Certificate:
    """What CERTIFY returns: ``label`` is certified within ``radius`` (L2) unless ``abstained``."""

    label: int | None  # cAHat, or None when abstained
    radius: float  # 0.0 when abstained
    abstained: bool
    cAHat: int  # the class the selection samples chose, kept even when abstaining
    nA: int  # votes for cAHat among the n estimation samples
    n: int
    pABar: float  # lower confidence bound of P(f(x + ε) = cAHat)


@dataclass(frozen=True, slots=True)
class Prediction:
    """What PREDICT returns: ``label`` is g(x) unless ``abstained``."""

    label: int | None  # the top class, or None when abstained
    abstained: bool
    nA: int  # votes for the top class
    nB: int  # votes for the runner-up
    p_value: float  # two-sided binomial test of nA in nA + nB at p = 1/2


class ParameterError(ValueError):
    """Settings under which a procedure can never answer; ``name`` is the culprit."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name} {message}")
        self.name = name
        self.message = message


class Smooth:
    """The smoothed classifier g of ``predict_labels`` (f: a batch of inputs → int labels)."""

    def __init__(
        self, predict_labels: LabelFn, sigma: float, *, batch: int = 1000, dtype: Any = np.float32
    ) -> None:
        self.base_classifier = predict_labels
        self.sigma = float(sigma)
        self.sampler = NoiseSampler(sigma, batch=batch, dtype=dtype)

    def certify(
        self, x: np.ndarray, n0: int, n: int, alpha: float, *, rng: np.random.Generator
    ) -> Certificate:
        """CERTIFY at ``x`` (one input, without a batch dimension)."""
        _check_ranges(n0=n0, n=n, alpha=alpha)
        counts0 = self.sampler.counts(x, n0, rng, self.base_classifier)
        cAHat = int(counts0.argmax())
        counts = self.sampler.counts(x, n, rng, self.base_classifier)
        return certificate(cAHat, _votes(counts, cAHat), n, alpha, self.sigma)

    def predict(
        self, x: np.ndarray, n: int, alpha: float, *, rng: np.random.Generator
    ) -> Prediction:
        """PREDICT at ``x`` (one input, without a batch dimension)."""
        _check_ranges(n0=1, n=n, alpha=alpha)
        return prediction(self.sampler.counts(x, n, rng, self.base_classifier), alpha)


class AsyncSmooth:
    """:class:`Smooth` for a base classifier that is awaited (a model server)."""

    def __init__(
        self,
        predict_labels: AsyncLabelFn,
        sigma: float,
        *,
        batch: int = 1000,
        dtype: Any = np.float32,
    ) -> None:
        self.base_classifier = predict_labels
        self.sigma = float(sigma)
        self.sampler = NoiseSampler(sigma, batch=batch, dtype=dtype)

    async def certify(
        self, x: np.ndarray, n0: int, n: int, alpha: float, *, rng: np.random.Generator
    ) -> Certificate:
        _check_ranges(n0=n0, n=n, alpha=alpha)
        counts0 = await self.sampler.counts_async(x, n0, rng, self.base_classifier)
        cAHat = int(counts0.argmax())
        counts = await self.sampler.counts_async(x, n, rng, self.base_classifier)
        return certificate(cAHat, _votes(counts, cAHat), n, alpha, self.sigma)

    async def predict(
        self, x: np.ndarray, n: int, alpha: float, *, rng: np.random.Generator
    ) -> Prediction:
        _check_ranges(n0=1, n=n, alpha=alpha)
        return prediction(await self.sampler.counts_async(x, n, rng, self.base_classifier), alpha)


# -- the statistics, shared by both -------------------------------------------------


def lower_confidence_bound(nA: int, n: int, alpha: float) -> float:
    """One-sided (1 − α) Clopper–Pearson lower bound of a binomial proportion nA / n."""
    if nA <= 0:
        return 0.0
    return float(betaincinv(nA, n - nA + 1, alpha))


def certificate(cAHat: int, nA: int, n: int, alpha: float, sigma: float) -> Certificate:
    """CERTIFY's decision from its counts: abstain if pABar < 1/2, else radius σ·Φ⁻¹(pABar)."""
    pABar = lower_confidence_bound(nA, n, alpha)
    if pABar < 0.5:
        return Certificate(None, 0.0, True, cAHat, nA, n, pABar)
    return Certificate(cAHat, sigma * float(ndtri(pABar)), False, cAHat, nA, n, pABar)


def prediction(counts: np.ndarray, alpha: float) -> Prediction:
    """PREDICT's decision from the vote counts (index = class)."""
    from scipy.stats import binomtest  # scipy.stats is slow to import; PREDICT alone needs it

    order = np.argsort(-np.asarray(counts), kind="stable")  # ties: the lower class first
    nA = int(counts[order[0]]) if len(order) else 0
    nB = int(counts[order[1]]) if len(order) > 1 else 0
    if nA + nB == 0:
        return Prediction(None, True, 0, 0, 1.0)
    p_value = float(binomtest(nA, nA + nB, 0.5).pvalue)
    if p_value > alpha:
        return Prediction(None, True, nA, nB, p_value)
    return Prediction(int(order[0]), False, nA, nB, p_value)


# -- what settings can answer -----------------------------------------------------


def max_radius(sigma: float, n: int, alpha: float) -> float:
    """The largest radius CERTIFY can return with ``n`` samples (all for cAHat); 0 if none."""
    pABar = lower_confidence_bound(n, n, alpha)  # = alpha ** (1 / n)
    return sigma * float(ndtri(pABar)) if pABar >= 0.5 else 0.0


def min_samples(alpha: float, procedure: str = "certify") -> int:
    """The least ``n`` with which ``procedure`` can answer at all at level ``alpha``.

    CERTIFY needs α^(1/n) ≥ 1/2 (n ≥ log₂(1/α)); PREDICT needs 2·2⁻ⁿ ≤ α
    (n ≥ log₂(2/α)): 10 and 11 at α = 0.001. Checked against the same
    functions that decide, so the bound is exact, not a float approximation.
    """
    _check_ranges(n0=1, n=1, alpha=alpha)
    if procedure == "certify":
        n = math.ceil(math.log2(1 / alpha))
        answers = lambda m: lower_confidence_bound(m, m, alpha) >= 0.5  # noqa: E731
    elif procedure == "predict":
        n = math.ceil(math.log2(2 / alpha))
        answers = lambda m: prediction(np.array([m]), alpha).label is not None  # noqa: E731
    else:
        raise ValueError(f"procedure must be one of {', '.join(PROCEDURES)}; got {procedure!r}")
    n = max(n, 1)
    while not answers(n):
        n += 1
    while n > 1 and answers(n - 1):
        n -= 1
    return n


def check_parameters(
    *, sigma: float, n: int, alpha: float, n0: int = 1, procedure: str = "certify"
) -> float:
    """Refuse settings that can never answer; return the largest certifiable radius.

    Raises :class:`ParameterError` naming the parameter when σ ≤ 0, n0 < 1,
    α outside (0, 1), or ``n`` is below :func:`min_samples` for ``procedure``.
    The radius returned is :func:`max_radius` (for PREDICT too: what CERTIFY
    would reach with the same n).
    """
    if not sigma > 0:
        raise ParameterError("sigma", f"must be > 0; got {sigma!r}")
    _check_ranges(n0=n0, n=n, alpha=alpha)
    least = min_samples(alpha, procedure)
    if n < least:
        raise ParameterError(
            "n",
            f"must be >= {least} for {procedure.upper()} to ever answer at alpha={alpha:g}; "
            f"got {n}",
        )
    return max_radius(sigma, n, alpha)


def _check_ranges(*, n0: int, n: int, alpha: float) -> None:
    if n0 < 1:
        raise ParameterError("n0", f"must be >= 1; got {n0!r}")
    if n < 1:
        raise ParameterError("n", f"must be >= 1; got {n!r}")
    if not 0 < alpha < 1:
        raise ParameterError("alpha", f"must be in (0, 1); got {alpha!r}")


def _votes(counts: np.ndarray, label: int) -> int:
    return int(counts[label]) if label < len(counts) else 0

"""Sequential randomized smoothing: a certificate from as few samples as it needs.

Cohen, Rosenfeld and Kolter's CERTIFY (ICML 2019; :mod:`guard.defenses.smoothing`)
draws a fixed n. Two sequential procedures, both built on the same anytime-valid
bound, draw in looks and stop once the answer is known:

TARGET    Horváth, Müller, Fischer and Vechev, "Boosting Randomized Smoothing
          with Variance Reduced Classifiers", ICLR 2022 (reference code:
          eth-sri/smoothing-ensembles; the predetermined-radius certification
          with sequential Clopper–Pearson tests and a Bonferroni split of α).
          Is g robust within radius r at x? With pStar = Φ(r/σ): certified as
          soon as the lower bound pABar reaches pStar; abstain as soon as the
          upper bound pAUpper falls below it, or at the last look.
ADAPTIVE  the largest radius within a budget, as Chen et al., "Input-Specific
          Robustness Certification for Randomized Smoothing", AAAI 2022, size the
          sample per input: stop once the radius the rest of the budget could add
          (projected from the vote share so far) is at most ``tolerance``·σ, or
          the budget (samples or seconds) is spent.

The bound (a union bound over a geometric schedule of looks, the "Bonferroni"
confidence sequence; Voráček, "Treatment of Statistical Estimation Problems in
Randomized Smoothing for Adversarial Robustness", NeurIPS 2024, reference code
RS_conf_seq, compares it with likelihood-ratio and betting sequences and splits α
unevenly over an unbounded schedule; here K is finite and planned, so α splits evenly):
the looks are at predetermined cumulative sample sizes n_1 < … < n_K (doubling),
and at look k the one-sided Clopper–Pearson lower bound pABar_k of nA_k / n_k is
taken at level α/K. For the fixed class cAHat (chosen from ``n0`` separate
selection samples, as in CERTIFY) and its true probability pA, each event
{pABar_k > pA} has probability ≤ α/K, because n_k is fixed in advance and the
Clopper–Pearson bound is valid (conservative) at a fixed n. Hence

    P(∃k ≤ K: pABar_k > pA) ≤ Σ_k α/K = α,

whatever rule decides when to stop: every bound computed at every look holds at
once with probability ≥ 1 − α, so a bound read at a data-dependent stopping
time (or the maximum over the looks taken) holds too. Guarantees:

- TARGET returns "certified" only when some pABar_k ≥ pStar ≥ 1/2; if that
  happens while pA < pStar, then pABar_k > pA. So P(certified and g's radius at
  x < r, or g(x) ≠ cAHat) ≤ α. The upper bounds (futility, at level
  ``futility``/K each) only ever turn a certificate into an abstention; they
  spend nothing of α and cost at most ``futility`` in power.
- ADAPTIVE returns the radius σ·Φ⁻¹(max_k pABar_k) over the looks taken; with
  probability ≥ 1 − α it is no larger than g's true robust radius at x.

Samples used (the cost) are returned per certification: ``n0 + n``.
The base classifier and a ``numpy.random.Generator`` are injected, as in
:mod:`guard.defenses.smoothing`; statistics go through SciPy
(``scipy.special.betaincinv`` for Clopper–Pearson, ``ndtri``/``ndtr`` for Φ⁻¹/Φ).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.special import betaincinv, ndtr, ndtri

from guard.defenses.smoothing import (
    AsyncSmooth,
    ParameterError,
    Smooth,
    _check_ranges,
    lower_confidence_bound,
)

MODES = ("fixed", "target", "adaptive")


@dataclass(frozen=True, slots=True)
class SequentialCertificate:
    """A sequential certificate: ``label`` within ``radius`` unless ``abstained``; its cost."""

    label: int | None  # cAHat, or None when abstained
    radius: float  # σ·Φ⁻¹(pABar); 0.0 when abstained
    abstained: bool
    cAHat: int
    nA: int  # votes for cAHat among the n estimation samples drawn
    n: int  # estimation samples drawn (the look it stopped at)
    n0: int  # selection samples
    pABar: float  # the lower bound the answer rests on (level α/K)
    looks: int  # looks taken, of K planned

    @property
    def samples(self) -> int:
        """Samples used: selection plus estimation."""
        return self.n0 + self.n


def upper_confidence_bound(nA: int, n: int, alpha: float) -> float:
    """One-sided (1 − α) Clopper–Pearson upper bound of a binomial proportion nA / n."""
    if nA >= n:
        return 1.0
    return float(betaincinv(nA + 1, n - nA, 1.0 - alpha))


def schedule(first: int, last: int) -> tuple[int, ...]:
    """Cumulative sample sizes of the looks: ``first`` doubling, then ``last``."""
    if first < 1 or last < first:
        raise ParameterError("n", f"must be >= {max(first, 1)}; got {last}")
    sizes = [first]
    while sizes[-1] * 2 < last:
        sizes.append(sizes[-1] * 2)
    if sizes[-1] != last:
        sizes.append(last)
    return tuple(sizes)


def target_schedule(radius: float, sigma: float, n: int, alpha: float) -> tuple[int, ...]:
    """Looks for TARGET: from the least n_1 at which all-votes could certify ``radius``, to ``n``.

    n_1 = ⌈ln(α/K) / ln Φ(r/σ)⌉ (then (α/K)^(1/n_1) ≥ Φ(r/σ)); K depends on n_1,
    so both are fixed by iterating from K = 1. Raises :class:`ParameterError` when
    even ``n`` samples all voting for cAHat could not certify ``radius``.
    """
    pStar = float(ndtr(radius / sigma))
    if pStar >= 1.0:  # Φ(r/σ) rounds to 1: no finite sample reaches it
        raise ParameterError(
            "n", f"cannot be enough to certify radius {radius:g} at sigma={sigma:g}"
        )
    looks = 1
    for _ in range(64):
        first = _least_n(pStar, alpha / looks)
        if first > n:
            raise ParameterError(
                "n", f"must be >= {first} to ever certify radius {radius:g} at sigma={sigma:g}"
            )
        sizes = schedule(first, n)
        if len(sizes) == looks:
            return sizes
        looks = len(sizes)
    return sizes  # pragma: no cover - K grows by one per round and is at most log2(n) + 2


def _least_n(pStar: float, level: float) -> int:
    if pStar <= 0.5:
        return max(1, math.ceil(math.log(level) / math.log(0.5)))
    m = max(1, math.ceil(math.log(level) / math.log(pStar)))
    while lower_confidence_bound(m, m, level) < pStar:  # float safety
        m += 1
    return m


class TargetDecision:
    """TARGET's rule at one look: certified, abstain, or ``None`` (draw more)."""

    def __init__(self, radius: float, sigma: float, alpha: float, futility: float, looks: int):
        self.pStar = float(ndtr(radius / sigma))
        self.level = alpha / looks
        self.futility = futility / looks

    def __call__(self, nA: int, n: int, last: bool) -> tuple[bool, float] | None:
        pABar = lower_confidence_bound(nA, n, self.level)
        if pABar >= self.pStar:
            return True, pABar
        if last or upper_confidence_bound(nA, n, self.futility) < self.pStar:
            return False, pABar
        return None


class AdaptiveDecision:
    """ADAPTIVE's rule at one look: stop when the rest of the budget adds ≤ tolerance·σ."""

    def __init__(self, sigma: float, alpha: float, tolerance: float, final: int, looks: int):
        self.sigma, self.tolerance, self.final = sigma, tolerance, final
        self.level = alpha / looks
        self.best = 0.0

    def __call__(self, nA: int, n: int, last: bool) -> tuple[bool, float] | None:
        self.best = max(self.best, lower_confidence_bound(nA, n, self.level))
        if last:
            return self.best >= 0.5, self.best
        projected = lower_confidence_bound(round(nA / n * self.final), self.final, self.level)
        if projected < 0.5:  # not even the whole budget would certify at this vote share
            return self.best >= 0.5, self.best
        if self.best >= 0.5 and ndtri(projected) - ndtri(self.best) <= self.tolerance:
            return True, self.best
        return None


Decision = Callable[[int, int, bool], "tuple[bool, float] | None"]


class SequentialSmooth(Smooth):
    """TARGET and ADAPTIVE on the smoothed classifier g of ``predict_labels`` (beside
    :class:`Smooth`'s fixed-n CERTIFY and PREDICT, whose construction it shares)."""

    def certify_radius(
        self,
        x: np.ndarray,
        radius: float,
        n0: int,
        n: int,
        alpha: float,
        *,
        rng: np.random.Generator,
        futility: float | None = None,
    ) -> SequentialCertificate:
        """TARGET: is g robust within ``radius`` at ``x``? At most ``n`` estimation samples.

        ``futility`` (default α) is the level of the upper bounds that stop early
        to abstain; it bounds the power lost, not the error.
        """
        sizes, decide = target_plan(self.sigma, radius, n0, n, alpha, futility)
        return self._run(x, n0, sizes, decide, rng, None, time.perf_counter)

    def certify_adaptive(
        self,
        x: np.ndarray,
        n0: int,
        budget: int,
        alpha: float,
        *,
        rng: np.random.Generator,
        tolerance: float = 0.1,
        first: int = 100,
        seconds: float | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> SequentialCertificate:
        """ADAPTIVE: the largest radius from at most ``budget`` samples (or ``seconds``)."""
        sizes, decide = adaptive_plan(self.sigma, n0, budget, alpha, tolerance, first)
        deadline = None if seconds is None else clock() + seconds
        return self._run(x, n0, sizes, decide, rng, deadline, clock)

    def _run(
        self,
        x: np.ndarray,
        n0: int,
        sizes: tuple[int, ...],
        decide: Decision,
        rng: np.random.Generator,
        deadline: float | None,
        clock: Callable[[], float],
    ) -> SequentialCertificate:
        cAHat = int(self.sampler.counts(x, n0, rng, self.base_classifier).argmax())
        nA = drawn = 0
        for k, size in enumerate(sizes):
            votes = self.sampler.counts(x, size - drawn, rng, self.base_classifier)
            nA, drawn = nA + _votes(votes, cAHat), size
            last = k == len(sizes) - 1 or (deadline is not None and clock() >= deadline)
            verdict = decide(nA, drawn, last)
            if verdict is not None:
                return answer(self.sigma, cAHat, nA, drawn, n0, verdict, k + 1)
        raise AssertionError("the last look always decides")  # pragma: no cover


class AsyncSequentialSmooth(AsyncSmooth):
    """:class:`SequentialSmooth` for a base classifier that is awaited (a model server)."""

    async def certify_radius(
        self,
        x: np.ndarray,
        radius: float,
        n0: int,
        n: int,
        alpha: float,
        *,
        rng: np.random.Generator,
        futility: float | None = None,
    ) -> SequentialCertificate:
        sizes, decide = target_plan(self.sigma, radius, n0, n, alpha, futility)
        return await self._run(x, n0, sizes, decide, rng)

    async def certify_adaptive(
        self,
        x: np.ndarray,
        n0: int,
        budget: int,
        alpha: float,
        *,
        rng: np.random.Generator,
        tolerance: float = 0.1,
        first: int = 100,
    ) -> SequentialCertificate:
        sizes, decide = adaptive_plan(self.sigma, n0, budget, alpha, tolerance, first)
        return await self._run(x, n0, sizes, decide, rng)

    async def _run(
        self,
        x: np.ndarray,
        n0: int,
        sizes: tuple[int, ...],
        decide: Decision,
        rng: np.random.Generator,
    ) -> SequentialCertificate:
        f = self.base_classifier
        cAHat = int((await self.sampler.counts_async(x, n0, rng, f)).argmax())
        nA = drawn = 0
        for k, size in enumerate(sizes):
            votes = await self.sampler.counts_async(x, size - drawn, rng, f)
            nA, drawn = nA + _votes(votes, cAHat), size
            verdict = decide(nA, drawn, k == len(sizes) - 1)
            if verdict is not None:
                return answer(self.sigma, cAHat, nA, drawn, n0, verdict, k + 1)
        raise AssertionError("the last look always decides")  # pragma: no cover


def answer(
    sigma: float, cAHat: int, nA: int, n: int, n0: int, verdict: tuple[bool, float], looks: int
) -> SequentialCertificate:
    """The certificate of a decided look: radius σ·Φ⁻¹(pABar) unless abstaining."""
    certified, pABar = verdict
    if not certified or pABar < 0.5:
        return SequentialCertificate(None, 0.0, True, cAHat, nA, n, n0, pABar, looks)
    radius = sigma * float(ndtri(pABar))
    return SequentialCertificate(cAHat, radius, False, cAHat, nA, n, n0, pABar, looks)


def target_plan(
    sigma: float, radius: float, n0: int, n: int, alpha: float, futility: float | None = None
) -> tuple[tuple[int, ...], TargetDecision]:
    """TARGET's looks and rule; raises :class:`ParameterError` on settings that never answer."""
    _check_ranges(n0=n0, n=n, alpha=alpha)
    if not sigma > 0:
        raise ParameterError("sigma", f"must be > 0; got {sigma!r}")
    if not (math.isfinite(radius) and radius >= 0):
        raise ParameterError("radius", f"must be >= 0; got {radius!r}")
    futility = alpha if futility is None else futility
    if not 0 < futility < 1:
        raise ParameterError("futility", f"must be in (0, 1); got {futility!r}")
    sizes = target_schedule(radius, sigma, n, alpha)
    return sizes, TargetDecision(radius, sigma, alpha, futility, len(sizes))


def adaptive_plan(
    sigma: float, n0: int, budget: int, alpha: float, tolerance: float, first: int = 100
) -> tuple[tuple[int, ...], AdaptiveDecision]:
    """ADAPTIVE's looks (``first`` doubling to ``budget``) and rule."""
    _check_ranges(n0=n0, n=budget, alpha=alpha)
    if not tolerance >= 0:
        raise ParameterError("tolerance", f"must be >= 0; got {tolerance!r}")
    sizes = schedule(min(first, budget), budget)
    return sizes, AdaptiveDecision(sigma, alpha, tolerance, budget, len(sizes))


def _votes(counts: np.ndarray, label: int) -> int:
    return int(counts[label]) if label < len(counts) else 0

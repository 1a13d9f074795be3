"""Sequential certification against the closed form of a linear classifier and its guarantees.

As in test_smoothing.py: two classes split by w·x + b = 0, pA = Φ((w·x + b) / (σ‖w‖)),
the true robust radius is σ·Φ⁻¹(pA). A TARGET certificate for radius r is wrong exactly
when it certifies while pA < Φ(r/σ) (or names the wrong class); an ADAPTIVE one when
its pABar exceeds pA.
"""

from __future__ import annotations

import asyncio
import itertools

import numpy as np
import pytest
from scipy.stats import binom, norm

from guard.defenses.sampling import NoiseSampler
from guard.defenses.sequential import (
    AsyncSequentialSmooth,
    SequentialSmooth,
    adaptive_plan,
    schedule,
    target_plan,
    target_schedule,
    upper_confidence_bound,
)
from guard.defenses.smoothing import ParameterError, lower_confidence_bound

W = np.array([3.0, -1.0, 0.5, 2.0])
B = -0.25
SIGMA = 0.5


def linear(x: np.ndarray) -> np.ndarray:
    return (x @ W + B > 0).astype(np.int64)


def point_with(pA: float) -> np.ndarray:
    distance = SIGMA * norm.ppf(pA)
    return (distance * np.linalg.norm(W) - B) * W / (W @ W)


def most_failures(runs: int, alpha: float) -> int:
    """Failures a correct procedure exceeds with probability below 1e-6."""
    return int(binom.ppf(1 - 1e-6, runs, alpha))


# -- the guarantee ------------------------------------------------------------------


@pytest.mark.parametrize("gap", [0.003, 0.02])
def test_target_certificates_are_wrong_no_more_often_than_alpha(gap: float) -> None:
    """pA just below Φ(r/σ): every certificate is wrong; they come at most α of the time."""
    alpha, runs, radius = 0.05, 1500, SIGMA
    pStar = norm.cdf(radius / SIGMA)
    x = point_with(pStar - gap)
    smooth = SequentialSmooth(linear, SIGMA, batch=512)
    wrong = sum(
        not smooth.certify_radius(
            x, radius, 10, 4000, alpha, rng=np.random.default_rng(s)
        ).abstained
        for s in range(runs)
    )
    assert wrong <= most_failures(runs, alpha)


def test_the_same_check_catches_peeking_without_the_split() -> None:
    """Clopper-Pearson at the full α at every look (no Bonferroni split) certifies too often."""
    alpha, runs, radius = 0.05, 1500, SIGMA
    pStar = norm.cdf(radius / SIGMA)
    x = point_with(pStar - 0.003)
    sampler = NoiseSampler(SIGMA, batch=512)
    sizes = schedule(20, 4000)
    wrong = 0
    for seed in range(runs):
        rng, nA, drawn = np.random.default_rng(seed), 0, 0
        for size in sizes:
            nA += int(sampler.counts(x, size - drawn, rng, linear)[1:].sum())
            drawn = size
            if lower_confidence_bound(nA, drawn, alpha) >= pStar:
                wrong += 1
                break
    assert wrong > most_failures(runs, alpha)


def test_adaptive_radius_is_too_large_no_more_often_than_alpha() -> None:
    alpha, runs, pA = 0.05, 600, 0.97
    x = point_with(pA)
    smooth = SequentialSmooth(linear, SIGMA, batch=512)
    wrong = certified = 0
    for seed in range(runs):
        cert = smooth.certify_adaptive(
            x, 10, 3000, alpha, rng=np.random.default_rng(seed), tolerance=0.02, first=50
        )
        certified += not cert.abstained
        wrong += not cert.abstained and (cert.label != 1 or cert.pABar > pA)
    assert certified > runs * 0.9
    assert wrong <= most_failures(runs, alpha)


# -- what it saves and when it abstains ------------------------------------------------


def test_a_clear_case_certifies_at_the_first_look() -> None:
    x = point_with(0.999)
    sizes, _ = target_plan(SIGMA, SIGMA, 100, 100_000, 0.001)
    smooth = SequentialSmooth(linear, SIGMA)
    certs = [
        smooth.certify_radius(x, SIGMA, 100, 100_000, 0.001, rng=np.random.default_rng(s))
        for s in range(50)
    ]
    assert all(c.label == 1 and c.radius >= SIGMA for c in certs)
    assert np.mean([c.samples for c in certs]) < 100 + 2 * sizes[0]
    assert all(c.samples == c.n0 + c.n and c.n in sizes for c in certs)


def test_a_hopeless_case_abstains_early() -> None:
    """pA = 0.6 against Φ(1) = 0.84: the upper bound rules it out long before n."""
    smooth = SequentialSmooth(linear, SIGMA)
    certs = [
        smooth.certify_radius(
            point_with(0.6), SIGMA, 100, 100_000, 0.001, rng=np.random.default_rng(s)
        )
        for s in range(20)
    ]
    assert all(c.abstained and c.radius == 0.0 for c in certs)
    assert max(c.n for c in certs) < 2_000


def test_a_close_case_uses_more_samples_than_a_clear_one() -> None:
    smooth = SequentialSmooth(linear, SIGMA)
    pStar = norm.cdf(1.0)

    def mean_n(pA: float) -> float:
        rngs = (np.random.default_rng(s) for s in range(10))
        return np.mean(
            [
                smooth.certify_radius(point_with(pA), SIGMA, 100, 100_000, 0.001, rng=r).n
                for r in rngs
            ]
        )

    assert mean_n(pStar + 0.02) > 5 * mean_n(0.999)


def test_adaptive_stops_before_the_budget_near_the_boundary_and_obeys_a_deadline() -> None:
    smooth = SequentialSmooth(linear, SIGMA)
    rng = np.random.default_rng(0)
    hopeless = smooth.certify_adaptive(point_with(0.45), 100, 100_000, 0.001, rng=rng)
    assert hopeless.abstained and hopeless.n < 1_000
    ticks = iter(range(1_000))
    timed = smooth.certify_adaptive(
        point_with(0.999),
        100,
        100_000,
        0.001,
        rng=rng,
        tolerance=0.0,
        seconds=2.5,
        clock=lambda: float(next(ticks)),
    )
    assert timed.looks == 3 and timed.n == 400  # clock reads 1, 2, 3 after the looks


# -- the bound and the schedule ------------------------------------------------------------


@pytest.mark.parametrize(("radius", "sigma"), [(0.25, 0.25), (0.0, 1.0), (1.0, 0.5)])
def test_the_first_look_is_the_least_that_could_certify(radius: float, sigma: float) -> None:
    sizes = target_schedule(radius, sigma, 100_000, 0.001)
    level, pStar = 0.001 / len(sizes), norm.cdf(radius / sigma)
    assert lower_confidence_bound(sizes[0], sizes[0], level) >= pStar
    assert lower_confidence_bound(sizes[0] - 1, sizes[0] - 1, level) < pStar or sizes[0] == 1
    assert sizes[-1] == 100_000 and all(b == 2 * a for a, b in itertools.pairwise(sizes[:-1]))


def test_upper_bound_is_clopper_pearson() -> None:
    from scipy.stats import beta

    assert upper_confidence_bound(30, 100, 0.01) == pytest.approx(beta.ppf(0.99, 31, 70))
    assert upper_confidence_bound(100, 100, 0.01) == 1.0


def test_settings_that_never_answer_are_refused_by_name() -> None:
    with pytest.raises(ParameterError, match=r"^n must be >= "):
        target_plan(0.25, 1.0, 100, 50, 0.001)  # Φ(4) needs far more than 50 samples
    with pytest.raises(ParameterError, match=r"^radius "):
        target_plan(0.25, -1.0, 100, 1000, 0.001)
    with pytest.raises(ParameterError, match=r"^alpha "):
        target_plan(0.25, 0.25, 100, 1000, 1.5)
    with pytest.raises(ParameterError, match=r"^tolerance "):
        adaptive_plan(0.25, 100, 1000, 0.001, -0.1)


def test_async_agrees_with_sync_exactly() -> None:
    async def labels(batch: np.ndarray) -> np.ndarray:
        return linear(batch)

    x = point_with(0.9)
    sync, aio = (
        SequentialSmooth(linear, SIGMA, batch=300),
        AsyncSequentialSmooth(labels, SIGMA, batch=300),
    )
    for seed in range(3):
        want = sync.certify_radius(x, 0.3, 50, 20_000, 0.001, rng=np.random.default_rng(seed))
        got = asyncio.run(
            aio.certify_radius(x, 0.3, 50, 20_000, 0.001, rng=np.random.default_rng(seed))
        )
        assert got == want
        want = sync.certify_adaptive(x, 50, 20_000, 0.001, rng=np.random.default_rng(seed))
        got = asyncio.run(
            aio.certify_adaptive(x, 50, 20_000, 0.001, rng=np.random.default_rng(seed))
        )
        assert got == want

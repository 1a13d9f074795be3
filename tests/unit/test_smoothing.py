"""Randomized smoothing against closed forms, a float64 reference, and its own guarantees.

The workhorse is a linear classifier: two classes split by the hyperplane
w·x + b = 0. Its smoothed classifier has a closed form, pA = Φ((w·x + b) / (σ‖w‖)),
and the true robust radius at x is the distance to the hyperplane, σ·Φ⁻¹(pA).
A certificate is wrong exactly when pABar > pA (radius larger than the truth).
"""

from __future__ import annotations

import asyncio
import math
import tracemalloc

import numpy as np
import pytest
from scipy.stats import beta, binom, binomtest, norm

from guard.defenses.sampling import NoiseSampler, add_votes, labels_from_output
from guard.defenses.smoothing import (
    AsyncSmooth,
    Certificate,
    ParameterError,
    Smooth,
    certificate,
    check_parameters,
    lower_confidence_bound,
    max_radius,
    min_samples,
    prediction,
)
from guard.inference import class_output

W = np.array([3.0, -1.0, 0.5, 2.0])
B = -0.25
SIGMA = 0.5


def linear(x: np.ndarray) -> np.ndarray:
    return (x @ W + B > 0).astype(np.int64)


def point_with(pA: float) -> np.ndarray:
    """A point whose smoothed probability of class 1 is ``pA``."""
    distance = SIGMA * norm.ppf(pA)  # signed distance to the hyperplane
    return (distance * np.linalg.norm(W) - B) * W / (W @ W)


def true_pA(x: np.ndarray) -> float:
    return float(norm.cdf((x @ W + B) / (SIGMA * np.linalg.norm(W))))


def most_failures(runs: int, alpha: float) -> int:
    """Failures a correct procedure exceeds with probability below 1e-6."""
    return int(binom.ppf(1 - 1e-6, runs, alpha))


def reference_certify(
    f, x: np.ndarray, n0: int, n: int, alpha: float, sigma: float, rng: np.random.Generator
) -> Certificate:
    """The paper's CERTIFY written the plain way: float64, all copies at once, scipy.stats."""
    counts0 = np.bincount(f(x + sigma * rng.standard_normal((n0, *x.shape))), minlength=2)
    cAHat = int(counts0.argmax())
    counts = np.bincount(f(x + sigma * rng.standard_normal((n, *x.shape))), minlength=2)
    nA = int(counts[cAHat])
    pABar = float(beta.ppf(alpha, nA, n - nA + 1)) if nA else 0.0
    if pABar < 0.5:
        return Certificate(None, 0.0, True, cAHat, nA, n, pABar)
    return Certificate(cAHat, sigma * float(norm.ppf(pABar)), False, cAHat, nA, n, pABar)


# -- the closed form ------------------------------------------------------------------


def test_closed_form_of_the_linear_classifier() -> None:
    x = point_with(0.8)
    assert true_pA(x) == pytest.approx(0.8)
    votes = NoiseSampler(SIGMA, batch=4096).counts(x, 200_000, np.random.default_rng(0), linear)
    assert votes[1] / votes.sum() == pytest.approx(0.8, abs=0.005)


@pytest.mark.parametrize("pA", [0.7, 0.9, 0.99])
def test_certificates_are_wrong_no_more_often_than_alpha(pA: float) -> None:
    alpha, runs = 0.05, 1500
    x = point_with(pA)
    truth = SIGMA * norm.ppf(pA)
    smooth = Smooth(linear, SIGMA, batch=64)
    wrong = certified = 0
    for seed in range(runs):
        cert = smooth.certify(x, 20, 100, alpha, rng=np.random.default_rng(seed))
        if not cert.abstained:
            certified += 1
            wrong += cert.label != 1 or cert.pABar > pA
            assert (cert.radius > truth + 1e-12) == (cert.label == 1 and cert.pABar > pA)
    assert certified > runs // 2
    assert wrong <= most_failures(runs, alpha)


def test_the_same_check_catches_an_optimistic_bound() -> None:
    """The point estimate nA / n in place of Clopper-Pearson is wrong about half the time."""
    alpha, runs, pA = 0.05, 400, 0.9
    x = point_with(pA)
    sampler = NoiseSampler(SIGMA, batch=64)
    wrong = sum(
        sampler.counts(x, 100, np.random.default_rng(seed), linear)[1] / 100 > pA
        for seed in range(runs)
    )
    assert wrong > most_failures(runs, alpha)


# -- agreement with a float64 reference -------------------------------------------


@pytest.mark.parametrize("batch", [1, 7, 100, 10_000])
@pytest.mark.parametrize("pA", [0.55, 0.9, 0.999])
def test_float64_engine_matches_the_reference_exactly(batch: int, pA: float) -> None:
    x = point_with(pA)
    for seed in range(5):
        got = Smooth(linear, SIGMA, batch=batch, dtype=np.float64).certify(
            x, 50, 500, 0.001, rng=np.random.default_rng(seed)
        )
        want = reference_certify(linear, x, 50, 500, 0.001, SIGMA, np.random.default_rng(seed))
        assert (got.label, got.abstained, got.cAHat, got.nA, got.n) == (
            want.label,
            want.abstained,
            want.cAHat,
            want.nA,
            want.n,
        )
        assert got.pABar == pytest.approx(want.pABar, rel=1e-12, abs=1e-300)
        assert got.radius == pytest.approx(want.radius, rel=1e-9, abs=1e-12)


def test_float32_engine_agrees_with_the_reference_statistically() -> None:
    x, n, runs = point_with(0.9), 2000, 60
    f32 = Smooth(linear, SIGMA, batch=512)
    got = [f32.certify(x, 50, n, 0.001, rng=np.random.default_rng(s)).pABar for s in range(runs)]
    want = [
        reference_certify(linear, x, 50, n, 0.001, SIGMA, np.random.default_rng(10_000 + s)).pABar
        for s in range(runs)
    ]
    spread = math.sqrt(0.9 * 0.1 / n) / math.sqrt(runs)  # standard error of each mean
    assert abs(np.mean(got) - np.mean(want)) < 6 * spread


# -- the statistics -------------------------------------------------------------------


@pytest.mark.parametrize(("nA", "n"), [(1, 10), (9, 10), (10, 10), (612, 1000), (99_990, 100_000)])
@pytest.mark.parametrize("alpha", [0.05, 0.001])
def test_bound_and_radius_follow_the_formulas(nA: int, n: int, alpha: float) -> None:
    pABar = float(beta.ppf(alpha, nA, n - nA + 1))
    assert lower_confidence_bound(nA, n, alpha) == pytest.approx(pABar, rel=1e-10)
    cert = certificate(3, nA, n, alpha, sigma=0.25)
    if pABar < 0.5:
        assert cert == Certificate(None, 0.0, True, 3, nA, n, cert.pABar)
    else:
        assert cert.label == 3 and not cert.abstained
        assert cert.radius == pytest.approx(0.25 * norm.ppf(pABar), rel=1e-9)


def test_no_votes_give_a_zero_bound() -> None:
    assert lower_confidence_bound(0, 100, 0.001) == 0.0
    assert certificate(0, 0, 100, 0.001, sigma=1.0).abstained


@pytest.mark.parametrize(
    ("n", "published"), [(100, 1.50), (1000, 2.46), (10_000, 3.20), (100_000, 3.81)]
)
def test_largest_certifiable_radius(n: int, published: float) -> None:
    """σ·Φ⁻¹(α^(1/n)), the radius when every sample votes for cAHat (Cohen et al.'s table)."""
    assert max_radius(1.0, n, 0.001) == pytest.approx(norm.ppf(0.001 ** (1 / n)), rel=1e-9)
    assert max_radius(1.0, n, 0.001) == pytest.approx(published, abs=0.006)
    assert max_radius(0.5, n, 0.001) == pytest.approx(0.5 * max_radius(1.0, n, 0.001))
    constant = Smooth(lambda b: np.zeros(len(b), np.int64), 0.5)
    cert = constant.certify(np.zeros(3), 10, n, 0.001, rng=np.random.default_rng(0))
    assert cert.radius == pytest.approx(max_radius(0.5, n, 0.001), rel=1e-12)


def test_prediction_uses_the_two_sided_binomial_test() -> None:
    counts = np.array([5, 40, 3, 52])
    got = prediction(counts, 0.3)
    assert (got.label, got.nA, got.nB) == (3, 52, 40)
    assert got.p_value == pytest.approx(binomtest(52, 92, 0.5).pvalue)
    assert prediction(counts, 0.01).abstained
    assert prediction(np.array([0, 30]), 0.001).label == 1  # one class seen: nB = 0
    assert prediction(np.zeros(0, np.int64), 0.001).abstained  # no votes at all


# -- abstention ---------------------------------------------------------------------------


def test_certify_abstains_on_the_boundary() -> None:
    alpha, runs = 0.05, 400
    x = point_with(0.5)
    smooth = Smooth(linear, SIGMA, batch=256)
    answered = sum(
        not smooth.certify(x, 20, 400, alpha, rng=np.random.default_rng(s)).abstained
        for s in range(runs)
    )
    assert answered <= most_failures(runs, alpha)


def test_certify_abstains_without_a_majority() -> None:
    def three_way(b: np.ndarray) -> np.ndarray:  # thirds of the Gaussian along the first axis
        return np.digitize(b[:, 0], [norm.ppf(1 / 3), norm.ppf(2 / 3)])

    smooth = Smooth(three_way, 1.0)
    for seed in range(20):
        assert smooth.certify(
            np.zeros(2), 100, 2000, 0.001, rng=np.random.default_rng(seed)
        ).abstained


def test_predict_abstains_on_a_tie() -> None:
    alpha, runs = 0.05, 400
    smooth = Smooth(linear, SIGMA, batch=256)
    x = point_with(0.5)
    answered = sum(
        not smooth.predict(x, 200, alpha, rng=np.random.default_rng(s)).abstained
        for s in range(runs)
    )
    assert answered <= most_failures(runs, alpha)


@pytest.mark.parametrize("procedure", ["certify", "predict"])
def test_too_few_samples_always_abstain(procedure: str) -> None:
    alpha = 0.001
    least = min_samples(alpha, procedure)
    assert least == {"certify": 10, "predict": 11}[procedure]  # REFERENCES: n >= 10 / n >= 11
    constant = Smooth(lambda b: np.full(len(b), 2, np.int64), 1.0)
    rng = np.random.default_rng(0)

    def answer(n: int) -> bool:
        if procedure == "certify":
            return not constant.certify(np.zeros(2), 1, n, alpha, rng=rng).abstained
        return not constant.predict(np.zeros(2), n, alpha, rng=rng).abstained

    assert not answer(least - 1)
    assert answer(least)


# -- validation -------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.5, 0.3, 0.1, 0.05, 0.01, 0.001, 1e-6])
def test_min_samples_match_the_closed_forms(alpha: float) -> None:
    assert min_samples(alpha, "certify") == max(1, math.ceil(math.log2(1 / alpha)))
    assert min_samples(alpha, "predict") == max(1, math.ceil(math.log2(2 / alpha)))


@pytest.mark.parametrize(
    ("kwargs", "name", "message"),
    [
        ({"n": 9}, "n", "must be >= 10 for CERTIFY to ever answer at alpha=0.001; got 9"),
        ({"n": 10, "procedure": "predict"}, "n", "must be >= 11 for PREDICT"),
        ({"sigma": 0.0}, "sigma", "must be > 0"),
        ({"alpha": 1.0}, "alpha", "must be in (0, 1)"),
        ({"n0": 0}, "n0", "must be >= 1"),
    ],
)
def test_check_parameters_refuses_what_can_never_answer(
    kwargs: dict[str, object], name: str, message: str
) -> None:
    settings: dict[str, object] = {"sigma": 0.25, "n": 1000, "alpha": 0.001, **kwargs}
    with pytest.raises(ParameterError) as info:
        check_parameters(**settings)  # type: ignore[arg-type]
    assert info.value.name == name
    assert message in info.value.message


def test_check_parameters_returns_the_largest_radius() -> None:
    assert check_parameters(sigma=0.25, n=10, alpha=0.001) == pytest.approx(
        max_radius(0.25, 10, 0.001)
    )
    assert check_parameters(sigma=0.25, n=11, alpha=0.001, procedure="predict") > 0


# -- the sampling engine ----------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 3, 10, 11, 1000])
def test_float64_chunks_are_one_draw_in_order(batch: int) -> None:
    x = np.arange(6.0).reshape(2, 3)
    sampler = NoiseSampler(0.3, batch=batch, dtype=np.float64)
    chunks = [c.copy() for c in sampler.chunks(x, 10, np.random.default_rng(4))]
    assert all(len(c) <= batch for c in chunks)
    want = x + 0.3 * np.random.default_rng(4).standard_normal((10, 2, 3))
    np.testing.assert_array_equal(np.concatenate(chunks), want)


def test_chunks_reuse_one_float32_buffer() -> None:
    chunks = list(NoiseSampler(1.0, batch=4).chunks(np.zeros(5), 10, np.random.default_rng(0)))
    assert [len(c) for c in chunks] == [4, 4, 2]
    assert all(c.dtype == np.float32 for c in chunks)
    assert all(np.shares_memory(c, chunks[0]) for c in chunks)


def test_every_sample_is_classified_once_in_batches() -> None:
    seen: list[int] = []

    def spy(b: np.ndarray) -> np.ndarray:
        seen.append(len(b))
        return linear(b)

    Smooth(spy, SIGMA, batch=300).certify(
        point_with(0.9), 100, 1000, 0.001, rng=np.random.default_rng(0)
    )
    assert max(seen) <= 300 and sum(seen) == 1100


def test_memory_does_not_grow_with_n() -> None:
    x = np.zeros(64, np.float32)
    sampler = NoiseSampler(1.0, batch=200)
    peaks = {}
    for num in (1_000, 100_000):
        tracemalloc.start()
        sampler.counts(x, num, np.random.default_rng(0), lambda b: (b[:, 0] > 0).astype(np.int64))
        peaks[num] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    buffer = 200 * 64 * 4
    assert peaks[100_000] < 2 * buffer + 64 * 1024
    assert peaks[100_000] < 1.2 * peaks[1_000] + 16 * 1024
    assert peaks[100_000] < 100_000 * 64 * 4 / 20  # never the n copies


def test_async_engine_matches_the_sync_one() -> None:
    x = point_with(0.8)

    async def remote(b: np.ndarray) -> np.ndarray:
        await asyncio.sleep(0)
        return linear(b)

    want = Smooth(linear, SIGMA, batch=64).certify(x, 30, 700, 0.01, rng=np.random.default_rng(3))
    got = asyncio.run(
        AsyncSmooth(remote, SIGMA, batch=64).certify(x, 30, 700, 0.01, rng=np.random.default_rng(3))
    )
    assert got == want
    predicted = asyncio.run(
        AsyncSmooth(remote, SIGMA).predict(x, 700, 0.01, rng=np.random.default_rng(3))
    )
    assert predicted == Smooth(linear, SIGMA).predict(x, 700, 0.01, rng=np.random.default_rng(3))


def test_votes_grow_with_new_labels_and_refuse_bad_ones() -> None:
    votes = add_votes(np.zeros(0, np.int64), np.array([1, 1, 0]), 3)
    votes = add_votes(votes, np.array([4], dtype=np.uint8), 1)
    np.testing.assert_array_equal(votes, [1, 2, 0, 0, 1])
    for labels, expected in (
        (np.array([1, 2]), 3),
        (np.array([0.0, 1.0]), 2),
        (np.array([[1], [2]]), 2),
    ):
        with pytest.raises(ValueError, match="integer labels"):
            add_votes(votes, labels, expected)
    with pytest.raises(ValueError, match="negative"):
        add_votes(votes, np.array([-1]), 1)


def test_labels_from_label_and_score_outputs() -> None:
    np.testing.assert_array_equal(labels_from_output(np.array([3, 1]), 2), [3, 1])
    np.testing.assert_array_equal(labels_from_output(np.array([[3], [1]]), 2), [3, 1])
    scores = np.array([[0.1, 0.9], [0.8, 0.2]], np.float32)
    np.testing.assert_array_equal(labels_from_output(scores, 2), [1, 0])
    for bad in (np.array([[0.3], [0.7]]), np.array([1, 2, 3]), scores[:1]):
        with pytest.raises(ValueError, match="expected 2 integer labels"):
            labels_from_output(bad, 2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sigma": 0.0}, "sigma"),
        ({"batch": 0}, "batch"),
        ({"dtype": np.float16}, "float32 or float64"),
    ],
)
def test_sampler_refuses_bad_settings(kwargs: dict[str, object], message: str) -> None:
    settings: dict[str, object] = {"sigma": 1.0, **kwargs}
    sigma = settings.pop("sigma")
    with pytest.raises(ValueError, match=message):
        NoiseSampler(sigma, **settings)  # type: ignore[arg-type]


def test_no_samples_no_votes() -> None:
    votes = NoiseSampler(1.0).counts(np.zeros(3), 0, np.random.default_rng(0), linear)
    assert votes.shape == (0,)


@pytest.mark.parametrize(
    ("kind", "shape", "expected"),
    [
        ("i", (5,), "labels"),
        ("u", (-1, 1), "labels"),
        ("f", (5, 10), "scores"),
        ("f", (-1, -1), "scores"),
        ("f", (5, 1), None),  # one score: no argmax to take
        ("f", (5,), None),
        ("i", (5, 3), None),
        ("b", (5,), None),
        ("O", (5,), None),
    ],
)
def test_which_output_holds_the_class(kind: str, shape: tuple[int, ...], expected: str) -> None:
    assert class_output(kind, shape) == expected

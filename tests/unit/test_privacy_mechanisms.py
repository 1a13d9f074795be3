"""Output-privacy mechanisms: calibration, post-processing, top-1 preservation, consistency."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from guard.defenses.privacy import (
    L1_SENSITIVITY,
    ConfidenceBins,
    Gaussian,
    LabelOnly,
    Laplace,
    ReverseSigmoid,
    Rounding,
    TopK,
    add_laplace,
    bin_confidence,
    check_scores,
    consistent_generators,
    degrade_outputs,
    gaussian_rho,
    gaussian_sigma,
    keep_top1,
    label_only,
    laplace_scale,
    reverse_sigmoid,
    to_simplex,
    top_k,
)

SECRET = b"0123456789abcdef-test"


def probabilities(n: int, c: int, *, seed: int = 0, concentration: float = 0.5) -> np.ndarray:
    rows = np.random.default_rng(seed).dirichlet(np.full(c, concentration), n).astype(np.float32)
    return rows / rows.sum(axis=1, keepdims=True)


def rows_of(n: int, f: int = 8, *, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 16, (n, f)).astype(np.float32)


# -- calibration ----------------------------------------------------------------------


def test_laplace_scale_is_the_simplex_l1_diameter_over_epsilon() -> None:
    # Two opposite vertices are the worst pair: their log-density ratio at a vertex is exactly ε.
    for epsilon in (0.1, 1.0, 4.0):
        b = laplace_scale(epsilon)
        assert b == pytest.approx(L1_SENSITIVITY / epsilon)
        p, q = np.eye(3)[0], np.eye(3)[1]
        z = p
        ratio = (np.abs(z - q).sum() - np.abs(z - p).sum()) / b
        assert ratio == pytest.approx(epsilon)


def test_laplace_privacy_loss_is_bounded_by_epsilon_for_any_two_score_vectors() -> None:
    epsilon = 0.7
    b = laplace_scale(epsilon)
    rng = np.random.default_rng(3)
    p, q = probabilities(500, 10, seed=4), probabilities(500, 10, seed=5)
    z = rng.normal(0.3, 1.0, p.shape)
    loss = (np.abs(z - q).sum(axis=1) - np.abs(z - p).sum(axis=1)) / b
    assert loss.max() <= epsilon + 1e-9


def test_laplace_noise_has_the_calibrated_scale() -> None:
    scores = np.full((20000, 2), 0.5)
    noise = add_laplace(scores, 0.4, np.random.default_rng(7)) - scores
    assert stats.kstest(noise.ravel(), stats.laplace(scale=0.4).cdf).pvalue > 1e-3


def test_gaussian_rho_and_sigma_are_inverse() -> None:
    assert gaussian_rho(2.0) == pytest.approx(2.0 / (2 * 4.0))  # Δ₂² = 2
    for rho in (0.01, 0.5, 3.0):
        assert gaussian_rho(gaussian_sigma(rho)) == pytest.approx(rho)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan])
def test_calibration_refuses_non_positive_parameters(bad: float) -> None:
    with pytest.raises(ValueError, match="must be > 0"):
        laplace_scale(bad)
    with pytest.raises(ValueError, match="must be > 0"):
        Gaussian(sigma=bad)


# -- released vectors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "mechanism",
    [Laplace(epsilon=1.0), Gaussian(sigma=0.5), Laplace(epsilon=0.2, keep_argmax=False)],
    ids=["laplace", "gaussian", "laplace-no-keep"],
)
def test_noisy_mechanisms_release_probability_rows(mechanism) -> None:
    scores = probabilities(300, 10)
    released = mechanism.apply(scores, np.random.default_rng(0))
    assert released.shape == scores.shape
    assert released.dtype == scores.dtype
    assert (released >= 0).all()
    np.testing.assert_allclose(released.sum(axis=1), 1.0, atol=1e-5)
    assert not np.allclose(released, scores)


@pytest.mark.parametrize(
    "mechanism",
    [
        Laplace(epsilon=0.05),
        Gaussian(sigma=5.0),
        Rounding(decimals=1),
        Rounding(decimals=0),
        ReverseSigmoid(beta=1.0, gamma=0.1),
        ReverseSigmoid(beta=3.0, gamma=0.5),
        TopK(k=2),
        LabelOnly(),
    ],
    ids=lambda m: m.fingerprint(),
)
def test_keep_argmax_holds_on_every_row_of_a_batch(mechanism) -> None:
    scores = probabilities(2000, 10, concentration=0.3)
    released = mechanism.apply(scores, np.random.default_rng(1))
    np.testing.assert_array_equal(np.argmax(released, axis=1), np.argmax(scores, axis=1))


def test_without_keep_argmax_heavy_noise_changes_labels() -> None:
    scores = probabilities(2000, 10)
    released = Laplace(epsilon=0.5, keep_argmax=False).apply(scores, np.random.default_rng(2))
    flipped = np.mean(np.argmax(released, axis=1) != np.argmax(scores, axis=1))
    assert 0.3 < flipped < 0.95


def test_keep_top1_swaps_and_breaks_ties_towards_the_true_class() -> None:
    scores = np.array([[0.4, 0.6, 0.0], [0.2, 0.3, 0.5], [0.1, 0.2, 0.7]], dtype=np.float32)
    released = np.array([[0.5, 0.5, 0.0], [0.6, 0.3, 0.1], [0.1, 0.2, 0.7]], dtype=np.float32)
    fixed = keep_top1(released, scores)
    np.testing.assert_array_equal(np.argmax(fixed, axis=1), [1, 2, 2])
    np.testing.assert_allclose(np.sort(fixed[1]), np.sort(released[1]))  # values only swapped
    np.testing.assert_array_equal(fixed[2], released[2])


def test_to_simplex_clips_negatives_and_keeps_an_all_negative_row_valid() -> None:
    values = np.array([[0.5, -0.2, 1.7], [-0.3, -0.1, -0.4]])
    out = to_simplex(values)
    np.testing.assert_allclose(out[0], [0.5 / 2.2, 0.0, 1.7 / 2.2])
    np.testing.assert_array_equal(out[1], [0.0, 1.0, 0.0])


def test_rounding() -> None:
    scores = np.array([[0.123456, 0.876544], [0.494, 0.506]], dtype=np.float32)
    np.testing.assert_allclose(
        Rounding(decimals=2, keep_argmax=False).apply(scores)[0], [0.12, 0.88]
    )
    tied = Rounding(decimals=1, keep_argmax=False).apply(scores)[1]
    assert tied[0] == tied[1]  # rounding alone ties, and argmax would say class 0
    assert np.argmax(Rounding(decimals=1).apply(scores)[1]) == 1


def test_top_k_renormalised_or_raw() -> None:
    scores = np.array([[0.1, 0.5, 0.15, 0.25], [0.3, 0.3, 0.3, 0.1]], dtype=np.float32)
    raw = top_k(scores, 2, renormalize=False)
    np.testing.assert_allclose(raw[0], [0.0, 0.5, 0.0, 0.25])
    np.testing.assert_allclose(raw[1], [0.3, 0.3, 0.0, 0.0])  # ties go to the lower indices
    np.testing.assert_allclose(top_k(scores, 2).sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(TopK(k=10).apply(scores), scores, rtol=1e-6)


def test_label_only_is_one_hot_per_row_of_a_batch() -> None:
    scores = probabilities(50, 7, seed=9)
    out = label_only(scores)
    np.testing.assert_array_equal(out, np.eye(7, dtype=np.float32)[np.argmax(scores, axis=1)])
    assert out.dtype == scores.dtype


def test_reverse_sigmoid_matches_the_paper() -> None:
    scores = probabilities(100, 5, seed=11)
    beta, gamma = 0.7, 0.2
    y = np.clip(scores.astype(np.float64), 1e-9, 1 - 1e-9)
    r = beta * (1 / (1 + np.exp(-gamma * np.log(y / (1 - y)))) - 0.5)
    expected = np.maximum(scores - r, 0.0)
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(reverse_sigmoid(scores, beta, gamma), expected, rtol=1e-9)


def test_reverse_sigmoid_can_flip_top1_and_keep_argmax_fixes_it() -> None:
    scores = probabilities(20000, 10, seed=12, concentration=0.3)
    raw = ReverseSigmoid(keep_argmax=False).apply(scores)
    flipped = np.mean(np.argmax(raw, axis=1) != np.argmax(scores, axis=1))
    assert flipped > 0.01  # ~3% with β=1, γ=0.1 (ART's defaults)
    fixed = ReverseSigmoid().apply(scores)
    np.testing.assert_array_equal(np.argmax(fixed, axis=1), np.argmax(scores, axis=1))


@pytest.mark.parametrize(
    ("scores", "message"),
    [
        (np.array([[2.0, -1.0]], dtype=np.float32), "probabilities in"),
        (np.array([[0.2, 0.2]], dtype=np.float32), "sum to 1"),
        (np.array([0.5, 0.5], dtype=np.float32), "batch of probability rows"),
        (np.array([[1.0]], dtype=np.float32), "batch of probability rows"),
        (np.array([[0, 1]]), "floating point"),
        (np.array([[np.nan, 1.0]]), "probabilities in"),
    ],
)
def test_scores_that_are_not_probability_rows_are_refused(scores: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_scores(scores)
    with pytest.raises(ValueError, match=message):
        Laplace(epsilon=1.0).apply(scores, np.random.default_rng(0))
    with pytest.raises(ValueError, match=message):  # the compiled bins check their own rows
        ConfidenceBins(cuts=(0.5,), confidences=(0.48, 0.975), ranked=1).apply(scores)


def test_noisy_mechanism_without_a_generator_is_refused() -> None:
    with pytest.raises(ValueError, match="random generator"):
        Laplace(epsilon=1.0).apply(probabilities(2, 3))


def test_fingerprints_differ_when_any_parameter_does() -> None:
    prints = {
        m.fingerprint()
        for m in (
            Laplace(epsilon=1.0),
            Laplace(epsilon=2.0),
            Laplace(epsilon=1.0, keep_argmax=False),
            Gaussian(sigma=1.0),
            ReverseSigmoid(),
            ReverseSigmoid(beta=2.0),
        )
    }
    assert len(prints) == 6


# -- consistent noise -------------------------------------------------------------------


def draws(generators: list[np.random.Generator]) -> np.ndarray:
    return np.array([g.random(4) for g in generators])


def test_the_same_row_gets_the_same_noise_in_any_batch_at_any_position() -> None:
    x = rows_of(5)
    first = draws(consistent_generators(SECRET, ["m", "laplace"], {"input": x}))
    shuffled = x[[3, 0, 4, 1, 2]]
    again = draws(consistent_generators(SECRET, ["m", "laplace"], {"input": shuffled}))
    np.testing.assert_array_equal(again, first[[3, 0, 4, 1, 2]])
    alone = draws(consistent_generators(SECRET, ["m", "laplace"], {"input": x[2:3]}))
    np.testing.assert_array_equal(alone[0], first[2])
    assert len({tuple(row) for row in first}) == 5  # different rows, different noise


def test_noise_differs_with_secret_scope_and_input_but_not_with_the_sign_of_zero() -> None:
    x = np.zeros((1, 8), dtype=np.float32)
    base = draws(consistent_generators(SECRET, ["m", "laplace(epsilon=1)"], {"input": x}))
    others = [
        consistent_generators(SECRET + b"!", ["m", "laplace(epsilon=1)"], {"input": x}),
        consistent_generators(SECRET, ["m", "laplace(epsilon=2)"], {"input": x}),
        consistent_generators(SECRET, ["m2", "laplace(epsilon=1)"], {"input": x}),
        consistent_generators(SECRET, ["m", "laplace(epsilon=1)"], {"input": x + np.float32(1e-6)}),
        consistent_generators(SECRET, ["m", "laplace(epsilon=1)"], {"other": x}),
    ]
    for generators in others:
        assert not np.array_equal(draws(generators), base)
    negative_zero = draws(consistent_generators(SECRET, ["m", "laplace(epsilon=1)"], {"input": -x}))
    np.testing.assert_array_equal(negative_zero, base)


def test_inputs_must_agree_on_the_batch() -> None:
    with pytest.raises(ValueError, match="batch size"):
        consistent_generators(SECRET, ["m"], {"a": rows_of(2), "b": rows_of(3)})


def test_mean_of_100_consistent_answers_is_the_single_answer() -> None:
    x = rows_of(64)
    scores = probabilities(64, 10, seed=13)
    mechanism = Laplace(epsilon=1.0)
    scope = ["digits", mechanism.fingerprint()]

    def answer() -> np.ndarray:
        return mechanism.apply(scores, consistent_generators(SECRET, scope, {"input": x}))

    single = answer()
    mean = np.mean([answer().astype(np.float64) for _ in range(100)], axis=0)
    np.testing.assert_array_equal(mean, single)


def test_mean_of_100_fresh_answers_converges() -> None:
    scores = probabilities(64, 10, seed=13)
    mechanism = Laplace(epsilon=1.0)
    rng = np.random.default_rng(14)
    batches = [[mechanism.apply(scores, rng) for _ in range(100)] for _ in range(2)]
    singles_gap = np.abs(batches[0][0] - batches[1][0]).mean()
    means_gap = np.abs(np.mean(batches[0], axis=0) - np.mean(batches[1], axis=0)).mean()
    assert means_gap < singles_gap / 5  # the noise averages away (≈ 1/√100)


# -- degraded answers ------------------------------------------------------------------------


def test_degrade_outputs_defaults_to_label_only_and_keeps_the_label_consistent() -> None:
    scores = probabilities(6, 4, seed=15)
    outputs = {"probabilities": scores, "label": np.zeros(6, dtype=np.int64), "extra": np.ones(6)}
    degraded = degrade_outputs(outputs)
    np.testing.assert_array_equal(degraded["probabilities"], label_only(scores))
    np.testing.assert_array_equal(degraded["label"], np.argmax(scores, axis=1))
    assert degraded["label"].dtype == np.int64
    assert degraded["extra"] is outputs["extra"]
    assert outputs["probabilities"] is scores  # the input mapping is left alone


def test_degrade_outputs_with_a_noisy_mechanism_and_missing_scores() -> None:
    scores = probabilities(6, 4, seed=16)
    noisy = degrade_outputs(
        {"probabilities": scores}, mechanism=Laplace(epsilon=0.5), rng=np.random.default_rng(0)
    )
    np.testing.assert_array_equal(
        np.argmax(noisy["probabilities"], axis=1), np.argmax(scores, axis=1)
    )
    only_label = {"label": np.arange(6)}
    assert degrade_outputs(only_label) == only_label


def test_bins_release_the_level_of_each_rows_bin_and_keep_label_and_order() -> None:
    scores = probabilities(500, 10, seed=3, concentration=0.3)
    bins = ConfidenceBins(cuts=(0.5, 0.9), confidences=(0.45, 0.7, 0.97))
    released = bins.apply(scores)
    assert released.dtype == scores.dtype and bins.cost is None and not bins.noisy
    np.testing.assert_allclose(released.sum(axis=1), 1.0, atol=1e-6)
    top = scores.max(axis=1)
    expected = np.where(top < 0.5, 0.45, np.where(top < 0.9, 0.7, 0.97))
    np.testing.assert_allclose(released.max(axis=1), expected, atol=1e-6)
    assert (released.argmax(axis=1) == scores.argmax(axis=1)).all()
    order = np.argsort(-scores, axis=1, kind="stable")
    ranked = np.take_along_axis(released, order, axis=1)
    assert (np.diff(ranked, axis=1) < 0).all()  # every class keeps its place


def test_bins_answers_depend_on_label_order_and_bin_only() -> None:
    bins = ConfidenceBins(cuts=(0.5,), confidences=(0.4, 0.95))
    a = np.array([[0.96, 0.03, 0.01], [0.6, 0.3, 0.1], [0.2, 0.3, 0.5]], dtype=np.float32)
    b = np.array([[0.999, 0.0009, 0.0001], [0.9, 0.09, 0.01], [0.1, 0.45, 0.45]], np.float32)
    released_a, released_b = bins.apply(a), bins.apply(b)
    np.testing.assert_array_equal(released_a[:2], released_b[:2])
    # a level below the second class's share: the label is put back on top
    low = ConfidenceBins(confidences=(0.2,)).apply(np.array([[0.5, 0.3, 0.2]], np.float32))
    assert low.argmax() == 0


def test_bins_ranked_keeps_that_many_places_and_shares_the_rest_evenly() -> None:
    scores = np.array([[0.05, 0.6, 0.2, 0.1, 0.05]], dtype=np.float32)
    one = ConfidenceBins(confidences=(0.9,), ranked=1).apply(scores)[0]
    assert one[1] == pytest.approx(0.9) and one[2] > one[3] == one[0] == one[4]
    none = ConfidenceBins(confidences=(0.9,), ranked=0).apply(scores)[0]
    np.testing.assert_allclose(np.delete(none, 1), 0.025, rtol=1e-6)
    with pytest.raises(ValueError, match="ranked must be >= 0"):
        ConfidenceBins(confidences=(0.9,), ranked=-1)


@pytest.mark.parametrize(
    ("cuts", "levels", "message"),
    [
        ((0.5,), (0.9,), "one level more than cuts"),
        ((0.6, 0.5), (0.3, 0.5, 0.9), "rise strictly"),
        ((1.0,), (0.5, 0.9), "rise strictly"),
        ((), (0.0,), "confidences must lie in (0, 1]"),
        ((), (1.2,), "confidences must lie in (0, 1]"),
    ],
)
def test_bins_refuse_bad_cuts_and_levels(
    cuts: tuple[float, ...], levels: tuple[float, ...], message: str
) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("]", r"\]")):
        ConfidenceBins(cuts=cuts, confidences=levels)


@pytest.mark.parametrize("classes", [2, 3, 10])
@pytest.mark.parametrize("ranked", [None, 0, 1, 3])
@pytest.mark.parametrize("confidences", [(0.48, 0.975), (0.2, 0.9), (0.05, 0.5)])
def test_bins_skip_the_tie_break_only_where_it_changes_nothing(
    classes: int, ranked: int | None, confidences: tuple[float, float]
) -> None:
    # Levels that lead the runner-up's share already put the label on top; levels that
    # do not (0.05 among 2 classes) still go through keep_top1. Either way the answer is
    # what bin_confidence then keep_top1 give, ties among the scores included.
    bins = ConfidenceBins(cuts=(0.5,), confidences=confidences, ranked=ranked)
    scores = np.random.default_rng(classes).dirichlet(np.full(classes, 0.3), 300)
    scores = scores.astype(np.float32)
    scores[:5] = np.float32(1.0 / classes)  # every class tied
    scores[5:10, :2] = scores[5:10, :2].mean(axis=1, keepdims=True)  # the top two tied
    expected = keep_top1(
        bin_confidence(scores, (0.5,), confidences, ranked).astype(np.float32), scores
    )
    assert np.array_equal(bins.apply(scores), expected)
    assert np.array_equal(np.argmax(bins.apply(scores), axis=1), np.argmax(scores, axis=1))

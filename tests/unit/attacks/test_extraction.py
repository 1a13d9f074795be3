"""Extraction attacks copy the undefended digits model better as they spend more queries."""

from __future__ import annotations

import numpy as np
import pytest

from guard.attacks.extraction import Evaluation, JbDA, Knockoff, augment
from guard.attacks.surrogate import Surrogate
from guard.attacks.targets import OnnxTarget, TargetSpec
from tests.unit.attacks.scripted import ScriptedDefence

CHANCE = 0.1


@pytest.fixture(scope="module")
def split(digits: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, Evaluation]:
    x, y = digits
    order = np.random.default_rng(0).permutation(len(x))
    pool, held = order[:450], order[450:]
    return x[pool], Evaluation.of(OnnxTarget.builtin("digits"), x[held], y[held])


def test_knockoff_fidelity_rises_with_budget(
    split: tuple[np.ndarray, Evaluation], digits_target: OnnxTarget
) -> None:
    pool, evaluation = split
    run = Knockoff(budgets=(30, 150, 600), steps=400).run(
        digits_target, pool, evaluation, np.random.default_rng(0)
    )
    fidelity = [p.fidelity for p in run.curve]
    assert [p.queries for p in run.curve] == [30, 150, 600] and digits_target.queries == 600
    assert fidelity[0] > 3 * CHANCE and fidelity[-1] > fidelity[0] + 0.05 and fidelity[-1] > 0.9
    summary = run.summary(digits_target)
    assert summary["success_rate"] == fidelity[-1] and summary["queries"] == 600


def test_jbda_augmentation_beats_its_seed_set(
    split: tuple[np.ndarray, Evaluation], digits_target: OnnxTarget
) -> None:
    pool, evaluation = split
    run = JbDA(budget=500, seed_size=30, tau=3, steps=400).run(
        digits_target, pool, evaluation, np.random.default_rng(0)
    )
    queries = [p.queries for p in run.curve]
    assert queries == [30, 60, 120, 240, 480, 500] and digits_target.queries == 500
    assert run.curve[-1].fidelity > run.curve[0].fidelity > 3 * CHANCE


def test_refused_queries_cost_budget_and_teach_nothing(
    split: tuple[np.ndarray, Evaluation], digits_target: OnnxTarget
) -> None:
    pool, evaluation = split
    defence = ScriptedDefence(digits_target, deny_from=1)
    run = Knockoff(budgets=(20,), steps=10).run(defence, pool, evaluation, np.random.default_rng(0))
    assert run.curve[0].fidelity == 0.0 and defence.queries == 20
    summary = run.summary(defence)
    assert summary["detected_fraction"] == 1.0 and summary["first_detection_query"] == 1.0
    assert summary["refused_fraction"] == 1.0


def test_surrogate_gradients_match_finite_differences() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 16, (40, 5))
    model = Surrogate(5, 3, hidden=8).fit(x, np.eye(3)[rng.integers(0, 3, 40)], rng=rng, steps=50)
    point, classes = x[:4], np.array([0, 1, 2, 0])
    analytic = model.class_gradients(point, classes)

    def logit(z: np.ndarray) -> np.ndarray:
        return model._logits((z - model.mean) / model.std)[1][np.arange(len(z)), classes]

    h = 1e-5
    numeric = np.stack(
        [(logit(point + h * e) - logit(point - h * e)) / (2 * h) for e in np.eye(5)], axis=1
    )
    np.testing.assert_allclose(analytic, numeric, rtol=1e-4, atol=1e-7)


def test_augment_stays_in_range_and_shifts_images() -> None:
    spec = TargetSpec(64, 10, np.asarray(0.0), np.asarray(16.0))
    rng = np.random.default_rng(0)
    image = np.zeros((1, 8, 8))
    image[0, 3:5, 3:5] = 16.0
    out = augment(
        np.repeat(image.reshape(1, 64), 50, axis=0), spec, rng, noise=0.0, shift=1, shape=(8, 8)
    )
    assert out.min() >= 0 and out.max() <= 16
    assert (out.sum(axis=1) == 64.0).all()  # a shift of one pixel keeps the centred square whole
    assert len({row.tobytes() for row in out}) > 1
    noisy = augment(np.full((10, 64), 15.9), spec, rng, noise=0.5, shift=0, shape=None)
    assert noisy.min() >= 0 and noisy.max() <= 16

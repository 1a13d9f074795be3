"""Model inversion recovers what the digits look like from scores alone."""

from __future__ import annotations

import numpy as np
import pytest

from guard.attacks.inversion import Inversion, centred_cosine
from guard.attacks.nes import nes_gradient
from guard.attacks.targets import OnnxTarget


def test_inversion_beats_its_baseline(
    digits: tuple[np.ndarray, np.ndarray], digits_target: OnnxTarget
) -> None:
    x, y = digits
    run = Inversion().run(digits_target, x, y, budget=401, rng=np.random.default_rng(0))
    summary = run.summary(digits_target)
    assert digits_target.queries == 10 * 401 and summary["queries"] == 401
    assert summary["similarity"] > summary["baseline_similarity"] + 0.1
    assert summary["success_rate"] >= 0.5  # chance: 0.1
    for c in run.classes:
        assert (c.x >= 0).all() and (c.x <= 16).all()


def test_inversion_is_reproducible(digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digits
    a, b = (
        Inversion().run(OnnxTarget.builtin("digits"), x, y, budget=81, rng=np.random.default_rng(3))
        for _ in range(2)
    )
    for ca, cb in zip(a.classes, b.classes, strict=True):
        assert np.array_equal(ca.x, cb.x)


def test_nes_estimates_a_known_gradient() -> None:
    target = np.linspace(-1, 1, 20)

    def f(rows: np.ndarray) -> np.ndarray:
        return -((rows - target) ** 2).sum(axis=1)

    x = np.zeros(20)
    estimate = nes_gradient(f, x, pairs=400, sigma=0.01, rng=np.random.default_rng(0))
    truth = 2 * target
    cosine = estimate @ truth / (np.linalg.norm(estimate) * np.linalg.norm(truth))
    assert cosine > 0.9


def test_nes_skips_refused_pairs() -> None:
    def refused(rows: np.ndarray) -> np.ndarray:
        return np.full(len(rows), np.nan)

    assert not nes_gradient(
        refused, np.zeros(3), pairs=4, sigma=0.1, rng=np.random.default_rng(0)
    ).any()


def test_centred_cosine_prefers_the_matching_mean() -> None:
    means = np.array([[1.0, 0.0], [0.0, 1.0]])
    similarity = centred_cosine(np.array([2.0, 0.0]), means, np.zeros(2))
    assert similarity.argmax() == 0 and similarity[0] == pytest.approx(1.0)

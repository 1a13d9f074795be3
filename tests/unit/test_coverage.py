"""The coverage algorithm: calibration, novelty, evidence, the thresholds and the pooled test."""

from __future__ import annotations

import numpy as np
import pytest

from guard.defenses.coverage import (
    STEPS_PER_RADIUS,
    Evidence,
    Shard,
    Sketch,
    Thresholds,
    Window,
    calibrate_radius,
    union,
)


def clusters(rng: np.random.Generator, n: int, dim: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """``n`` natural-looking inputs: points around 10 class centres far apart, with labels."""
    centres = rng.normal(0.0, 10.0, (10, dim))
    labels = rng.integers(0, 10, n)
    return centres[labels] + rng.normal(0.0, 2.0, (n, dim)), labels


def observe(window: Window, row: np.ndarray, label: int, radius: float) -> bool:
    """Fold one query as the stage does (fixed point in steps of radius / 64): whether it
    was novel."""
    window.fold(Window.encode(row[None, :], np.array([label]), radius / STEPS_PER_RADIUS))
    return bool(window.state()[2][-1])


def stream(window: Window, x: np.ndarray, labels: np.ndarray, radius: float) -> list[bool]:
    return [observe(window, row, int(c), radius) for row, c in zip(x, labels, strict=True)]


def nearest(reference: np.ndarray, row: np.ndarray) -> float:
    return float(np.sqrt(np.min(np.sum((reference - row) ** 2, axis=1))))


def test_calibrated_radius_separates_jitter_from_distinct_inputs() -> None:
    rng = np.random.default_rng(0)
    reference, _ = clusters(rng, 500)
    radius = calibrate_radius(reference)
    fresh, _ = clusters(np.random.default_rng(1), 500)
    gaps = [nearest(reference, row) for row in fresh]
    assert np.mean(np.asarray(gaps) > radius) > 0.95  # new natural inputs are novel
    jitter = np.linalg.norm(rng.normal(0.0, 0.1, (500, 16)), axis=1)
    assert np.all(jitter < radius)  # small honest variation is not
    # duplicates in the reference do not collapse the radius to zero
    assert calibrate_radius(np.vstack([reference, reference])) == pytest.approx(radius)


def test_calibrate_radius_rejects_degenerate_references() -> None:
    with pytest.raises(ValueError, match="2 distinct"):
        calibrate_radius(np.ones((5, 4)))
    with pytest.raises(ValueError, match="quantile"):
        calibrate_radius(np.eye(4), quantile=1.5)


def test_an_extraction_stream_is_novel_and_spread_an_honest_one_is_not() -> None:
    rng = np.random.default_rng(3)
    x, labels = clusters(rng, 2000)
    radius = calibrate_radius(x[:500])
    thresholds = Thresholds()
    extraction = Window(16, 1000)
    stream(extraction, x[500:900], labels[500:900], radius)
    evidence = extraction.evidence(10)
    assert evidence.queries == 400 and evidence.novel >= 390
    assert evidence.entropy > 0.95 and thresholds.judge(evidence)

    honest = Window(16, 1000)  # a few popular inputs, retries and jittered copies, some fresh
    popular = x[900:905]
    row = x[905]
    for i in range(400):
        kind = rng.integers(4)
        if kind == 0:
            row = popular[rng.integers(5)]
        elif kind == 3:
            row = x[905 + i]
        else:  # a retry (kind 1: small jitter) or a re-encoded copy (kind 2) of the last one
            row = row + rng.normal(0, 0.1 * kind, 16)
        observe(honest, row, int(rng.integers(10)), radius)
    evidence = honest.evidence(10)
    assert 50 < evidence.novel < 200 and evidence.fraction < 0.5
    assert not thresholds.judge(evidence) and not thresholds.shard(evidence)


def test_the_window_forgets_and_repeats_of_forgotten_queries_are_novel_again() -> None:
    rng = np.random.default_rng(4)
    x, labels = clusters(rng, 40)
    window = Window(16, 30)
    assert all(stream(window, x, labels, 1.0))
    assert len(window) == 30
    assert stream(window, x[-5:], labels[-5:], 1.0) == [False] * 5  # still remembered
    assert stream(window, x[:1], labels[:1], 1.0) == [True]  # forgotten


def test_padding_with_repeats_lowers_the_fraction_but_not_the_count() -> None:
    thresholds = Thresholds(min_novel=150, min_fraction=0.8, max_novel=600)
    even = np.full(10, 15)
    padded = Evidence(queries=300, novel=150, classes=even)  # half repeats
    assert not thresholds.judge(padded)
    assert thresholds.judge(Evidence(queries=1000, novel=600, classes=even * 4))
    assert thresholds.judge(Evidence(queries=160, novel=150, classes=even))
    one_class = Evidence(queries=160, novel=150, classes=np.array([150] + [0] * 9))
    assert one_class.entropy == 0.0 and not thresholds.judge(one_class)


def test_thresholds_are_validated() -> None:
    with pytest.raises(ValueError, match="shard_novel <= min_novel <= max_novel"):
        Thresholds(min_novel=100, max_novel=50)
    with pytest.raises(ValueError, match="shard_novel <= min_novel <= max_novel"):
        Thresholds(shard_novel=200, min_novel=150)
    with pytest.raises(ValueError, match="min_fraction"):
        Thresholds(min_fraction=0.0)


def test_sketch_keeps_distances_roughly_and_is_the_identity_for_small_inputs() -> None:
    rng = np.random.default_rng(5)
    assert Sketch.make(16, 64).matrix is None
    big = rng.normal(size=(50, 3000)).astype(np.float32)
    sketch = Sketch.make(3000, 64, seed=1)
    assert np.array_equal(sketch(big), Sketch.make(3000, 64, seed=1)(big))  # seeded
    s = sketch(big)
    ratio = np.linalg.norm(s[1:] - s[:-1], axis=1) / np.linalg.norm(big[1:] - big[:-1], axis=1)
    assert 0.7 < np.median(ratio) < 1.3


def shard(client: str, at: float, novel: int, queries: int | None = None) -> Shard:
    classes = np.full(10, novel // 10)
    classes[0] += novel - classes.sum()
    return Shard(client, at, Evidence(queries or novel, novel, classes))


def test_union_pools_a_split_extraction_but_never_clients_unlike_a_shard() -> None:
    t = Thresholds(min_novel=150, shard_novel=50)
    split = [shard(f"sybil-{i}", 10.0 + i, 60) for i in range(3)]
    pooled = union(split, t, since=0.0)
    assert pooled is not None and pooled.novel == 180
    assert union(split[:2], t, since=0.0) is None  # 120 < 150
    # an honest client with many queries but few of them new is never pooled
    honest = shard("honest", 11.0, 100, queries=400)
    assert not t.shard(honest.evidence)
    assert union([*split[:2], honest], t, since=0.0) is None
    # each client counts once, with its newest entry; old entries are ignored
    again = [*split[:2], shard("sybil-0", 20.0, 70)]
    assert union(again, t, since=0.0) is None  # 70 + 60 < 150
    assert union(split, t, since=11.5) is None  # only sybil-2 is recent

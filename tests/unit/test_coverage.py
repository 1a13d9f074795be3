"""The coverage algorithm: calibration, novelty, evidence, the thresholds and the pooled test."""

from __future__ import annotations

import numpy as np
import pytest

from guard.defenses.coverage import (
    Evidence,
    History,
    Shard,
    Sketch,
    Thresholds,
    calibrate_radius,
    nearest,
    union,
)


def clusters(rng: np.random.Generator, n: int, dim: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """``n`` natural-looking inputs: points around 10 class centres far apart, with labels."""
    centres = rng.normal(0.0, 10.0, (10, dim))
    labels = rng.integers(0, 10, n)
    return centres[labels] + rng.normal(0.0, 2.0, (n, dim)), labels


def stream(
    history: History, x: np.ndarray, labels: np.ndarray, radius: float, window: int
) -> list[bool]:
    return [
        history.observe(row.astype(np.float32), int(c), radius, window)
        for row, c in zip(x, labels, strict=True)
    ]


def test_calibrated_radius_separates_jitter_from_distinct_inputs() -> None:
    rng = np.random.default_rng(0)
    reference, _ = clusters(rng, 500)
    radius = calibrate_radius(reference)
    fresh, _ = clusters(np.random.default_rng(1), 500)
    gaps = [nearest(reference.astype(np.float32), row.astype(np.float32)) for row in fresh]
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


def test_history_round_trips_through_its_encoding() -> None:
    rng = np.random.default_rng(2)
    rows = rng.normal(size=(5, 8)).astype(np.float32)
    step = 1e-3
    items = [
        History.encode(r, c, bool(c % 2), step) for r, c in zip(rows, [0, 1, 2, -1, 9], strict=True)
    ]
    history = History.decode(b"xyz" + b"".join(items), 8, step)  # a partial record: skipped
    assert history.labels.tolist() == [0, 1, 2, -1, 9]
    assert history.novel.tolist() == [False, True, False, True, True]
    np.testing.assert_allclose(history.sketches, rows, atol=step / 2 + 1e-6)  # fixed point
    saturated = History.decode(History.encode(np.array([1e9, -1e9]), 0, False, 1.0), 2, 1.0)
    assert saturated.sketches.tolist() == [[32767.0, -32767.0]]


def test_an_extraction_stream_is_novel_and_spread_an_honest_one_is_not() -> None:
    rng = np.random.default_rng(3)
    x, labels = clusters(rng, 2000)
    radius = calibrate_radius(x[:500])
    thresholds = Thresholds()
    extraction = History.empty(16)
    stream(extraction, x[500:900], labels[500:900], radius, 1000)
    evidence = extraction.evidence(10)
    assert evidence.queries == 400 and evidence.novel >= 390
    assert evidence.entropy > 0.95 and thresholds.judge(evidence)

    honest = History.empty(16)  # a few popular inputs, retries and jittered copies, some fresh
    popular = x[900:905]
    for i in range(400):
        kind = rng.integers(4)
        row = (
            popular[rng.integers(5)]
            if kind == 0
            else x[905 + i]
            if kind == 3
            else honest.sketches[-1] + rng.normal(0, 0.1 * kind, 16)
            if len(honest.labels)
            else x[905 + i]
        )
        honest.observe(np.asarray(row, np.float32), int(rng.integers(10)), radius, 1000)
    evidence = honest.evidence(10)
    assert 50 < evidence.novel < 200 and evidence.fraction < 0.5
    assert not thresholds.judge(evidence) and not thresholds.shard(evidence)


def test_the_window_forgets_and_repeats_of_forgotten_queries_are_novel_again() -> None:
    rng = np.random.default_rng(4)
    x, labels = clusters(rng, 40)
    history = History.empty(16)
    assert all(stream(history, x, labels, 1.0, 30))
    assert len(history.labels) == 30
    assert stream(history, x[-5:], labels[-5:], 1.0, 30) == [False] * 5  # still remembered
    assert stream(history, x[:1], labels[:1], 1.0, 30) == [True]  # forgotten


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


def test_a_window_longer_than_the_log_keeps_whole_records() -> None:
    step, dims = 0.5, 4
    size = History.record_size(dims)
    records = [History.encode(np.full(dims, float(i)), i % 10, True, step) for i in range(7)]
    trimmed = b"".join(records)[-(3 * size + 5) :]  # cut inside a record
    history = History.decode(trimmed, dims, step)
    assert history.labels.tolist() == [4, 5, 6]
    assert history.sketches[:, 0].tolist() == [4.0, 5.0, 6.0]

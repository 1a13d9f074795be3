"""The coverage stage's incremental window: the novelty kernel, folding one record at a time
against folding a whole log, and a window rebuilt from a trimmed log through LogViews."""

from __future__ import annotations

import numpy as np
import pytest

from guard._py.coverage import within as twin
from guard.defenses.coverage import STEPS_PER_RADIUS, Window
from guard.state.memory import MemoryStore
from guard.state.views import LogViews

LIMIT = STEPS_PER_RADIUS**2


def stream(rng: np.random.Generator, n: int, dims: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Fixed-point queries: clusters, exact repeats and jittered copies (some near, some not),
    with classes (a few unknown)."""
    centres = rng.integers(-2000, 2000, (10, dims))
    labels = rng.integers(-1, 10, n)
    rows = centres[np.maximum(labels, 0)] + rng.integers(-300, 300, (n, dims))
    for i in range(1, n):
        kind = rng.integers(4)
        if kind == 0:
            rows[i] = rows[rng.integers(max(0, i - 40), i)]  # a repeat, maybe forgotten
        elif kind == 1:
            rows[i] = rows[i - 1] + rng.integers(-20, 21, dims)  # within or near the radius
    return rows.astype(np.int16), labels


def records(rows: np.ndarray, labels: np.ndarray) -> bytes:
    """The log of ``rows`` (already fixed point: a step of 1)."""
    return Window.encode(rows.astype(np.float64), labels, 1.0)


def reference(rows: np.ndarray, window: int) -> list[bool]:
    """Novelty by definition: no row of the ``window`` before it within ``LIMIT``."""
    wide = rows.astype(np.int64)
    out = []
    for i in range(len(rows)):
        earlier = wide[max(0, i - window) : i]
        out.append(bool(earlier.size == 0 or np.min(np.sum((earlier - wide[i]) ** 2, 1)) > LIMIT))
    return out


def test_the_kernel_and_its_twin_agree_at_the_boundary() -> None:
    from guard._native import coverage_within

    rng = np.random.default_rng(0)
    rows = rng.integers(-4, 5, (300, 67)).astype(np.int16)
    for _ in range(200):
        x = rng.integers(-4, 5, 67).astype(np.int16)
        count = int(rng.integers(0, 301))
        exact = int(np.min(np.sum((rows[:count] - x.astype(np.int64)) ** 2, 1), initial=10**9))
        for limit in (exact - 1, exact, exact + 1):
            assert coverage_within(rows, count, x, limit) == twin(rows, count, x, limit)
            assert twin(rows, count, x, limit) == (count > 0 and exact <= limit)
    extreme = np.array([[32767, -32767] * 2048], np.int16)  # no overflow at the widest
    flipped = -extreme[0]
    assert coverage_within(extreme, 1, flipped, 2**62) and not coverage_within(
        extreme, 1, flipped, 4096 * 65534**2 - 1
    )


def test_folding_record_by_record_follows_the_definition() -> None:
    rows, labels = stream(np.random.default_rng(1), 400)
    window = Window(16, 50)
    for i in range(len(rows)):
        window.fold(records(rows[i : i + 1], labels[i : i + 1]))
    novel = reference(rows, 50)
    kept, kept_labels, kept_novel = window.state()
    assert np.array_equal(kept, rows[-50:]) and np.array_equal(kept_labels, labels[-50:])
    assert kept_novel.tolist() == novel[-50:]
    assert 0 < sum(novel[-50:]) < 50  # the stream has both kinds in the end window
    evidence = window.evidence(10)
    assert evidence.queries == 50 and evidence.novel == sum(novel[-50:])
    last = labels[-50:][np.array(novel[-50:])]
    assert evidence.classes.tolist() == np.bincount(last[last >= 0], minlength=10).tolist()
    assert window.total == 400


@pytest.mark.parametrize("batch", [1, 7, 50, 400])
def test_incremental_equals_batch_and_a_trimmed_log_rebuilds_exactly(batch: int) -> None:
    rows, labels = stream(np.random.default_rng(2), 400)
    log = records(rows, labels)
    size = Window.record_size(16)
    whole = Window(16, 50)
    whole.fold(log)
    pieces = Window(16, 50)
    for start in range(0, 400, batch):
        pieces.fold(log[start * size : (start + batch) * size])
    rebuilt = Window(16, 50)
    rebuilt.fold(log[-(2 * 50 + 13) * size :])  # a log trimmed to 2 x window and a little
    for other in (pieces, rebuilt):
        assert all(np.array_equal(a, b) for a, b in zip(whole.state(), other.state(), strict=True))
        mine, theirs = other.evidence(10), whole.evidence(10)
        assert (mine.queries, mine.novel) == (theirs.queries, theirs.novel)
        assert np.array_equal(mine.classes, theirs.classes)
    assert whole.state()[2].tolist() == reference(rows, 50)[-50:]
    short = Window(16, 50)
    short.fold(log[-(50 + 10) * size :])  # kept less than 2 x window: the front differs
    assert not np.array_equal(short.state()[2], whole.state()[2])


async def test_a_view_rebuilt_from_the_store_equals_one_kept_up_to_date() -> None:
    rows, labels = stream(np.random.default_rng(3), 300)
    size, store = Window.record_size(16), MemoryStore()
    kept = LogViews(lambda: Window(16, 40))
    for i in range(len(rows)):
        live = await kept.append(
            store, "k", records(rows[i : i + 1], labels[i : i + 1]), 2 * 40 * size, 60.0
        )
    fresh = LogViews(lambda: Window(16, 40))  # another replica, or this one after eviction
    rebuilt = await fresh.append(store, "k", b"", 2 * 40 * size, 60.0)
    assert len(rebuilt) == 40 and rebuilt.total < live.total  # the log was trimmed
    assert all(np.array_equal(a, b) for a, b in zip(live.state(), rebuilt.state(), strict=True))
    assert live.state()[2].tolist() == reference(rows, 40)[-40:]


def test_records_saturate_and_a_leading_partial_record_is_skipped() -> None:
    data = Window.encode(np.array([[1e9, -1e9], [0.26, -0.74]]), np.array([3, -1]), 0.5)
    window = Window(2, 10)
    window.fold(b"xyz" + data)
    rows, labels, novel = window.state()
    assert rows.tolist() == [[32767, -32767], [1, -1]] and labels.tolist() == [3, -1]
    assert novel.tolist() == [True, True]
    assert window.evidence(2).classes.tolist() == [0, 0]  # class 3 is beyond C = 2

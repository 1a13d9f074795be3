"""Blacklight's inverted index: the compiled kernel against its pure-Python twin."""

from __future__ import annotations

from array import array
from typing import Any

import numpy as np
import pytest

from guard._py.postings import PostingIndex as Twin

try:
    from guard._ext.postings import PostingIndex as Kernel
except ImportError:
    Kernel = None

needs_ext = pytest.mark.skipif(Kernel is None, reason="the Cython extension is not built")
IMPLS = [pytest.param(Twin, id="twin"), pytest.param(Kernel, id="kernel", marks=needs_ext)]


@pytest.mark.parametrize("impl", IMPLS)
def test_shared_counts_the_hashes_each_earlier_query_shares(impl: Any) -> None:
    index = impl()
    index.add(array("Q", [1, 2, 3, 4]), 1, 256)
    index.add(array("Q", [3, 4, 5, 2**64 - 1]), 2, 256)
    assert index.shared(array("Q", [2, 3, 4, 2**64 - 1]), 1) == ([(1, 3), (2, 3)], 3)
    assert index.shared(array("Q", [1, 2, 3]), 2) == ([(1, 3)], 3)
    assert index.shared(array("Q", [9]), 0) == ([], 0)
    assert len(index) == 6 and index.postings(3) == [1, 2] and index.postings(9) == []
    index.remove(array("Q", [1, 2, 3, 4]), 1)
    assert index.postings(3) == [2] and index.postings(1) == [] and len(index) == 4
    index.remove(array("Q", [3]), 7)  # not indexed there: nothing changes
    assert index.postings(3) == [2]


@pytest.mark.parametrize("impl", IMPLS)
def test_postings_keep_the_newest_max_per_hash(impl: Any) -> None:
    index = impl()
    for qid in range(1, 6):
        index.add(np.array([42], dtype=np.uint64), qid, 3)
    assert index.postings(42) == [3, 4, 5]
    index.add([42], 6, 1)  # one posting a hash: the newest replaces them
    assert index.postings(42) == [6]


@needs_ext
@pytest.mark.parametrize("max_per_hash", [1, 2, 3, 256])
def test_kernel_and_twin_agree_through_random_operations(max_per_hash: int) -> None:
    rng = np.random.default_rng(max_per_hash)
    kernel, twin = Kernel(), Twin()
    pool = rng.integers(0, 2**64, 300, dtype=np.uint64)
    alive: dict[int, array[int]] = {}
    for qid in range(1, 500):
        hashes = array("Q", rng.choice(pool, 20, replace=False).tolist())
        threshold = int(rng.integers(0, 6))
        assert kernel.shared(hashes, threshold) == twin.shared(hashes, threshold)
        kernel.add(hashes, qid, max_per_hash)
        twin.add(hashes, qid, max_per_hash)
        alive[qid] = hashes
        if rng.random() < 0.4:
            gone = int(rng.choice(list(alive)))
            kernel.remove(alive[gone], gone)
            twin.remove(alive.pop(gone), gone)
        assert len(kernel) == len(twin)
    assert all(kernel.postings(h) == twin.postings(h) for h in pool.tolist())


@needs_ext
@pytest.mark.parametrize("spacing", [1, 1 << 10, 1 << 40])
def test_kernel_and_twin_agree_when_hashes_crowd_the_same_slots(spacing: int) -> None:
    # Hashes sharing their low bits fall on one probe run of the kernel's table: growth,
    # lookups past other hashes and removal from the middle of a run all keep the postings.
    rng = np.random.default_rng(spacing % 97)
    kernel, twin = Kernel(), Twin()
    pool = (np.arange(1, 400, dtype=np.uint64) * np.uint64(spacing)).tolist()
    alive: dict[int, list[int]] = {}
    for qid in range(1, 1500):
        hashes = [int(h) for h in rng.choice(pool, 8, replace=False)]
        assert kernel.shared(hashes, 1) == twin.shared(hashes, 1)
        kernel.add(hashes, qid, 2)
        twin.add(hashes, qid, 2)
        alive[qid] = hashes
        while len(alive) > 60 or (alive and rng.random() < 0.3):
            gone = int(rng.choice(list(alive)))
            kernel.remove(alive[gone], gone)
            twin.remove(alive.pop(gone), gone)
        assert len(kernel) == len(twin)
    assert all(kernel.postings(h) == twin.postings(h) for h in pool)
    for qid, hashes in alive.items():
        kernel.remove(hashes, qid)
    assert len(kernel) == 0 and all(kernel.postings(h) == [] for h in pool)

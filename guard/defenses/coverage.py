"""Coverage: catch model extraction by natural data (Knockoff Nets) from how much new
ground a client's queries cover.

Knockoff Nets (Orekondy, Schiele, Fritz, CVPR 2019) query the victim with
natural inputs the attacker holds, each once, and train a copy on the answers.
There are no synthetic neighbours for PRADA (Juuti et al., EuroS&P 2019) to see,
and when the attacker's data comes from the victim's own distribution a
distribution test (maximum mean discrepancy against benign data) sees nothing
either: the queries *are* benign data. What an extractor cannot avoid is
volume of *new* inputs spread over the classes: a copy needs many labelled
points, and a repeat or a near repeat teaches it nothing. Honest traffic is
full of exactly those (popular inputs, retries, re-encoded or noisy copies).

Per client, over its last ``window`` queries (the history the caller keeps):

1. A query ``x`` is *novel* when no earlier query of the history lies within
   ``radius`` of it: ``min_{y ∈ H} ||s(x) - s(y)||₂ > radius`` where ``s`` is a
   fixed random projection to at most ``dims`` values (Johnson-Lindenstrauss;
   the identity for small inputs). ``radius`` comes from benign data alone:
   ``scale`` times the ``quantile`` of nearest-neighbour distances between
   distinct reference inputs (:func:`calibrate_radius`), so two different
   natural inputs are almost never "near" and a jittered copy almost always is.
2. Evidence: ``n`` queries in the window, ``k`` of them novel, and ``H`` the
   entropy of the predicted classes of the novel ones over ``log C`` (1: spread
   evenly over all ``C`` classes).
3. Suspicious when ``k ≥ min_novel`` and ``k / n ≥ min_fraction`` and
   ``H ≥ min_entropy`` (an extractor's stream: nearly all new, over all
   classes), or when ``k ≥ max_novel`` whatever the rest (an extractor padding
   its stream with repeats to lower its fraction pays for every one).

Across accounts (:func:`union`): clients whose own evidence already looks like
an extractor's shard (``k ≥ shard_novel``, the fraction and entropy tests
above) are pooled per model; when the pooled novel count of two or more of them
reaches ``min_novel`` each of them is suspicious. A client whose own queries do
not look like a shard is never pooled, so other accounts cannot push it over.

Steps 1 and 2 are incremental (:class:`Window`): a client's queries are an offset log
of raw facts (each query's fixed-point sketch and predicted class, never its novelty),
and this process's :class:`Window` of the log (a :class:`~guard.state.views.LogView`)
derives novelty and the evidence record by record as queries enter and leave the
window: a request costs its own rows, each one scan of the window
(:func:`guard._native.coverage_within`, exact integer arithmetic, abandoned early), not
a decode of the history.

What this cannot tell apart, and we say so: an honest client that sends many
fresh inputs over every class looks exactly like this (Karchmer, "Theoretical
limits of provable security against model extraction by efficient
observational defenses", SaTML 2023).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from guard._native import coverage_within

__all__ = [
    "STEPS_PER_RADIUS",
    "Evidence",
    "Shard",
    "Sketch",
    "Thresholds",
    "Window",
    "calibrate_radius",
    "union",
]

_VALUE = np.dtype("<i2")
STEPS_PER_RADIUS = 64  # the stored sketches' resolution: radius / 64


@dataclass(frozen=True, slots=True)
class Sketch:
    """``s(x)``: a seeded Gaussian projection to ``dims`` values, scaled to keep L2 distances
    in expectation; ``None`` (the identity) when the input has no more than ``dims`` values."""

    matrix: np.ndarray | None  # [D, dims] float32

    @classmethod
    def make(cls, features: int, dims: int, seed: int = 0) -> Sketch:
        if features <= dims:
            return cls(None)
        rng = np.random.default_rng(seed)
        matrix = rng.standard_normal((features, dims)) / np.sqrt(dims)
        return cls(matrix.astype(np.float32))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        return x if self.matrix is None else x @ self.matrix


_LABEL = np.dtype("<i4")  # a Window record's predicted class; -1: unknown
MAX_LABEL = 1 << 20  # classes at or above this are counted as unknown
_ONE_LABEL = struct.Struct("<i")


class Window:
    """A client's newest ``window`` queries, derived from its log one record at a time.

    Records (:meth:`encode`): the predicted class (little-endian i4, -1: unknown), then the
    query's sketch in fixed point, multiples of ``step = radius / STEPS_PER_RADIUS``
    (little-endian i2, saturating at ±32,767). :meth:`fold` takes each record in log
    order: it is novel when no row of the window before it (the ``window`` records that
    precede it) lies within ``STEPS_PER_RADIUS`` steps (squared distance at most
    ``STEPS_PER_RADIUS²``, in exact integers: the same answer on every replica and
    machine), then it joins the window and the oldest record leaves; the novel count and
    the novel records' class counts change by the record entering and the one leaving.

    So the state after the records of a log depends on the records alone, folded one at a
    time or all at once: a window rebuilt from a log that kept at least ``2 × window``
    records (every record of the window then has all its predecessors) equals one folded
    request by request (:meth:`state` compares them). Folding ``n`` records costs at most
    ``min(n, window)`` scans: records that leave again within the same fold are only
    counted (their novelty can no longer matter), and those older than ``2 × window``
    records before the end are skipped. ``total`` counts every record folded (the log's
    lifetime when folded from its start; the kept log when rebuilt from a trimmed one).
    """

    __slots__ = (
        "dims",
        "window",
        "limit",
        "total",
        "novel_count",
        "_record",
        "_rows",
        "_labels",
        "_novel",
        "_classes",
        "_count",
        "_head",
    )

    def __init__(self, dims: int, window: int, *, limit: int = STEPS_PER_RADIUS**2) -> None:
        if dims < 1 or window < 1:
            raise ValueError("a Window needs dims >= 1 and window >= 1")
        self.dims, self.window, self.limit = dims, window, limit
        self.total = 0  # records folded
        self.novel_count = 0  # novel records in the window
        self._record = Window.record_dtype(dims)
        capacity = min(window, 64)  # grows by doubling up to ``window``
        self._rows = np.empty((capacity, dims), np.int16)
        self._labels = np.empty(capacity, np.int32)
        self._novel = np.zeros(capacity, bool)
        self._classes: list[int] = []  # novel records in the window, per class
        self._count = 0  # records in the window
        self._head = 0  # the oldest record's slot once the window is full

    @staticmethod
    def record_dtype(dims: int) -> np.dtype:
        return np.dtype([("label", _LABEL), ("values", _VALUE, (dims,))])

    @staticmethod
    def record_size(dims: int) -> int:
        """Bytes of one record."""
        return _LABEL.itemsize + dims * _VALUE.itemsize

    @staticmethod
    def encode(sketches: np.ndarray, labels: np.ndarray, step: float) -> bytes:
        """The records of queries ``sketches`` ``[n, dims]`` with predicted ``labels``."""
        fixed = np.divide(sketches, step, dtype=np.float64)
        np.rint(fixed, out=fixed)
        np.maximum(fixed, -32767, out=fixed)  # saturating (np.clip costs more per call)
        np.minimum(fixed, 32767, out=fixed)
        if len(fixed) == 1:  # one query (most requests): no interleaving needed
            return _ONE_LABEL.pack(int(labels[0])) + fixed.astype(_VALUE).tobytes()
        header = np.asarray(labels, _LABEL).view(_VALUE).reshape(len(fixed), 2)
        return np.concatenate((header, fixed.astype(_VALUE)), axis=1).tobytes()

    @property
    def nbytes(self) -> int:
        return self._rows.nbytes + self._labels.nbytes + self._novel.nbytes + 8 * len(self._classes)

    def __len__(self) -> int:
        return self._count

    def fold(self, records: bytes) -> None:
        """Take in ``records`` (whole records, oldest first; a leading partial one is skipped)."""
        size = self._record.itemsize
        if len(records) == size:  # one record (most requests): no structured decode
            row = np.frombuffer(records, _VALUE, offset=_LABEL.itemsize)
            novel = not coverage_within(self._rows, self._count, row, self.limit)
            self._push(row, _ONE_LABEL.unpack_from(records)[0], novel)
            return
        raw = np.frombuffer(records, self._record, offset=len(records) % size)
        n = len(raw)
        skip, quiet = max(0, n - 2 * self.window), max(0, n - self.window)
        self.total += skip
        values, labels = raw["values"], raw["label"].tolist()
        if self._count == 0 and quiet > skip:  # a rebuild: the leaving ones in one copy
            self._fill(values[skip:quiet], raw["label"][skip:quiet])
            self.total += quiet - skip
            skip = quiet
        for i in range(skip, n):
            row = values[i]
            novel = i >= quiet and not coverage_within(self._rows, self._count, row, self.limit)
            self._push(row, labels[i], novel)

    def _push(self, row: np.ndarray, label: int, novel: bool) -> None:
        if self._count == self.window:  # the oldest leaves
            slot = self._head
            self._head = (slot + 1) % self.window
            if self._novel[slot]:
                self._count_novel(int(self._labels[slot]), -1)
        else:
            slot = self._count
            if slot == len(self._labels):
                self._grow()
            self._count += 1
        self._rows[slot] = row
        self._labels[slot] = label
        self._novel[slot] = novel
        if novel:
            self._count_novel(label, 1)
        self.total += 1

    def _fill(self, rows: np.ndarray, labels: np.ndarray) -> None:
        """An empty window's first records, none novel (they leave within the fold)."""
        while len(self._labels) < len(rows):
            self._grow()
        count = len(rows)
        self._rows[:count] = rows
        self._labels[:count] = labels
        self._novel[:count] = False
        self._count, self._head = count, 0

    def _count_novel(self, label: int, change: int) -> None:
        self.novel_count += change
        if 0 <= label < MAX_LABEL:
            if label >= len(self._classes):
                self._classes.extend([0] * (label + 1 - len(self._classes)))
            self._classes[label] += change

    def _grow(self) -> None:
        capacity = min(self.window, 2 * len(self._labels))
        rows = np.empty((capacity, self.dims), np.int16)
        rows[: self._count] = self._rows[: self._count]
        labels = np.empty(capacity, np.int32)
        labels[: self._count] = self._labels[: self._count]
        novel = np.zeros(capacity, bool)
        novel[: self._count] = self._novel[: self._count]
        self._rows, self._labels, self._novel = rows, labels, novel

    def evidence(self, classes: int) -> Evidence:
        """Step 2 over the window, the novel records' classes cut or padded to ``classes``."""
        counts = self._classes[:classes]
        counts = counts + [0] * (classes - len(counts))
        return Evidence(self._count, self.novel_count, np.array(counts, np.int64))

    def state(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The window oldest first: fixed-point rows, classes and novelty."""
        order = (np.arange(self._count) + self._head) % max(self._count, 1)
        return self._rows[order], self._labels[order], self._novel[order]


def calibrate_radius(reference: np.ndarray, *, quantile: float = 0.01, scale: float = 0.5) -> float:
    """``scale`` times the ``quantile`` of the nearest-neighbour distances between the distinct
    rows of ``reference`` (sketched benign inputs; exact duplicates are dropped first)."""
    rows = np.unique(np.asarray(reference, dtype=np.float64), axis=0)
    if rows.shape[0] < 2:
        raise ValueError("calibrate_radius needs at least 2 distinct reference rows")
    if not (0.0 < quantile < 1.0 and scale > 0.0):
        raise ValueError("quantile must be in (0, 1) and scale > 0")
    squared = np.sum(rows * rows, axis=1)
    best = np.full(rows.shape[0], np.inf)
    for start in range(0, rows.shape[0], 512):  # bounded memory for large references
        block = rows[start : start + 512]
        d2 = squared[start : start + 512, None] + squared[None, :] - 2.0 * block @ rows.T
        d2[np.arange(block.shape[0]), np.arange(start, start + block.shape[0])] = np.inf
        best[start : start + 512] = np.min(d2, axis=1)
    return float(scale * np.quantile(np.sqrt(np.maximum(best, 0.0)), quantile))


@dataclass(frozen=True, slots=True)
class Evidence:
    """Step 2: queries in the window, how many were novel, and the novel ones' class counts."""

    queries: int
    novel: int
    classes: np.ndarray  # [C] int

    @property
    def fraction(self) -> float:
        return self.novel / self.queries if self.queries else 0.0

    @property
    def entropy(self) -> float:
        """Entropy of the novel queries' classes over ``log C``: 0 (one class) to 1 (even)."""
        if len(self.classes) > 64:  # many classes: vectorised
            total = int(self.classes.sum())
            if total == 0:
                return 0.0
            p = self.classes[self.classes > 0] / total
            return float(-np.sum(p * np.log(p)) / np.log(len(self.classes)))
        counts = self.classes.tolist()  # a few: per request, cheaper in plain floats
        total = sum(counts)
        if total == 0 or len(counts) < 2:
            return 0.0
        h = 0.0
        for c in counts:
            if c > 0:
                h -= c / total * math.log(c / total)
        return h / math.log(len(counts))


@dataclass(frozen=True, kw_only=True, slots=True)
class Thresholds:
    """Step 3's thresholds (see the module docstring)."""

    min_novel: int = 150
    min_fraction: float = 0.9
    min_entropy: float = 0.7
    max_novel: int = 600
    shard_novel: int = 50

    def __post_init__(self) -> None:
        if not 1 <= self.shard_novel <= self.min_novel <= self.max_novel:
            raise ValueError("need 1 <= shard_novel <= min_novel <= max_novel")
        if not (0.0 < self.min_fraction <= 1.0 and 0.0 <= self.min_entropy <= 1.0):
            raise ValueError("min_fraction must be in (0, 1], min_entropy in [0, 1]")

    def spread(self, evidence: Evidence) -> bool:
        """Nearly all new, over the classes: the shape of an extractor's stream."""
        return evidence.fraction >= self.min_fraction and evidence.entropy >= self.min_entropy

    def judge(self, evidence: Evidence) -> bool:
        """Whether one client's own evidence is suspicious."""
        if evidence.novel >= self.max_novel:
            return True
        return evidence.novel >= self.min_novel and self.spread(evidence)

    def shard(self, evidence: Evidence) -> bool:
        """Whether a client's own evidence makes it a candidate shard of a split extraction."""
        return evidence.novel >= self.shard_novel and self.spread(evidence)


@dataclass(frozen=True, slots=True)
class Shard:
    """One client's evidence as the model-wide pool keeps it."""

    client: str
    at: float
    evidence: Evidence


def union(shards: Sequence[Shard], thresholds: Thresholds, *, since: float) -> Evidence | None:
    """The pooled evidence of the candidate shards seen at or after ``since`` (each client's
    newest entry), or ``None`` when fewer than two of them remain or their pooled evidence is
    not suspicious."""
    newest: dict[str, Shard] = {}
    for shard in shards:
        if shard.at >= since and thresholds.shard(shard.evidence):
            kept = newest.get(shard.client)
            if kept is None or shard.at >= kept.at:
                newest[shard.client] = shard
    if len(newest) < 2:
        return None
    pooled = Evidence(
        sum(s.evidence.queries for s in newest.values()),
        sum(s.evidence.novel for s in newest.values()),
        np.sum([s.evidence.classes for s in newest.values()], axis=0),
    )
    if pooled.novel >= thresholds.min_novel and thresholds.spread(pooled):
        return pooled
    return None

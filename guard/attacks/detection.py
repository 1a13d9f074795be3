"""How often a defence caught an attack, read from a target's query log."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from guard.attacks.targets import QueryLog


@dataclass(frozen=True, slots=True)
class Detection:
    """Detection over an attack's units (samples, classes, a run), each a span of queries.

    ``first_queries`` holds, for each detected unit, the 1-based index within the
    unit of its first detected query.
    """

    units: int
    first_queries: tuple[int, ...]
    queries: int
    detected_queries: int
    refused_queries: int

    @property
    def detected_fraction(self) -> float | None:
        return len(self.first_queries) / self.units if self.units else None

    @property
    def first_detection_query(self) -> float | None:
        """Median first-detection index over detected units; None when never detected."""
        return float(np.median(self.first_queries)) if self.first_queries else None

    @property
    def refused_fraction(self) -> float | None:
        return self.refused_queries / self.queries if self.queries else None

    def summary(self) -> dict[str, float | int | None]:
        return {
            "detected_fraction": self.detected_fraction,
            "first_detection_query": self.first_detection_query,
            "detected_query_fraction": self.detected_queries / self.queries
            if self.queries
            else None,
            "refused_fraction": self.refused_fraction,
        }


def detection(log: QueryLog, spans: Sequence[tuple[int, int]]) -> Detection:
    """Detection of the units whose queries are the log rows ``[start, end)`` of ``spans``."""
    first: list[int] = []
    queries = detected = refused = 0
    for start, end in spans:
        hits = log.detected(start, end)
        queries += end - start
        detected += int(hits.sum())
        refused += int(log.refused(start, end).sum())
        if hits.any():
            first.append(int(np.argmax(hits)) + 1)
    return Detection(len(spans), tuple(first), queries, detected, refused)

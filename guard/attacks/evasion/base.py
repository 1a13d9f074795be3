"""Running a black-box evasion attack sample by sample, and what a run measured.

Each sample gets its own :class:`~guard.attacks.budget.Oracle`. Its first query
is the clean input: a sample the target already gets wrong (or refuses) is not
attacked and counts in no rate. The attack then searches until it meets its
goal or the budget runs out; :class:`Progress` keeps what it found either way.
Perturbation norms are in input units (pixel values for digits).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np

from guard.attacks.budget import BudgetExhausted, Oracle
from guard.attacks.detection import detection
from guard.attacks.targets import Target

CURVE_POINTS = 25  # geometrically spaced, for log-scale plots


class Progress:
    """The best input an attack has found on one sample and when it first met its goal."""

    __slots__ = ("oracle", "success_query", "x_adv")

    def __init__(self, oracle: Oracle) -> None:
        self.oracle = oracle
        self.x_adv: np.ndarray | None = None
        self.success_query: int | None = None

    def found(self, x: np.ndarray, *, success: bool) -> None:
        """Record ``x`` (adversarial) as the best so far; ``success`` if it meets the goal."""
        self.x_adv = x.copy()
        if success and self.success_query is None:
            self.success_query = self.oracle.used


class EvasionAttack(Protocol):
    name: ClassVar[str]

    def run(
        self,
        oracle: Oracle,
        x0: np.ndarray,
        y0: int,
        scores0: np.ndarray,
        rng: np.random.Generator,
        progress: Progress,
    ) -> None:
        """Search from ``x0`` (true label ``y0``, target scores ``scores0``) until the goal
        is met (return) or the budget runs out (:class:`BudgetExhausted` propagates)."""
        ...


def margin(scores: np.ndarray, y: int) -> np.ndarray:
    """``log p_y - max_{j != y} log p_j`` per row (the logit margin; < 0: misclassified).

    Refused rows (NaN scores) get ``+inf``: never an improvement.
    """
    logp = np.log(np.maximum(scores, 1e-300))
    others = np.delete(logp, y, axis=1).max(axis=1)
    out = logp[:, y] - others
    return np.where(np.isnan(out), np.inf, out)


@dataclass(frozen=True, slots=True)
class EvasionSample:
    index: int  # row of the inputs given to run_evasion
    label: int
    attacked: bool  # False: the clean input was already misclassified or refused
    success: bool
    queries: int
    success_query: int | None
    l2: float | None  # of the best adversarial found, if any
    linf: float | None
    first_detection: int | None
    refused: int
    x_adv: np.ndarray | None = field(repr=False)


@dataclass(frozen=True, slots=True)
class EvasionRun:
    attack: str
    params: dict[str, Any]
    budget: int
    samples: tuple[EvasionSample, ...]
    spans: tuple[tuple[int, int], ...]  # query-log rows of each attacked sample
    seconds: float

    @property
    def attacked(self) -> list[EvasionSample]:
        return [s for s in self.samples if s.attacked]

    def success_curve(self, points: int = CURVE_POINTS) -> dict[str, list[float]]:
        """Success rate against the queries spent per sample, up to the budget."""
        attacked = self.attacked
        grid = np.unique(np.geomspace(1, self.budget, points).round().astype(int))
        when = np.array([s.success_query if s.success else np.inf for s in attacked], dtype=float)
        rate = [(float(np.mean(when <= q)) if attacked else 0.0) for q in grid]
        return {"queries": grid.tolist(), "success_rate": rate}

    def summary(self, target: Target) -> dict[str, Any]:
        attacked = self.attacked
        wins = [s for s in attacked if s.success]
        caught_first = [
            s
            for s in wins
            if s.first_detection is not None and s.first_detection <= (s.success_query or 0)
        ]
        return {
            "attack": self.attack,
            "family": "evasion",
            "unit": "sample",
            "units": len(attacked),
            "skipped": len(self.samples) - len(attacked),
            "success_rate": len(wins) / len(attacked) if attacked else None,
            "queries": _median([s.queries for s in attacked]),
            "queries_to_success": _median([s.success_query for s in wins]),
            "l2": _median([s.l2 for s in wins]),
            "linf": _median([s.linf for s in wins]),
            **detection(target.log, self.spans).summary(),
            "detected_before_success": len(caught_first) / len(wins) if wins else None,
            "budget": self.budget,
            "params": self.params,
            "curve": self.success_curve(),
            "seconds": round(self.seconds, 3),
        }


def _median(values: list[Any]) -> float | None:
    return float(np.median(values)) if values else None


def _not_attacked(index: int, label: int, *, refused: int) -> EvasionSample:
    return EvasionSample(
        index=index,
        label=label,
        attacked=False,
        success=False,
        queries=1,
        success_query=None,
        l2=None,
        linf=None,
        first_detection=None,
        refused=refused,
        x_adv=None,
    )


def run_evasion(
    attack: EvasionAttack,
    target: Target,
    x: np.ndarray,
    y: np.ndarray,
    *,
    budget: int,
    rng: np.random.Generator,
) -> EvasionRun:
    """Attack each row of ``x`` (true labels ``y``) with at most ``budget`` queries."""
    started = time.perf_counter()
    samples: list[EvasionSample] = []
    spans: list[tuple[int, int]] = []
    for i, (x0, y0) in enumerate(zip(np.asarray(x, dtype=np.float64), np.asarray(y), strict=True)):
        oracle = Oracle(target, budget)
        clean = oracle.ask(x0[None])
        if not clean.answered[0] or clean.labels[0] != y0:
            samples.append(_not_attacked(i, int(y0), refused=int(not clean.answered[0])))
            continue
        progress = Progress(oracle)
        with contextlib.suppress(BudgetExhausted):  # the budget ends the search, not the run
            attack.run(oracle, x0, int(y0), clean.scores[0], rng, progress)
        spans.append(oracle.span)
        found = detection(target.log, [oracle.span])
        delta = None if progress.x_adv is None else progress.x_adv - x0
        samples.append(
            EvasionSample(
                index=i,
                label=int(y0),
                attacked=True,
                success=progress.success_query is not None,
                queries=oracle.used,
                success_query=progress.success_query,
                l2=None if delta is None else float(np.linalg.norm(delta)),
                linf=None if delta is None else float(np.abs(delta).max()),
                first_detection=found.first_queries[0] if found.first_queries else None,
                refused=found.refused_queries,
                x_adv=progress.x_adv,
            )
        )
    return EvasionRun(
        attack=attack.name,
        params=dataclasses.asdict(attack) if dataclasses.is_dataclass(attack) else {},
        budget=budget,
        samples=tuple(samples),
        spans=tuple(spans),
        seconds=time.perf_counter() - started,
    )

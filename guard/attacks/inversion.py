"""Model inversion from scores alone: reconstruct what a class looks like.

A black-box variant of Fredrikson, Jha, Ristenpart. "Model Inversion Attacks
that Exploit Confidence Information and Basic Countermeasures." CCS 2015
(MI-Face). Fredrikson et al. descend the gradient of ``1 - p_c(x)``; without
gradients we estimate ``grad log p_c`` by NES (:mod:`guard.attacks.nes`) and
ascend it from a blank input with normalised steps, a small L2 pull back toward
the start (the prior), and every input clipped to the valid range.

Judged against real data the attacker never saw: the centred cosine similarity
(mean of all classes subtracted) of the reconstruction of class ``c`` to the
mean of class ``c``'s held-out inputs, against its mean similarity to the other
classes' means (the baseline); a class is *identified* when its own mean is the
most similar. ``success_rate`` is the identified fraction (chance: ``1 / C``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from guard.attacks.budget import BudgetExhausted, Oracle
from guard.attacks.detection import detection
from guard.attacks.nes import nes_gradient
from guard.attacks.targets import Target


@dataclass(frozen=True, slots=True)
class ClassInversion:
    label: int
    x: np.ndarray
    confidence: float  # the target's p_c of the reconstruction (NaN: refused)
    own: float  # centred cosine to the class's mean
    other: float  # mean centred cosine to the other classes' means
    identified: bool
    span: tuple[int, int]


@dataclass(frozen=True, slots=True)
class InversionRun:
    attack: str
    params: dict[str, Any]
    budget: int
    classes: tuple[ClassInversion, ...]
    seconds: float

    def summary(self, target: Target) -> dict[str, Any]:
        spans = [c.span for c in self.classes]
        return {
            "attack": self.attack,
            "family": "inversion",
            "unit": "class",
            "units": len(self.classes),
            "success_rate": float(np.mean([c.identified for c in self.classes])),
            "queries": float(np.median([end - start for start, end in spans])),
            "similarity": float(np.mean([c.own for c in self.classes])),
            "baseline_similarity": float(np.mean([c.other for c in self.classes])),
            "confidence": float(np.nanmean([c.confidence for c in self.classes]))
            if not np.all(np.isnan([c.confidence for c in self.classes]))
            else None,
            **detection(target.log, spans).summary(),
            "budget": self.budget,
            "params": self.params,
            "seconds": round(self.seconds, 3),
        }


def centred_cosine(x: np.ndarray, means: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Cosine similarity of ``x - centre`` to each row of ``means - centre``."""
    a = x - centre
    b = means - centre
    return (b @ a) / (np.linalg.norm(b, axis=1) * np.linalg.norm(a) + 1e-12)


@dataclass(frozen=True, kw_only=True, slots=True)
class Inversion:
    pairs: int = 20  # NES antithetic pairs per step (2 * pairs queries)
    sigma: float = 0.1  # NES probe radius, fraction of the input range
    lr: float = 0.05  # RMS change per feature per step, fraction of the input range
    prior: float = 0.01  # weight of the L2 pull toward the blank start
    name: ClassVar[str] = "inversion"

    def reconstruct(
        self, target: Target, c: int, budget: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, Oracle]:
        """Ascend ``log p_c`` within ``budget`` queries; returns the input and its oracle."""
        spec = target.spec
        span = spec.hi - spec.lo
        start = np.broadcast_to(spec.lo, (spec.n_features,)).astype(np.float64)
        oracle = Oracle(target, budget)

        def objective(rows: np.ndarray) -> np.ndarray:
            scores = oracle.ask(rows).scores[:, c]
            return np.log(np.maximum(scores, 1e-300))

        x = start.copy()
        d = x.size
        with contextlib.suppress(BudgetExhausted):  # the budget ends the ascent
            while True:
                g = nes_gradient(
                    objective,
                    x,
                    pairs=self.pairs,
                    sigma=self.sigma * float(np.mean(span)),
                    rng=rng,
                    lo=spec.lo,
                    hi=spec.hi,
                )
                g = g / (np.linalg.norm(g) + 1e-12) - self.prior * (x - start) / span
                x = spec.clip(x + self.lr * span * np.sqrt(d) * g / (np.linalg.norm(g) + 1e-12))
        return x, oracle

    def run(
        self,
        target: Target,
        evaluation_x: np.ndarray,
        evaluation_y: np.ndarray,
        *,
        budget: int,
        rng: np.random.Generator,
    ) -> InversionRun:
        """Invert every class with ``budget`` queries each (one of them checks the result)."""
        if budget < 2:
            raise ValueError(f"inversion needs a budget of at least 2 per class; got {budget}")
        started = time.perf_counter()
        c_count = target.spec.n_classes
        means = np.stack([evaluation_x[evaluation_y == k].mean(axis=0) for k in range(c_count)])
        centre = evaluation_x.mean(axis=0)
        results = []
        for c in range(c_count):
            x, oracle = self.reconstruct(target, c, budget - 1, rng)
            confidence = float(target.query(x[None]).scores[0, c])
            similarity = centred_cosine(x, means, centre)
            others = np.delete(similarity, c)
            results.append(
                ClassInversion(
                    label=c,
                    x=x,
                    confidence=confidence,
                    own=float(similarity[c]),
                    other=float(others.mean()),
                    identified=bool(similarity.argmax() == c),
                    span=(oracle.start, target.queries),
                )
            )
        return InversionRun(
            self.name,
            dataclasses.asdict(self),
            budget,
            tuple(results),
            time.perf_counter() - started,
        )

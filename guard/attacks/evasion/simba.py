"""SimBA (pixel basis), untargeted: a score-based coordinate search.

Guo, Gardner, You, Wilson, Weinberger. "Simple Black-box Adversarial Attacks."
ICML 2019.

Walk the pixels in a random order; for each, try ``x - epsilon q`` and, if that
does not lower the true class's score, ``x + epsilon q`` (``q`` the pixel's
basis vector); keep the first that lowers it. Each step changes one pixel by
``epsilon``, so after ``T`` accepted steps the L2 norm is at most
``sqrt(T) * epsilon``. When every pixel was tried, a new random order starts.

We compare the margin ``log p_y - max_{j != y} log p_j`` instead of ``p_y``: the
float32 probabilities of a confident model round to exactly 1.0 and would hide
every improvement. Goal: a misclassified input (its norms are reported); every
query stays in the target's range. A refused query is not an improvement.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from guard.attacks.budget import Oracle
from guard.attacks.evasion.base import Progress, margin


@dataclass(frozen=True, kw_only=True, slots=True)
class SimBA:
    epsilon: float  # step per pixel, input units
    name: ClassVar[str] = "simba"

    def __post_init__(self) -> None:
        if self.epsilon <= 0:
            raise ValueError(f"SimBA epsilon must be > 0; got {self.epsilon}")

    def run(
        self,
        oracle: Oracle,
        x0: np.ndarray,
        y0: int,
        scores0: np.ndarray,
        rng: np.random.Generator,
        progress: Progress,
    ) -> None:
        spec = oracle.spec
        lo = np.broadcast_to(spec.lo, x0.shape)
        hi = np.broadcast_to(spec.hi, x0.shape)
        x = x0.copy()
        loss = margin(scores0[None], y0)[0]
        while True:
            before = oracle.used
            for i in rng.permutation(x.size):
                for step in (-self.epsilon, self.epsilon):
                    value = min(max(x[i] + step, lo[i]), hi[i])
                    if value == x[i]:
                        continue  # clipped to no change: no query
                    candidate = x.copy()
                    candidate[i] = value
                    answers = oracle.ask(candidate[None])
                    new = margin(answers.scores, y0)[0]
                    if new < loss:
                        x, loss = candidate, new
                        if answers.labels[0] != y0:
                            progress.found(x, success=True)
                            return
                        break
            if oracle.used == before:
                return  # no pixel can move: nothing left to try

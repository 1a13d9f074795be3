"""HopSkipJump, L2, untargeted: a decision-based attack that needs only labels.

Chen, Jordan, Wainwright. "HopSkipJumpAttack: A Query-Efficient Decision-Based
Attack." IEEE S&P 2020. Reference code: Jianbo Chen's ``hsja.py``.

Start from a random input the target already misclassifies, move it to the
decision boundary by binary search toward the clean input, then repeat:
estimate the boundary's normal from ``B_t`` label queries around the boundary
point (a Monte Carlo average of random unit directions signed by the decision,
baseline-corrected), step along it with a geometrically shrinking step until
still adversarial, and binary-search back toward the clean input. Paper
notation: ``theta = gamma / d^{3/2}`` (binary-search tolerance, in blend
units), ``delta_t = sqrt(d) * theta * d_{t-1}`` (probe radius; ``0.1 *`` the
input range at ``t = 1``), ``B_t = B_0 * sqrt(t)`` capped at ``max_evals``,
step ``xi_t = d_{t-1} / sqrt(t)``.

Goal: an adversarial input within L2 distance ``epsilon`` of the clean one (input
units). A refused query reads as "not adversarial". Every input stays in the
target's range.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from guard.attacks.budget import Oracle
from guard.attacks.evasion.base import Progress

MAX_HALVINGS = 30
Decision = Callable[[np.ndarray], np.ndarray]  # rows -> adversarial?


@dataclass(frozen=True, kw_only=True, slots=True)
class HopSkipJump:
    epsilon: float  # success radius (L2, input units)
    init_evals: int = 100  # B_0
    max_evals: int = 10_000
    gamma: float = 1.0
    init_tries: int = 100  # random inputs tried to find a first adversarial one
    name: ClassVar[str] = "hopskipjump"

    def __post_init__(self) -> None:
        if self.epsilon <= 0 or self.init_evals < 1 or self.gamma <= 0 or self.init_tries < 1:
            raise ValueError(f"invalid HopSkipJump parameters: {self}")

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

        def adversarial(x: np.ndarray) -> np.ndarray:
            answers = oracle.ask(x)
            return answers.answered & (answers.labels != y0)

        d = x0.size
        theta = self.gamma / (d * np.sqrt(d))
        x = self._initialize(adversarial, x0, spec.lo, spec.hi, rng)
        if x is None:
            return
        x = _binary_search(adversarial, x0, x, theta)
        dist = float(np.linalg.norm(x - x0))
        best = dist
        progress.found(x, success=dist <= self.epsilon)
        t = 0
        while best > self.epsilon:
            t += 1
            delta = 0.1 * float(np.mean(spec.hi - spec.lo)) if t == 1 else np.sqrt(d) * theta * dist
            evals = min(int(self.init_evals * np.sqrt(t)), self.max_evals)
            direction = _gradient_direction(adversarial, x, evals, delta, spec.lo, spec.hi, rng)
            step = dist / np.sqrt(t)
            for _ in range(MAX_HALVINGS):
                candidate = np.clip(x + step * direction, spec.lo, spec.hi)
                if adversarial(candidate[None])[0]:
                    x = _binary_search(adversarial, x0, candidate, theta)
                    break
                step /= 2
            dist = float(np.linalg.norm(x - x0))
            if dist < best:
                best = dist
                progress.found(x, success=dist <= self.epsilon)

    def _initialize(
        self,
        adversarial: Decision,
        x0: np.ndarray,
        lo: np.ndarray,
        hi: np.ndarray,
        rng: np.random.Generator,
    ) -> np.ndarray | None:
        """A uniformly random input the target misclassifies (one query per try)."""
        for _ in range(self.init_tries):
            noise = rng.uniform(lo, hi, size=x0.shape)
            if adversarial(noise[None])[0]:
                return noise
        return None


def _binary_search(
    adversarial: Decision, x0: np.ndarray, x_adv: np.ndarray, theta: float
) -> np.ndarray:
    """The blend ``(1 - a) x0 + a x_adv`` closest to ``x0`` that is still adversarial,
    to within ``theta`` in ``a``."""
    low, high = 0.0, 1.0
    while high - low > theta:
        mid = (low + high) / 2
        if adversarial(((1 - mid) * x0 + mid * x_adv)[None])[0]:
            high = mid
        else:
            low = mid
    return (1 - high) * x0 + high * x_adv


def _gradient_direction(
    adversarial: Decision,
    x: np.ndarray,
    evals: int,
    delta: float,
    lo: np.ndarray,
    hi: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Unit estimate of the boundary normal at ``x`` (pointing to the adversarial side)."""
    u = rng.standard_normal((evals, x.size))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    probes = np.clip(x + delta * u, lo, hi)
    u = (probes - x) / delta
    phi = np.where(adversarial(probes), 1.0, -1.0)
    mean = phi.mean()
    if mean == 1.0:
        grad = u.mean(axis=0)
    elif mean == -1.0:
        grad = -u.mean(axis=0)
    else:
        grad = ((phi - mean)[:, None] * u).mean(axis=0)
    norm = np.linalg.norm(grad)
    return grad / norm if norm > 0 else grad

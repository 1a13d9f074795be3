"""A target seen through one attack unit's query budget."""

from __future__ import annotations

import numpy as np

from guard.attacks.targets import Answers, Target, TargetSpec


class BudgetExhausted(Exception):
    """The next batch would exceed the budget; it was not sent."""


class Oracle:
    """Queries ``target`` for one unit of an attack (a sample, a class, a run).

    Guarantees: at most ``budget`` rows are sent through this oracle; a batch
    that does not fit raises :class:`BudgetExhausted` before anything is sent.
    """

    def __init__(self, target: Target, budget: int) -> None:
        if budget < 1:
            raise ValueError(f"budget must be >= 1; got {budget}")
        self.target = target
        self.budget = budget
        self.start = target.queries

    @property
    def spec(self) -> TargetSpec:
        return self.target.spec

    @property
    def used(self) -> int:
        return self.target.queries - self.start

    @property
    def remaining(self) -> int:
        return self.budget - self.used

    @property
    def span(self) -> tuple[int, int]:
        """The target's query-log rows this oracle sent, as ``[start, end)``."""
        return self.start, self.target.queries

    def ask(self, x: np.ndarray) -> Answers:
        if len(x) > self.remaining:
            raise BudgetExhausted(f"{len(x)} queries asked, {self.remaining} left")
        return self.target.query(x)

"""Per-client privacy budgets: what each answer costs, and when a client has had enough.

Composition
-----------
* Laplace answers are ε-DP each; over a client's answers the ε add up (basic
  composition: ``k`` answers at ε are ``kε``-DP). Budgets and spending are in ε.
* Gaussian answers are ρ-zCDP each (``ρ = Δ₂²/(2σ²)``); ρ adds up exactly
  (Bun & Steinke, TCC 2016, Lemma 2.3). Spending is in ρ; for reporting and for
  budgets written in ε, ρ converts to (ε, δ)-DP by their Proposition 1.3::

      ε(ρ, δ) = ρ + 2 √(ρ ln(1/δ))

  and a budget of ε at δ is the largest ρ with ``ε(ρ, δ) <= ε``:
  ``ρ = (√(ln(1/δ) + ε) - √(ln(1/δ)))²``.

Units and atomicity
-------------------
Budgets live in the shared state store in integer micro-units (10⁻⁶ ε or ρ):
costs are rounded up and limits down, so rounding never grants more than the
budget. One :meth:`Accountant.charge` is one atomic ``spend`` (all or nothing),
so concurrent requests and several guard replicas on one Redis never overspend.

Windows are fixed and aligned to the epoch (``per: 1d`` resets at 00:00 UTC),
so the time to reset is known without asking the store; without a window the
budget is for the client's lifetime (as long as the store keeps it: a bounded
memory store may evict idle clients; Redis keeps them).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from guard.defenses.privacy import Unit
from guard.state.base import client_key

MICRO = 1_000_000


class BudgetStore(Protocol):
    """The one state-store operation the accountant needs (see :mod:`guard.state`)."""

    async def spend(
        self, key: str, amount: int, limit: int, window_s: float | None
    ) -> tuple[bool, int]: ...


def zcdp_epsilon(rho: float, delta: float) -> float:
    """The ε of (ε, δ)-DP implied by ρ-zCDP: ``ρ + 2√(ρ ln(1/δ))``."""
    _check_delta(delta)
    if rho < 0:
        raise ValueError(f"rho must be >= 0; got {rho}")
    return rho + 2.0 * math.sqrt(rho * math.log(1.0 / delta))


def zcdp_rho(epsilon: float, delta: float) -> float:
    """The largest ρ whose :func:`zcdp_epsilon` at ``delta`` is at most ``epsilon``."""
    _check_delta(delta)
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0; got {epsilon}")
    log_term = math.log(1.0 / delta)
    return (math.sqrt(log_term + epsilon) - math.sqrt(log_term)) ** 2


def to_micro(amount: float, *, round_up: bool) -> int:
    """``amount`` in micro-units: costs round up, limits down (never in the client's favour)."""
    scaled = round(amount * MICRO, 6)  # drop float noise such as 0.1 * 1e6 = 100000.00000000001
    return math.ceil(scaled) if round_up else math.floor(scaled)


def _check_delta(delta: float) -> None:
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1); got {delta}")


@dataclass(frozen=True, kw_only=True, slots=True)
class Budget:
    """How much privacy loss a client may incur per window, in the mechanism's unit."""

    unit: Unit
    limit: float  # ε for unit "epsilon", ρ for unit "rho"
    window_s: float | None  # None: never resets
    delta: float | None = None  # for unit "rho": the δ at which ε is reported

    def __post_init__(self) -> None:
        if self.unit not in ("epsilon", "rho"):
            raise ValueError(f"unit must be epsilon or rho; got {self.unit!r}")
        if not self.limit > 0:
            raise ValueError(f"limit must be > 0; got {self.limit}")
        if self.window_s is not None and not self.window_s >= 1.0:
            raise ValueError(f"window must be at least 1 s; got {self.window_s}")
        if self.unit == "rho":
            if self.delta is None:
                raise ValueError("a budget in rho needs delta to report epsilon")
            _check_delta(self.delta)

    @classmethod
    def of_epsilon(
        cls, epsilon: float, *, unit: Unit, window_s: float | None, delta: float | None = None
    ) -> Budget:
        """A budget written as ε (at ``delta`` for the Gaussian), in the unit spent."""
        if unit == "rho":
            if delta is None:
                raise ValueError("a Gaussian budget in epsilon needs delta")
            return cls(unit=unit, limit=zcdp_rho(epsilon, delta), window_s=window_s, delta=delta)
        return cls(unit=unit, limit=epsilon, window_s=window_s)

    def epsilon(self, used: float) -> float:
        """``used`` (in the budget's unit) as the ε a client has spent."""
        if self.unit == "rho":
            return zcdp_epsilon(used, self.delta)  # type: ignore[arg-type]
        return used


@dataclass(frozen=True, slots=True)
class Charge:
    """The outcome of one charge: granted or not, and where the client stands.

    ``used`` and ``limit`` are in the budget's unit; ``epsilon`` is ``used`` as
    ε; ``retry_after`` is the seconds until the window resets (None: never).
    """

    granted: bool
    used: float
    limit: float
    epsilon: float
    retry_after: float | None


class Accountant:
    """Charges each client's answers to its budget for one model.

    Guarantee: the sum of the amounts granted to a client within one window
    never exceeds the budget's limit (to the micro-unit, rounding against the
    client), however many requests or replicas race.
    """

    def __init__(
        self,
        store: BudgetStore,
        budget: Budget,
        *,
        model: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.budget = budget
        self.model = model
        self.clock = clock
        self._limit = to_micro(budget.limit, round_up=False)

    def key(self, client: str, now: float) -> str:
        """The store key of ``client``'s budget in the window holding ``now``."""
        window = self.budget.window_s
        period = "life" if window is None else f"{window:g}s:{math.floor(now / window)}"
        return client_key(client, "privacy", self.model, self.budget.unit, period)

    def retry_after(self, now: float) -> float | None:
        window = self.budget.window_s
        if window is None:
            return None
        return (math.floor(now / window) + 1) * window - now

    async def charge(self, client: str, cost: float, answers: int = 1) -> Charge:
        """Spend ``answers`` answers at ``cost`` each (in the budget's unit), all or nothing."""
        if cost < 0 or answers < 0:
            raise ValueError(f"cost and answers must be >= 0; got {cost}, {answers}")
        now = self.clock()
        granted, used = await self.store.spend(
            self.key(client, now),
            to_micro(cost, round_up=True) * answers,
            self._limit,
            self.budget.window_s,
        )
        spent = used / MICRO
        return Charge(
            granted=granted,
            used=spent,
            limit=self.budget.limit,
            epsilon=self.budget.epsilon(spent),
            retry_after=self.retry_after(now),
        )

"""Privacy accounting: composition, conversions, integer units, windows, atomic spending."""

from __future__ import annotations

import asyncio
import math

import pytest

from guard.defenses.accountant import (
    MICRO,
    Accountant,
    Budget,
    to_micro,
    zcdp_epsilon,
    zcdp_rho,
)
from guard.defenses.privacy import gaussian_rho
from guard.state.memory import MemoryStore


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def accountant(
    limit: float, *, window_s: float | None = None, clock: Clock | None = None
) -> Accountant:
    budget = Budget(unit="epsilon", limit=limit, window_s=window_s)
    return Accountant(MemoryStore(), budget, model="digits", clock=clock or Clock())


def test_zcdp_to_epsilon_follows_bun_and_steinke() -> None:
    rho, delta = 0.5, 1e-5
    assert zcdp_epsilon(rho, delta) == pytest.approx(rho + 2 * math.sqrt(rho * math.log(1e5)))
    assert zcdp_epsilon(0.0, delta) == 0.0


@pytest.mark.parametrize("epsilon", [0.1, 1.0, 10.0, 1000.0])
@pytest.mark.parametrize("delta", [1e-9, 1e-6, 1e-3])
def test_an_epsilon_budget_converts_to_the_largest_rho_within_it(
    epsilon: float, delta: float
) -> None:
    rho = zcdp_rho(epsilon, delta)
    assert zcdp_epsilon(rho, delta) == pytest.approx(epsilon, rel=1e-9)
    assert zcdp_epsilon(rho * 1.001, delta) > epsilon


@pytest.mark.parametrize("delta", [0.0, 1.0, -0.1])
def test_delta_outside_the_open_unit_interval_is_refused(delta: float) -> None:
    with pytest.raises(ValueError, match="delta"):
        zcdp_epsilon(1.0, delta)


def test_micro_units_round_against_the_client() -> None:
    assert to_micro(0.1, round_up=True) == 100_000  # not 100_001 from 0.1 * 1e6
    assert to_micro(1e-7, round_up=True) == 1
    assert to_micro(1e-7, round_up=False) == 0
    assert to_micro(2.0000004, round_up=False) == 2 * MICRO


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"unit": "epsilon", "limit": 0.0, "window_s": None}, "limit"),
        ({"unit": "epsilon", "limit": 1.0, "window_s": 0.5}, "window"),
        ({"unit": "rho", "limit": 1.0, "window_s": None}, "delta"),
        ({"unit": "bits", "limit": 1.0, "window_s": None}, "unit"),
    ],
)
def test_invalid_budgets_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Budget(**kwargs)


def test_a_gaussian_budget_in_epsilon_is_spent_in_rho() -> None:
    budget = Budget.of_epsilon(10.0, unit="rho", window_s=None, delta=1e-6)
    assert budget.unit == "rho"
    assert budget.limit == pytest.approx(zcdp_rho(10.0, 1e-6))
    assert budget.epsilon(budget.limit) == pytest.approx(10.0)
    # σ = 2 costs ρ = 0.5 per answer: k answers compose to ρ = k/2 (zCDP adds up)
    answers = int(budget.limit / gaussian_rho(2.0))
    assert budget.epsilon(answers * gaussian_rho(2.0)) <= 10.0


async def test_answers_are_granted_up_to_the_limit_exactly() -> None:
    acc = accountant(1.0)
    granted = [(await acc.charge("alice", 0.1)).granted for _ in range(12)]
    assert granted == [True] * 10 + [False] * 2
    refused = await acc.charge("alice", 0.1)
    assert refused.used == pytest.approx(1.0)
    assert refused.epsilon == pytest.approx(1.0)
    assert refused.retry_after is None  # a lifetime budget does not reset


async def test_a_batch_is_charged_all_or_nothing() -> None:
    acc = accountant(1.0)
    assert (await acc.charge("alice", 0.1, 7)).granted
    too_many = await acc.charge("alice", 0.1, 5)
    assert not too_many.granted
    assert too_many.used == pytest.approx(0.7)
    assert (await acc.charge("alice", 0.1, 3)).granted


async def test_clients_and_models_have_separate_budgets() -> None:
    store = MemoryStore()
    budget = Budget(unit="epsilon", limit=1.0, window_s=None)
    digits = Accountant(store, budget, model="digits")
    cancer = Accountant(store, budget, model="breast_cancer")
    assert (await digits.charge("alice", 1.0)).granted
    assert not (await digits.charge("alice", 0.5)).granted
    assert (await digits.charge("bob", 1.0)).granted
    assert (await cancer.charge("alice", 1.0)).granted


async def test_windows_are_aligned_to_the_epoch_and_reset() -> None:
    clock = Clock(3600.0 * 10 + 600.0)  # 10 min into an hour
    acc = accountant(1.0, window_s=3600.0, clock=clock)
    assert (await acc.charge("alice", 1.0)).granted
    refused = await acc.charge("alice", 0.5)
    assert not refused.granted
    assert refused.retry_after == pytest.approx(3000.0)
    clock.now += 2999.0
    assert not (await acc.charge("alice", 0.5)).granted
    clock.now += 1.0  # the next hour
    fresh = await acc.charge("alice", 0.5)
    assert fresh.granted
    assert fresh.used == pytest.approx(0.5)
    assert fresh.retry_after == pytest.approx(3600.0)


async def test_concurrent_charges_never_overspend() -> None:
    acc = accountant(5.0)
    results = await asyncio.gather(*(acc.charge("alice", 0.3) for _ in range(100)))
    assert sum(r.granted for r in results) == 16  # floor(5 / 0.3)
    assert max(r.used for r in results) <= 5.0


async def test_negative_costs_are_refused() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        await accountant(1.0).charge("alice", -0.1)

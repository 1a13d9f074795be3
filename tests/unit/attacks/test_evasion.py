"""Each evasion attack really fools the undefended digits model, within its bounds and budget."""

from __future__ import annotations

import numpy as np
import pytest

from guard.attacks.evasion import HopSkipJump, SimBA, SquareL2, SquareLinf, run_evasion
from guard.attacks.evasion.base import EvasionAttack, margin
from guard.attacks.evasion.square import p_selection
from guard.attacks.targets import OnnxTarget
from tests.unit.attacks.scripted import ScriptedDefence

SAMPLES = 6
CASES = [
    pytest.param(HopSkipJump(epsilon=14.0), 1000, id="hopskipjump"),
    pytest.param(SquareLinf(epsilon=3.0), 300, id="square-linf"),
    pytest.param(SquareL2(epsilon=14.0), 300, id="square-l2"),
    pytest.param(SimBA(epsilon=2.0), 300, id="simba"),
]


@pytest.mark.parametrize(("attack", "budget"), CASES)
def test_attack_fools_most_samples_within_bounds_and_budget(
    attack: EvasionAttack,
    budget: int,
    digits: tuple[np.ndarray, np.ndarray],
    digits_target: OnnxTarget,
) -> None:
    x, y = digits
    run = run_evasion(
        attack, digits_target, x[:SAMPLES], y[:SAMPLES], budget=budget, rng=np.random.default_rng(0)
    )
    attacked = run.attacked
    wins = [s for s in attacked if s.success]
    assert len(attacked) >= SAMPLES - 1 and len(wins) >= 0.6 * len(attacked)
    assert sum(s.queries for s in run.samples) == digits_target.queries
    check = OnnxTarget.builtin("digits")
    for s in wins:
        assert s.x_adv is not None and s.success_query is not None
        assert s.success_query <= s.queries <= budget
        assert (s.x_adv >= 0).all() and (s.x_adv <= 16).all()
        assert check.query(s.x_adv[None]).labels[0] != s.label  # really adversarial
        delta = s.x_adv - x[s.index]
        if isinstance(attack, SquareLinf):
            assert np.abs(delta).max() <= attack.epsilon + 1e-9
        elif isinstance(attack, HopSkipJump | SquareL2):
            assert np.linalg.norm(delta) <= attack.epsilon * (1 + 1e-9)
    summary = run.summary(digits_target)
    assert summary["success_rate"] == len(wins) / len(attacked)
    assert summary["detected_fraction"] == 0.0 and summary["first_detection_query"] is None
    curve = summary["curve"]["success_rate"]
    assert curve == sorted(curve) and curve[-1] == summary["success_rate"]


@pytest.mark.parametrize(("attack", "budget"), CASES)
def test_a_seed_reproduces_the_run(
    attack: EvasionAttack, budget: int, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = digits
    runs = [
        run_evasion(
            attack,
            OnnxTarget.builtin("digits"),
            x[:2],
            y[:2],
            budget=budget // 3,
            rng=np.random.default_rng(7),
        )
        for _ in range(2)
    ]
    for a, b in zip(runs[0].samples, runs[1].samples, strict=True):
        assert (a.success, a.queries, a.success_query) == (b.success, b.queries, b.success_query)
        if a.x_adv is None or b.x_adv is None:
            assert a.x_adv is b.x_adv
        else:
            assert np.array_equal(a.x_adv, b.x_adv)


def test_an_attack_keeps_going_after_a_denial_and_reports_when_it_was_caught(
    digits: tuple[np.ndarray, np.ndarray], digits_target: OnnxTarget
) -> None:
    x, y = digits
    defence = ScriptedDefence(digits_target, flag_from=5, deny_from=9)
    run = run_evasion(
        SquareLinf(epsilon=0.5), defence, x[:2], y[:2], budget=20, rng=np.random.default_rng(0)
    )
    first, second = run.samples
    assert first.attacked and first.queries == 20 and first.first_detection == 5
    assert first.refused == 12 and not first.success  # every denied query counted, none answered
    assert not second.attacked  # its clean query was denied: nothing to attack
    summary = run.summary(defence)
    assert summary["detected_fraction"] == 1.0 and summary["first_detection_query"] == 5.0
    assert summary["refused_fraction"] == pytest.approx(12 / 20)


def test_margin_is_the_logit_margin_and_refusals_never_improve() -> None:
    scores = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [np.nan] * 3])
    out = margin(scores, 0)
    assert out[0] == pytest.approx(np.log(0.7 / 0.2)) and out[1] < 0 and out[2] == np.inf


def test_square_schedule_halves_p_as_in_the_paper() -> None:
    assert p_selection(0.8, 0, 10000) == 0.8
    assert p_selection(0.8, 30, 10000) == 0.4
    assert p_selection(0.8, 9000, 10000) == 0.8 / 512
    assert p_selection(0.8, 500, 1000) == 0.8 / 128  # it scales to the budget


def test_invalid_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="HopSkipJump"):
        HopSkipJump(epsilon=0.0)
    with pytest.raises(ValueError, match="epsilon"):
        SimBA(epsilon=-1.0)

"""Black-box evasion attacks: decision-based (HopSkipJump) and score-based (Square, SimBA).

Each attack is a small frozen dataclass with a ``run`` method driven by
:func:`~guard.attacks.evasion.base.run_evasion`, which attacks sample by sample
under a per-sample query budget and measures success, norms and detection.
"""

from __future__ import annotations

from guard.attacks.evasion.base import EvasionAttack, EvasionRun, EvasionSample, run_evasion
from guard.attacks.evasion.hopskipjump import HopSkipJump
from guard.attacks.evasion.simba import SimBA
from guard.attacks.evasion.square import SquareL2, SquareLinf

__all__ = [
    "EvasionAttack",
    "EvasionRun",
    "EvasionSample",
    "HopSkipJump",
    "SimBA",
    "SquareL2",
    "SquareLinf",
    "run_evasion",
]

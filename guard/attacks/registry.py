"""Every named attack, in one table read by ``guard attack``, ``guard tune`` and ``guard demo``.

Adding an attack to a family that exists is one :class:`AttackSpec` in :data:`SPECS`.
Their order is part of the seeds: ``guard attack`` draws attack ``k``'s stream from
``default_rng([seed, k])`` and ``guard tune`` numbers the attacks it measures in this
order (:data:`guard.tuning.measure.STREAMS`), so new entries go at the end.

Pure data, no heavy imports: the command line reads it to build ``--help``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

L2_SHARE, LINF_SHARE = 0.625, 0.125  # default evasion radii, shares of the input range


@dataclass(frozen=True, slots=True)
class AttackSpec:
    name: str
    family: str  # evasion, extraction, membership, inversion, benign, adaptive
    budget: int = 0  # guard attack's queries per unit by default; 0: set by the attack
    groups: tuple[str, ...] = ()  # groups of guard attack --attack that hold it, besides all
    evasion: str = ""  # evasion: its class in guard.attacks.evasion; adaptive: the one wrapped
    norm: str = ""  # evasion: the radius it takes, "l2" or "linf"
    judged: bool = True  # evasion: success counts only within that radius (SimBA: unbounded)
    tunes: tuple[str, ...] = ()  # the stages whose tuning (guard tune) measures it
    tune_batch: int = 1  # rows per request when guard tune measures it

    def evasion_attack(
        self, span: float, l2: float | None = None, linf: float | None = None
    ) -> tuple[Any, tuple[float | None, float | None]]:
        """A new evasion attack (the one wrapped, if adaptive) for inputs in a range of
        width ``span``, and the (L2, L∞) radii its success is judged within (None:
        unbounded). Radii left out are the default shares of the range."""
        from guard.attacks import evasion

        spec = ATTACK[self.evasion] if self.family == "adaptive" else self
        l2, linf = l2 or L2_SHARE * span, linf or LINF_SHARE * span
        attack = getattr(evasion, spec.evasion)(epsilon=l2 if spec.norm == "l2" else linf)
        if not spec.judged:
            return attack, (None, None)
        return attack, (l2, None) if spec.norm == "l2" else (None, linf)


_IMAGE = ("blacklight", "squeeze_detect", "prada")  # stages tuned against evasion
_SQUARE = ("square", "evasion")
SPECS: tuple[AttackSpec, ...] = (
    AttackSpec("hopskipjump", "evasion", 2000, ("evasion",), "HopSkipJump", "l2", tunes=_IMAGE),
    AttackSpec("square-linf", "evasion", 1000, _SQUARE, "SquareLinf", "linf", tunes=_IMAGE),
    AttackSpec("square-l2", "evasion", 1000, _SQUARE, "SquareL2", "l2", tunes=_IMAGE),
    AttackSpec("simba", "evasion", 1000, ("evasion",), "SimBA", "linf", False, _IMAGE),
    AttackSpec(
        "knockoff", "extraction", 2000, tunes=("blacklight", "prada", "privacy"), tune_batch=10
    ),
    AttackSpec("jbda", "extraction", 2000, tunes=("prada",), tune_batch=10),
    AttackSpec("membership", "membership", tunes=("privacy",), tune_batch=51),
    AttackSpec("inversion", "inversion", 2000),
    AttackSpec("benign", "benign", 200),
    *(  # guard.attacks.adaptive: "<kind>-<the evasion attack it wraps>"
        AttackSpec(name, "adaptive", 1000, ("adaptive",), name.split("-", 1)[1])
        for name in (
            "oars-hopskipjump",
            "oars-square-linf",
            "oars-simba",
            "resampling-square-linf",
            "sybil-hopskipjump",
            "sybil-square-linf",
            "flushing-square-linf",
            "labelonly-hopskipjump",
        )
    ),
)
ATTACK = {spec.name: spec for spec in SPECS}
ATTACKS = tuple(ATTACK)
GROUPS = ("square", "evasion", "adaptive")
ALIASES = {g: tuple(s.name for s in SPECS if g in s.groups) for g in GROUPS} | {"all": ATTACKS}
TUNABLE = tuple(s.name for s in SPECS if s.tunes)  # what guard tune can measure, in order


def help_text() -> str:
    """What ``guard attack --attack`` accepts, for its help."""
    return (
        f"comma-separated attacks ({', '.join(ATTACKS)}) or groups ({', '.join(ALIASES)}); "
        "default: all"
    )

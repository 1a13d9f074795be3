"""The named attacks behind ``guard attack``, with their defaults for the demo models.

Each attack gets a fresh target (so its query log starts at zero) and its own
random stream ``default_rng([seed, k])``; evasion attacks share one draw of
samples. Attacks run in the order given, as one client: a stateful defence
carries what it learned from one attack into the next.

Budgets are per unit: per sample (evasion), per run (extraction), per class
(inversion), per client (benign); membership inference sends one query per
record (``neighbours + 1`` for label-only) whatever the budget.

Everything runs on a plain install except the shadow-model membership attack,
which trains scikit-learn models: without scikit-learn it is left out and the
report says so in its notes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from guard.attacks.report import Report
from guard.attacks.targets import OnnxTarget, Target, TargetSpec
from guard.extras import hint, installed

EVASION = ("hopskipjump", "square-linf", "square-l2", "simba")
ATTACKS = (*EVASION, "knockoff", "jbda", "membership", "inversion", "benign")
ALIASES = {"square": ("square-linf", "square-l2"), "evasion": EVASION, "all": ATTACKS}
BUDGETS = {
    "hopskipjump": 2000,
    "square-linf": 1000,
    "square-l2": 1000,
    "simba": 1000,
    "knockoff": 2000,
    "jbda": 2000,
    "inversion": 2000,
    "benign": 200,
}
_SAMPLES_STREAM = 100

TargetFactory = Callable[[int | None], Target]  # None: the attacker; i: benign client i
Entry = dict[str, Any]


def resolve(names: Sequence[str], spec: TargetSpec) -> list[str]:
    """Attack names with aliases expanded, in order, once each. ``all`` leaves out
    evasion on models whose features do not share one range (tabular data)."""
    out: list[str] = []
    for name in names:
        expanded = ALIASES.get(name, (name,))
        for attack in expanded:
            if attack not in ATTACKS:
                raise ValueError(
                    f"unknown attack {attack!r}; expected one of {', '.join(ATTACKS)}, "
                    f"or {', '.join(ALIASES)}"
                )
            if attack in EVASION and not spec.scalar_range:
                if name == "all":
                    continue
                raise ValueError(
                    f"{attack} needs inputs that share one range (an image); "
                    "this model has per-feature ranges"
                )
            if attack not in out:
                out.append(attack)
    return out


@dataclass(frozen=True, kw_only=True, slots=True)
class SuiteConfig:
    model: str
    samples: int = 10  # evasion samples
    budget: int | None = None  # per unit; None: BUDGETS
    seed: int = 0
    epsilon_l2: float | None = None  # input units; default 0.625 x the input range
    epsilon_linf: float | None = None  # input units; default 0.125 x the input range
    benign_clients: int = 3


def run_suite(
    names: Sequence[str],
    config: SuiteConfig,
    make_target: TargetFactory,
    *,
    target_label: str = "local",
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Run each attack in ``names`` against targets from ``make_target``; one report."""
    spec = TargetSpec.builtin(config.model)
    report = Report(model=config.model, target=target_label, seed=config.seed)
    attacks = resolve(names, spec)
    if "membership" in attacks and not installed("sklearn"):
        report.notes.append(SHADOW_SKIPPED)
    for name in attacks:
        if progress:
            progress(name)
        rng = np.random.default_rng([config.seed, ATTACKS.index(name)])
        budget = config.budget or BUDGETS.get(name, 0)
        for entry in _RUNNERS[name](name, config, make_target, budget, rng):
            report.add(entry)
    return report


def _evasion(
    name: str,
    config: SuiteConfig,
    make_target: TargetFactory,
    budget: int,
    rng: np.random.Generator,
) -> list[Entry]:
    from guard.attacks import evasion
    from guard.models import load_samples

    spec = TargetSpec.builtin(config.model)
    span = float(spec.hi - spec.lo)
    l2 = config.epsilon_l2 or 0.625 * span
    linf = config.epsilon_linf or 0.125 * span
    attacks: dict[str, Callable[[], evasion.EvasionAttack]] = {
        "hopskipjump": lambda: evasion.HopSkipJump(epsilon=l2),
        "square-linf": lambda: evasion.SquareLinf(epsilon=linf),
        "square-l2": lambda: evasion.SquareL2(epsilon=l2),
        "simba": lambda: evasion.SimBA(epsilon=linf),
    }
    attack = attacks[name]()
    x, y = load_samples(config.model)
    rows = np.random.default_rng([config.seed, _SAMPLES_STREAM]).choice(
        len(x), min(config.samples, len(x)), replace=False
    )
    with make_target(None) as target:
        run = evasion.run_evasion(attack, target, x[rows], y[rows], budget=budget, rng=rng)
        return [run.summary(target)]


def _extraction(
    name: str,
    config: SuiteConfig,
    make_target: TargetFactory,
    budget: int,
    rng: np.random.Generator,
) -> list[Entry]:
    from guard.attacks.extraction import Evaluation, JbDA, Knockoff
    from guard.models import load_samples

    x, y = load_samples(config.model)
    order = rng.permutation(len(x))
    pool, held = order[: len(x) // 2], order[len(x) // 2 :]
    reference = OnnxTarget.builtin(config.model)  # the undefended victim, uncounted
    evaluation = Evaluation.of(reference, x[held], y[held])
    with make_target(None) as target:
        if name == "knockoff":
            budgets = tuple(sorted({max(1, budget * k // 20) for k in (1, 2, 5, 10, 20)}))
            attack: Knockoff | JbDA = Knockoff(budgets=budgets, image=target.spec.scalar_range)
        else:
            attack = JbDA(budget=budget, seed_size=min(50, budget))
        return [attack.run(target, x[pool], evaluation, rng).summary(target)]


def _membership(
    name: str,
    config: SuiteConfig,
    make_target: TargetFactory,
    budget: int,
    rng: np.random.Generator,
) -> list[Entry]:
    from guard.attacks import membership

    data = membership.membership_data(config.model, rng)
    entries = []
    with make_target(None) as target:
        for run in membership.threshold_attacks(target, data):
            entries.append(run.summary(target))
        if installed("sklearn"):  # else run_suite notes the skip
            shadow = membership.shadow_attack(target, data, _shadow_recipe(config.model), rng)
            entries.append(shadow.summary(target))
        label_only = membership.label_only_attack(target, data, rng)
        entries.append(label_only.summary(target))
    return entries


SHADOW_SKIPPED = f"membership-shadow skipped: its shadow models need scikit-learn {hint('sklearn')}"


def _shadow_recipe(model: str) -> Callable[[int], Any]:
    """The attacker's guess of the training recipe (see guard.models.train)."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if model == "breast_cancer":
        return lambda seed: RandomForestClassifier(n_estimators=100, random_state=seed, n_jobs=1)
    # A smaller MLP than the target's 256 units: shadow training stays within seconds.
    return lambda seed: make_pipeline(
        StandardScaler(), MLPClassifier((64,), alpha=1e-3, max_iter=300, random_state=seed)
    )


def _inversion(
    name: str,
    config: SuiteConfig,
    make_target: TargetFactory,
    budget: int,
    rng: np.random.Generator,
) -> list[Entry]:
    from guard.attacks.inversion import Inversion
    from guard.models import load_samples

    x, y = load_samples(config.model)  # held-out: for judging only, the attacker never sees it
    with make_target(None) as target:
        return [Inversion().run(target, x, y, budget=budget, rng=rng).summary(target)]


def _benign(
    name: str,
    config: SuiteConfig,
    make_target: TargetFactory,
    budget: int,
    rng: np.random.Generator,
) -> list[Entry]:
    from guard.attacks.benign import BenignTraffic
    from guard.models import load_samples

    x, y = load_samples(config.model)
    targets = [make_target(i) for i in range(config.benign_clients)]
    try:
        clients = [(f"client-{i}", t) for i, t in enumerate(targets)]
        run = BenignTraffic(queries=budget).run(clients, x, y, rng)
        return [run.summary()]
    finally:
        for target in targets:
            target.close()


_RUNNERS: dict[str, Callable[..., list[Entry]]] = {
    **dict.fromkeys(EVASION, _evasion),
    "knockoff": _extraction,
    "jbda": _extraction,
    "membership": _membership,
    "inversion": _inversion,
    "benign": _benign,
}

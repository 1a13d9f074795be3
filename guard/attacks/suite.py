"""The named attacks behind ``guard attack``, with their defaults for the demo models.

Each attack gets a fresh target (so its query log starts at zero) and its own
random stream ``default_rng([seed, k])``; evasion attacks share one draw of
samples. Attacks run in the order given, as one client: a stateful defence
carries what it learned from one attack into the next.

Budgets are per unit: per sample (evasion, adaptive), per run (extraction), per
class (inversion), per client (benign); membership inference sends one query per
record (``neighbours + 1`` for label-only) whatever the budget.

``benign`` is the realistic honest mix (:class:`~guard.attacks.benign.TrafficMix`:
popular inputs, retries, jitter, fresh inputs) from ``benign_clients`` clients.
The adaptive attackers (:mod:`~guard.attacks.adaptive`) run an evasion attack
through a wrapper, and again against the bare local model; their success is
judged on the final input against the bare model, and the entry reports both.

The target factory gets ``None`` for the attacker's own account, ``i >= 0`` for
benign client ``i``, and ``-1 - j`` for the attacker's extra account ``j`` (Sybil
keys, junk senders).

Everything runs on a plain install except the shadow-model membership attacks
(shadow, LiRA), which train scikit-learn models: without scikit-learn they are
left out and the report says so in its notes.

The model and its data are a :class:`~guard.subject.Subject` (``SuiteConfig.subject``;
default: the built-in ``SuiteConfig.model``). A subject without member rows
(``x_members``) skips the membership attacks, with a note; one with ``x_train``
gives the extraction attacks that pool (else half the held-out rows). Shadow models
of a user's model follow a generic recipe: a scikit-learn MLP on flattened inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from guard.attacks.registry import ALIASES, ATTACK, ATTACKS
from guard.attacks.report import Report
from guard.attacks.targets import Target, TargetSpec
from guard.extras import hint, installed
from guard.subject import Subject

_SAMPLES_STREAM = 100

TargetFactory = Callable[[int | None], Target]  # None: the attacker; i: benign client i
Entry = dict[str, Any]


def resolve(names: Sequence[str], spec: TargetSpec) -> list[str]:
    """Attack names with aliases expanded, in order, once each. ``all`` leaves out
    evasion on models whose features do not share one range (tabular data), and
    square-l2 where the rows fold into an image smaller than 4 x 4."""
    out: list[str] = []
    for name in names:
        expanded = ALIASES.get(name, (name,))
        for attack in expanded:
            if attack not in ATTACKS:
                raise ValueError(
                    f"unknown attack {attack!r}; expected one of {', '.join(ATTACKS)}, "
                    f"or {', '.join(ALIASES)}"
                )
            if ATTACK[attack].evasion and not spec.scalar_range:
                if name == "all":
                    continue
                raise ValueError(
                    f"{attack} needs inputs that share one range (an image); "
                    "this model has per-feature ranges"
                )
            if _square_l2_too_small(attack, spec):
                if name == "all":
                    continue
                raise ValueError(
                    f"{attack} needs rows that fold into an image of at least 4 x 4; "
                    f"this model's rows have {spec.n_features} values"
                )
            if attack not in out:
                out.append(attack)
    return out


def _square_l2_too_small(attack: str, spec: TargetSpec) -> bool:
    from guard.attacks.evasion.square import Grid

    evasion = ATTACK[attack].evasion if ATTACK[attack].family == "adaptive" else attack
    grid = Grid.of(spec)
    return evasion == "square-l2" and min(grid.height, grid.width) < 4


@dataclass(frozen=True, kw_only=True, slots=True)
class SuiteConfig:
    model: str
    samples: int = 10  # evasion samples
    budget: int | None = None  # per unit; None: the attack's (guard.attacks.registry)
    seed: int = 0
    epsilon_l2: float | None = None  # input units; default 0.625 x the input range
    epsilon_linf: float | None = None  # input units; default 0.125 x the input range
    benign_clients: int = 40
    benign_popular: float = 0.3  # shares of the honest mix; fresh inputs are the rest
    benign_retry: float = 0.1
    benign_jitter: float = 0.2
    sybil_keys: int = 10
    flush_every: int = 100  # adaptive flushing: attack queries between 10,000 junk rows
    subject: Subject | None = None  # the model and data; None: Subject.builtin(model)


def subject_of(config: SuiteConfig) -> Subject:
    """The model under test and its data."""
    return config.subject if config.subject is not None else Subject.builtin(config.model)


def run_suite(
    names: Sequence[str],
    config: SuiteConfig,
    make_target: TargetFactory,
    *,
    target_label: str = "local",
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Run each attack in ``names`` against targets from ``make_target``; one report."""
    subject = subject_of(config)
    report = Report(model=config.model, target=target_label, seed=config.seed)
    report.notes += list(subject.notes)
    attacks = resolve(names, subject.spec)
    if "membership" in attacks and subject.x_members is None:
        report.notes.append(MEMBERSHIP_SKIPPED)
        attacks.remove("membership")
    if "membership" in attacks and not installed("sklearn"):
        report.notes += [SHADOW_SKIPPED, LIRA_SKIPPED]
    for name in attacks:
        if progress:
            progress(name)
        rng = np.random.default_rng([config.seed, ATTACKS.index(name)])
        budget = config.budget or ATTACK[name].budget
        for entry in _RUNNERS[ATTACK[name].family](name, config, make_target, budget, rng):
            report.add(entry)
    return report


def _range(config: SuiteConfig) -> tuple[float, float | None, float | None]:
    spec = subject_of(config).spec
    return float(spec.hi - spec.lo), config.epsilon_l2, config.epsilon_linf


def _adaptive(
    name: str,
    config: SuiteConfig,
    make_target: TargetFactory,
    budget: int,
    rng: np.random.Generator,
) -> list[Entry]:
    from guard.attacks import adaptive, evasion

    subject = subject_of(config)
    kind = name.split("-", 1)[0]
    attack, (l2, linf) = ATTACK[name].evasion_attack(*_range(config))
    if kind == "resampling":  # OARS proper: the attack resamples its own proposals
        attack = adaptive.ResamplingSquareLinf(epsilon=attack.epsilon)
    x, y = subject.x, subject.y
    bare = subject.target()
    right = np.flatnonzero(bare.query(x).labels == y)
    rows = np.random.default_rng([config.seed, _SAMPLES_STREAM]).choice(
        right, min(config.samples, len(right)), replace=False
    )
    x, y = x[rows].astype(np.float64), y[rows]
    n = adaptive.accounts_needed(kind, sybil_keys=config.sybil_keys)
    state = rng.bit_generator.state

    def attack_through(targets: list[Target]) -> tuple[Any, Target]:
        inner = np.random.default_rng()
        inner.bit_generator.state = state  # the same draws with and without the guard
        wrapped = adaptive.wrap(kind, targets, inner, flush_every=config.flush_every)
        return evasion.run_evasion(attack, wrapped, x, y, budget=budget, rng=inner), wrapped

    def judged(run: Any) -> float:
        wins = [
            adaptive.judge_on(bare, x[s.index], s.label, s.x_adv, l2=l2, linf=linf).success
            for s in run.samples
        ]
        return float(np.mean(wins)) if wins else 0.0

    local: list[Target] = [subject.target() for _ in range(n)]
    bare_run, bare_wrapped = attack_through(local)
    targets = [make_target(None), *(make_target(-1 - j) for j in range(n - 1))]
    try:
        run, wrapped = attack_through(targets)
        entry = run.summary(wrapped)
    finally:
        for target in targets:
            target.close()
    entry.update(
        attack=name,
        family="adaptive",
        reported_success_rate=entry["success_rate"],
        success_rate=judged(run),
        bare_success_rate=judged(bare_run),
        real_queries=adaptive.real_queries(wrapped),
        bare_real_queries=adaptive.real_queries(bare_wrapped),
        accounts=n,
    )
    return [entry]


def _evasion(
    name: str,
    config: SuiteConfig,
    make_target: TargetFactory,
    budget: int,
    rng: np.random.Generator,
) -> list[Entry]:
    from guard.attacks import evasion

    attack, _ = ATTACK[name].evasion_attack(*_range(config))
    subject = subject_of(config)
    x, y = subject.x, subject.y
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

    subject = subject_of(config)
    x, y = subject.x, subject.y
    order = rng.permutation(len(x))
    pool, held = order[: len(x) // 2], order[len(x) // 2 :]
    reference = subject.target()  # the undefended victim, uncounted
    if subject.x_train is not None:  # the attacker's own rows; every held-out row judges
        evaluation = Evaluation.of(reference, x, y)
        attacker_rows = subject.x_train
    else:
        evaluation = Evaluation.of(reference, x[held], y[held])
        attacker_rows = x[pool]
    with make_target(None) as target:
        if name == "knockoff":
            budgets = tuple(sorted({max(1, budget * k // 20) for k in (1, 2, 5, 10, 20)}))
            attack: Knockoff | JbDA = Knockoff(budgets=budgets, image=target.spec.scalar_range)
        else:
            attack = JbDA(budget=budget, seed_size=min(50, budget))
        return [attack.run(target, attacker_rows, evaluation, rng).summary(target)]


def _membership(
    name: str,
    config: SuiteConfig,
    make_target: TargetFactory,
    budget: int,
    rng: np.random.Generator,
) -> list[Entry]:
    from guard.attacks import membership

    subject = subject_of(config)
    data = subject.membership_data(rng)
    if data is None:  # run_suite leaves membership out and notes it
        return []
    recipe = _shadow_recipe(subject.builtin_name or "") if installed("sklearn") else None
    entries = []
    with make_target(None) as target:
        for run in membership.threshold_attacks(target, data):
            entries.append(run.summary(target))
        if recipe is not None:  # else run_suite notes the skip
            shadow = membership.shadow_attack(target, data, recipe, rng)
            entries.append(shadow.summary(target))
        label_only = membership.label_only_attack(target, data, rng)
        entries.append(label_only.summary(target))
        if recipe is not None:
            lira = membership.lira_attack(target, data, recipe, rng)
            entries.append(lira.summary(target))
    return entries


MEMBERSHIP_SKIPPED = (
    "membership skipped: the data has no member rows (save the model's training rows as "
    "x_members and y_members in the .npz)"
)
SHADOW_SKIPPED = f"membership-shadow skipped: its shadow models need scikit-learn {hint('sklearn')}"
LIRA_SKIPPED = f"membership-lira skipped: its shadow models need scikit-learn {hint('sklearn')}"


def _shadow_recipe(model: str) -> Callable[[int], Any]:
    """The attacker's guess of the training recipe (see guard.models.train); for a
    user's model (``model`` empty), a generic MLP on flattened inputs."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if model == "breast_cancer":
        return lambda seed: RandomForestClassifier(n_estimators=100, random_state=seed, n_jobs=1)
    if model == "shapes":  # no CNN without torch: a small MLP on the 3,072 flat pixels
        return lambda seed: make_pipeline(
            StandardScaler(), MLPClassifier((32,), alpha=1e-2, max_iter=100, random_state=seed)
        )
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

    subject = subject_of(config)
    x, y = subject.x, subject.y  # held-out: for judging only, the attacker never sees it
    with make_target(None) as target:
        return [Inversion().run(target, x, y, budget=budget, rng=rng).summary(target)]


def _benign(
    name: str,
    config: SuiteConfig,
    make_target: TargetFactory,
    budget: int,
    rng: np.random.Generator,
) -> list[Entry]:
    from guard.attacks.benign import TrafficMix

    subject = subject_of(config)
    x, y = subject.x, subject.y
    mix = TrafficMix(
        queries=budget,
        popular=config.benign_popular,
        retry=config.benign_retry,
        jitter=config.benign_jitter,
    )
    targets = [make_target(i) for i in range(config.benign_clients)]
    try:
        clients = [(f"client-{i}", t) for i, t in enumerate(targets)]
        return [mix.run(clients, x, y, rng).summary()]
    finally:
        for target in targets:
            target.close()


_RUNNERS: dict[str, Callable[..., list[Entry]]] = {  # by family
    "evasion": _evasion,
    "extraction": _extraction,
    "membership": _membership,
    "inversion": _inversion,
    "benign": _benign,
    "adaptive": _adaptive,
}

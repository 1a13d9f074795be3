"""One attacker, one outcome: the attacks a measurement (and ``guard demo``) runs.

Each runner attacks one target (a guard through :class:`ObservedTarget`, or the
bare model through :class:`~guard.attacks.targets.OnnxTarget`) and returns an
:class:`AttackOutcome` holding what the attacker got and when it was caught.
*Caught* means a detector fired on one of its queries (a flag, degrade, deny
or shadow verdict, or a 403/429; see :mod:`guard.attacks.targets`).

``undetected`` is the part of the attacker's gain made before it was caught,
the quantity a policy should drive down:

* evasion: the share of samples misclassified within the budget with no
  detection at or before the query that succeeded (a sample whose clean query
  was refused counts as a failure; one the model already gets wrong is skipped);
* extraction: the surrogate's fidelity from the answers received before the
  first detection (the curve point at the largest budget below it; 0 if none);
* membership: the advantage of the strongest membership attack, with its
  threshold picked on half of the records and scored on the other half
  (:func:`holdout_advantage`); it needs one query per record, so it is judged
  by what it learns, detection aside.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from guard.attacks.detection import detection
from guard.attacks.registry import ATTACK
from guard.attacks.targets import (
    DETECTED_STATUS,
    DETECTED_VERDICTS,
    Answers,
    HttpTarget,
    QueryLog,
    Target,
)
from guard.tuning.workload import TuneData, Workload


@dataclass(frozen=True, slots=True)
class AttackOutcome:
    attack: str
    family: str  # evasion, extraction, membership
    units: int  # samples, runs or records judged
    success: float  # success rate, fidelity or advantage
    undetected: float  # the gain made before being caught (see the module)
    detected: float | None  # share of units with a detection
    first_detection: float | None  # median 1-based query of first detection within a unit
    first_caught: int | None  # 1-based index of the attacker's first detected query overall
    queries: int
    refused: float  # share of its queries left unanswered
    seconds: float


class ObservedTarget(HttpTarget):
    """An :class:`HttpTarget` that also keeps, per request, its inputs, answers and
    round-trip time, and calls ``on_caught(query_index, status, verdict)`` once, at its
    first detected row."""

    def __init__(
        self,
        *args: Any,
        on_caught: Callable[[int, int, str | None], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.inputs: list[np.ndarray] = []
        self.answers: list[Answers] = []
        self.seconds: list[float] = []
        self.on_caught = on_caught
        self.first_caught: int | None = None

    def _send(self, x: np.ndarray) -> tuple[Answers, int, str | None]:
        started = time.perf_counter()
        answers, status, verdict = super()._send(x)
        self.seconds.append(time.perf_counter() - started)
        self.inputs.append(x.reshape(len(x), -1))  # flat rows, as the attacks made them
        self.answers.append(answers)
        if self.first_caught is None and _detected(status, verdict):
            self.first_caught = self.queries + 1  # the log records this batch after _send
            if self.on_caught is not None:
                self.on_caught(self.first_caught, status, verdict)
        return answers, status, verdict


def _detected(status: int, verdict: str | None) -> bool:
    return verdict in DETECTED_VERDICTS or status in DETECTED_STATUS


def first_caught(log: QueryLog) -> int | None:
    hits = log.detected()
    return int(np.argmax(hits)) + 1 if hits.any() else None


def run_evasion(
    name: str, target: Target, data: TuneData, workload: Workload, rng: np.random.Generator
) -> AttackOutcome:
    """``name`` on ``evasion_samples`` of the attacker's rows, ``evasion_budget`` queries
    each; samples whose clean query was refused count as failures (see the module)."""
    from guard.attacks.evasion import run_evasion as attack_samples

    started = time.perf_counter()
    rows = rng.choice(len(data.attacker_x), workload.evasion_samples, replace=False)
    run = attack_samples(
        ATTACK[name].evasion_attack(float(data.spec.hi - data.spec.lo))[0],
        target,
        data.attacker_x[rows],
        data.attacker_y[rows],
        budget=workload.evasion_budget,
        rng=rng,
    )
    judged = [s for s in run.samples if s.attacked or s.refused]
    wins = [s for s in judged if s.success]
    unnoticed = [
        s for s in wins if s.first_detection is None or s.first_detection > (s.success_query or 0)
    ]
    found = detection(target.log, run.spans)
    n = len(judged)
    return AttackOutcome(
        attack=name,
        family="evasion",
        units=n,
        success=len(wins) / n if n else 0.0,
        undetected=len(unnoticed) / n if n else 0.0,
        detected=found.detected_fraction,
        first_detection=found.first_detection_query,
        first_caught=first_caught(target.log),
        queries=target.queries,
        refused=float(target.log.refused().mean()) if target.queries else 0.0,
        seconds=time.perf_counter() - started,
    )


def run_extraction(
    name: str,
    target: Target,
    reference: Target,
    data: TuneData,
    workload: Workload,
    rng: np.random.Generator,
) -> AttackOutcome:
    """Knockoff (``knockoff``) or JbDA (``jbda``) from the attacker's pool, judged by
    agreement with ``reference`` (the bare model, uncounted) on the benign rows."""
    from guard.attacks.extraction import Evaluation, JbDA, Knockoff

    started = time.perf_counter()
    evaluation = Evaluation.of(reference, data.benign_x, data.benign_y)
    attack: Knockoff | JbDA
    if name == "knockoff":
        attack = Knockoff(
            budgets=workload.knockoff_budgets,
            steps=workload.surrogate_steps,
            image=data.image,
        )
    else:
        budget = workload.jbda_budget
        attack = JbDA(
            budget=budget, seed_size=max(10, budget // 10), steps=workload.surrogate_steps
        )
    run = attack.run(target, data.attacker_x, evaluation, rng)
    caught = first_caught(target.log)
    final = run.curve[-1].fidelity if run.curve else 0.0
    before = [p.fidelity for p in run.curve if caught is None or p.queries < caught]
    return AttackOutcome(
        attack=name,
        family="extraction",
        units=1,
        success=final,
        undetected=final if caught is None else (before[-1] if before else 0.0),
        detected=1.0 if caught is not None else 0.0,
        first_detection=float(caught) if caught is not None else None,
        first_caught=caught,
        queries=target.queries,
        refused=float(target.log.refused().mean()) if target.queries else 0.0,
        seconds=time.perf_counter() - started,
    )


def run_membership(
    target: Target, data: TuneData, workload: Workload, rng: np.random.Generator
) -> AttackOutcome:
    """The loss and confidence thresholds on every member and as many non-members (and
    label-only on ``membership_records`` of them when the workload says); the strongest
    counts, by its :func:`holdout_advantage`."""
    from guard.attacks import membership

    started = time.perf_counter()
    records = membership.membership_data(data.name, rng)
    runs = []
    if "threshold" in workload.membership:
        runs += membership.threshold_attacks(target, records)
    if "label-only" in workload.membership:
        k = workload.membership_records
        subset = membership.MembershipData(
            records.x[:k],
            records.y[:k],
            records.member[:k],
            records.x_attacker,
            records.y_attacker,
        )
        runs.append(membership.label_only_attack(target, subset, rng))
    advantages = [holdout_advantage(r.scores, r.member, rng) for r in runs]
    best = runs[int(np.argmax(advantages))]
    found = detection(target.log, best.spans)
    advantage = max(0.0, max(advantages))
    return AttackOutcome(
        attack="membership",
        family="membership",
        units=len(best.spans),
        success=advantage,
        undetected=advantage,
        detected=found.detected_fraction,
        first_detection=found.first_detection_query,
        first_caught=first_caught(target.log),
        queries=target.queries,
        refused=float(target.log.refused().mean()) if target.queries else 0.0,
        seconds=time.perf_counter() - started,
    )


def holdout_advantage(
    scores: np.ndarray, member: np.ndarray, rng: np.random.Generator, *, halvings: int = 20
) -> float:
    """TPR - FPR as an attacker gets it: the threshold is chosen on one half of the
    records (best on that half) and scored on the other; the mean over ``halvings``
    random halvings. Unlike the best threshold on all records, it is 0 in expectation
    when scores carry no membership signal."""
    scores = np.asarray(scores, dtype=np.float64)
    finite = scores[np.isfinite(scores)]
    floor = (finite.min() - 1.0) if finite.size else 0.0
    scores = np.where(np.isfinite(scores), scores, floor)  # refused: least member-like
    values = []
    for _ in range(halvings):
        half = rng.permutation(len(scores)) < len(scores) // 2
        fit, test = scores[half], scores[~half]
        cuts = np.unique(fit)
        tpr = (fit[None, :] >= cuts[:, None])[:, member[half]].mean(axis=1)
        fpr = (fit[None, :] >= cuts[:, None])[:, ~member[half]].mean(axis=1)
        t = cuts[int(np.argmax(tpr - fpr))]
        values.append(float(np.mean(test[member[~half]] >= t) - np.mean(test[~member[~half]] >= t)))
    return float(np.mean(values))


def run_attack(
    name: str,
    target: Target,
    reference: Target,
    data: TuneData,
    workload: Workload,
    rng: np.random.Generator,
) -> AttackOutcome:
    """Any attack a measurement runs, by name (one of :data:`~guard.attacks.registry.TUNABLE`)."""
    family = ATTACK[name].family if name in ATTACK else None
    if family == "evasion":
        return run_evasion(name, target, data, workload, rng)
    if family == "extraction":
        return run_extraction(name, target, reference, data, workload, rng)
    if family == "membership":
        return run_membership(target, data, workload, rng)
    raise ValueError(f"unknown attack {name!r}")

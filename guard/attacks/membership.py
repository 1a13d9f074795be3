"""Membership inference: was this record in the training set?

* ``loss`` threshold: Yeom, Giacomelli, Fredrikson, Jha. "Privacy Risk in
  Machine Learning: Analyzing the Connection to Overfitting." CSF 2018. Score:
  ``log p_y`` (minus the cross-entropy loss); needs the true label.
* ``confidence`` threshold: the top probability ``max_j p_j`` (label-free; Salem
  et al., NDSS 2019, call it the ML-Leaks adversary 3).
* ``shadow``: Shokri, Stronati, Song, Shmatikov. "Membership Inference Attacks
  Against Machine Learning Models." IEEE S&P 2017. Shadow models of the
  target's recipe, trained on halves of the attacker's own data, teach an attack
  model what the target's answers look like for members; one attack model over
  ``(log p_y, top-3 probabilities)`` instead of one per class.
* ``label-only``: Choquette-Choo, Tramer, Carlini, Papernot. "Label-Only
  Membership Inference Attacks." ICML 2021. Score: the fraction of ``n``
  Gaussian neighbours of ``x`` (and ``x`` itself) the target still labels ``y``;
  members sit farther from the boundary. Defences that perturb scores do not
  touch it.

What the attacker holds (:func:`membership_data`): the evaluation set is the
same for every attack, ``k`` members and ``k`` non-members. The attacker's own
data is the *other* half of the non-members, disjoint from the target's members
and from the evaluation set; shadow models train on it and the label-only noise
scale comes from its per-feature spread. Reported: AUC and the advantage
``max_t (TPR - FPR)`` over thresholds ``t`` (the best threshold, an upper bound
for one the attacker would have to pick). A refused query scores as the least
member-like value.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from guard.attacks.detection import detection
from guard.attacks.targets import Answers, Target

ShadowFactory = Callable[[int], Any]  # seed -> an unfitted scikit-learn classifier


@dataclass(frozen=True, slots=True)
class MembershipData:
    """The evaluation records (``member`` marks the target's training rows) and the
    attacker's own labelled data, disjoint from both."""

    x: np.ndarray
    y: np.ndarray
    member: np.ndarray
    x_attacker: np.ndarray
    y_attacker: np.ndarray


def membership_data(
    name: str, rng: np.random.Generator, *, size: int | None = None
) -> MembershipData:
    """Split a demo model's data: half the non-members go to the attacker; the other
    half, with as many members drawn at random, form the evaluation set (``size``
    caps each side)."""
    from guard.models import load_split

    split = load_split(name)
    order = rng.permutation(len(split.x_nonmembers))
    half = len(order) // 2
    attacker, held = order[:half], order[half:]
    k = min(len(held), len(split.x_members), size or len(held))
    members = rng.choice(len(split.x_members), k, replace=False)
    held = held[:k]
    # Interleaved at random: a defence that kicks in part-way must not meet one side only.
    shuffle = rng.permutation(2 * k)
    return MembershipData(
        x=np.concatenate([split.x_members[members], split.x_nonmembers[held]])[shuffle].astype(
            np.float64
        ),
        y=np.concatenate([split.y_members[members], split.y_nonmembers[held]])[shuffle],
        member=np.concatenate([np.ones(k, dtype=bool), np.zeros(k, dtype=bool)])[shuffle],
        x_attacker=split.x_nonmembers[attacker].astype(np.float64),
        y_attacker=split.y_nonmembers[attacker],
    )


@dataclass(frozen=True, slots=True)
class Roc:
    fpr: np.ndarray
    tpr: np.ndarray

    @property
    def auc(self) -> float:
        return float(np.trapezoid(self.tpr, self.fpr))

    @property
    def advantage(self) -> float:
        return float(np.max(self.tpr - self.fpr))


def roc(scores: np.ndarray, member: np.ndarray) -> Roc:
    """ROC of "member when score >= t" over every threshold; ties move together.
    NaN scores (refused) rank below every other."""
    scores = np.asarray(scores, dtype=np.float64)
    finite = scores[np.isfinite(scores)]
    floor = (finite.min() - 1.0) if finite.size else 0.0
    scores = np.where(np.isnan(scores), floor, scores)
    order = np.argsort(-scores, kind="mergesort")
    ranked, hits = scores[order], member[order]
    cuts = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1]
    tp = np.cumsum(hits)[cuts]
    fp = cuts + 1 - tp
    p, n = max(int(member.sum()), 1), max(int((~member).sum()), 1)
    return Roc(np.r_[0.0, fp / n], np.r_[0.0, tp / p])


@dataclass(frozen=True, slots=True)
class MembershipRun:
    attack: str
    params: dict[str, Any]
    scores: np.ndarray
    member: np.ndarray
    spans: tuple[tuple[int, int], ...]  # query-log rows per evaluated record
    seconds: float

    @property
    def roc(self) -> Roc:
        return roc(self.scores, self.member)

    def summary(self, target: Target) -> dict[str, Any]:
        curve = self.roc
        per_record = [end - start for start, end in self.spans]
        return {
            "attack": self.attack,
            "family": "membership",
            "unit": "record",
            "units": len(self.spans),
            "success_rate": (1.0 + curve.advantage) / 2,  # balanced accuracy at the best threshold
            "queries": float(np.median(per_record)) if per_record else 0.0,
            "auc": curve.auc,
            "advantage": curve.advantage,
            **detection(target.log, self.spans).summary(),
            "params": self.params,
            "roc": {"fpr": curve.fpr.round(4).tolist(), "tpr": curve.tpr.round(4).tolist()},
            "seconds": round(self.seconds, 3),
        }


def _answers_per_record(target: Target, x: np.ndarray) -> tuple[Answers, list[tuple[int, int]]]:
    start = target.queries
    answers = target.query(x)
    return answers, [(start + i, start + i + 1) for i in range(len(x))]


def log_likelihood(answers: Answers, y: np.ndarray) -> np.ndarray:
    """``log p_y`` per row; NaN where refused."""
    return np.log(np.maximum(answers.scores[np.arange(len(y)), y], 1e-300))


def threshold_attacks(target: Target, data: MembershipData) -> list[MembershipRun]:
    """Yeom's loss threshold and the label-free confidence threshold, from one query per record."""
    started = time.perf_counter()
    answers, spans = _answers_per_record(target, data.x)
    seconds = time.perf_counter() - started
    return [
        MembershipRun(
            "membership-loss",
            {},
            log_likelihood(answers, data.y),
            data.member,
            tuple(spans),
            seconds,
        ),
        MembershipRun(
            "membership-confidence",
            {},
            answers.scores.max(axis=1),
            data.member,
            tuple(spans),
            seconds,
        ),
    ]


def _features(scores: np.ndarray, y: np.ndarray) -> np.ndarray:
    top = -np.sort(-scores, axis=1)[:, :3]
    return np.column_stack([np.log(np.maximum(scores[np.arange(len(y)), y], 1e-300)), top])


def shadow_attack(
    target: Target,
    data: MembershipData,
    make_shadow: ShadowFactory,
    rng: np.random.Generator,
    *,
    shadows: int = 4,
) -> MembershipRun:
    """Shokri et al. with ``shadows`` shadow models built by ``make_shadow(seed)``."""
    from sklearn.ensemble import GradientBoostingClassifier

    started = time.perf_counter()
    c = target.spec.n_classes
    features, labels = [], []
    for _ in range(shadows):
        inside = rng.permutation(len(data.x_attacker)) < len(data.x_attacker) // 2
        model = make_shadow(int(rng.integers(2**31)))
        model.fit(data.x_attacker[inside], data.y_attacker[inside])
        scores = np.zeros((len(data.x_attacker), c))
        scores[:, model.classes_] = model.predict_proba(data.x_attacker)
        features.append(_features(scores, data.y_attacker))
        labels.append(inside)
    attack_model = GradientBoostingClassifier(random_state=int(rng.integers(2**31)))
    attack_model.fit(np.concatenate(features), np.concatenate(labels))
    answers, spans = _answers_per_record(target, data.x)
    inferred = np.full(len(data.x), np.nan)
    kept = answers.answered
    if kept.any():
        features_kept = _features(answers.scores[kept], data.y[kept])
        inferred[kept] = attack_model.predict_proba(features_kept)[:, 1]
    return MembershipRun(
        "membership-shadow",
        {"shadows": shadows},
        inferred,
        data.member,
        tuple(spans),
        time.perf_counter() - started,
    )


def label_only_attack(
    target: Target,
    data: MembershipData,
    rng: np.random.Generator,
    *,
    neighbours: int = 50,
    sigma: float = 0.5,
) -> MembershipRun:
    """Choquette-Choo et al.'s noise-robustness attack: ``neighbours`` queries per
    record, Gaussian noise of ``sigma`` times the attacker data's per-feature
    standard deviation, clipped to the input range."""
    started = time.perf_counter()
    spec = target.spec
    scale = sigma * data.x_attacker.std(axis=0)
    scores = np.empty(len(data.x))
    spans = []
    for i, (x, y) in enumerate(zip(data.x, data.y, strict=True)):
        batch = np.vstack([x, spec.clip(x + rng.normal(0.0, 1.0, (neighbours, x.size)) * scale)])
        start = target.queries
        labels = target.query(batch).labels
        spans.append((start, target.queries))
        scores[i] = np.mean(labels == y)  # refused rows never match
    return MembershipRun(
        "membership-label-only",
        {"neighbours": neighbours, "sigma": sigma},
        scores,
        data.member,
        tuple(spans),
        time.perf_counter() - started,
    )

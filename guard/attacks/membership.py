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
* ``lira``: Carlini, Chien, Nasr, Song, Terzis, Tramer. "Membership Inference
  Attacks From First Principles." IEEE S&P 2022 (the online Likelihood Ratio
  Attack). Shadow models of the target's recipe train on random halves of the
  attacker's data together with the records under test, so each record is in
  about half of them; per record, Gaussians are fitted to the logit-scaled
  confidence ``φ = log(p_y / (1 - p_y))`` of the shadows that trained on it and
  of those that did not (one variance each, pooled over records: the paper's
  choice for few shadows), and the score is the log likelihood ratio of the
  target's released ``φ``. Built to be judged at low false-positive rates.
* ``label-only``: Choquette-Choo, Tramer, Carlini, Papernot. "Label-Only
  Membership Inference Attacks." ICML 2021. Score: the fraction of ``n``
  Gaussian neighbours of ``x`` (and ``x`` itself) the target still labels ``y``;
  members sit farther from the boundary. Defences that perturb scores do not
  touch it.

What the attacker holds (:func:`membership_data`): the evaluation set is the
same for every attack, ``k`` members and ``k`` non-members. The attacker's own
data is the *other* half of the non-members, disjoint from the target's members
and from the evaluation set; shadow models train on it and the label-only noise
scale comes from its per-feature spread. Reported: AUC, the advantage
``max_t (TPR - FPR)`` over thresholds ``t`` (the best threshold, an upper bound
for one the attacker would have to pick) and the TPR at 0.1% FPR (Carlini et al.:
what an attacker gets when it must be almost never wrong; chance is 0.001, and
with fewer than 1,000 non-members it is the TPR at no false positive). A refused
query scores as the least member-like value.
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
LOW_FPR = 0.001  # the false-positive rate TPR is reported at


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
    """Split a demo model's data (:func:`split_membership`)."""
    from guard.models import load_split

    split = load_split(name)
    return split_membership(
        split.x_members, split.y_members, split.x_nonmembers, split.y_nonmembers, rng, size=size
    )


def split_membership(
    x_members: np.ndarray,
    y_members: np.ndarray,
    x_nonmembers: np.ndarray,
    y_nonmembers: np.ndarray,
    rng: np.random.Generator,
    *,
    size: int | None = None,
) -> MembershipData:
    """Half the non-members go to the attacker; the other half, with as many members
    drawn at random, form the evaluation set (``size`` caps each side)."""
    order = rng.permutation(len(x_nonmembers))
    half = len(order) // 2
    attacker, held = order[:half], order[half:]
    k = min(len(held), len(x_members), size or len(held))
    members = rng.choice(len(x_members), k, replace=False)
    held = held[:k]
    # Interleaved at random: a defence that kicks in part-way must not meet one side only.
    shuffle = rng.permutation(2 * k)
    return MembershipData(
        x=np.concatenate([x_members[members], x_nonmembers[held]])[shuffle].astype(np.float64),
        y=np.concatenate([y_members[members], y_nonmembers[held]])[shuffle],
        member=np.concatenate([np.ones(k, dtype=bool), np.zeros(k, dtype=bool)])[shuffle],
        x_attacker=x_nonmembers[attacker].astype(np.float64),
        y_attacker=y_nonmembers[attacker],
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

    def tpr_at(self, fpr: float) -> float:
        """The largest TPR of a threshold whose FPR is at most ``fpr``."""
        return float(np.max(self.tpr[self.fpr <= fpr]))


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
            "tpr_at_0.1%_fpr": curve.tpr_at(LOW_FPR),
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


def logit_confidence(scores: np.ndarray, y: np.ndarray) -> np.ndarray:
    """LiRA's ``φ = log(p_y / (1 - p_y))``, ``p_y`` clipped to ``[1e-7, 1 - 1e-7]`` (FP32)."""
    p = np.clip(scores[np.arange(len(y)), y].astype(np.float64), 1e-7, 1.0 - 1e-7)
    return np.log(p) - np.log1p(-p)


@dataclass(frozen=True, slots=True)
class LiraReference:
    """Per-record Gaussians of ``φ`` from shadow models that trained on the record (in)
    and that did not (out); :meth:`score` is the log likelihood ratio of an answer."""

    mu_in: np.ndarray
    sd_in: float
    mu_out: np.ndarray
    sd_out: float

    @classmethod
    def fit(
        cls,
        data: MembershipData,
        n_classes: int,
        make_shadow: ShadowFactory,
        rng: np.random.Generator,
        *,
        shadows: int = 16,
    ) -> LiraReference:
        """``shadows`` models, each on a random half of the attacker's data and the records."""
        x_pool = np.concatenate([data.x_attacker, data.x])
        y_pool = np.concatenate([data.y_attacker, data.y])
        tested = slice(len(data.x_attacker), None)
        phi = np.empty((shadows, len(data.x)))
        inside = np.empty((shadows, len(data.x)), dtype=bool)
        for s in range(shadows):
            chosen = rng.random(len(x_pool)) < 0.5
            model = make_shadow(int(rng.integers(2**31)))
            model.fit(x_pool[chosen], y_pool[chosen])
            scores = np.zeros((len(data.x), n_classes))
            scores[:, model.classes_] = model.predict_proba(data.x)
            phi[s], inside[s] = logit_confidence(scores, data.y), chosen[tested]
        mu_in, sd_in = _pooled_gaussian(phi, inside)
        mu_out, sd_out = _pooled_gaussian(phi, ~inside)
        return cls(mu_in, sd_in, mu_out, sd_out)

    def score(self, answers: Answers, y: np.ndarray) -> np.ndarray:
        """The log likelihood ratio of each answer (NaN where refused)."""
        observed = logit_confidence(answers.scores, y)
        ratio = _log_normal(observed, self.mu_in, self.sd_in) - _log_normal(
            observed, self.mu_out, self.sd_out
        )
        return np.where(answers.answered, ratio, np.nan)


def lira_attack(
    target: Target,
    data: MembershipData,
    make_shadow: ShadowFactory,
    rng: np.random.Generator,
    *,
    shadows: int = 16,
) -> MembershipRun:
    """Carlini et al.'s online LiRA with ``shadows`` models built by ``make_shadow(seed)``."""
    started = time.perf_counter()
    reference = LiraReference.fit(data, target.spec.n_classes, make_shadow, rng, shadows=shadows)
    answers, spans = _answers_per_record(target, data.x)
    return MembershipRun(
        "membership-lira",
        {"shadows": shadows},
        reference.score(answers, data.y),
        data.member,
        tuple(spans),
        time.perf_counter() - started,
    )


def _pooled_gaussian(phi: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-record means of ``phi`` where ``mask`` (the overall mean for a record with
    none) and one standard deviation pooled over every record."""
    counts = mask.sum(axis=0)
    overall = float(phi[mask].mean()) if mask.any() else 0.0
    mean = np.where(counts > 0, (phi * mask).sum(axis=0) / np.maximum(counts, 1), overall)
    spread = float(np.sqrt(((phi - mean) ** 2)[mask].mean())) if mask.any() else 1.0
    return mean, max(spread, 1e-3)


def _log_normal(x: np.ndarray, mean: np.ndarray, sd: float) -> np.ndarray:
    return -0.5 * ((x - mean) / sd) ** 2 - np.log(sd)


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

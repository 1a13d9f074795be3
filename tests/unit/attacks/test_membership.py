"""Membership attacks find the random forest's members; the ROC is computed right."""

from __future__ import annotations

import numpy as np
import pytest

from guard.attacks.membership import (
    LiraReference,
    MembershipData,
    label_only_attack,
    lira_attack,
    membership_data,
    roc,
    shadow_attack,
    threshold_attacks,
)
from guard.attacks.targets import Answers, OnnxTarget
from guard.defenses.privacy import ConfidenceBins
from tests.unit.attacks.scripted import ScriptedDefence

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def data() -> MembershipData:
    return membership_data("breast_cancer", np.random.default_rng(0))


def test_the_attacker_data_is_disjoint_from_members_and_evaluation(data: MembershipData) -> None:
    assert data.member.sum() == (~data.member).sum() == len(data.x) // 2
    rows = {r.tobytes() for r in data.x}
    assert not rows & {r.tobytes() for r in data.x_attacker}


def test_threshold_attacks_find_members_with_one_query_each(data: MembershipData) -> None:
    target = OnnxTarget.builtin("breast_cancer")
    runs = threshold_attacks(target, data)
    assert target.queries == len(data.x)
    for run in runs:
        summary = run.summary(target)
        assert summary["auc"] > 0.55 and summary["advantage"] > 0.05 and summary["queries"] == 1


def test_shadow_and_label_only_attacks_beat_chance(data: MembershipData) -> None:
    from sklearn.ensemble import RandomForestClassifier

    target = OnnxTarget.builtin("breast_cancer")
    shadow = shadow_attack(
        target,
        data,
        lambda seed: RandomForestClassifier(30, random_state=seed, n_jobs=1),
        np.random.default_rng(0),
        shadows=2,
    )
    assert shadow.roc.auc > 0.55 and shadow.roc.advantage > 0.05
    label_only = label_only_attack(target, data, np.random.default_rng(0), neighbours=20)
    assert label_only.roc.auc > 0.5 and label_only.roc.advantage > 0.0
    assert label_only.summary(target)["queries"] == 21


def test_refused_records_rank_as_non_members(data: MembershipData) -> None:
    target = ScriptedDefence(OnnxTarget.builtin("breast_cancer"), deny_from=1)
    (loss, _) = threshold_attacks(target, data)
    assert loss.roc.auc == 0.5 and loss.summary(target)["detected_fraction"] == 1.0


def test_roc_handles_perfect_inverse_and_tied_scores() -> None:
    member = np.array([True, True, False, False])
    perfect = roc(np.array([0.9, 0.8, 0.2, 0.1]), member)
    assert perfect.auc == 1.0 and perfect.advantage == 1.0
    assert roc(np.array([0.1, 0.2, 0.8, 0.9]), member).auc == 0.0
    tied = roc(np.array([0.5, 0.5, 0.5, 0.5]), member)
    assert tied.auc == 0.5 and tied.advantage == 0.0
    assert roc(np.array([0.9, np.nan, 0.3, 0.4]), member).auc == 0.5


def test_roc_reports_tpr_at_a_false_positive_rate() -> None:
    member = np.array([True] * 4 + [False] * 4)
    curve = roc(np.array([0.9, 0.8, 0.3, 0.2, 0.85, 0.1, 0.05, 0.0]), member)
    assert curve.tpr_at(0.0) == 0.25  # 0.9 alone, before the first non-member
    assert curve.tpr_at(0.2) == 0.25 and curve.tpr_at(0.25) == 1.0
    assert roc(np.full(8, 0.5), member).tpr_at(0.001) == 0.0  # ties move together


def _forest(seed: int) -> object:
    from sklearn.ensemble import RandomForestClassifier

    return RandomForestClassifier(30, random_state=seed, n_jobs=1)


def test_lira_finds_the_forests_members_and_reports_low_fpr(data: MembershipData) -> None:
    target = OnnxTarget.builtin("breast_cancer")
    run = lira_attack(target, data, _forest, np.random.default_rng(0), shadows=8)
    summary = run.summary(target)
    assert run.roc.auc > 0.6 and summary["queries"] == 1 and target.queries == len(data.x)
    assert summary["tpr_at_0.1%_fpr"] == run.roc.tpr_at(0.001)


def test_lira_loses_its_signal_when_every_right_answer_has_the_same_confidence(
    data: MembershipData,
) -> None:
    reference = LiraReference.fit(data, 2, _forest, np.random.default_rng(1), shadows=8)
    scores = OnnxTarget.builtin("breast_cancer").query(data.x).scores

    def lira(released: np.ndarray) -> float:
        answers = Answers(released.astype(np.float64), released.argmax(axis=1))
        return roc(reference.score(answers, data.y), data.member).auc

    binned = ConfidenceBins(confidences=(0.94,)).apply(scores.astype(np.float32))
    right = scores.argmax(axis=1) == data.y
    floor = roc(right.astype(float), data.member).auc  # what the label alone gives
    assert lira(scores) > 0.65
    assert lira(binned) < lira(scores) - 0.1 and lira(binned) < floor + 0.05

"""Membership attacks find the random forest's members; the ROC is computed right."""

from __future__ import annotations

import numpy as np
import pytest

from guard.attacks.membership import (
    MembershipData,
    label_only_attack,
    membership_data,
    roc,
    shadow_attack,
    threshold_attacks,
)
from guard.attacks.targets import OnnxTarget
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

"""Targets count one query per row, log status and verdict per row, and mark refusals."""

from __future__ import annotations

import numpy as np
import pytest

from guard.attacks.budget import BudgetExhausted, Oracle
from guard.attacks.detection import detection
from guard.attacks.targets import REFUSED, Answers, OnnxTarget, QueryLog, Target, TargetSpec
from tests.unit.attacks.scripted import ScriptedDefence


def test_onnx_target_counts_rows_and_matches_the_model(
    digits: tuple[np.ndarray, np.ndarray],
) -> None:
    x, y = digits
    target = OnnxTarget.builtin("digits", batch_size=7)
    answers = target.query(x[:20])
    assert target.queries == 20 and len(target.log) == 20
    assert answers.scores.shape == (20, 10) and answers.answered.all()
    np.testing.assert_allclose(answers.scores.sum(axis=1), 1.0, atol=1e-5)
    assert np.array_equal(answers.labels, answers.scores.argmax(axis=1))
    assert np.mean(answers.labels == y[:20]) > 0.8
    assert set(target.log.status) == {200} and set(target.log.verdicts) == {None}


def test_builtin_specs_record_the_input_range() -> None:
    digits = TargetSpec.builtin("digits")
    assert (digits.n_features, digits.n_classes, float(digits.lo), float(digits.hi)) == (
        64,
        10,
        0.0,
        16.0,
    )
    assert digits.scalar_range
    cancer = TargetSpec.builtin("breast_cancer")
    assert cancer.lo.shape == (30,) and not cancer.scalar_range


def test_query_refuses_a_wrong_shape(digits_target: OnnxTarget) -> None:
    with pytest.raises(ValueError, match=r"\[N, 64\]"):
        digits_target.query(np.zeros((2, 63)))


class LabelsOnly(Target):
    def _send(self, x: np.ndarray) -> tuple[Answers, int, str | None]:
        return (
            self._answers({"label": np.arange(len(x)) % 3}, len(x), "probabilities", "label"),
            200,
            "degrade",
        )


def test_a_label_only_answer_reads_as_one_hot_scores() -> None:
    target = LabelsOnly(TargetSpec(4, 3, np.asarray(0.0), np.asarray(1.0)), batch_size=2)
    answers = target.query(np.zeros((5, 4)))
    assert np.array_equal(answers.scores, np.eye(3)[[0, 1, 0, 1, 0]])
    assert target.log.verdicts == ["degrade"] * 5


class Abstaining(Target):
    def _send(self, x: np.ndarray) -> tuple[Answers, int, str | None]:
        outputs = {"label": np.array([1, -1]), "probabilities": np.array([[0.2, 0.8], [0.5, 0.5]])}
        return self._answers(outputs, len(x), "probabilities", "label"), 200, "allow"


def test_an_abstention_is_no_answer_though_the_query_was_served() -> None:
    target = Abstaining(TargetSpec(3, 2, np.asarray(0.0), np.asarray(1.0)), batch_size=2)
    answers = target.query(np.zeros((2, 3)))
    assert answers.answered.tolist() == [True, False] and np.isnan(answers.scores[1]).all()
    assert answers.scores[0].tolist() == [0.2, 0.8] and not target.log.refused().any()


def test_refused_rows_have_no_answer_and_detection_reads_verdicts_and_status(
    digits_target: OnnxTarget,
) -> None:
    defence = ScriptedDefence(digits_target, flag_from=3, deny_from=5)
    answers = defence.query(np.zeros((6, 64)))
    assert answers.answered.tolist() == [True] * 4 + [False] * 2
    assert (answers.labels[4:] == REFUSED).all() and np.isnan(answers.scores[4:]).all()
    assert defence.log.detected().tolist() == [False, False, True, True, True, True]
    found = detection(defence.log, [(0, 2), (2, 6)])
    assert found.first_queries == (1,) and found.detected_fraction == 0.5
    assert found.refused_fraction == pytest.approx(2 / 6)


def test_a_400_is_refused_but_not_detected() -> None:
    log = QueryLog()
    log.record(2, 400, "allow")
    log.record(1, 429, None)
    assert log.refused().tolist() == [True, True, True]
    assert log.detected().tolist() == [False, False, True]


def test_the_oracle_never_exceeds_its_budget(digits_target: OnnxTarget) -> None:
    oracle = Oracle(digits_target, 5)
    oracle.ask(np.zeros((3, 64)))
    with pytest.raises(BudgetExhausted):
        oracle.ask(np.zeros((3, 64)))
    assert oracle.used == 3 and oracle.remaining == 2 and oracle.span == (0, 3)

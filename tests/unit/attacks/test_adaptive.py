"""Adaptive attacker wrappers and the honest traffic mix, against local targets."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from guard.attacks import adaptive
from guard.attacks.benign import CATEGORIES, TrafficMix, priming_requests
from guard.attacks.targets import Answers, OnnxTarget, Target, TargetSpec
from guard.models import load_samples

SPEC = TargetSpec.builtin("digits")


class Gatekeeper(Target):
    """Refuses (403 deny) a row unless it differs from the last refused one by more
    than ``tolerance`` in L-inf: a crude near-duplicate detector; ``label_only``
    answers one-hot after ``label_only`` queries."""

    def __init__(self, *, tolerance: float, label_only: int | None = None) -> None:
        super().__init__(SPEC, batch_size=1)
        self.inner = OnnxTarget.builtin("digits")
        self.tolerance = tolerance
        self.label_only = label_only
        self.seen: list[np.ndarray] = []

    def _send(self, x: np.ndarray) -> tuple[Answers, int, str | None]:
        near = any(np.abs(x[0] - s).max() <= self.tolerance for s in self.seen)
        self.seen.append(x[0].copy())
        if near:
            return Answers.refused(1, SPEC.n_classes), 403, "deny"
        answers = self.inner.query(x)
        if self.label_only is not None and self.queries >= self.label_only:
            return Answers(np.eye(SPEC.n_classes)[answers.labels], answers.labels), 200, None
        return answers, 200, "allow"


def digit() -> np.ndarray:
    x, _ = load_samples("digits")
    return x[:1].astype(np.float64)


def test_resampling_resends_with_more_noise_until_answered() -> None:
    gate = Gatekeeper(tolerance=0.5)
    wrapped = adaptive.Resampling(gate, np.random.default_rng(0), sigma=0.001, growth=2.0)
    first = wrapped.query(digit())
    second = wrapped.query(digit())  # the same row again: refused until the noise is large
    assert first.answered.all() and second.answered.all()
    assert wrapped.queries == 2 and wrapped.resent > 0
    assert adaptive.real_queries(wrapped) == gate.queries == 2 + wrapped.resent
    assert wrapped.log.status == [200, 200]


def test_resampling_gives_up_after_its_retries() -> None:
    gate = Gatekeeper(tolerance=100.0)  # refuses everything after the first query
    wrapped = adaptive.Resampling(gate, np.random.default_rng(0), retries=3)
    wrapped.query(digit())
    answers = wrapped.query(digit())
    assert not answers.answered.any() and wrapped.log.status[-1] == 403
    assert gate.queries == 1 + 4


@pytest.mark.parametrize(("accept", "resends"), [(False, True), (True, False)])
def test_label_only_answers_count_as_caught_unless_accepted(accept: bool, resends: bool) -> None:
    gate = Gatekeeper(tolerance=-1.0, label_only=2)
    wrapped = adaptive.Resampling(
        gate, np.random.default_rng(0), retries=2, accept_label_only=accept
    )
    for _ in range(4):
        wrapped.query(digit())
    assert (wrapped.resent > 0) is resends


def test_looks_caught_reads_status_verdict_and_one_hot_scores() -> None:
    scores = np.array([[0.7, 0.3] + [0.0] * 8])
    one_hot = np.eye(10)[[1]]
    ok = Answers(scores, np.array([0]))
    assert not adaptive.looks_caught(ok, 200, "allow", scored=True)
    assert adaptive.looks_caught(ok, 200, "degrade", scored=False)
    assert adaptive.looks_caught(Answers.refused(1, 10), 403, None, scored=False)
    assert adaptive.looks_caught(Answers(one_hot, np.array([1])), 200, None, scored=True)
    assert not adaptive.looks_caught(Answers(one_hot, np.array([1])), 200, None, scored=False)


def test_sybil_rotates_over_its_accounts() -> None:
    accounts = [OnnxTarget.builtin("digits") for _ in range(10)]
    wrapped = adaptive.Sybil(accounts)
    for _ in range(25):
        wrapped.query(digit())
    assert [a.queries for a in accounts] == [3] * 5 + [2] * 5
    assert adaptive.real_queries(wrapped) == 25


def test_flushing_sends_junk_between_attack_steps_from_other_accounts() -> None:
    attacker, *junk = [OnnxTarget.builtin("digits") for _ in range(3)]
    wrapped = adaptive.Flushing(attacker, junk, np.random.default_rng(0), every=5, junk=120)
    for _ in range(16):
        wrapped.query(digit())
    assert attacker.queries == 16 and wrapped.flushes == 3
    assert [j.queries for j in junk] == [240, 120]
    assert adaptive.real_queries(wrapped) == 16 + 360


def test_judge_on_the_bare_model_checks_label_and_radius() -> None:
    bare = OnnxTarget.builtin("digits")
    x, y = load_samples("digits")
    other = int(np.flatnonzero(y != y[0])[0])
    far = adaptive.judge_on(bare, x[0], int(y[0]), x[other])
    assert far.success and far.l2 is not None and far.l2 > 1
    assert not adaptive.judge_on(bare, x[0], int(y[0]), x[other], l2=far.l2 / 2).success
    assert not adaptive.judge_on(bare, x[0], int(y[0]), x[0]).success
    assert not adaptive.judge_on(bare, x[0], int(y[0]), None).success


def test_the_mix_has_its_proportions_and_one_fresh_input_per_row() -> None:
    x, y = load_samples("digits")
    mix = TrafficMix(queries=30, popular=0.3, retry=0.1, jitter=0.2)
    plan = mix.plan(40, x, y, SPEC, np.random.default_rng(0))  # shares of 21 rows: enough
    counts = Counter(r.category for r in plan)
    assert set(counts) == set(CATEGORIES) and len(plan) == 1200
    for category, share in (("popular", 0.3), ("retry", 0.1), ("jitter", 0.2), ("fresh", 0.4)):
        assert abs(counts[category] / 1200 - share) < 0.05, category
    fresh = [r.source for r in plan if r.category == "fresh"]
    assert len(fresh) == len(set(fresh))
    by_popularity = Counter(r.source for r in plan if r.category == "popular").most_common()
    assert by_popularity[0][1] > 3 * by_popularity[-1][1]  # Zipf: a few are very popular


def test_priming_guesses_the_popular_inputs_exactly_and_jittered() -> None:
    x, y = load_samples("digits")
    mix = TrafficMix(queries=30, pool=6)
    plans = priming_requests(
        mix, x, y, SPEC, np.random.default_rng(1), accounts=5, mix_rng=np.random.default_rng(2)
    )
    honest = mix.plan(10, x, y, SPEC, np.random.default_rng(2))
    popular = {r.x.tobytes() for r in honest if r.category == "popular"}
    assert len(plans) == 5 and all(len(p) == 12 for p in plans)
    exact = {r.x.tobytes() for p in plans for r in p if r.jitter is None}
    assert popular <= exact
    assert all(r.x.tobytes() not in exact for p in plans for r in p if r.jitter is not None)


def test_the_suite_runs_adaptive_attackers_and_judges_them_on_the_bare_model() -> None:
    from guard.attacks.suite import SuiteConfig, run_suite

    calls: list[int | None] = []

    def make_target(client: int | None) -> Target:
        calls.append(client)
        return OnnxTarget.builtin("digits")

    config = SuiteConfig(model="digits", samples=2, budget=80, seed=0, sybil_keys=4)
    report = run_suite(["oars-square-linf", "sybil-square-linf"], config, make_target)
    oars, sybil = report.entries
    assert calls == [None, None, -1, -2, -3]  # Sybil: its own account and three more
    for entry in (oars, sybil):
        assert entry["family"] == "adaptive" and entry["units"] == 2
        # undefended, the run through the target repeats the bare run draw for draw
        assert entry["success_rate"] == entry["bare_success_rate"]
        assert entry["real_queries"] == entry["bare_real_queries"] > 2
    assert sybil["accounts"] == 4


def test_resampling_square_widens_its_proposals_when_caught_and_stays_in_the_ball() -> None:
    from guard.attacks.evasion import run_evasion

    x, y = load_samples("digits")
    sent: list[np.ndarray] = []

    class Recording(Gatekeeper):
        def _send(self, rows: np.ndarray) -> tuple[Answers, int, str | None]:
            sent.append(rows[0].copy())
            return super()._send(rows)

    gate = Recording(tolerance=2.5)  # refuses a query within 2.5 of any earlier one
    attack = adaptive.ResamplingSquareLinf(epsilon=2.0, retries=4)
    run = run_evasion(attack, gate, x[:2], y[:2], budget=80, rng=np.random.default_rng(0))
    refused = sum(s != 200 for s in gate.log.status)
    assert refused > 0 and gate.queries == sum(s.queries for s in run.samples)
    for i, sample in enumerate(run.samples):
        start = sum(s.queries for s in run.samples[:i])
        for row in sent[start + 1 : start + sample.queries]:  # after the clean query
            assert np.abs(row - x[i]).max() <= 2.0 + 1e-5
    # the refusals came in runs that ended with an answered, widened proposal
    pairs = itertools.pairwise(gate.log.status)
    answered_after_refusal = sum(1 for a, b in pairs if a != 200 and b == 200)
    assert answered_after_refusal > 0

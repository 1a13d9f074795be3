"""The radius as a score oracle (issue 21), with a small budget: under a label-only policy,
what certification now releases gives Square no more than the labels alone do.

The full measurement (more digits, more queries, the membership attack, the release as it
was before) is ``python -m tests.benchmarks.measure_certify_leak``; docs/certification.md
has its numbers.
"""

from __future__ import annotations

import math

import numpy as np

from guard.models import load_samples
from tests.benchmarks.measure_certify_leak import LabelOnlyPolicy, square_success

SAMPLES, BUDGET, EPSILON = 12, 100, 16.0


def test_the_released_certificate_gives_square_no_more_than_labels() -> None:
    x, y = load_samples("digits")
    x, y = x[:SAMPLES].astype(np.float64), y[:SAMPLES]
    off = square_success("off", x, y, epsilon=EPSILON, budget=BUDGET, seed=0)
    served = square_success("policy", x, y, epsilon=EPSILON, budget=BUDGET, seed=0)
    error = 2 * math.hypot(off["stderr"], served["stderr"]) + 1 / SAMPLES
    assert off["attacked"] == served["attacked"] >= SAMPLES - 2
    assert served["success_rate"] <= off["success_rate"] + error, (off, served)


def test_the_attackers_score_follows_the_radius_only_where_it_is_released() -> None:
    """The harness reads the radius: graded before, two levels at most now."""
    x, labels = load_samples("digits")
    other = int(np.flatnonzero(labels != labels[0])[0])
    t = np.linspace(0.0, 1.0, 21)[:, None]
    walk = ((1 - t) * x[0] + t * x[other]).astype(np.float32)
    levels = {}
    for condition in ("raw", "policy"):
        with LabelOnlyPolicy(condition) as target:
            answers = target.query(walk)
        levels[condition] = len({round(float(s), 9) for s in answers.scores.max(axis=1)})
    assert levels["raw"] >= 4 and levels["policy"] <= 2, levels

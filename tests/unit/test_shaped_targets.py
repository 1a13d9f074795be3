"""Targets wrapping targets on a model with a multi-dimensional input (shapes: [32, 32, 3]).

A wrapper's ``_send`` gets each batch already in the model's shape and passes it to the
inner target's ``query``, which must take it as it takes flat rows.
"""

from __future__ import annotations

import numpy as np

from guard.attacks import adaptive
from guard.attacks.targets import OnnxTarget
from guard.models import load_samples


def test_wrappers_over_an_image_model_answer_as_the_bare_model() -> None:
    x, _ = load_samples("shapes")
    rows = x[:4]
    bare = OnnxTarget.builtin("shapes").query(rows)
    sybil = adaptive.Sybil([OnnxTarget.builtin("shapes"), OnnxTarget.builtin("shapes")])
    resampling = adaptive.Resampling(OnnxTarget.builtin("shapes"), np.random.default_rng(0))
    for wrapper in (sybil, resampling):
        answers = wrapper.query(rows)
        assert answers.answered.all()
        np.testing.assert_array_equal(answers.labels, bare.labels)


def test_a_batch_in_the_model_shape_is_taken_as_its_flat_rows() -> None:
    x, _ = load_samples("shapes")
    target = OnnxTarget.builtin("shapes")
    flat = target.query(x[:3])
    shaped = target.query(x[:3].reshape(3, 32, 32, 3))
    np.testing.assert_array_equal(flat.scores, shaped.scores)
    assert target.queries == 6

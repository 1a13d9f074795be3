"""Rules several stages share: which input a stage watches.

At load, :func:`watched_input` picks the model input a stage's ``input`` key
names, or the model's only input when the key is absent (when the metadata is
known); :func:`only_input` is that default as an option's ``derive``. At request
time, :func:`request_input` picks the named input of the request, or its only
one, with a 400 naming the field otherwise. Which *output* holds the class is
:func:`guard.inference.class_output` (below the stages: the pipeline uses it too).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from guard.errors import RequestError

if TYPE_CHECKING:
    from guard.inference import TensorSpec
    from guard.pipeline import RequestContext
    from guard.stages.env import StageEnv


def watched_input(env: StageEnv, name: str | None) -> TensorSpec | None:
    """The model input named ``name``, or the model's only input when ``name`` is None;
    None when the metadata is unknown, ``name`` names none, or the model takes several."""
    specs = env.metadata.inputs if env.metadata is not None else ()
    if name is None:
        return specs[0] if len(specs) == 1 else None
    return next((spec for spec in specs if spec.name == name), None)


def only_input(values: Mapping[str, Any], env: StageEnv) -> str | None:
    """``input``'s default (an option's ``derive``): the model's only input, when known."""
    spec = watched_input(env, None)
    return spec.name if spec is not None else None


def request_input(ctx: RequestContext, name: str | None, *, several: str) -> tuple[str, np.ndarray]:
    """The request's input ``name``, or its only input when ``name`` is None; a 400 when it
    lacks the input or holds several and none is named (``several`` says what needs one)."""
    inputs = ctx.request.inputs
    if name is None:
        if len(inputs) != 1:
            raise RequestError(
                f"inputs: {several}; got {len(inputs)} (name it with the stage's input key)"
            )
        name = next(iter(inputs))
    if name not in inputs:
        raise RequestError(f"inputs: input {name!r} is required")
    return name, inputs[name]

"""Rules several stages share: which input a stage watches, which class a response gives.

At load, :func:`watched_input` picks the model input a stage's ``input`` key
names, or the model's only input when the key is absent (when the metadata is
known); :func:`only_input` is that default as an option's ``derive``. At request
time, :func:`request_input` picks the named input of the request, or its only
one, with a 400 naming the field otherwise. Whether an output holds the class is
:func:`guard.inference.class_output` (below the stages: the pipeline uses it too);
:func:`predicted` reads the class of each row of a response with it (the detectors
that watch answers: ``prada``, ``coverage``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from guard.errors import RequestError
from guard.inference import class_output

if TYPE_CHECKING:
    from guard.inference import InferResponse, TensorSpec
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


PREFERRED_OUTPUTS = ("probabilities", "label")
OUTPUT_DOC = (
    "the output the class is read from: the argmax of a `[batch, classes]` score output or a "
    "`[batch]` label output; default: `probabilities`, else `label`. When the response lacks "
    "it (the client asked for other outputs), any output of either shape"
)


def predicted(
    response: InferResponse, rows: int, output: str | None
) -> tuple[np.ndarray, int | None] | None:
    """The predicted class of each row and, from a score output, the number of classes (None
    from a label output); ``None`` when no output fits. Read from ``output`` (default:
    ``probabilities``, else ``label``), else from the first output that fits: a client asking
    for a subset of the outputs does not escape the detector."""
    outputs = response.outputs
    preferred = (output,) if output else PREFERRED_OUTPUTS
    for name in [*(n for n in preferred if n in outputs), *outputs]:
        value = outputs.get(name)
        if value is None or value.shape[:1] != (rows,):
            continue
        kind = class_output(value.dtype.kind, value.shape)
        if kind == "scores":
            return np.argmax(value, axis=1).astype(np.int64, copy=False), int(value.shape[1])
        if kind == "labels":
            return value.reshape(rows).astype(np.int64), None
    return None

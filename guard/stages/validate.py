"""``validate``: refuse malformed input before anything else sees it.

Keys: :class:`ValidateOptions` (docs/stage-options.md).

Failure mode: a violation is always a 400 in the protocol's error format with a
message that names the input and the first offending element; the request never
reaches later stages or the model. Casting follows numpy's ``same_kind`` rule
plus integers to floats: FP64 → FP32 is accepted, FP32 → INT64 and BYTES → FP32
are refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from guard import _native
from guard._native import Violation
from guard.errors import RequestError
from guard.inference import DATATYPES, datatype_name
from guard.pipeline import RequestContext, Verdict
from guard.stages.env import StageEnv
from guard.stages.options import OptionError, OptionsStage, option
from guard.stages.shared import watched_input

Datatype = Literal[
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64",
]  # fmt: skip


def _shape(values: Mapping[str, Any], env: StageEnv) -> tuple[int, ...] | None:
    spec = watched_input(env, values["input"])
    return tuple(spec.shape[1:]) if spec is not None else None


def _datatype(values: Mapping[str, Any], env: StageEnv) -> str | None:
    spec = watched_input(env, values["input"])
    if spec is None or spec.datatype not in DATATYPES or spec.datatype == "BYTES":
        return None
    return spec.datatype


@dataclass(frozen=True, kw_only=True)
class ValidateOptions:
    input: str | None = option(
        None, names="input", doc="the input to check; default: every input of the request"
    )
    shape: tuple[int, ...] | None = option(
        None,
        derive=_shape,
        shown="the local copy's",
        doc="per-sample shape (batch dimension excluded), `-1` for any size; "
        "default: the local model copy's input shape, else unchecked",
    )
    dtype: Datatype | None = option(
        None,
        derive=_datatype,
        shown="the local copy's",
        doc="the V2 datatype the model takes; values are cast to it in one pass. "
        "Default: the local copy's, else the client's datatype is kept",
    )
    min: float | None = option(None, doc="inclusive lower bound on every value")
    max: float | None = option(None, doc="inclusive upper bound on every value")
    allow_nonfinite: bool = option(False, doc="let NaN and ±Inf through")
    max_batch: int = option(256, min=1, doc="most samples per request")
    max_bytes: int = option(
        16 << 20, min=1, shown="16 MiB", doc="most tensor bytes per request, after the cast"
    )

    def __post_init__(self) -> None:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise OptionError("min", f"must be <= max ({self.max:g}); got {self.min:g}")


class Validate(OptionsStage[ValidateOptions]):
    name = "validate"
    Options = ValidateOptions

    async def on_request(self, ctx: RequestContext) -> Verdict:
        inputs = ctx.request.inputs
        if not inputs:
            raise RequestError("inputs: at least one input is required")
        o = self.options
        total = 0
        for target in [o.input] if o.input is not None else list(inputs):
            if target not in inputs:
                raise RequestError(f"inputs: input {target!r} is required")
            checked = self._check(target, inputs[target])
            inputs[target] = checked
            total += checked.nbytes
        if total > o.max_bytes:
            raise RequestError(
                f"inputs: {total} bytes of tensors exceed the limit of {o.max_bytes}"
            )
        return Verdict.CONTINUE

    def _check(self, name: str, array: np.ndarray) -> np.ndarray:
        o = self.options
        field = f"inputs.{name}"
        if array.ndim == 0:
            raise RequestError(f"{field}: expected a batch; got a scalar")
        if array.shape[0] > o.max_batch:
            raise RequestError(
                f"{field}: batch of {array.shape[0]} exceeds max_batch {o.max_batch}"
            )
        if o.shape is not None and not _shape_matches(array.shape[1:], o.shape):
            expected = ["batch", *(d if d >= 0 else "any" for d in o.shape)]
            raise RequestError(f"{field}: shape {list(array.shape)} does not match {expected}")
        if array.dtype.kind in "OSUV":
            raise RequestError(f"{field}: datatype BYTES is not accepted; expected numbers")
        target = DATATYPES[o.dtype] if o.dtype is not None else array.dtype
        if not _castable(array.dtype, target):
            given, wanted = datatype_name(array.dtype), datatype_name(target)
            raise RequestError(f"{field}: datatype {given} cannot be used as {wanted}")
        out, index, code = _native.check_and_cast(array, target, o.min, o.max, o.allow_nonfinite)
        if index >= 0:
            where = [int(i) for i in np.unravel_index(index, array.shape)]
            value = array.reshape(-1)[index].item()
            raise RequestError(f"{field}{where}: value {value!r} {_violation(code, o, target)}")
        return out


def _violation(code: int, o: ValidateOptions, target: np.dtype[Any]) -> str:
    if code == Violation.NAN:
        return "is NaN"
    if code == Violation.INF:
        return "is infinite"
    bound = o.min if code == Violation.BELOW else o.max
    if bound is None:  # no bound set: the value does not fit the model's datatype
        return f"does not fit the model's datatype {datatype_name(target)}"
    side = "below the minimum" if code == Violation.BELOW else "above the maximum"
    return f"is {side} {bound:g}"


def _shape_matches(actual: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    return len(actual) == len(expected) and all(
        e < 0 or a == e for a, e in zip(actual, expected, strict=True)
    )


def _castable(source: np.dtype[Any], target: np.dtype[Any]) -> bool:
    if source == target:
        return True
    if source.kind == "b":
        return target.kind == "b"
    if source.kind in "iu" and target.kind == "f":
        return True
    return bool(np.can_cast(source, target, casting="same_kind"))

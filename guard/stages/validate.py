"""``validate``: refuse malformed input before anything else sees it.

YAML keys (all optional):

``input``            the input to check; default: every input of the request
``shape``            per-sample shape (batch dimension excluded), ``-1`` for any size;
                     default: the local model copy's input shape, else unchecked
``dtype``            the V2 datatype the model takes; values are cast to it in one pass.
                     Default: the local copy's, else the client's datatype is kept
``min`` / ``max``    inclusive bounds on every value; default: none
``allow_nonfinite``  let NaN and ±Inf through; default ``false``
``max_batch``        most samples per request; default 256
``max_bytes``        most tensor bytes per request, after the cast; default 16 MiB

Failure mode: a violation is always a 400 in the protocol's error format with a
message that names the input and the first offending element; the request never
reaches later stages or the model. Casting follows numpy's ``same_kind`` rule
plus integers to floats: FP64 → FP32 is accepted, FP32 → INT64 and BYTES → FP32
are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from guard import _native
from guard._native import Violation
from guard.configreader import Section
from guard.errors import RequestError
from guard.inference import DATATYPES, TensorSpec, datatype_name
from guard.pipeline import BaseStage, RequestContext, Verdict
from guard.stages.env import StageEnv


@dataclass(frozen=True, kw_only=True, slots=True)
class Rule:
    shape: tuple[int, ...] | None
    dtype: np.dtype[Any] | None
    lo: float | None
    hi: float | None
    allow_nonfinite: bool


class Validate(BaseStage):
    name = "validate"

    def __init__(
        self,
        *,
        rules: dict[str | None, Rule],
        max_batch: int,
        max_bytes: int,
    ) -> None:
        self.rules = rules  # input name -> rule; None: every input
        self.max_batch = max_batch
        self.max_bytes = max_bytes

    @classmethod
    def from_config(cls, section: Section, env: StageEnv) -> Validate:
        name = section.str("input", None)
        specs = {s.name: s for s in env.metadata.inputs} if env.metadata else {}
        if name is not None and specs and name not in specs:
            raise section.error(
                "input", f"names no input of model {env.model}; it has {', '.join(specs)}"
            )
        known: TensorSpec | None = (
            specs.get(name) if name else (next(iter(specs.values())) if len(specs) == 1 else None)
        )
        shape = section.shape("shape", None)
        if shape is None and known is not None:
            shape = known.shape[1:]
        datatype = section.choice("dtype", [d for d in DATATYPES if d != "BYTES"], None)
        if datatype is None and known is not None and known.datatype in DATATYPES:
            datatype = known.datatype if known.datatype != "BYTES" else None
        lo = section.float("min", None)
        hi = section.float("max", None)
        if lo is not None and hi is not None and lo > hi:
            raise section.error("min", f"must be <= max ({hi:g}); got {lo:g}")
        rule = Rule(
            shape=shape,
            dtype=DATATYPES[datatype] if datatype else None,
            lo=lo,
            hi=hi,
            allow_nonfinite=section.bool("allow_nonfinite", False),
        )
        stage = cls(
            rules={name: rule},
            max_batch=section.int("max_batch", 256, min=1),
            max_bytes=section.int("max_bytes", 16 << 20, min=1),
        )
        section.finish()
        return stage

    def describe(self) -> dict[str, Any]:
        return {
            "inputs": {
                name or "*": {
                    "shape": list(r.shape) if r.shape is not None else None,
                    "dtype": str(r.dtype) if r.dtype is not None else None,
                    "min": r.lo,
                    "max": r.hi,
                    "allow_nonfinite": r.allow_nonfinite,
                }
                for name, r in self.rules.items()
            },
            "max_batch": self.max_batch,
            "max_bytes": self.max_bytes,
        }

    async def on_request(self, ctx: RequestContext) -> Verdict:
        inputs = ctx.request.inputs
        if not inputs:
            raise RequestError("inputs: at least one input is required")
        total = 0
        for name, rule in self.rules.items():
            targets = [name] if name is not None else list(inputs)
            for target in targets:
                if target not in inputs:
                    raise RequestError(f"inputs: input {target!r} is required")
                checked = self._check(target, inputs[target], rule)
                inputs[target] = checked
                total += checked.nbytes
        if total > self.max_bytes:
            raise RequestError(
                f"inputs: {total} bytes of tensors exceed the limit of {self.max_bytes}"
            )
        return Verdict.CONTINUE

    def _check(self, name: str, array: np.ndarray, rule: Rule) -> np.ndarray:
        field = f"inputs.{name}"
        if array.ndim == 0:
            raise RequestError(f"{field}: expected a batch; got a scalar")
        if array.shape[0] > self.max_batch:
            raise RequestError(
                f"{field}: batch of {array.shape[0]} exceeds max_batch {self.max_batch}"
            )
        if rule.shape is not None and not _shape_matches(array.shape[1:], rule.shape):
            expected = ["batch", *(d if d >= 0 else "any" for d in rule.shape)]
            raise RequestError(f"{field}: shape {list(array.shape)} does not match {expected}")
        if array.dtype.kind in "OSUV":
            raise RequestError(f"{field}: datatype BYTES is not accepted; expected numbers")
        target = rule.dtype if rule.dtype is not None else array.dtype
        if not _castable(array.dtype, target):
            given, wanted = datatype_name(array.dtype), datatype_name(target)
            raise RequestError(f"{field}: datatype {given} cannot be used as {wanted}")
        out, index, code = _native.check_and_cast(
            array, target, rule.lo, rule.hi, rule.allow_nonfinite
        )
        if index >= 0:
            where = [int(i) for i in np.unravel_index(index, array.shape)]
            value = array.reshape(-1)[index].item()
            raise RequestError(f"{field}{where}: value {value!r} {_violation(code, rule, target)}")
        return out


def _violation(code: int, rule: Rule, target: np.dtype[Any]) -> str:
    if code == Violation.NAN:
        return "is NaN"
    if code == Violation.INF:
        return "is infinite"
    bound = rule.lo if code == Violation.BELOW else rule.hi
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

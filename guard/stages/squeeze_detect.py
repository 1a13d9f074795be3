"""``squeeze_detect``: flag inputs whose prediction moves when they are squeezed.

Feature-squeezing joint detection (Xu, Evans, Qi, NDSS 2018; see
:mod:`guard.defenses.squeeze`): the model scores the input and each squeezed
copy in one batched call; a sample's score is the largest L1 distance between
its ``output`` vector and a squeezed copy's, and the request's score is the
largest over its samples. A score above ``threshold`` is a finding (MITRE ATLAS
AML.T0043, Craft Adversarial Data). The request itself is forwarded unchanged.

Keys: :class:`SqueezeDetectOptions` (docs/stage-options.md).

Cost: one model call on ``(len(squeezers) + 1) x batch`` samples per request.
Failure mode: input errors are 400s naming the input, as in ``squeeze``; errors
of the scoring call keep their status (a local model rejecting the input: 400;
an unreachable upstream: 503).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from guard.defenses.squeeze import TECHNIQUE, distances_from_scores, squeezed_batch
from guard.errors import RequestError
from guard.inference import InferRequest, RequestedOutput
from guard.pipeline import Action, RequestContext, Verdict
from guard.stages.detector import ACTIONS_BUT_MISDIRECT
from guard.stages.env import StageEnv
from guard.stages.options import OptionError, OptionsStage, option
from guard.stages.squeeze import (
    OFFLOAD_VALUES,
    SqueezedInputOptions,
    SqueezerOptions,
    float_input,
    image_of,
)

if TYPE_CHECKING:
    from guard.backends.base import Backend


@dataclass(frozen=True, kw_only=True)
class SqueezeDetectOptions(SqueezedInputOptions):
    threshold: float = option(
        min=0.0,
        doc="flag when the score exceeds it; pick it on benign data at a target false "
        "positive rate: `guard calibrate-squeeze`",
    )
    squeezers: tuple[SqueezerOptions, ...] = option(
        doc="squeezers, each a mapping of `clip`, `bits`, `median` as in `squeeze`, "
        "e.g. `[{bits: 4}, {median: 2}]`",
    )
    output: str = option("probabilities", names="output", doc="the model output compared")
    scorer: Literal["local", "backend"] = option(
        derive=lambda values, env: "local" if env.local is not None else "backend",
        shown="`local` with a model file",
        doc="`local`: the policy's local model copy (onnxruntime, in a worker thread); "
        "`backend`: what serves the model. Either way one batched call",
    )
    action: Action = option(Action.FLAG, choices=ACTIONS_BUT_MISDIRECT, doc="what a finding does")
    on_error: Literal["closed", "open"] = option(
        "closed",
        doc="a fault of the stage itself (the answer lacks `output` or has the wrong number of "
        "rows): `closed` refuses the request (503), `open` forwards it flagged",
    )

    def __post_init__(self) -> None:
        if not self.squeezers:
            raise OptionError("squeezers", "must list at least one squeezer, e.g. [{bits: 4}]")
        for index, squeezer in enumerate(self.squeezers):
            squeezer.check(self.range, self.image, f"squeezers[{index}].")


class SqueezeDetect(OptionsStage[SqueezeDetectOptions]):
    name = "squeeze_detect"
    Options = SqueezeDetectOptions

    def __init__(self, options: SqueezeDetectOptions, env: StageEnv) -> None:
        super().__init__(options, env)
        image = image_of(options, env)
        self.squeezers = tuple(s.build(options.range, image) for s in options.squeezers)
        scorer = env.local if options.scorer == "local" else env.backend
        if scorer is None:
            local = options.scorer == "local"
            needs = "the policy's local model copy (model: ...)" if local else "a backend"
            raise OptionError("scorer", f"{options.scorer} needs {needs}")
        self.scorer: Backend = scorer

    async def on_request(self, ctx: RequestContext) -> Verdict:
        name, x = float_input(ctx, self.options.input)
        if len(x) == 0:
            return Verdict.CONTINUE
        inputs = ctx.request.inputs
        if x.size * len(self.squeezers) < OFFLOAD_VALUES:
            batch = self._batch(inputs, name)
        else:
            batch = await asyncio.get_running_loop().run_in_executor(
                None, self._batch, inputs, name
            )
        response = await self.scorer.infer(
            InferRequest(
                model_name=ctx.request.model_name,
                model_version=ctx.request.model_version,
                inputs=batch,
                outputs=[RequestedOutput(self.options.output)],
            )
        )
        if self.options.output not in response.outputs:
            raise RuntimeError(f"the model returned no output {self.options.output!r}")
        distances = distances_from_scores(
            response.outputs[self.options.output], len(x), len(self.squeezers)
        )
        per_sample = distances.max(axis=1)
        sample = int(np.argmax(per_sample))
        score = float(per_sample[sample])
        if score <= self.options.threshold:
            return Verdict.CONTINUE
        squeezer = self.squeezers[int(np.argmax(distances[sample]))]
        return ctx.report(
            self.name,
            self.options.action,
            f"squeezing ({squeezer.name}) moved {self.options.output} of sample {sample} by L1 "
            f"{score:.3f} > {self.options.threshold:g}",
            score=score,
            threshold=self.options.threshold,
            technique=TECHNIQUE,
        )

    def _batch(self, inputs: dict[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
        """Every input repeated once per squeezer, ``name`` squeezed in each repeat."""
        try:
            batch = {name: squeezed_batch(inputs[name], self.squeezers)}
        except ValueError as exc:
            raise RequestError(f"inputs.{name}: {exc}") from exc
        copies = len(self.squeezers) + 1
        for other, array in inputs.items():
            if other != name:
                batch[other] = np.concatenate([array] * copies)
        return batch

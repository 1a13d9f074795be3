"""``squeeze_detect``: flag inputs whose prediction moves when they are squeezed.

Feature-squeezing joint detection (Xu, Evans, Qi, NDSS 2018; see
:mod:`guard.defenses.squeeze`): the model scores the input and each squeezed
copy in one batched call; a sample's score is the largest L1 distance between
its ``output`` vector and a squeezed copy's, and the request's score is the
largest over its samples. A score above ``threshold`` is a finding (MITRE ATLAS
AML.T0043, Craft Adversarial Data). The request itself is forwarded unchanged.

YAML keys:

``threshold``  flag when the score exceeds it (required). Pick it on benign data
               at a target false positive rate: ``guard calibrate-squeeze``
``squeezers``  list of squeezers, each a mapping of ``clip``, ``bits``, ``median``
               as in the ``squeeze`` stage (required), e.g.
               ``[{bits: 4}, {median: 2}]``
``range``      ``[lo, hi]`` of the values; required by ``bits``
``image``      ``{height, width, channels: 1, layout: HWC}``; required by ``median``
``input``      the input to squeeze; default: the model's only input
``output``     the model output compared; default ``probabilities``
``scorer``     ``local``: the policy's local model copy (onnxruntime, in a
               worker thread); ``backend``: what serves the model (the upstream).
               Either way one batched call. Default: ``local`` when the policy
               has a model file
``action``     what a finding does; default ``flag``
``on_error``   a fault of the stage itself (the model's answer lacks ``output`` or
               has the wrong number of rows): ``closed`` (default) refuses the
               request (503), ``open`` forwards it flagged

Cost: one model call on ``(len(squeezers) + 1) x batch`` samples per request.
Failure mode: input errors are 400s naming the input, as in ``squeeze``; errors
of the scoring call keep their status (a local model rejecting the input: 400;
an unreachable upstream: 503).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import numpy as np

from guard.configreader import Section
from guard.defenses.squeeze import (
    TECHNIQUE,
    Squeezer,
    distances_from_scores,
    squeezed_batch,
)
from guard.errors import RequestError
from guard.inference import InferRequest, RequestedOutput
from guard.pipeline import Action, BaseStage, RequestContext, Verdict
from guard.stages.detector import read_action, read_fail_open
from guard.stages.env import StageEnv
from guard.stages.squeeze import (
    OFFLOAD_VALUES,
    describe_squeezer,
    read_image,
    read_input,
    read_range,
    read_squeezer,
    take_input,
)

if TYPE_CHECKING:
    from guard.backends.base import Backend

SCORERS = ("local", "backend")


class SqueezeDetect(BaseStage):
    name = "squeeze_detect"

    def __init__(
        self,
        *,
        squeezers: tuple[Squeezer, ...],
        threshold: float,
        input_name: str | None,
        output: str,
        scorer: Backend,
        scorer_kind: str,
        action: Action,
        fail_open: bool,
    ) -> None:
        self.squeezers = squeezers
        self.threshold = threshold
        self.input_name = input_name
        self.output = output
        self.scorer = scorer
        self.scorer_kind = scorer_kind
        self.action = action
        self.fail_open = fail_open

    @classmethod
    def from_config(cls, section: Section, env: StageEnv) -> SqueezeDetect:
        input_name = read_input(section, env)
        value_range = read_range(section, "range")
        image = read_image(section, env, input_name)
        squeezers = []
        for index, entry in section.section_list("squeezers"):
            item = Section(
                entry, source=section.source, path=f"{section.where('squeezers')}[{index}]"
            )
            squeezers.append(read_squeezer(item, value_range, image))
            item.finish()
        if not squeezers:
            raise section.error("squeezers", "must list at least one squeezer, e.g. [{bits: 4}]")
        output = section.str("output", "probabilities")
        if env.metadata and output not in {s.name for s in env.metadata.outputs}:
            names = ", ".join(s.name for s in env.metadata.outputs)
            raise section.error("output", f"names no output of model {env.model}; it has {names}")
        kind = section.choice("scorer", SCORERS, "local" if env.local is not None else "backend")
        scorer = env.local if kind == "local" else env.backend
        if scorer is None:
            needs = "the policy's local model copy (model: ...)" if kind == "local" else "a backend"
            raise section.error("scorer", f"{kind} needs {needs}")
        stage = cls(
            squeezers=tuple(squeezers),
            threshold=section.float("threshold", min=0.0),
            input_name=input_name,
            output=output,
            scorer=scorer,
            scorer_kind=kind,
            action=read_action(section, Action.FLAG),
            fail_open=read_fail_open(section),
        )
        section.finish()
        return stage

    def describe(self) -> dict[str, Any]:
        return {
            "input": self.input_name,
            "output": self.output,
            "scorer": self.scorer_kind,
            "threshold": self.threshold,
            "action": self.action.value,
            "squeezers": [describe_squeezer(s) for s in self.squeezers],
        }

    async def on_request(self, ctx: RequestContext) -> Verdict:
        name, x = take_input(ctx, self.input_name)
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
                outputs=[RequestedOutput(self.output)],
            )
        )
        if self.output not in response.outputs:
            raise RuntimeError(f"the model returned no output {self.output!r}")
        distances = distances_from_scores(
            response.outputs[self.output], len(x), len(self.squeezers)
        )
        per_sample = distances.max(axis=1)
        sample = int(np.argmax(per_sample))
        score = float(per_sample[sample])
        if score <= self.threshold:
            return Verdict.CONTINUE
        squeezer = self.squeezers[int(np.argmax(distances[sample]))]
        return ctx.report(
            self.name,
            self.action,
            f"squeezing ({squeezer.name}) moved {self.output} of sample {sample} by L1 "
            f"{score:.3f} > {self.threshold:g}",
            score=score,
            threshold=self.threshold,
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

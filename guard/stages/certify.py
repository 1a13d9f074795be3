"""``certify``: answer with a certified label and L2 radius (randomized smoothing).

Cohen, Rosenfeld and Kolter (ICML 2019); the algorithm is
:mod:`guard.defenses.smoothing`. After the model has answered, this stage runs
CERTIFY on every row of the request's input and adds its result to the answer.
The model's own outputs are left as they are: the certified label is that of
the *smoothed* model, which may differ from the label the model served.

Who gets a certificate: a client asks with the V2 request parameter
``certify: true`` or the header ``X-Guard-Certify: 1`` (``when`` widens this).

What the answer carries:

- V2 response parameters ``certified`` (true when certification ran),
  ``certified_label`` (int, ``-1`` when abstained), ``certified_radius``
  (float, ``0.0`` when abstained) and ``abstained`` (bool). A one-row request
  gets scalars; a batch of B rows gets lists of B values in row order (the V2
  spec defines scalar parameters only; lists are plain JSON and tritonclient
  reads them). When capacity is exhausted and ``on_overload: uncertified``:
  ``certified: false``, ``abstained: true`` and ``abstain_reason``.
- Headers (for TF Serving clients too): ``X-Guard-Certified-Radius`` and
  ``X-Guard-Certified-Label``, one comma-separated value per row, ``abstain``
  for abstained rows, or ``uncertified`` when certification did not run.

YAML keys:

``sigma``                   required, > 0: noise level σ in the model's input units. The model
                            must have been trained with Gaussian noise of this σ, or it abstains
``n0``                      selection samples; default 100
``n``                       estimation samples; default 10000. Refused at load when CERTIFY could
                            never certify (n < log₂(1/α): 10 at α = 0.001)
``alpha``                   failure probability of a certificate, in (0, 1); default 0.001
``batch``                   noisy samples per model call; default 1000
``when``                    ``on_request`` (default): when the client asks; ``always``; ``flagged``:
                            when the client asks or a stage listed earlier reported a finding
                            (action other than allow) or degraded the request
``source``                  ``local``: the policy's local model file, in worker threads (default
                            when there is one); ``upstream``: batches of noisy samples sent to the
                            upstream as V2 requests (its batch limit must admit ``batch``)
``input``                   the input to perturb; default: the model's only input
``output``                  the output giving the class: integer labels as is, scores by argmax;
                            default: the local copy's label output (``label`` for the digits model).
                            Required without a local copy
``max_concurrent``          certifications running at once; default 2. Keep it below the number
                            of worker threads: the embedded model's inference shares them
``max_samples_per_second``  budget of noisy samples per second (token bucket holding one second's
                            worth, admitting while not in debt); default: unlimited
``on_overload``             ``503`` (default): refuse the request; ``uncertified``: answer it
                            without a certificate
``seed``                    seed of the noise (tests and reproductions only); default: fresh entropy
``on_error``                ``closed`` (default) or ``open``, as every stage

Order: the stage keeps the input as it is at its place in the policy (its
request hook copies it) and certifies it once the model has answered. A stage
listed before ``certify`` that changes the input (squeezing, quantization)
therefore changes the certified function: the radius bounds perturbations of
the *transformed* input, not of what the client sent, and a transform that is
not 1-Lipschitz in L2 (quantization is not) voids any statement about the raw
input. List ``certify`` before such stages to certify what the client sent
(the noisy copies then go to the model without the transform), or fold the
transform into the model. ``flagged`` sees the findings of the stages listed
before ``certify``.

Failure mode: ``on_overload`` decides when capacity is exhausted; a fault while
sampling follows ``on_error``; an upstream error while sampling (``source:
upstream``) is the request's error, as if the model call had failed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from guard.configreader import Section
from guard.defenses.sampling import labels_from_output
from guard.errors import Overloaded, RequestError, UpstreamError
from guard.inference import DATATYPES, InferRequest, InferResponse, RequestedOutput, TensorSpec
from guard.pipeline import Action, BaseStage, RequestContext, Verdict
from guard.stages.detector import read_fail_open
from guard.stages.env import StageEnv

if TYPE_CHECKING:
    from guard.backends.base import Backend
    from guard.backends.onnx import OnnxBackend
    from guard.defenses.smoothing import Certificate
    from guard.metrics import GuardMetrics

log = logging.getLogger(__name__)

WHEN = ("on_request", "always", "flagged")
SOURCES = ("local", "upstream")
ON_OVERLOAD = ("503", "uncertified")
REQUEST_PARAMETER = "certify"
REQUEST_HEADER = "X-Guard-Certify"
RADIUS_HEADER = "X-Guard-Certified-Radius"
LABEL_HEADER = "X-Guard-Certified-Label"
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


class SampleBudget:
    """Token bucket of noisy samples: refills at ``rate`` per second up to one second's worth.

    A certification is admitted while the bucket is not in debt and then spends
    its whole cost, so one large request is never starved; over any window the
    samples admitted stay below ``rate`` per second plus one request's cost.
    """

    def __init__(self, rate: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.clock = clock
        self.tokens = rate
        self.updated = clock()

    def try_spend(self, cost: int) -> bool:
        now = self.clock()
        self.tokens = min(self.rate, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens < 0:
            return False
        self.tokens -= cost
        return True


class Certify(BaseStage):
    """CERTIFY on every row of the requests it selects; see the module docstring."""

    name = "certify"

    def __init__(
        self,
        *,
        sigma: float,
        n0: int,
        n: int,
        alpha: float,
        batch: int,
        when: str,
        input_name: str | None,
        output_name: str,
        local: OnnxBackend | None,
        backend: Backend,
        dtype: np.dtype[Any],
        max_concurrent: int,
        budget: SampleBudget | None,
        on_overload: str,
        seed: int | None,
        fail_open: bool = False,
    ) -> None:
        from guard.defenses.smoothing import max_radius

        self.sigma, self.n0, self.n, self.alpha, self.batch = sigma, n0, n, alpha, batch
        self.when = when
        self.input_name = input_name
        self.output_name = output_name
        self.local = local  # set: sample the local copy; else the backend (upstream)
        self.backend = backend
        self.dtype = dtype
        self.max_concurrent = max_concurrent
        self.budget = budget
        self.on_overload = on_overload
        self.seed = seed
        self.fail_open = fail_open
        self.max_radius = max_radius(sigma, n, alpha)
        self._seeds = np.random.SeedSequence(seed)
        self.metrics: GuardMetrics | None = None
        self._active = 0  # certifications running (touched on the event loop only)

    @classmethod
    def from_config(cls, section: Section, env: StageEnv) -> Certify:
        from guard.defenses.smoothing import ParameterError, check_parameters

        sigma = section.float("sigma", gt=0)
        n0 = section.int("n0", 100, min=1)
        n = section.int("n", 10_000, min=1)
        alpha = section.float("alpha", 0.001, gt=0, lt=1)
        try:
            check_parameters(sigma=sigma, n0=n0, n=n, alpha=alpha, procedure="certify")
        except ParameterError as exc:
            raise section.error(exc.name, exc.message) from None
        local, backend = _read_source(section, env)
        input_name = section.str("input", None)
        output_name = section.str("output", None)
        dtype = np.dtype(np.float32)
        if env.metadata is not None:
            spec = _pick_input(section, env.metadata.inputs, input_name)
            input_name = spec.name
            if spec.datatype not in ("FP32", "FP64"):
                raise section.error(
                    "input",
                    f"must be a float input to add noise to; {spec.name} is {spec.datatype}",
                )
            dtype = DATATYPES[spec.datatype]
            output_name = _pick_output(section, env.metadata.outputs, output_name)
        elif output_name is None:
            raise section.error(
                "output", f"is required: model {env.model} has no local copy to read it from"
            )
        stage = cls(
            sigma=sigma,
            n0=n0,
            n=n,
            alpha=alpha,
            batch=section.int("batch", 1000, min=1),
            when=section.choice("when", WHEN, "on_request"),
            input_name=input_name,
            output_name=output_name,
            local=local,
            backend=backend,
            dtype=dtype,
            max_concurrent=section.int("max_concurrent", 2, min=1),
            budget=_read_budget(section),
            on_overload=_read_overload(section),
            seed=section.int("seed", None, min=0),
            fail_open=read_fail_open(section),
        )
        section.finish()
        log.info(
            "model %s: certify with sigma=%g, n=%d, alpha=%g; largest certifiable radius %.4g",
            env.model,
            sigma,
            n,
            alpha,
            stage.max_radius,
        )
        stage.metrics = env.metrics
        return stage

    def describe(self) -> dict[str, Any]:
        return {
            "sigma": self.sigma,
            "n0": self.n0,
            "n": self.n,
            "alpha": self.alpha,
            "max_radius": round(self.max_radius, 6),
            "batch": self.batch,
            "when": self.when,
            "source": "local" if self.local is not None else "upstream",
            "input": self.input_name,
            "output": self.output_name,
            "max_concurrent": self.max_concurrent,
            "max_samples_per_second": self.budget.rate if self.budget else None,
            "on_overload": self.on_overload,
            "seeded": self.seed is not None,
            "running": self._active,
        }

    async def on_request(self, ctx: RequestContext) -> Verdict:
        if self._wanted(ctx):  # keep the input as it is here, before later stages change it
            ctx.stage_state[self.name] = self._rows(ctx).copy()
        return Verdict.CONTINUE

    async def on_response(self, ctx: RequestContext) -> Verdict:
        response = ctx.response
        x = ctx.stage_state.pop(self.name, None)
        if response is None or x is None:
            return Verdict.CONTINUE
        refusal = self._admit(len(x) * (self.n0 + self.n))
        if refusal is not None:
            if self.on_overload == "503":
                raise Overloaded(f"certification capacity exhausted ({refusal}); try again shortly")
            _publish_uncertified(ctx, response, len(x), refusal)
            if self.metrics is not None:
                self.metrics.count_certifications(ctx.model, "overloaded", len(x))
            return Verdict.CONTINUE
        self._active += 1  # _certify releases it once sampling has really stopped
        certificates = await self._certify(ctx, x)
        _publish(ctx, response, certificates)
        if self.metrics is not None:
            self.metrics.record_certificates(ctx.model, certificates)
        return Verdict.CONTINUE

    # -- deciding --------------------------------------------------------------

    def _wanted(self, ctx: RequestContext) -> bool:
        if _asked(ctx) or self.when == "always":
            return True
        return self.when == "flagged" and (
            ctx.degraded or any(f.intended is not Action.ALLOW for f in ctx.findings)
        )

    def _admit(self, cost: int) -> str | None:
        """None when a certification of ``cost`` samples may start now, else why not."""
        if self._active >= self.max_concurrent:
            return f"{self._active} certifications running"
        if self.budget is not None and not self.budget.try_spend(cost):
            return "sample budget spent"
        return None

    def _rows(self, ctx: RequestContext) -> np.ndarray:
        inputs = ctx.request.inputs
        name = self.input_name
        if name is None:
            if len(inputs) != 1:
                raise RequestError(f"certify: needs exactly one input; got {len(inputs)}")
            name = next(iter(inputs))
        if name not in inputs:
            raise RequestError(f"certify: input {name!r} is required")
        if len(inputs) > 1:
            raise RequestError(f"certify: perturbs {name!r} only; remove the other inputs")
        x = inputs[name]
        if x.ndim < 2 or x.dtype.kind not in "iuf":
            raise RequestError(
                f"certify: inputs.{name} must be a batch of numbers; got {list(x.shape)} {x.dtype}"
            )
        return x

    # -- sampling ----------------------------------------------------------------

    async def _certify(self, ctx: RequestContext, x: np.ndarray) -> list[Certificate]:
        """Certify every row; release the concurrency slot when sampling has stopped.

        A request cancelled while its rows are sampled in a worker thread keeps
        its slot until the thread is done, so cancelled requests cannot pile up
        more than ``max_concurrent`` certifications.
        """
        from guard.defenses.smoothing import AsyncSmooth, Smooth

        rng = np.random.default_rng(self._seeds.spawn(1)[0])
        if self.local is not None:
            local, input_name, output_name = self.local, self.input_name or "", self.output_name

            def local_labels(batch: np.ndarray) -> np.ndarray:
                output = local.run({input_name: batch}, [output_name])[output_name]
                return labels_from_output(output, len(batch))

            smooth = Smooth(local_labels, self.sigma, batch=self.batch, dtype=self.dtype)
            loop = asyncio.get_running_loop()

            def work() -> list[Certificate]:
                return [smooth.certify(row, self.n0, self.n, self.alpha, rng=rng) for row in x]

            try:
                sampling = loop.run_in_executor(local.executor, work)
            except BaseException:
                self._release()
                raise
            sampling.add_done_callback(self._release)
            return await asyncio.shield(sampling)

        async def upstream_labels(batch: np.ndarray) -> np.ndarray:
            return await self._upstream_labels(ctx, batch)

        dtype = x.dtype if x.dtype == np.float64 else self.dtype
        remote = AsyncSmooth(upstream_labels, self.sigma, batch=self.batch, dtype=dtype)
        try:
            return [await remote.certify(row, self.n0, self.n, self.alpha, rng=rng) for row in x]
        finally:
            self._release()

    def _release(self, _: object = None) -> None:
        self._active -= 1

    async def _upstream_labels(self, ctx: RequestContext, batch: np.ndarray) -> np.ndarray:
        name = self.input_name or next(iter(ctx.request.inputs))
        request = InferRequest(
            model_name=ctx.request.model_name,
            model_version=ctx.request.model_version,
            id=f"{ctx.request_id}-certify",
            inputs={name: batch},
            outputs=[RequestedOutput(self.output_name)],
        )
        response = await self.backend.infer(request)
        output = response.outputs.get(self.output_name)
        if output is None:
            raise UpstreamError(f"certify: the upstream's answer lacks output {self.output_name!r}")
        try:
            return labels_from_output(output, len(batch))
        except ValueError as exc:
            raise UpstreamError(f"certify: output {self.output_name!r}: {exc}") from None


def _publish(ctx: RequestContext, response: InferResponse, certificates: list[Certificate]) -> None:
    labels = [-1 if c.label is None else c.label for c in certificates]
    radii = [c.radius for c in certificates]
    abstained = [c.abstained for c in certificates]
    one = len(certificates) == 1
    response.parameters.update(
        certified=True,
        certified_label=labels[0] if one else labels,
        certified_radius=radii[0] if one else radii,
        abstained=abstained[0] if one else abstained,
    )
    ctx.headers[RADIUS_HEADER] = ",".join(
        "abstain" if c.abstained else f"{c.radius:.6g}" for c in certificates
    )
    ctx.headers[LABEL_HEADER] = ",".join(
        "abstain" if c.label is None else str(c.label) for c in certificates
    )


def _publish_uncertified(
    ctx: RequestContext, response: InferResponse, rows: int, reason: str
) -> None:
    response.parameters.update(
        certified=False,
        abstained=True if rows == 1 else [True] * rows,
        abstain_reason=f"overloaded: {reason}",
    )
    ctx.headers[RADIUS_HEADER] = ctx.headers[LABEL_HEADER] = "uncertified"


def _asked(ctx: RequestContext) -> bool:
    """Whether the client asked for a certificate; a malformed ask is a 400."""
    parameter = ctx.request.parameters.get(REQUEST_PARAMETER)
    if parameter is not None and not isinstance(parameter, bool):
        raise RequestError(
            f"parameters.{REQUEST_PARAMETER}: must be true or false; got {parameter!r}"
        )
    header = ctx.request_headers.get(REQUEST_HEADER)
    if header is not None and header.strip().lower() not in _TRUE | _FALSE:
        raise RequestError(f"{REQUEST_HEADER}: must be 1 or 0 (true or false); got {header[:20]!r}")
    return bool(parameter) or (header is not None and header.strip().lower() in _TRUE)


def _read_source(section: Section, env: StageEnv) -> tuple[OnnxBackend | None, Backend]:
    """(the local copy to sample, or None to sample the backend; the backend)."""
    has_upstream = env.backend is not None and env.backend is not env.local
    source = section.choice("source", SOURCES, "local" if env.local is not None else "upstream")
    if source == "local":
        if env.local is None:
            raise section.error(
                "source", f"is local, but model {env.model} has no local model file"
            )
        return env.local, env.backend if env.backend is not None else env.local
    if env.backend is None or not has_upstream:
        raise section.error("source", f"is upstream, but model {env.model} has no upstream")
    return None, env.backend


def _pick_input(section: Section, inputs: tuple[TensorSpec, ...], name: str | None) -> TensorSpec:
    if len(inputs) != 1:
        raise section.error("input", f"certify perturbs one input; the model takes {len(inputs)}")
    if name is not None and name != inputs[0].name:
        raise section.error("input", f"names no input of the model; it has {inputs[0].name}")
    return inputs[0]


def _pick_output(section: Section, outputs: tuple[TensorSpec, ...], name: str | None) -> str:
    by_name = {s.name: s for s in outputs}
    if name is not None:
        spec = by_name.get(name)
        if spec is None:
            raise section.error(
                "output", f"names no output of the model; it has {', '.join(by_name)}"
            )
        if not (_is_labels(spec) or _is_scores(spec)):
            raise section.error(
                "output",
                f"must be integer labels [N] or scores [N, classes]; "
                f"{name} is {spec.datatype} {list(spec.shape)}",
            )
        return name
    for pick in (_is_labels, _is_scores):
        found = [s.name for s in outputs if pick(s)]
        if found:
            return found[0]
    raise section.error("output", "is required: the model has no integer label or score output")


def _is_labels(spec: TensorSpec) -> bool:
    rank_one = len(spec.shape) == 1 or spec.shape[1:] == (1,)
    return spec.datatype.startswith(("INT", "UINT")) and rank_one


def _is_scores(spec: TensorSpec) -> bool:
    return spec.datatype.startswith("FP") and len(spec.shape) == 2 and spec.shape[1] != 1


def _read_budget(section: Section) -> SampleBudget | None:
    rate = section.float("max_samples_per_second", None, gt=0)
    return SampleBudget(rate) if rate is not None else None


def _read_overload(section: Section) -> str:
    raw = section.data.get("on_overload")
    if isinstance(raw, int) and not isinstance(raw, bool):  # YAML reads an unquoted 503 as a number
        code = section.int("on_overload")
        if str(code) not in ON_OVERLOAD:
            raise section.error(
                "on_overload", f"must be one of {', '.join(ON_OVERLOAD)}; got {code}"
            )
        return str(code)
    return str(section.choice("on_overload", ON_OVERLOAD, "503"))

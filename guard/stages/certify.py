"""``certify``: answer with a certified label and L2 radius (randomized smoothing).

Cohen, Rosenfeld and Kolter (ICML 2019); the algorithm is
:mod:`guard.defenses.smoothing`. After the model has answered, this stage runs
CERTIFY on every row of the request's input and adds its result to the answer.
The model's own outputs are left as they are: the certified label is that of
the *smoothed* model, which may differ from the label the model served.

Who gets a certificate: a client asks with the V2 request parameter
``certify: true`` or the header ``X-Guard-Certify: 1`` (``when`` widens this).
A client that only needs "robust within r?" asks with ``certify_radius: r``
(or ``X-Guard-Certify-Radius: r``, input units): TARGET of
:mod:`guard.defenses.sequential` then stops as soon as that is decided (``n`` is
its most), and the radius answered is at least r, or it abstains. Without
a radius, ``mode`` picks CERTIFY with ``n`` samples or ADAPTIVE within ``n``.

What the answer carries:

- V2 response parameters ``certified`` (true when certification ran),
  ``certified_label`` (int, ``-1`` when abstained), ``certified_radius``
  (float, ``0.0`` when abstained) and ``abstained`` (bool). A one-row request
  gets scalars; a batch of B rows gets lists of B values in row order (the V2
  spec defines scalar parameters only; lists are plain JSON and tritonclient
  reads them). ``certified_samples``: the noisy samples each row used (n0
  included). When capacity is exhausted and ``on_overload: uncertified``:
  ``certified: false``, ``abstained: true`` and ``abstain_reason``.
- Headers (for TF Serving clients too): ``X-Guard-Certified-Radius`` and
  ``X-Guard-Certified-Label``, one comma-separated value per row, ``abstain``
  for abstained rows, or ``uncertified`` when certification did not run;
  ``X-Guard-Certified-Samples``, the samples each row used.
- Metrics: ``guard_certification_samples``, a histogram of samples per row.

Keys: :class:`CertifyOptions` (docs/stage-options.md).

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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from guard.defenses.sampling import labels_from_output
from guard.errors import Overloaded, RequestError, UpstreamError
from guard.inference import (
    DATATYPES,
    InferRequest,
    InferResponse,
    RequestedOutput,
    TensorSpec,
    class_output,
)
from guard.pipeline import Action, RequestContext, Verdict
from guard.stages.env import StageEnv
from guard.stages.options import OptionError, OptionsStage, option
from guard.stages.shared import request_input, watched_input

if TYPE_CHECKING:
    from guard.backends.base import Backend
    from guard.backends.onnx import OnnxBackend
    from guard.defenses.smoothing import Certificate
    from guard.metrics import GuardMetrics

log = logging.getLogger(__name__)

REQUEST_PARAMETER = "certify"
REQUEST_HEADER = "X-Guard-Certify"
RADIUS_HEADER = "X-Guard-Certified-Radius"
LABEL_HEADER = "X-Guard-Certified-Label"
RADIUS_PARAMETER = "certify_radius"
RADIUS_REQUEST_HEADER = "X-Guard-Certify-Radius"
SAMPLES_HEADER = "X-Guard-Certified-Samples"
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


@dataclass(frozen=True, kw_only=True)
class CertifyOptions:
    sigma: float = option(
        gt=0,
        doc="noise level σ in the model's input units; the model must have been trained with "
        "Gaussian noise of this σ, or it abstains",
    )
    n0: int = option(100, min=1, doc="selection samples")
    n: int = option(
        10_000,
        min=1,
        doc="estimation samples; refused when CERTIFY could never certify "
        "(n < log₂(1/α): 10 at α = 0.001)",
    )
    alpha: float = option(0.001, gt=0, lt=1, doc="failure probability of a certificate")
    batch: int = option(1000, min=1, doc="noisy samples per model call")
    when: Literal["on_request", "always", "flagged"] = option(
        "on_request",
        doc="`on_request`: when the client asks; `always`; `flagged`: when the client asks or "
        "a stage listed earlier reported a finding (action other than allow) or degraded it",
    )
    source: Literal["local", "upstream"] = option(
        derive=lambda values, env: "local" if env.local is not None else "upstream",
        shown="`local` with a model file",
        doc="`local`: the policy's local model file, in worker threads; `upstream`: batches of "
        "noisy samples sent to the upstream as V2 requests (its batch limit must admit `batch`)",
    )
    input: str | None = option(None, doc="the input to perturb; default: the model's only input")
    output: str | None = option(
        None,
        doc="the output giving the class: integer labels as is, scores by argmax; default: the "
        "local copy's label output. Required without a local copy",
    )
    max_concurrent: int = option(
        2,
        min=1,
        doc="certifications running at once; keep it below the number of worker threads "
        "(the embedded model's inference shares them)",
    )
    max_samples_per_second: float | None = option(
        None,
        gt=0,
        doc="budget of noisy samples per second (a token bucket holding one second's worth, "
        "admitting while not in debt); default: unlimited",
    )
    on_overload: Literal["503", "uncertified"] = option(
        "503", doc="`503`: refuse the request; `uncertified`: answer it without a certificate"
    )
    mode: Literal["fixed", "adaptive"] = option(
        "fixed",
        doc="without a requested radius: `fixed` runs CERTIFY with `n` samples; `adaptive` "
        "stops once the rest of `n` would add at most `tolerance`·σ to the radius",
    )
    tolerance: float = option(0.1, min=0, doc="`adaptive`: radius left unclaimed, in σ")
    seed: int | None = option(
        None, min=0, doc="seed of the noise (tests and reproductions only); default: fresh entropy"
    )
    on_error: Literal["closed", "open"] = option(
        "closed", doc="a fault while sampling: `closed` refuses the request (503), `open` serves it"
    )

    def __post_init__(self) -> None:
        from guard.defenses.smoothing import ParameterError, check_parameters

        try:
            check_parameters(
                sigma=self.sigma, n0=self.n0, n=self.n, alpha=self.alpha, procedure="certify"
            )
        except ParameterError as exc:
            raise OptionError(exc.name, exc.message) from None


class Certify(OptionsStage[CertifyOptions]):
    """CERTIFY on every row of the requests it selects; see the module docstring."""

    name = "certify"
    Options = CertifyOptions

    def __init__(self, options: CertifyOptions, env: StageEnv) -> None:
        from guard.defenses.smoothing import max_radius

        super().__init__(options, env)
        self.local, self.backend = _source_of(options, env)  # local None: sample the upstream
        self.input = options.input  # resolved: the model's only input when it is known
        output = options.output
        self.dtype = np.dtype(np.float32)
        if env.metadata is not None:
            spec = _pick_input(env, options.input)
            self.input, self.dtype = spec.name, DATATYPES[spec.datatype]
            output = _pick_output(env.metadata.outputs, options.output)
        if output is None:
            raise OptionError(
                "output", f"is required: model {env.model} has no local copy to read it from"
            )
        self.output = output
        rate = options.max_samples_per_second
        self.budget = SampleBudget(rate) if rate is not None else None
        self.max_radius = max_radius(options.sigma, options.n, options.alpha)
        self._seeds = np.random.SeedSequence(options.seed)
        self.metrics: GuardMetrics | None = env.metrics
        self._active = 0  # certifications running (touched on the event loop only)
        log.info(
            "model %s: certify with sigma=%g, n=%d, alpha=%g; largest certifiable radius %.4g",
            env.model,
            options.sigma,
            options.n,
            options.alpha,
            self.max_radius,
        )

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "input": self.input,
            "output": self.output,
            "max_radius": round(self.max_radius, 6),
            "running": self._active,
        }

    async def on_request(self, ctx: RequestContext) -> Verdict:
        radius = self._radius(ctx)
        if radius is not None or self._wanted(ctx):  # the input as it is here, before later stages
            ctx.stage_state[self.name] = (self._rows(ctx).copy(), radius)
        return Verdict.CONTINUE

    async def on_response(self, ctx: RequestContext) -> Verdict:
        response = ctx.response
        x, radius = ctx.stage_state.pop(self.name, (None, None))
        if response is None or x is None:
            return Verdict.CONTINUE
        cost = len(x) * (self.options.n0 + self.options.n)
        refusal = self._admit(cost)
        if refusal is not None:
            if self.options.on_overload == "503":
                raise Overloaded(f"certification capacity exhausted ({refusal}); try again shortly")
            _publish_uncertified(ctx, response, len(x), refusal)
            if self.metrics is not None:
                self.metrics.count_certifications(ctx.model, "overloaded", len(x))
            return Verdict.CONTINUE
        self._active += 1  # _certify releases it once sampling has really stopped
        certificates = await self._certify(ctx, x, radius)
        samples = [self._samples(c) for c in certificates]
        if self.budget is not None:
            self.budget.tokens += cost - sum(samples)  # charged the most; refund what was unused
        _publish(ctx, response, certificates, samples)
        if self.metrics is not None:
            self.metrics.record_certificates(ctx.model, certificates)
            self.metrics.record_certification_samples(ctx.model, samples)
        return Verdict.CONTINUE

    # -- deciding --------------------------------------------------------------

    def _wanted(self, ctx: RequestContext) -> bool:
        if _asked(ctx) or self.options.when == "always":
            return True
        return self.options.when == "flagged" and (
            ctx.degraded or any(f.intended is not Action.ALLOW for f in ctx.findings)
        )

    def _radius(self, ctx: RequestContext) -> float | None:
        """The radius the client asked to certify, if any; a malformed or hopeless one is a 400."""
        from guard.defenses.sequential import target_plan
        from guard.defenses.smoothing import ParameterError

        value: Any = ctx.request.parameters.get(RADIUS_PARAMETER)
        where = f"parameters.{RADIUS_PARAMETER}"
        if value is None and (header := ctx.request_headers.get(RADIUS_REQUEST_HEADER)) is not None:
            value, where = _number(header), RADIUS_REQUEST_HEADER
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
            raise RequestError(f"{where}: must be a number >= 0; got {str(value)[:20]!r}")
        o = self.options
        try:
            target_plan(o.sigma, float(value), o.n0, o.n, o.alpha)
        except ParameterError as exc:
            raise RequestError(
                f"{where}: {value:g} cannot be certified with sigma={o.sigma:g}, n={o.n}, "
                f"alpha={o.alpha:g} ({exc})"
            ) from None
        return float(value)

    def _samples(self, certificate: Any) -> int:
        return int(getattr(certificate, "samples", self.options.n0 + certificate.n))

    def _admit(self, cost: int) -> str | None:
        """None when a certification of ``cost`` samples may start now, else why not."""
        if self._active >= self.options.max_concurrent:
            return f"{self._active} certifications running"
        if self.budget is not None and not self.budget.try_spend(cost):
            return "sample budget spent"
        return None

    def _rows(self, ctx: RequestContext) -> np.ndarray:
        name, x = request_input(ctx, self.input, several="certify perturbs exactly one input")
        if len(ctx.request.inputs) > 1:
            raise RequestError(f"certify: perturbs {name!r} only; remove the other inputs")
        if x.ndim < 2 or x.dtype.kind not in "iuf":
            raise RequestError(
                f"certify: inputs.{name} must be a batch of numbers; got {list(x.shape)} {x.dtype}"
            )
        return x

    # -- sampling ----------------------------------------------------------------

    async def _certify(
        self, ctx: RequestContext, x: np.ndarray, radius: float | None
    ) -> list[Certificate]:
        """Certify every row; release the concurrency slot when sampling has stopped.

        A request cancelled while its rows are sampled in a worker thread keeps
        its slot until the thread is done, so cancelled requests cannot pile up
        more than ``max_concurrent`` certifications.
        """
        from guard.defenses.sequential import AsyncSequentialSmooth, SequentialSmooth
        from guard.defenses.smoothing import AsyncSmooth, Smooth

        o = self.options

        rng = np.random.default_rng(self._seeds.spawn(1)[0])
        if self.local is not None:
            local, input_name, output_name = self.local, self.input or "", self.output

            def local_labels(batch: np.ndarray) -> np.ndarray:
                output = local.run({input_name: batch}, [output_name])[output_name]
                return labels_from_output(output, len(batch))

            smooth = Smooth(local_labels, o.sigma, batch=o.batch, dtype=self.dtype)
            seq = SequentialSmooth(local_labels, o.sigma, batch=o.batch, dtype=self.dtype)
            loop = asyncio.get_running_loop()

            def one(row: np.ndarray) -> Any:
                if radius is not None:
                    return seq.certify_radius(row, radius, o.n0, o.n, o.alpha, rng=rng)
                if o.mode == "adaptive":
                    return seq.certify_adaptive(
                        row, o.n0, o.n, o.alpha, rng=rng, tolerance=o.tolerance
                    )
                return smooth.certify(row, o.n0, o.n, o.alpha, rng=rng)

            def work() -> list[Certificate]:
                return [one(row) for row in x]

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
        remote = AsyncSmooth(upstream_labels, o.sigma, batch=o.batch, dtype=dtype)
        aseq = AsyncSequentialSmooth(upstream_labels, o.sigma, batch=o.batch, dtype=dtype)

        async def one_async(row: np.ndarray) -> Any:
            if radius is not None:
                return await aseq.certify_radius(row, radius, o.n0, o.n, o.alpha, rng=rng)
            if o.mode == "adaptive":
                return await aseq.certify_adaptive(
                    row, o.n0, o.n, o.alpha, rng=rng, tolerance=o.tolerance
                )
            return await remote.certify(row, o.n0, o.n, o.alpha, rng=rng)

        try:
            return [await one_async(row) for row in x]
        finally:
            self._release()

    def _release(self, _: object = None) -> None:
        self._active -= 1

    async def _upstream_labels(self, ctx: RequestContext, batch: np.ndarray) -> np.ndarray:
        name = self.input or next(iter(ctx.request.inputs))
        request = InferRequest(
            model_name=ctx.request.model_name,
            model_version=ctx.request.model_version,
            id=f"{ctx.request_id}-certify",
            inputs={name: batch},
            outputs=[RequestedOutput(self.output)],
        )
        response = await self.backend.infer(request)
        output = response.outputs.get(self.output)
        if output is None:
            raise UpstreamError(f"certify: the upstream's answer lacks output {self.output!r}")
        try:
            return labels_from_output(output, len(batch))
        except ValueError as exc:
            raise UpstreamError(f"certify: output {self.output!r}: {exc}") from None


def _publish(
    ctx: RequestContext,
    response: InferResponse,
    certificates: list[Certificate],
    samples: list[int],
) -> None:
    labels = [-1 if c.label is None else c.label for c in certificates]
    radii = [c.radius for c in certificates]
    abstained = [c.abstained for c in certificates]
    one = len(certificates) == 1
    response.parameters.update(
        certified=True,
        certified_label=labels[0] if one else labels,
        certified_radius=radii[0] if one else radii,
        abstained=abstained[0] if one else abstained,
        certified_samples=samples[0] if one else samples,
    )
    ctx.headers[SAMPLES_HEADER] = ",".join(map(str, samples))
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


def _number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def _source_of(options: CertifyOptions, env: StageEnv) -> tuple[OnnxBackend | None, Backend]:
    """(the local copy to sample, or None to sample the backend; the backend)."""
    if options.source == "local":
        if env.local is None:
            raise OptionError("source", f"is local, but model {env.model} has no local model file")
        return env.local, env.backend if env.backend is not None else env.local
    if env.backend is None or env.backend is env.local:
        raise OptionError("source", f"is upstream, but model {env.model} has no upstream")
    return None, env.backend


def _pick_input(env: StageEnv, name: str | None) -> TensorSpec:
    """The model's one input (certify perturbs one), a float input to add noise to."""
    inputs = env.metadata.inputs if env.metadata is not None else ()
    if len(inputs) != 1:
        raise OptionError("input", f"certify perturbs one input; the model takes {len(inputs)}")
    spec = watched_input(env, name)
    if spec is None:
        raise OptionError("input", f"names no input of the model; it has {inputs[0].name}")
    if spec.datatype not in ("FP32", "FP64"):
        raise OptionError(
            "input", f"must be a float input to add noise to; {spec.name} is {spec.datatype}"
        )
    return spec


def _pick_output(outputs: tuple[TensorSpec, ...], name: str | None) -> str:
    """The output named, or the first label output, else the first score output."""
    kinds = {s.name: class_output(_kind(s), s.shape) for s in outputs}
    if name is not None:
        spec = next((s for s in outputs if s.name == name), None)
        if spec is None:
            raise OptionError("output", f"names no output of the model; it has {', '.join(kinds)}")
        if kinds[name] is None:
            raise OptionError(
                "output",
                f"must be integer labels [N] or scores [N, classes]; "
                f"{name} is {spec.datatype} {list(spec.shape)}",
            )
        return name
    for kind in ("labels", "scores"):
        found = [n for n, k in kinds.items() if k == kind]
        if found:
            return found[0]
    raise OptionError("output", "is required: the model has no integer label or score output")


def _kind(spec: TensorSpec) -> str:
    return DATATYPES.get(spec.datatype, np.dtype(object)).kind

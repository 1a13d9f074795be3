"""``certify``: answer with a certified label and L2 radius (randomized smoothing).

Cohen, Rosenfeld and Kolter (ICML 2019); the algorithm is
:mod:`guard.defenses.smoothing`. After the model has answered, this stage runs
CERTIFY on every row of the request's input and adds its result to the answer.
The model's own outputs are left as they are: the certified label is that of
the *smoothed* model, which may differ from the label the model served.

Who gets a certificate: a client asks with the V2 request parameter
``certify: true`` or the header ``X-Guard-Certify: 1`` (``when`` widens this).
A client that only needs "robust within r?" asks with ``certify_radius: r``
(or ``X-Guard-Certify-Radius: r``, input units): r is rounded up to the
``radius_step`` grid, and TARGET of :mod:`guard.defenses.sequential` stops as
soon as that radius is decided (``n`` is its most); the answer is that radius,
or abstained. Without a radius, ``mode`` picks CERTIFY with ``n`` samples or
ADAPTIVE within ``n``.

What the answer carries:

- V2 response parameters ``certified`` (true when certification ran),
  ``certified_label`` (int, ``-1`` when abstained), ``certified_radius``
  (float rounded down to ``radius_step``, ``0.0`` when abstained) and
  ``abstained`` (bool). A one-row request
  gets scalars; a batch of B rows gets lists of B values in row order (the V2
  spec defines scalar parameters only; lists are plain JSON and tritonclient
  reads them). ``certified_samples``: the noisy samples each row used (n0
  included; left out where only one bit is released: a sequential
  certification's cost tracks pA). When capacity is exhausted and ``on_overload: uncertified``:
  ``certified: false``, ``abstained: true`` and ``abstain_reason``.
- Headers (for TF Serving clients too): ``X-Guard-Certified-Radius`` and
  ``X-Guard-Certified-Label``, one comma-separated value per row, ``abstain``
  for abstained rows, or ``uncertified`` when certification did not run;
  ``X-Guard-Certified-Samples``, the samples each row used.
- Metrics: ``guard_certification_samples``, a histogram of samples per row.

What it releases (docs/certification.md): the radius on the ``radius_step``
grid, or one bit (certified at one step, or abstained) where the policy's
``privacy`` stage releases labels only or the client is degraded; the noise is
keyed on the input row, so the same input gets the same answer. A certification
is an ordinary request to every other stage (detectors see it, budgets count
it); its noisy samples are the stage's own and are charged to the client's
share of the capacity instead (:mod:`guard.stages.capacity`).

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

Failure mode: ``on_overload`` decides when capacity (the stage's, or the client's
share) is still exhausted after ``max_wait``; a fault while
sampling follows ``on_error``; an upstream error while sampling (``source:
upstream``) is the request's error, as if the model call had failed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from guard.defenses.privacy import consistent_generators
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
from guard.pipeline import Action, RequestContext, Stage, Verdict
from guard.stages.capacity import Capacity, SampleBudget
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
DEFAULT_SECRET_ENV = "GUARD_CERTIFY_SECRET"
MIN_SECRET_CHARS = 16
STEP_DECIMALS = 6  # the finest radius step, and the most decimals a released radius has

__all__ = ["Certify", "CertifyOptions", "SampleBudget"]


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
    client_max_concurrent: int | None = option(
        None,
        min=1,
        shown="`max_concurrent - 1`, at least 1",
        doc="certifications one client may have running at once: its share of `max_concurrent`",
    )
    client_samples_per_second: float | None = option(
        None,
        gt=0,
        shown="half of `max_samples_per_second`; without it unlimited",
        doc="noisy samples one client may spend per second (its own token bucket, admitting "
        "while not in debt); a certification is charged `rows × (n0 + n)` samples",
    )
    max_wait: float = option(
        1.0,
        min=0,
        doc="seconds a request waits for capacity (a slot, or its client's samples) before "
        "`on_overload` applies (0: at once): a client sending more than its share queues "
        "instead of retrying at once; a waiting request holds its connection (bounded by "
        "`limits.max_in_flight_per_client`), not a worker",
    )
    on_overload: Literal["503", "uncertified"] = option(
        "503",
        doc="capacity (the stage's or the client's share) exhausted after `max_wait`: `503` "
        "refuses the request before the model is called; `uncertified` answers it without a "
        "certificate",
    )
    radius_step: float | None = option(
        None,
        gt=0,
        shown="σ/4, rounded down to 6 decimals",
        doc="the released radius is rounded down to a multiple of this (input units, at most 6 "
        "decimals): a smaller radius is still certified, and the answer carries no finer "
        "confidence than the step",
    )
    release: Literal["radius", "certified"] = option(
        "radius",
        doc="`radius`: the radius on the `radius_step` grid; `certified`: only whether the "
        "input is certified at radius `radius_step` (radius `radius_step`) or abstained. "
        "`certified` is forced for degraded clients and when the policy's `privacy` stage "
        "releases labels only",
    )
    consistent: bool = option(
        True,
        doc="the same input always gets the same noise and so the same answer (a keyed hash of "
        "the row seeds it): repeating a query cannot average the radius",
    )
    secret_env: str | None = option(
        None,
        shown=f"`{DEFAULT_SECRET_ENV}`",
        doc="environment variable holding the key of that hash (at least 16 characters); when "
        "the default is unset a random key is drawn at load (consistent within this process)",
    )
    mode: Literal["fixed", "adaptive"] = option(
        "fixed",
        doc="without a requested radius: `fixed` runs CERTIFY with `n` samples; `adaptive` "
        "stops once the rest of `n` would add at most `tolerance`·σ to the radius",
    )
    tolerance: float = option(0.1, min=0, doc="`adaptive`: radius left unclaimed, in σ")
    seed: int | None = option(
        None,
        min=0,
        doc="seed of the noise (tests and reproductions only; with `consistent` it keys the "
        "hash); default: fresh entropy",
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
        if self.client_max_concurrent is not None and self.client_max_concurrent > (
            self.max_concurrent
        ):
            raise OptionError(
                "client_max_concurrent",
                f"must be <= max_concurrent ({self.max_concurrent}); "
                f"got {self.client_max_concurrent}",
            )
        total, share = self.max_samples_per_second, self.client_samples_per_second
        if total is not None and share is not None and share > total:
            raise OptionError(
                "client_samples_per_second",
                f"must be <= max_samples_per_second ({total:g}); got {share:g}",
            )
        step = self.radius_step
        if step is not None and abs(round(step, STEP_DECIMALS) - step) > 1e-12:
            raise OptionError(
                "radius_step", f"must have at most {STEP_DECIMALS} decimals; got {step!r}"
            )

    @property
    def step(self) -> float:
        """The radius step released: ``radius_step``, else σ/4 rounded down to 6 decimals."""
        if self.radius_step is not None:
            return self.radius_step
        scale = 10**STEP_DECIMALS
        return max(math.floor(self.sigma / 4 * scale), 1) / scale

    @property
    def client_concurrent(self) -> int:
        if self.client_max_concurrent is not None:
            return self.client_max_concurrent
        return max(self.max_concurrent - 1, 1)

    @property
    def client_rate(self) -> float | None:
        if self.client_samples_per_second is not None:
            return self.client_samples_per_second
        total = self.max_samples_per_second
        return total / 2 if total is not None else None


class Certify(OptionsStage[CertifyOptions]):
    """CERTIFY on every row of the requests it selects; see the module docstring."""

    name = "certify"
    Options = CertifyOptions

    def __init__(self, options: CertifyOptions, env: StageEnv) -> None:
        from guard.defenses.smoothing import max_radius

        super().__init__(options, env)
        o = options
        self.local, self.backend = _source_of(o, env)  # local None: sample the upstream
        self.input = o.input  # resolved: the model's only input when it is known
        output = o.output
        self.dtype = np.dtype(np.float32)
        if env.metadata is not None:
            spec = _pick_input(env, o.input)
            self.input, self.dtype = spec.name, DATATYPES[spec.datatype]
            output = _pick_output(env.metadata.outputs, o.output)
        if output is None:
            raise OptionError(
                "output", f"is required: model {env.model} has no local copy to read it from"
            )
        self.output = output
        self.capacity = Capacity(
            max_concurrent=o.max_concurrent,
            samples_per_second=o.max_samples_per_second,
            client_max_concurrent=o.client_concurrent,
            client_samples_per_second=o.client_rate,
        )
        self.max_radius = max_radius(o.sigma, o.n, o.alpha)
        self.grid = RadiusGrid(o.step)
        self.labels_only = False  # the policy's privacy stage releases labels only (bind)
        self.key = _noise_key(o, env) if o.consistent else None
        self.scope = noise_scope(env.model, env.version, o)
        self._seeds = np.random.SeedSequence(o.seed)
        self.metrics: GuardMetrics | None = env.metrics
        log.info(
            "model %s: certify with sigma=%g, n=%d, alpha=%g; largest certifiable radius %.4g",
            env.model,
            o.sigma,
            o.n,
            o.alpha,
            self.max_radius,
        )

    def bind(self, stages: Sequence[Stage]) -> None:
        """See the policy's other stages: a ``privacy`` stage releasing labels only makes
        every certificate ``release: certified``."""
        from guard.defenses.privacy import LabelOnly

        privacy = next((s for s in stages if s.name == "privacy"), None)
        self.labels_only = isinstance(getattr(privacy, "mechanism", None), LabelOnly)

    def describe(self) -> dict[str, Any]:
        o = self.options
        return {
            **super().describe(),
            "input": self.input,
            "output": self.output,
            "max_radius": round(self.max_radius, 6),
            "radius_step": self.grid.step,
            "release": "certified" if self.labels_only else o.release,
            "client_max_concurrent": o.client_concurrent,
            "client_samples_per_second": o.client_rate,
            "running": self.capacity.running,
        }

    async def on_request(self, ctx: RequestContext) -> Verdict:
        radius = self._radius(ctx)
        if radius is None and not self._wanted(ctx):
            return Verdict.CONTINUE
        o = self.options
        x = self._rows(ctx)
        client = ctx.client.name
        # Admitted (and charged) before the model is called: a refusal costs no model call.
        refusal = await self.capacity.acquire(client, len(x) * (o.n0 + o.n), o.max_wait)
        if refusal is not None:
            if o.on_overload == "503":
                raise Overloaded(f"certification capacity exhausted ({refusal}); try again shortly")
            ctx.stage_state[self.name] = refusal
            return Verdict.CONTINUE
        slot = _Slot(self.capacity, client, asyncio.current_task())
        ctx.stage_state[self.name] = (x.copy(), slot, radius)  # as it is here, before later stages
        return Verdict.CONTINUE

    async def on_response(self, ctx: RequestContext) -> Verdict:
        response = ctx.response
        kept = ctx.stage_state.pop(self.name, None)
        if isinstance(kept, str):  # refused at on_request, on_overload: uncertified
            if response is not None:
                rows = len(self._rows(ctx))
                _publish_uncertified(ctx, response, rows, kept)
                if self.metrics is not None:
                    self.metrics.count_certifications(ctx.model, "overloaded", rows)
            return Verdict.CONTINUE
        if kept is None:
            return Verdict.CONTINUE
        o = self.options
        x, slot, radius = kept
        slot.reached()
        if response is None:
            slot.drop()
            return Verdict.CONTINUE
        certificates = await self._certify(ctx, x, slot, radius)  # it gives the slot back
        samples = [self._samples(c) for c in certificates]
        self.capacity.refund(ctx.client.name, len(x) * (o.n0 + o.n) - sum(samples))
        if radius is not None:  # TARGET answers the radius asked (on the grid), no finer
            certificates = [c if c.abstained else replace(c, radius=radius) for c in certificates]
        # Degraded clients, and policies that release labels only, learn one bit per row.
        certified_only = o.release == "certified" or self.labels_only or ctx.degraded
        released = [self.grid.release(c, certified_only) for c in certificates]
        _publish(ctx, response, released, None if certified_only else samples)
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
        """The radius the client asked to certify, rounded up to the grid; a malformed or
        hopeless one is a 400."""
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
        o, radius = self.options, self.grid.up(float(value))
        try:
            target_plan(o.sigma, radius, o.n0, o.n, o.alpha)
        except ParameterError as exc:
            raise RequestError(
                f"{where}: {value:g} cannot be certified with sigma={o.sigma:g}, n={o.n}, "
                f"alpha={o.alpha:g} ({exc})"
            ) from None
        return radius

    def _samples(self, certificate: Any) -> int:
        return int(getattr(certificate, "samples", self.options.n0 + certificate.n))

    def _rows(self, ctx: RequestContext) -> np.ndarray:
        name, x = request_input(ctx, self.input, several="certify perturbs exactly one input")
        if len(ctx.request.inputs) > 1:
            raise RequestError(f"certify: perturbs {name!r} only; remove the other inputs")
        if x.ndim < 2 or x.dtype.kind not in "iuf":
            raise RequestError(
                f"certify: inputs.{name} must be a batch of numbers; got {list(x.shape)} {x.dtype}"
            )
        substitute = (ctx.substitute or {}).get(name)  # misdirected: certify what the model sees
        return x if substitute is None else np.asarray(substitute)

    # -- sampling ----------------------------------------------------------------

    def generators(self, x: np.ndarray) -> list[np.random.Generator]:
        """The noise of each row: keyed on the row (``consistent``), else fresh."""
        if self.key is not None:
            return consistent_generators(self.key, self.scope, {self.input or "input": x})
        rng = np.random.default_rng(self._seeds.spawn(1)[0])
        return [rng] * len(x)

    async def _certify(
        self, ctx: RequestContext, x: np.ndarray, slot: _Slot, radius: float | None = None
    ) -> list[Certificate]:
        """Certify every row; release the capacity taken when sampling has stopped.

        A request cancelled while its rows are sampled in a worker thread keeps
        its slot until the thread is done, so cancelled requests cannot pile up
        more than ``max_concurrent`` certifications.
        """
        from guard.defenses.sequential import AsyncSequentialSmooth, SequentialSmooth
        from guard.defenses.smoothing import AsyncSmooth, Smooth

        o = self.options
        try:
            rngs = self.generators(x)
        except BaseException:
            slot.drop()
            raise
        if self.local is not None:
            local, input_name, output_name = self.local, self.input or "", self.output

            def local_labels(batch: np.ndarray) -> np.ndarray:
                output = local.run({input_name: batch}, [output_name])[output_name]
                return labels_from_output(output, len(batch))

            smooth = Smooth(local_labels, o.sigma, batch=o.batch, dtype=self.dtype)
            seq = SequentialSmooth(local_labels, o.sigma, batch=o.batch, dtype=self.dtype)
            loop = asyncio.get_running_loop()

            def one(row: np.ndarray, rng: np.random.Generator) -> Any:
                if radius is not None:
                    return seq.certify_radius(row, radius, o.n0, o.n, o.alpha, rng=rng)
                if o.mode == "adaptive":
                    return seq.certify_adaptive(
                        row, o.n0, o.n, o.alpha, rng=rng, tolerance=o.tolerance
                    )
                return smooth.certify(row, o.n0, o.n, o.alpha, rng=rng)

            def work() -> list[Certificate]:
                return [one(row, rng) for row, rng in zip(x, rngs, strict=True)]

            try:
                sampling = loop.run_in_executor(local.executor, work)
            except BaseException:
                slot.drop()
                raise
            slot.sampling = True  # a cancelled request keeps it until the thread is done
            sampling.add_done_callback(slot.drop)
            return await asyncio.shield(sampling)

        async def upstream_labels(batch: np.ndarray) -> np.ndarray:
            return await self._upstream_labels(ctx, batch)

        dtype = x.dtype if x.dtype == np.float64 else self.dtype
        remote = AsyncSmooth(upstream_labels, o.sigma, batch=o.batch, dtype=dtype)
        aseq = AsyncSequentialSmooth(upstream_labels, o.sigma, batch=o.batch, dtype=dtype)

        async def one_async(row: np.ndarray, rng: np.random.Generator) -> Any:
            if radius is not None:
                return await aseq.certify_radius(row, radius, o.n0, o.n, o.alpha, rng=rng)
            if o.mode == "adaptive":
                return await aseq.certify_adaptive(
                    row, o.n0, o.n, o.alpha, rng=rng, tolerance=o.tolerance
                )
            return await remote.certify(row, o.n0, o.n, o.alpha, rng=rng)

        try:
            return [await one_async(row, rng) for row, rng in zip(x, rngs, strict=True)]
        finally:
            slot.drop()

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


class _Slot:
    """One admitted certification's place in :class:`Capacity`, given back exactly once:
    when its sampling stops, or when its request's task ends before ``on_response`` ran
    (an upstream error, a later stage refusing)."""

    __slots__ = ("capacity", "client", "held", "sampling", "task")

    def __init__(self, capacity: Capacity, client: str, task: asyncio.Task[Any] | None) -> None:
        self.capacity, self.client, self.task = capacity, client, task
        self.held, self.sampling = True, False
        if task is not None:
            task.add_done_callback(self.abandon)

    def reached(self) -> None:
        """``on_response`` runs: it gives the slot back from here."""
        if self.task is not None:
            self.task.remove_done_callback(self.abandon)
            self.task = None

    def drop(self, _: object = None) -> None:
        if self.held:
            self.held = False
            self.capacity.release(self.client)

    def abandon(self, _: object = None) -> None:
        """The request ended: give the slot back unless a worker thread still samples."""
        if not self.sampling:
            self.drop()


@dataclass(frozen=True, slots=True)
class Released:
    """What one row's answer says: the certificate as the policy releases it."""

    label: int  # -1: abstained
    radius: float  # on the grid; 0.0 when abstained
    text: str  # the radius as the header writes it, or "abstain"

    @property
    def abstained(self) -> bool:
        return self.label < 0


class RadiusGrid:
    """Radii rounded down to multiples of ``step`` (at most 6 decimals), written alike in
    the V2 parameters and the header; a smaller radius is still a valid certificate."""

    def __init__(self, step: float) -> None:
        self.step = step
        self.decimals = max(0, -Decimal(repr(step)).normalize().as_tuple().exponent)  # type: ignore[operator]

    def release(self, certificate: Certificate, certified_only: bool = False) -> Released:
        """``certificate`` on the grid; ``certified_only``: certified at one step, or abstained."""
        if certificate.abstained or certificate.label is None:
            return Released(-1, 0.0, "abstain")
        steps = math.floor(certificate.radius / self.step)
        if round((steps + 1) * self.step, self.decimals) <= certificate.radius:
            steps += 1  # the division fell just short of a grid point (0.3 / 0.05 < 6)
        if certified_only:
            if steps < 1:
                return Released(-1, 0.0, "abstain")
            steps = 1
        radius = round(steps * self.step, self.decimals)
        return Released(certificate.label, radius, f"{radius:.{self.decimals}f}")

    def up(self, radius: float) -> float:
        """``radius`` rounded up to the grid (a requested radius: certifying it answers more)."""
        steps = math.ceil(round(radius / self.step, 9))
        return round(steps * self.step, self.decimals)


def noise_scope(model: str, version: str, options: CertifyOptions) -> tuple[str, ...]:
    """What the consistent noise is keyed on besides the row: fixed by the policy."""
    o = options
    return ("certify", model, version, repr(o.sigma), str(o.n0), str(o.n))


def seed_key(seed: int) -> bytes:
    """The key of the consistent noise when the policy sets ``seed`` (tests, reproductions)."""
    return f"certify-seed:{seed}".encode()


def _noise_key(options: CertifyOptions, env: StageEnv) -> bytes:
    if options.seed is not None:
        return seed_key(options.seed)
    name = options.secret_env or DEFAULT_SECRET_ENV
    value = env.secret(name)
    if value:
        if len(value) < MIN_SECRET_CHARS:
            raise OptionError(
                "secret_env",
                f"names {name}, which holds {len(value)} characters; "
                f"the noise key needs at least {MIN_SECRET_CHARS}",
            )
        return value.encode("utf-8")
    if options.secret_env is not None:
        raise OptionError("secret_env", f"names environment variable {name}, which is not set")
    log.warning(
        "certify: %s is not set; consistent noise uses a random key for this process only",
        DEFAULT_SECRET_ENV,
    )
    return os.urandom(32)


def _publish(
    ctx: RequestContext,
    response: InferResponse,
    released: list[Released],
    samples: list[int] | None,
) -> None:
    labels = [r.label for r in released]
    radii = [r.radius for r in released]
    abstained = [r.abstained for r in released]
    one = len(released) == 1
    response.parameters.update(
        certified=True,
        certified_label=labels[0] if one else labels,
        certified_radius=radii[0] if one else radii,
        abstained=abstained[0] if one else abstained,
    )
    if samples is not None:  # where one bit is released, the cost is not (it tracks pA)
        response.parameters["certified_samples"] = samples[0] if one else samples
        ctx.headers[SAMPLES_HEADER] = ",".join(map(str, samples))
    ctx.headers[RADIUS_HEADER] = ",".join(r.text for r in released)
    ctx.headers[LABEL_HEADER] = ",".join(
        "abstain" if r.abstained else str(r.label) for r in released
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

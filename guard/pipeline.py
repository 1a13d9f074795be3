"""The stage chain every inference request runs through.

A policy builds one :class:`Pipeline` per model, once, and freezes it. For each
request the pipeline runs the request stages in policy order, calls the backend
unless a stage already answered, then runs the response stages in reverse order
(the Envoy filter-chain shape)::

    validate ─▶ blacklight ─▶ certify ─▶ [backend] ─▶ certify ─▶ blacklight ─▶ validate
                (on_request, in order)                (on_response, reversed)

Per-request state lives in the slotted :class:`RequestContext`, never on stages.
Stages report what they found with :meth:`RequestContext.report`; the policy's
action for that finding decides what happens:

``allow``    record nothing beyond metrics
``flag``     answer normally, add ``X-Guard-Verdict: flag``, count it, audit it
``degrade``  answer with a weaker output for this client (stages read ``ctx.degraded``;
             when no stage declares ``handles_degrade``, :func:`label_only` is applied)
``deny``     refuse the request (403 in the protocol's error format)
``misdirect`` answer as if nothing happened (status 200, the verdict header says
             ``allow``, same stages, same timing) but from substituted inputs
             (``ctx.substitute``, set by the detector: docs/detection.md); only
             metrics and the audit log record it
``shadow``   count and audit what *would* have happened; change nothing

A policy-wide ``mode: shadow`` turns every flag, degrade and deny into shadow.

A stage that keeps state may split each side in two: ``prepare_request`` (or
``prepare_response``) does the state round trips that need no other stage's verdict
and leaves their results in ``ctx.stage_state``; ``on_request`` (``on_response``)
then decides from them. The pipeline runs every stage's prepare hook of a side
together, just before the first of them would run in order (after ``validate``, which
keeps none): on a remote store their commands leave in one write and come back in one
read, one round trip for the whole chain instead of one per stage. The price: a
request a later stage refuses was still counted by the stages that prepared (a query
over quota is remembered by the detectors; an attacker learns nothing from it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from guard.errors import Denied, GuardError, Overloaded, StateUnavailable
from guard.inference import InferRequest, InferResponse, class_output
from guard.protocols import v2

if TYPE_CHECKING:
    from guard.backends.base import Backend
    from guard.clients import Client

log = logging.getLogger(__name__)


class Verdict(enum.Enum):
    CONTINUE = "continue"
    RESPOND = "respond"  # ctx.response is set: skip the backend and the later request stages
    DENY = "deny"  # refuse the request


class Action(str, enum.Enum):
    ALLOW = "allow"
    FLAG = "flag"
    DEGRADE = "degrade"
    DENY = "deny"
    SHADOW = "shadow"
    MISDIRECT = "misdirect"


ACTIONS = tuple(a.value for a in Action)


@dataclass(frozen=True, slots=True)
class Finding:
    """What one stage saw in one request, and what was done about it."""

    stage: str
    action: Action  # what was done (shadow when the policy or mode says so)
    intended: Action  # what the stage's action would do in enforce mode
    message: str
    score: float | None = None
    threshold: float | None = None
    technique: str | None = None  # MITRE ATLAS technique id the finding evidences


class RequestContext:
    """Everything one request carries through the chain."""

    __slots__ = (
        "request_id",
        "model",
        "client",
        "request",
        "response",
        "findings",
        "stage_seconds",
        "upstream_seconds",
        "degraded",
        "shadow_mode",
        "headers",
        "request_headers",
        "stage_state",
        "substitute",
    )

    def __init__(
        self,
        *,
        request_id: str,
        model: str,
        client: Client,
        request: InferRequest,
        shadow_mode: bool = False,
        request_headers: Mapping[str, str] | None = None,
    ) -> None:
        self.request_id = request_id
        self.model = model
        self.client = client
        self.request = request
        self.response: InferResponse | None = None
        self.findings: list[Finding] = []
        self.stage_seconds: dict[str, float] = {}
        self.upstream_seconds: float | None = None
        self.degraded = False
        self.shadow_mode = shadow_mode
        self.headers: dict[str, str] = {}  # extra response headers
        # The client's HTTP request headers (read-only; case-insensitive when the server sets them).
        self.request_headers: Mapping[str, str] = {} if request_headers is None else request_headers
        # What a stage keeps from its on_request for its on_response, keyed by stage name.
        self.stage_state: dict[str, Any] = {}
        # Inputs the backend sees instead of the client's (misdirection); None: the client's.
        self.substitute: dict[str, np.ndarray] | None = None

    def report(
        self,
        stage: str,
        action: Action,
        message: str,
        *,
        score: float | None = None,
        threshold: float | None = None,
        technique: str | None = None,
    ) -> Verdict:
        """Record a finding and return the verdict its action calls for."""
        taken = action
        if self.shadow_mode and action in (
            Action.FLAG,
            Action.DEGRADE,
            Action.DENY,
            Action.MISDIRECT,
        ):
            taken = Action.SHADOW
        self.findings.append(Finding(stage, taken, action, message, score, threshold, technique))
        if taken is Action.DEGRADE:
            self.degraded = True
        return Verdict.DENY if taken is Action.DENY else Verdict.CONTINUE

    @property
    def verdict(self) -> str:
        """The strongest action taken on this request, for headers and metrics.

        A misdirected request reads ``allow``: the client must not tell it apart
        (its finding, in ``guard_findings_total`` and the audit log, says what was done).
        """
        taken = {f.action for f in self.findings}
        for action in (Action.DENY, Action.DEGRADE, Action.FLAG, Action.SHADOW):
            if action in taken:
                return action.value
        return Action.ALLOW.value


class Stage(Protocol):
    """One step of the chain. Build with ``from_config``; never keep per-request state."""

    name: str
    fail_open: bool

    async def on_request(self, ctx: RequestContext) -> Verdict: ...

    async def on_response(self, ctx: RequestContext) -> Verdict: ...


class BaseStage:
    """Optional base: no-op hooks, so a stage writes only the side it needs.

    The pipeline skips hooks a stage does not override, so a request-only stage
    costs nothing on the response path, and the hooks an instance names in
    ``idle_hooks`` (its settings leave them nothing to do).
    """

    name = "stage"
    fail_open = False
    # False: ``on_response`` only reads the response (the upstream's body can then be
    # answered as it came when no other stage changes it). Stages that do not say: True.
    changes_outputs = True
    handles_degrade = False  # True: this stage decides what ``ctx.degraded`` answers look like
    idle_hooks: frozenset[str] = frozenset()

    async def on_request(self, ctx: RequestContext) -> Verdict:
        return Verdict.CONTINUE

    async def on_response(self, ctx: RequestContext) -> Verdict:
        return Verdict.CONTINUE

    async def prepare_request(self, ctx: RequestContext) -> None:
        """State round trips for ``on_request``, run together with the other stages'."""

    async def prepare_response(self, ctx: RequestContext) -> None:
        """State round trips for ``on_response``, run together with the other stages'."""

    def describe(self) -> dict[str, Any]:
        """The resolved settings, for ``guard check`` and the admin status page."""
        return {}


def _overrides(stage: object, hook: str) -> bool:
    """Whether the pipeline calls ``stage``'s ``hook``: its class has one of its own, and
    the instance does not call it idle."""
    base = getattr(BaseStage, hook)
    own = getattr(type(stage), hook, base) is not base
    return own and hook not in getattr(stage, "idle_hooks", ())


class Pipeline:
    """A frozen chain of stages for one model."""

    __slots__ = (
        "stages",
        "concurrent",
        "_request_stages",
        "_response_stages",
        "_request_prepares",
        "_response_prepares",
        "_default_degrade",
        "_reads_only",
    )

    def __init__(self, stages: Sequence[Stage], *, concurrent: bool = False) -> None:
        """``concurrent``: the stages' state is remote, and prepare hooks run at once (in
        this process's memory they never wait: they run in turn, without tasks)."""
        self.stages: tuple[Stage, ...] = tuple(stages)
        self.concurrent = concurrent
        # (position, stage) so a chain cut short by RESPOND unwinds only what ran.
        self._request_stages = tuple(
            (i, s)
            for i, s in enumerate(self.stages)
            if _overrides(s, "on_request") or _overrides(s, "prepare_request")
        )
        self._response_stages = tuple(
            (i, s)
            for i, s in reversed(list(enumerate(self.stages)))
            if _overrides(s, "on_response") or _overrides(s, "prepare_response")
        )
        self._request_prepares = tuple(s for s in self.stages if _overrides(s, "prepare_request"))
        # (position, stage): a chain cut short prepares the responses of the stages that ran.
        self._response_prepares = tuple(
            (i, s) for i, s in enumerate(self.stages) if _overrides(s, "prepare_response")
        )
        self._default_degrade = not any(getattr(s, "handles_degrade", False) for s in self.stages)
        # Every response stage only reads: the upstream's raw body can be answered as is.
        self._reads_only = not any(
            getattr(s, "changes_outputs", True) for _, s in self._response_stages
        )

    async def run(
        self, ctx: RequestContext, backend: Backend, *, passthrough: bool = False
    ) -> InferResponse:
        """Run the chain. ``passthrough``: the caller can answer with the backend's raw
        V2 JSON body, which is used when no response stage changes the outputs and the
        client is not degraded: response stages that only read (``changes_outputs``
        False) read them decoded from it, and the body goes back untouched."""
        reached = len(self.stages)
        prepares = self._request_prepares
        for position, stage in self._request_stages:
            if prepares and stage is prepares[0]:  # the first stage that prepares: all at once
                await self._prepare(prepares, "prepare_request", ctx)
            verdict = await self._call(stage, "on_request", ctx)
            if verdict is Verdict.DENY:
                raise Denied(f"request refused by policy ({stage.name})")
            if verdict is Verdict.RESPOND:
                reached = position
                break
        if ctx.response is None:
            started = time.perf_counter()
            raw_ok = passthrough and self._reads_only
            raw_ok = raw_ok and not (ctx.degraded and self._default_degrade)
            request = ctx.request
            if ctx.substitute:
                request = dataclasses.replace(request, inputs={**request.inputs, **ctx.substitute})
            ctx.response = await backend.infer(request, passthrough=raw_ok)
            ctx.upstream_seconds = time.perf_counter() - started
            raw = ctx.response.raw
            if raw is not None and self._response_stages and not ctx.response.outputs:
                ctx.response.outputs = v2.decode_response(raw, header_length=None).outputs
        shapes = {n: a.shape for n, a in ctx.response.outputs.items()}
        if self._response_prepares:
            ran = [s for position, s in self._response_prepares if position <= reached]
            await self._prepare(ran, "prepare_response", ctx)
        for position, stage in self._response_stages:
            if position > reached:
                continue
            verdict = await self._call(stage, "on_response", ctx)
            if verdict is Verdict.DENY:
                raise Denied(f"response withheld by policy ({stage.name})")
        if ctx.degraded and self._default_degrade:
            ctx.response.raw = None  # a finding degraded the client: answer the label only
            label_only(ctx.response)
        keep_shapes(ctx.response, shapes)
        return ctx.response

    async def _prepare(self, stages: Sequence[Stage], hook: str, ctx: RequestContext) -> None:
        """Run ``hook`` of every stage in ``stages``: at once when the state is remote. A
        failure is the first failing stage's, in policy order, as if run in turn."""
        for stage in stages:
            ctx.stage_state[f"{hook}:{stage.name}"] = True
        if not self.concurrent or len(stages) < 2:
            for stage in stages:
                await self._call(stage, hook, ctx)
            return
        done = await asyncio.gather(
            *(self._call(stage, hook, ctx) for stage in stages), return_exceptions=True
        )
        for outcome in done:
            if isinstance(outcome, BaseException):
                raise outcome

    @staticmethod
    async def _call(stage: Stage, hook: str, ctx: RequestContext) -> Verdict:
        started = time.perf_counter()
        try:
            verdict: Verdict = await getattr(stage, hook)(ctx) or Verdict.CONTINUE
        except StateUnavailable as exc:  # the state store, not the request: same failure mode
            log.warning("stage %s failed in %s: %s", stage.name, hook, exc, extra=_where(ctx))
            ctx.report(stage.name, Action.FLAG, f"stage failed: {exc}")
            if not stage.fail_open:
                raise
            verdict = Verdict.CONTINUE
        except GuardError:
            raise
        except Exception as exc:  # a stage's own fault: apply its declared failure mode
            log.exception("stage %s failed in %s", stage.name, hook, extra=_where(ctx))
            ctx.report(stage.name, Action.FLAG, f"stage failed: {type(exc).__name__}")
            if not stage.fail_open:
                raise Overloaded(f"stage {stage.name} is unavailable; request not served") from exc
            verdict = Verdict.CONTINUE
        finally:
            ctx.stage_seconds[stage.name] = (
                ctx.stage_seconds.get(stage.name, 0.0) + time.perf_counter() - started
            )
        return verdict


async def ensure_prepared(stage: Stage, hook: str, ctx: RequestContext) -> None:
    """Run ``stage``'s prepare ``hook`` (``prepare_request`` or ``prepare_response``)
    unless the pipeline already has, failed or not: for a stage called on its own."""
    done = f"{hook}:{stage.name}"
    if done not in ctx.stage_state:
        ctx.stage_state[done] = True
        await getattr(stage, hook)(ctx)


async def take_prepared(stage: Stage, hook: str, ctx: RequestContext) -> Any:
    """What ``stage``'s prepare ``hook`` left in ``ctx.stage_state`` under the stage's
    name, taken out (None when it left nothing: no rows to watch, or its store failed
    and ``on_error`` is open); the hook runs first if the pipeline has not run it."""
    await ensure_prepared(stage, hook, ctx)
    return ctx.stage_state.pop(stage.name, None)


def _where(ctx: RequestContext) -> dict[str, str]:
    """Structured fields for a log record about this request (``--log-format json``)."""
    return {"request_id": ctx.request_id, "model": ctx.model, "client": ctx.client.name}


def keep_shapes(response: InferResponse, shapes: dict[str, tuple[int, ...]]) -> None:
    """Give each output the shape the backend gave it when a response stage kept its
    values but not its layout (a ``[N, 1]`` label rewritten as ``[N]``): a client's
    decoder reads the shape. An output whose element count changed is left alone."""
    for name, array in response.outputs.items():
        shape = shapes.get(name)
        if shape is not None and array.shape != shape and array.size == math.prod(shape):
            response.outputs[name] = array.reshape(shape)


def label_only(response: InferResponse) -> None:
    """What ``degraded`` means when no stage handles it: answers carry the label alone.

    Every score output (floating point, ``[batch, classes]`` with two or more
    classes) is replaced in place by the one-hot of its argmax, in its dtype;
    labels and other outputs are left as they are. The client is not told.
    """
    for name, scores in response.outputs.items():
        if class_output(scores.dtype.kind, scores.shape) == "scores":
            onehot = np.zeros_like(scores)
            onehot[np.arange(scores.shape[0]), np.argmax(scores, axis=1)] = 1
            response.outputs[name] = onehot

"""``privacy``: perturb the scores a model releases and charge each client's budget.

The mechanisms and their guarantees are in :mod:`guard.defenses.privacy`, the
accounting in :mod:`guard.defenses.accountant`; docs/privacy.md has the measured
trade-offs. In one sentence: a noisy answer is ε-DP with respect to the model's
score vector at that input (not with respect to the training data), and a
client's answers compose up to its budget.

Keys: :class:`PrivacyOptions` (docs/stage-options.md); the mechanism keys
(:class:`MechanismOptions`) sit in the stage's section and again under ``degraded``.

Where in the list: put ``privacy`` right after ``validate``. Response stages run in
reverse, so it then perturbs the final outputs, and a later stage answering by
itself still has its answer perturbed. ``validate`` casting inputs to the model's
dtype makes equal model inputs hash equally.

Noise is keyed on the model, the version the guard serves (``upstream.version``
in the policy; none for an embedded model), the output, the mechanism with its
parameters and the input row, not on the client: everyone asking the same
question gets the same answer. The version a client writes in its URL
(``/versions/<v>/``) is not part of the key: it does not change the model that
answers, so it must not buy a fresh draw of noise.

Each answered row costs one answer's ε (ρ for the Gaussian); a request whose
cost does not fit the budget is answered as ``on_exhausted`` says, all rows
alike. Rows released label-only are never charged. Answers carry
``X-Guard-Privacy-Epsilon: spent/budget`` (ε in the current window). Exhaustion
is a finding (action ``degrade`` or ``deny``; technique AML.T0024), so it is
counted in ``guard_findings_total{stage="privacy"}`` and written to the audit log.
Failure mode: ``on_error``; scores that cannot be perturbed always refuse (503).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from guard.defenses.accountant import Accountant, Budget, zcdp_epsilon, zcdp_rho
from guard.defenses.privacy import (
    ConfidenceBins,
    Gaussian,
    LabelOnly,
    Laplace,
    Mechanism,
    ReverseSigmoid,
    Rounding,
    TopK,
    consistent_generators,
    gaussian_sigma,
)
from guard.errors import Overloaded, RateLimited, StateUnavailable
from guard.inference import RequestedOutput
from guard.pipeline import Action, RequestContext, Verdict
from guard.stages.env import StageEnv
from guard.stages.options import Duration, OptionError, OptionsStage, format_duration, option

if TYPE_CHECKING:
    from guard.metrics import GuardMetrics

log = logging.getLogger(__name__)

DEFAULT_SECRET_ENV = "GUARD_PRIVACY_SECRET"
DEFAULT_DELTA = 1e-6
MIN_SECRET_CHARS = 16
BUDGET_HEADER = "X-Guard-Privacy-Epsilon"
TECHNIQUE = "AML.T0024"  # Exfiltration via ML Inference API
# The keys each mechanism takes, with their defaults (None: no default).
_TAKES: dict[str, dict[str, Any]] = {
    "laplace": {"epsilon": None, "keep_argmax": True},
    "gaussian": {"sigma": None, "epsilon": None, "keep_argmax": True},
    "round": {"decimals": 2, "keep_argmax": True},
    "topk": {"k": 1, "renormalize": True},
    "label_only": {},
    "reverse_sigmoid": {"beta": 1.0, "gamma": 0.1, "keep_argmax": True},
    "bins": {"cuts": (), "confidences": None, "ranked": None},
}
_PARAMETERS = sorted({key for keys in _TAKES.values() for key in keys})


@dataclass(frozen=True, kw_only=True)
class MechanismOptions:
    """A mechanism and its parameters; a parameter it does not take must stay unset."""

    mechanism: Literal[
        "laplace", "gaussian", "round", "topk", "label_only", "reverse_sigmoid", "bins"
    ] = option(doc="the output defence (guard.defenses.privacy); label_only releases the label")
    epsilon: float | None = option(
        None,
        gt=0.0,
        shown="required (laplace)",
        doc="laplace: ε per answer, noise scale 2/ε. gaussian: per-answer ε at `delta`, "
        "instead of `sigma`",
    )
    sigma: float | None = option(
        None, gt=0.0, doc="gaussian: noise standard deviation (ρ = 1/σ² per answer)"
    )
    decimals: int | None = option(
        None, min=0, max=8, shown="`2` (round)", doc="round: decimal places kept"
    )
    k: int | None = option(None, min=1, shown="`1` (topk)", doc="topk: classes kept")
    renormalize: bool | None = option(
        None, shown="`true` (topk)", doc="topk: rescale the kept scores to sum to 1"
    )
    beta: float | None = option(
        None, gt=0.0, shown="`1.0` (reverse_sigmoid)", doc="reverse_sigmoid: magnitude"
    )
    gamma: float | None = option(
        None, gt=0.0, shown="`0.1` (reverse_sigmoid)", doc="reverse_sigmoid: convergence"
    )
    cuts: tuple[float, ...] | None = option(
        None,
        shown="`[]` (bins)",
        doc="bins: top-probability boundaries, rising within (0, 1); none: one bin",
    )
    confidences: tuple[float, ...] | None = option(
        None,
        shown="required (bins)",
        doc="bins: the top probability released in each bin, one more than `cuts`; set "
        "each to the model's held-out accuracy in that bin to keep the answers calibrated",
    )
    ranked: int | None = option(
        None,
        min=0,
        shown="all (bins)",
        doc="bins: how many classes after the top keep their place (the rest share evenly); "
        "fewer tell an extraction attack less",
    )
    keep_argmax: bool | None = option(
        None,
        shown="`true`",
        doc="laplace, gaussian, round, reverse_sigmoid: release the model's top-1 class "
        "exactly. The label is then disclosed and ε covers the rest; with false the label "
        "comes from the noisy scores (and ε covers it too)",
    )

    def __post_init__(self) -> None:
        takes = _TAKES[self.mechanism]
        for key in _PARAMETERS:
            if key not in takes and getattr(self, key) is not None:
                taken = ", ".join(takes) or "no options"
                raise OptionError(
                    key, f"does not apply to mechanism {self.mechanism} (it takes {taken})"
                )
        if self.mechanism == "laplace" and self.epsilon is None:
            raise OptionError("epsilon", "is required")
        if self.mechanism == "bins":
            if self.confidences is None:
                raise OptionError("confidences", "is required")
            try:
                self.build(None)
            except ValueError as exc:
                key = "cuts" if str(exc).startswith("cuts") else "confidences"
                raise OptionError(key, str(exc).split(" ", 1)[1]) from None
        if self.mechanism == "gaussian" and (self.sigma is None) == (self.epsilon is None):
            raise OptionError(None, "mechanism gaussian takes sigma or epsilon (one of them)")

    def value(self, key: str) -> Any:
        """Parameter ``key`` as the mechanism uses it: as set, else the mechanism's default."""
        value = getattr(self, key)
        return _TAKES[self.mechanism][key] if value is None else value

    def build(self, delta: float | None) -> Mechanism:
        """The mechanism these options configure (``delta`` turns a Gaussian's ε into σ)."""
        kind, v = self.mechanism, self.value
        if kind == "laplace":
            return Laplace(epsilon=v("epsilon"), keep_argmax=v("keep_argmax"))
        if kind == "gaussian":
            sigma = self.sigma or gaussian_sigma(zcdp_rho(v("epsilon"), delta or DEFAULT_DELTA))
            return Gaussian(sigma=sigma, keep_argmax=v("keep_argmax"))
        if kind == "round":
            return Rounding(decimals=v("decimals"), keep_argmax=v("keep_argmax"))
        if kind == "topk":
            return TopK(k=v("k"), renormalize=v("renormalize"))
        if kind == "bins":
            return ConfidenceBins(cuts=v("cuts"), confidences=v("confidences"), ranked=v("ranked"))
        if kind == "reverse_sigmoid":
            return ReverseSigmoid(beta=v("beta"), gamma=v("gamma"), keep_argmax=v("keep_argmax"))
        return LabelOnly()


@dataclass(frozen=True, kw_only=True)
class BudgetOptions:
    """``budget: {epsilon: E, per: 1d}``: the ε each client may spend per window."""

    epsilon: float = option(gt=0.0, doc="the ε each client may spend per window on this model")
    per: Duration | None = option(
        None, min=1, shown="never resets", doc="the window: seconds or `30s`/`15m`/`12h`/`1d`"
    )


@dataclass(frozen=True, kw_only=True)
class PrivacyOptions(MechanismOptions):
    delta: float | None = option(
        None,
        gt=0.0,
        lt=1.0,
        shown="`1e-6` (gaussian)",
        doc="gaussian (main or degraded) only: the δ of reported (ε, δ) and of ε budgets",
    )
    consistent: bool = option(
        True,
        doc="noisy mechanisms: the same input always gets the same noise (a keyed hash seeds "
        "it), so repeating a query cannot average the noise away",
    )
    secret_env: str | None = option(
        None,
        shown=f"`{DEFAULT_SECRET_ENV}`",
        doc="environment variable holding the key of that hash (at least 16 characters). When "
        "the default is unset a random key is drawn at load (consistent within this process "
        "only; set it for replicas)",
    )
    output: str = option("probabilities", names="output", doc="the score output to perturb")
    label_output: str = option(
        "label",
        doc="the label output, rewritten to the argmax of the released scores so the two never "
        "disagree (ignored when the answer has none)",
    )
    budget: BudgetOptions | None = option(
        None, doc="each client may spend `epsilon` per window `per`; noisy mechanisms only"
    )
    on_exhausted: Literal["label_only", "degrade", "deny"] = option(
        "label_only",
        doc="a spent budget: `label_only` answers with the label alone; `degrade` with the "
        "`degraded` mechanism, uncharged; `deny` 429 with Retry-After",
    )
    degraded: MechanismOptions = option(
        MechanismOptions(mechanism="label_only"),
        shown="`{mechanism: label_only}`",
        doc="the mechanism a degraded client gets (a detector's `degrade`, or `on_exhausted: "
        "degrade`); the mechanism keys. With a noisy main mechanism: label_only or the same "
        "mechanism with at least as much noise",
    )
    on_error: Literal["closed", "open"] = option(
        "closed",
        doc="the state store unreachable: `closed` refuses the request (503); `open` serves it "
        "perturbed but uncharged, flagged. Scores that cannot be perturbed always refuse it",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        gaussian = "gaussian" in (self.mechanism, self.degraded.mechanism)
        if self.delta is not None and not gaussian:
            raise OptionError("delta", "applies to mechanism gaussian only")
        main, degraded = self.build(self.delta), self.degraded.build(self.delta)
        if main.noisy and not isinstance(degraded, LabelOnly) and _weaker(degraded, main):
            raise OptionError(
                "degraded",
                f"must be label_only or {main.kind} with at least as much noise as the main "
                f"mechanism ({main.fingerprint()}); got {degraded.fingerprint()}",
            )
        if self.budget is not None and main.cost is None:
            raise OptionError(
                "budget",
                f"needs a noisy mechanism (laplace or gaussian): {main.kind} has no epsilon",
            )


def _weaker(degraded: Mechanism, main: Mechanism) -> bool:
    return (
        type(degraded) is not type(main)
        or (isinstance(main, Laplace) and degraded.epsilon > main.epsilon)  # type: ignore[attr-defined]
        or (isinstance(main, Gaussian) and degraded.sigma < main.sigma)  # type: ignore[attr-defined]
    )


class _AddedOutput(RequestedOutput):
    """An output this stage asked the model for; removed before the answer is encoded."""

    __slots__ = ()


class Privacy(OptionsStage[PrivacyOptions]):
    handles_degrade = True  # degraded clients get the ``degraded`` mechanism, not label-only
    name = "privacy"
    Options = PrivacyOptions

    def __init__(
        self, options: PrivacyOptions, env: StageEnv, *, rng: np.random.Generator | None = None
    ) -> None:
        super().__init__(options, env)
        o = options
        self.model = env.model
        self.version = env.version  # the served model's, from the policy: part of the noise key
        self.metrics: GuardMetrics | None = env.metrics
        self.mechanism = o.build(o.delta)
        self.degraded = o.degraded.build(o.delta)
        known = {spec.name for spec in env.metadata.outputs} if env.metadata else None
        self.label_output = o.label_output if known is None or o.label_output in known else None
        noisy = self.mechanism.noisy or self.degraded.noisy
        self.secret = _secret(o.secret_env, env) if noisy and o.consistent else None  # None: fresh
        self.accountant: Accountant | None = None
        cost = self.mechanism.cost
        if o.budget is not None and cost is not None:
            budget = Budget.of_epsilon(
                o.budget.epsilon,
                unit=cost.unit,
                window_s=o.budget.per,
                delta=(o.delta or DEFAULT_DELTA) if cost.unit == "rho" else None,
            )
            self.accountant = Accountant(env.store, budget, model=env.model)
        self.rng = rng if rng is not None else np.random.default_rng()
        self._derive_label = not all(_keeps_argmax(m) for m in (self.mechanism, self.degraded))

    def describe(self) -> dict[str, Any]:
        described = _applicable(super().describe(), self.options)
        described["degraded"] = _applicable(described["degraded"], self.options.degraded)
        for mechanism, shown in (
            (self.mechanism, described),
            (self.degraded, described["degraded"]),
        ):
            if mechanism.noisy:  # what the noise is, derived: scale, sigma, rho
                shown["noise"] = mechanism.describe()
        described["epsilon_per_answer"] = self._epsilon_per_answer(self.mechanism)
        described["label_output"] = self.label_output
        described["consistent"] = self.secret is not None
        if self.accountant is not None:
            b = self.accountant.budget
            described["budget"].update(
                unit=b.unit, limit=b.limit, window_s=b.window_s, delta=b.delta
            )
        return described

    def _epsilon_per_answer(self, mechanism: Mechanism) -> float | None:
        cost = mechanism.cost
        if cost is None:
            return None
        if cost.unit == "rho":
            return zcdp_epsilon(cost.amount, self.options.delta or DEFAULT_DELTA)
        return cost.amount

    # -- serving ---------------------------------------------------------------------
    async def on_request(self, ctx: RequestContext) -> Verdict:
        # A label derived from noisy scores needs the scores even when only the label is asked for.
        output = self.options.output
        if not self._derive_label or self.label_output is None:
            return Verdict.CONTINUE
        wanted = {o.name for o in ctx.request.outputs}
        if wanted and self.label_output in wanted and output not in wanted:
            ctx.request.outputs.append(_AddedOutput(output))
        return Verdict.CONTINUE

    async def on_response(self, ctx: RequestContext) -> Verdict:
        response, output = ctx.response, self.options.output
        if response is None:
            return Verdict.CONTINUE
        requested = ctx.request.outputs
        added = any(isinstance(o, _AddedOutput) for o in requested)
        if added:
            requested[:] = [o for o in requested if not isinstance(o, _AddedOutput)]
        outputs = response.outputs
        scores = outputs.pop(output, None) if added else outputs.get(output)
        if scores is None:
            return Verdict.CONTINUE
        names = {o.name for o in requested}
        releases_scores = not names or output in names
        label = self.label_output if self.label_output in outputs else None
        releases_label = label is not None and (not names or label in names)
        mechanism = self.degraded if ctx.degraded else self.mechanism
        if not releases_scores and (not releases_label or _keeps_argmax(mechanism)):
            return Verdict.CONTINUE  # nothing leaves that the mechanism would change
        rows = int(scores.shape[0]) if scores.ndim else 0
        if self.accountant is not None and mechanism.cost is not None and rows:
            mechanism = await self._charge(ctx, mechanism, rows)
        try:
            rng = self._generators(ctx, mechanism, rows) if mechanism.noisy else None
            released = mechanism.apply(np.asarray(scores), rng)
        except ValueError as exc:  # never let unperturbed scores out, whatever on_error says
            log.error("privacy: cannot perturb %s of model %s: %s", output, self.model, exc)
            raise Overloaded(f"output {output!r} of model {self.model} cannot be released") from exc
        if releases_scores:
            outputs[output] = released
        if label is not None:
            outputs[label] = np.argmax(released, axis=1).astype(outputs[label].dtype, copy=False)
        if self.metrics is not None:
            self.metrics.privacy_answers.labels(self.model, mechanism.kind).inc(rows)
        return Verdict.CONTINUE

    async def _charge(self, ctx: RequestContext, mechanism: Mechanism, rows: int) -> Mechanism:
        """The mechanism to answer with once ``rows`` answers are charged (or refused)."""
        accountant = self.accountant
        cost = mechanism.cost
        if accountant is None or cost is None:
            return mechanism
        try:
            charge = await accountant.charge(ctx.client.name, cost.amount, rows)
        except StateUnavailable as exc:
            if not self.fail_open:
                raise
            ctx.report(self.name, Action.FLAG, f"budget not charged: {exc.message}")
            return mechanism
        budget = accountant.budget
        limit = budget.epsilon(budget.limit)
        ctx.headers[BUDGET_HEADER] = f"{charge.epsilon:.6g}/{limit:.6g}"
        if charge.granted:
            if self.metrics is not None:
                spent = self.metrics.privacy_spent.labels(self.model, mechanism.kind)
                spent.inc(cost.amount * rows)
            return mechanism
        return self._exhausted(ctx, mechanism, charge.epsilon, limit, charge.retry_after)

    def _exhausted(
        self,
        ctx: RequestContext,
        mechanism: Mechanism,
        spent: float,
        limit: float,
        retry_after: float | None,
    ) -> Mechanism:
        budget = self.accountant.budget if self.accountant else None
        per = f" per {format_duration(budget.window_s)}" if budget and budget.window_s else ""
        message = (
            f"privacy budget of epsilon {limit:.6g}{per} for model {self.model} is spent "
            f"({spent:.6g} used)"
        )
        if self.options.on_exhausted == "deny":
            verdict = ctx.report(
                self.name, Action.DENY, message, score=spent, threshold=limit, technique=TECHNIQUE
            )
            if verdict is Verdict.DENY:
                when = "it does not reset"
                if retry_after is not None:
                    when = f"it resets in {retry_after:.0f} s"
                raise RateLimited(f"{message}; {when}", retry_after=retry_after)
            return mechanism  # shadow mode: answer as usual, uncharged
        ctx.report(
            self.name, Action.DEGRADE, message, score=spent, threshold=limit, technique=TECHNIQUE
        )
        if ctx.shadow_mode:
            return mechanism
        return LabelOnly() if self.options.on_exhausted == "label_only" else self.degraded

    def noise_scope(self, mechanism: Mechanism) -> tuple[str, ...]:
        """What the consistent noise is keyed on besides the input row: fixed by the
        policy, nothing a client sends (see the module docstring)."""
        return (self.model, self.version, self.options.output, mechanism.fingerprint())

    def _generators(
        self, ctx: RequestContext, mechanism: Mechanism, rows: int
    ) -> np.random.Generator | list[np.random.Generator]:
        if self.secret is None:
            return self.rng
        scope = self.noise_scope(mechanism)
        generators = consistent_generators(self.secret, scope, ctx.request.inputs)
        if len(generators) != rows:
            raise ValueError(f"{rows} rows of scores answer {len(generators)} rows of input")
        return generators


def _applicable(described: dict[str, Any], options: MechanismOptions) -> dict[str, Any]:
    """Described options with the mechanism's keys as it uses them, the others left out."""
    takes = _TAKES[options.mechanism]
    return {
        k: options.value(k) if k in takes else v
        for k, v in described.items()
        if k not in _PARAMETERS or k in takes
    }


def _keeps_argmax(mechanism: Mechanism) -> bool:
    return bool(getattr(mechanism, "keep_argmax", True))


def _secret(name: str | None, env: StageEnv) -> bytes:
    """The consistent-noise key from ``name`` (default ``GUARD_PRIVACY_SECRET``)."""
    value = env.secret(name or DEFAULT_SECRET_ENV)
    if value:
        if len(value) < MIN_SECRET_CHARS:
            raise OptionError(
                "secret_env",
                f"names {name or DEFAULT_SECRET_ENV}, which holds {len(value)} characters; "
                f"the noise key needs at least {MIN_SECRET_CHARS}",
            )
        return value.encode("utf-8")
    if name is not None:
        raise OptionError("secret_env", f"names environment variable {name}, which is not set")
    log.warning(
        "privacy: %s is not set; consistent noise uses a random key for this process only "
        "(set it, the same on every replica, to keep answers consistent across restarts)",
        DEFAULT_SECRET_ENV,
    )
    return os.urandom(32)

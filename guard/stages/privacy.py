"""``privacy``: perturb the scores a model releases and charge each client's budget.

The mechanisms and their guarantees are in :mod:`guard.defenses.privacy`, the
accounting in :mod:`guard.defenses.accountant`; docs/privacy.md has the measured
trade-offs. In one sentence: a noisy answer is ε-DP with respect to the model's
score vector at that input (not with respect to the training data), and a
client's answers compose up to its budget.

YAML keys:

``mechanism``     required: ``laplace``, ``gaussian``, ``round``, ``topk``, ``label_only`` or
                  ``reverse_sigmoid``
``epsilon``       laplace (required): ε per answer, noise scale 2/ε. gaussian: per-answer ε at
                  ``delta``, instead of ``sigma``
``sigma``         gaussian: noise standard deviation (ρ = 1/σ² per answer)
``delta``         gaussian: the δ of reported (ε, δ) and of ε budgets; default 1e-6
``decimals``      round: decimal places kept; default 2
``k``             topk: classes kept; default 1
``renormalize``   topk: rescale the kept scores to sum to 1; default true
``beta``/``gamma`` reverse_sigmoid: magnitude and convergence; default 1.0 and 0.1
``keep_argmax``   laplace, gaussian, round, reverse_sigmoid: release the model's top-1 class
                  exactly; default true. The label is then disclosed and ε covers the rest;
                  with false the label comes from the noisy scores (and ε covers it too)
``consistent``    noisy mechanisms: the same input always gets the same noise (a keyed hash
                  seeds it), so repeating a query cannot average the noise away; default true
``secret_env``    environment variable holding the key of that hash (at least 16 characters);
                  default ``GUARD_PRIVACY_SECRET``. When the default is unset a random key is
                  drawn at load (consistent within this process only; set it for replicas)
``output``        the score output to perturb; default ``probabilities``
``label_output``  the label output, rewritten to the argmax of the released scores so the two
                  never disagree; default ``label`` (ignored when the answer has none)
``budget``        ``{epsilon: E, per: 1d}``: each client may spend E per window on this model
                  (``per``: seconds or ``30s``/``15m``/``12h``/``1d``; absent: never resets).
                  Noisy mechanisms only. Default: no budget
``on_exhausted``  ``label_only`` (default): answer with the label alone; ``degrade``: answer
                  with the ``degraded`` mechanism, uncharged; ``deny``: 429 with Retry-After
``degraded``      the mechanism a degraded client gets (a detector's ``degrade`` action, or
                  ``on_exhausted: degrade``); same keys as above; default ``{mechanism:
                  label_only}``. With a noisy main mechanism it must be label_only or the same
                  mechanism with at least as much noise
``on_error``      the state store unreachable: ``closed`` (default) refuses the request (503);
                  ``open`` serves it perturbed but uncharged, flagged. Scores that cannot be
                  perturbed (not probability rows) always refuse it (503): an unperturbed
                  answer never leaves

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
"""

from __future__ import annotations

import logging
import os
import re
from typing import TYPE_CHECKING, Any

import numpy as np

from guard.configreader import Section
from guard.defenses.accountant import Accountant, Budget, zcdp_epsilon, zcdp_rho
from guard.defenses.privacy import (
    MECHANISMS,
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
from guard.pipeline import Action, BaseStage, RequestContext, Verdict
from guard.stages.detector import read_fail_open
from guard.stages.env import StageEnv

if TYPE_CHECKING:
    from guard.defenses.accountant import BudgetStore
    from guard.metrics import GuardMetrics

log = logging.getLogger(__name__)

DEFAULT_SECRET_ENV = "GUARD_PRIVACY_SECRET"
MIN_SECRET_CHARS = 16
ON_EXHAUSTED = ("label_only", "degrade", "deny")
BUDGET_HEADER = "X-Guard-Privacy-Epsilon"
TECHNIQUE = "AML.T0024"  # Exfiltration via ML Inference API
_OPTIONS: dict[str, tuple[str, ...]] = {
    "laplace": ("epsilon", "keep_argmax"),
    "gaussian": ("sigma", "epsilon", "keep_argmax"),
    "round": ("decimals", "keep_argmax"),
    "topk": ("k", "renormalize"),
    "label_only": (),
    "reverse_sigmoid": ("beta", "gamma", "keep_argmax"),
}
_ALL_OPTIONS = sorted({key for keys in _OPTIONS.values() for key in keys})
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class _AddedOutput(RequestedOutput):
    """An output this stage asked the model for; removed before the answer is encoded."""

    __slots__ = ()


class Privacy(BaseStage):
    handles_degrade = True  # degraded clients get the ``degraded`` mechanism, not label-only
    name = "privacy"

    def __init__(
        self,
        *,
        model: str,
        version: str = "",
        mechanism: Mechanism,
        degraded: Mechanism,
        delta: float | None,
        output: str,
        label_output: str | None,
        secret: bytes | None,
        accountant: Accountant | None,
        on_exhausted: str,
        fail_open: bool = False,
        rng: np.random.Generator | None = None,
        metrics: GuardMetrics | None = None,
    ) -> None:
        if on_exhausted not in ON_EXHAUSTED:
            raise ValueError(f"on_exhausted must be one of {', '.join(ON_EXHAUSTED)}")
        self.model = model
        self.version = version  # the served model's, from the policy: part of the noise key
        self.mechanism = mechanism
        self.degraded = degraded
        self.delta = delta
        self.output = output
        self.label_output = label_output
        self.secret = secret  # None: fresh noise on every answer
        self.accountant = accountant
        self.on_exhausted = on_exhausted
        self.fail_open = fail_open
        self.rng = rng if rng is not None else np.random.default_rng()
        self.metrics = metrics
        self._derive_label = not all(_keeps_argmax(m) for m in (mechanism, degraded))

    # -- building ------------------------------------------------------------------
    @classmethod
    def from_config(cls, section: Section, env: StageEnv) -> Privacy:
        kind = section.choice("mechanism", tuple(MECHANISMS))
        delta = section.float("delta", 1e-6, gt=0.0, lt=1.0)
        mechanism = _read_mechanism(section, kind, delta)
        degraded = _read_degraded(section, mechanism, delta)
        if section.has("delta") and not any(isinstance(m, Gaussian) for m in (mechanism, degraded)):
            raise section.error("delta", "applies to mechanism gaussian only")

        output = section.str("output", "probabilities")
        label_output = section.str("label_output", "label")
        known = {spec.name for spec in env.metadata.outputs} if env.metadata else None
        if known is not None and output not in known:
            outputs = ", ".join(sorted(known))
            raise section.error("output", f"names no output of model {env.model}; it has {outputs}")
        if known is not None and label_output not in known:
            label_output = None

        noisy = mechanism.noisy or degraded.noisy
        consistent = section.bool("consistent", True)
        secret = _read_secret(section, needed=noisy and consistent)

        budget = _read_budget(section, mechanism, delta)
        on_exhausted = section.choice("on_exhausted", ON_EXHAUSTED, "label_only")
        fail_open = read_fail_open(section)
        section.finish()

        accountant = Accountant(_store(env), budget, model=env.model) if budget else None
        gaussian = any(isinstance(m, Gaussian) for m in (mechanism, degraded))
        return cls(
            model=env.model,
            version=env.version,
            mechanism=mechanism,
            degraded=degraded,
            delta=delta if gaussian else None,
            output=output,
            label_output=label_output,
            secret=secret,
            accountant=accountant,
            on_exhausted=on_exhausted,
            fail_open=fail_open,
            metrics=env.metrics,
        )

    def describe(self) -> dict[str, Any]:
        described: dict[str, Any] = {
            "mechanism": {"kind": self.mechanism.kind, **self.mechanism.describe()},
            "epsilon_per_answer": self._epsilon_per_answer(self.mechanism),
            "degraded": {"kind": self.degraded.kind, **self.degraded.describe()},
            "output": self.output,
            "label_output": self.label_output,
            "consistent": self.secret is not None,
            "on_exhausted": self.on_exhausted,
        }
        if self.accountant is not None:
            budget = self.accountant.budget
            described["budget"] = {
                "epsilon": budget.epsilon(budget.limit),
                "unit": budget.unit,
                "limit": budget.limit,
                "window_s": budget.window_s,
                "delta": budget.delta,
            }
        return described

    def _epsilon_per_answer(self, mechanism: Mechanism) -> float | None:
        cost = mechanism.cost
        if cost is None:
            return None
        if cost.unit == "rho":
            return zcdp_epsilon(cost.amount, self.delta or 1e-6)
        return cost.amount

    # -- serving ---------------------------------------------------------------------
    async def on_request(self, ctx: RequestContext) -> Verdict:
        # A label derived from noisy scores needs the scores even when only the label is asked for.
        if not self._derive_label or self.label_output is None:
            return Verdict.CONTINUE
        wanted = {o.name for o in ctx.request.outputs}
        if wanted and self.label_output in wanted and self.output not in wanted:
            ctx.request.outputs.append(_AddedOutput(self.output))
        return Verdict.CONTINUE

    async def on_response(self, ctx: RequestContext) -> Verdict:
        response = ctx.response
        if response is None:
            return Verdict.CONTINUE
        requested = ctx.request.outputs
        added = any(isinstance(o, _AddedOutput) for o in requested)
        if added:
            requested[:] = [o for o in requested if not isinstance(o, _AddedOutput)]
        outputs = response.outputs
        scores = outputs.pop(self.output, None) if added else outputs.get(self.output)
        if scores is None:
            return Verdict.CONTINUE
        names = {o.name for o in requested}
        releases_scores = not names or self.output in names
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
            log.error("privacy: cannot perturb %s of model %s: %s", self.output, self.model, exc)
            raise Overloaded(
                f"output {self.output!r} of model {self.model} cannot be released"
            ) from exc
        if releases_scores:
            outputs[self.output] = released
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
        per = f" per {_span(budget.window_s)}" if budget and budget.window_s else ""
        message = (
            f"privacy budget of epsilon {limit:.6g}{per} for model {self.model} is spent "
            f"({spent:.6g} used)"
        )
        if self.on_exhausted == "deny":
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
        return LabelOnly() if self.on_exhausted == "label_only" else self.degraded

    def noise_scope(self, mechanism: Mechanism) -> tuple[str, ...]:
        """What the consistent noise is keyed on besides the input row: fixed by the
        policy, nothing a client sends (see the module docstring)."""
        return (self.model, self.version, self.output, mechanism.fingerprint())

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


# -- configuration helpers -----------------------------------------------------------


def _keeps_argmax(mechanism: Mechanism) -> bool:
    return bool(getattr(mechanism, "keep_argmax", True))


def _read_mechanism(section: Section, kind: str, delta: float) -> Mechanism:
    """Mechanism ``kind`` with its options from ``section``; other mechanisms' options refused."""
    allowed = _OPTIONS[kind]
    for key in _ALL_OPTIONS:
        if key not in allowed and section.has(key):
            takes = ", ".join(allowed) or "no options"
            raise section.error(key, f"does not apply to mechanism {kind} (it takes {takes})")
    keep = section.bool("keep_argmax", True) if "keep_argmax" in allowed else True
    if kind == "laplace":
        return Laplace(epsilon=section.float("epsilon", gt=0.0), keep_argmax=keep)
    if kind == "gaussian":
        sigma = section.float("sigma", None, gt=0.0)
        epsilon = section.float("epsilon", None, gt=0.0)
        if (sigma is None) == (epsilon is None):
            raise section.error(None, "mechanism gaussian takes sigma or epsilon (one of them)")
        if sigma is None:
            sigma = gaussian_sigma(zcdp_rho(epsilon, delta))
        return Gaussian(sigma=sigma, keep_argmax=keep)
    if kind == "round":
        return Rounding(decimals=section.int("decimals", 2, min=0, max=8), keep_argmax=keep)
    if kind == "topk":
        return TopK(k=section.int("k", 1, min=1), renormalize=section.bool("renormalize", True))
    if kind == "reverse_sigmoid":
        return ReverseSigmoid(
            beta=section.float("beta", 1.0, gt=0.0),
            gamma=section.float("gamma", 0.1, gt=0.0),
            keep_argmax=keep,
        )
    return LabelOnly()


def _read_degraded(section: Section, main: Mechanism, delta: float) -> Mechanism:
    if not section.has("degraded"):
        section.child("degraded")  # mark as read
        return LabelOnly()
    child = section.child("degraded")
    kind = child.choice("mechanism", tuple(MECHANISMS))
    degraded = _read_mechanism(child, kind, delta)
    child.finish()
    if main.noisy and not isinstance(degraded, LabelOnly):
        weaker = (
            type(degraded) is not type(main)
            or (isinstance(main, Laplace) and degraded.epsilon > main.epsilon)  # type: ignore[attr-defined]
            or (isinstance(main, Gaussian) and degraded.sigma < main.sigma)  # type: ignore[attr-defined]
        )
        if weaker:
            raise child.error(
                None,
                f"must be label_only or {main.kind} with at least as much noise as the main "
                f"mechanism ({main.fingerprint()}); got {degraded.fingerprint()}",
            )
    return degraded


def _read_budget(section: Section, mechanism: Mechanism, delta: float) -> Budget | None:
    if not section.has("budget"):
        section.child("budget")  # mark as read
        return None
    cost = mechanism.cost
    if cost is None:
        raise section.error(
            "budget",
            f"needs a noisy mechanism (laplace or gaussian): {mechanism.kind} has no epsilon",
        )
    child = section.child("budget")
    epsilon = child.float("epsilon", gt=0.0)
    window = _duration(child, "per")
    child.finish()
    return Budget.of_epsilon(
        epsilon, unit=cost.unit, window_s=window, delta=delta if cost.unit == "rho" else None
    )


def _duration(section: Section, key: str) -> float | None:
    """Seconds from a number or ``<n>s|m|h|d``; None when absent."""
    value = section.data.get(key)
    if value is None:
        section.str(key, None)  # mark as read
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = section.float(key, min=1.0)
    else:
        match = _DURATION.match(value) if isinstance(value, str) else None
        if match is None:
            raise section.error(
                key, f"must be seconds or a duration such as 30s, 15m, 12h, 1d; got {value!r}"
            )
        section.str(key)
        seconds = float(match.group(1)) * _SECONDS[match.group(2)]
        if seconds < 1.0:
            raise section.error(key, f"must be at least 1 s; got {value!r}")
    return float(seconds)


def _span(seconds: float) -> str:
    """``86400`` as ``1d``, ``5400`` as ``90m``: the unit a policy would use."""
    for unit in ("d", "h", "m"):
        count = seconds / _SECONDS[unit]
        if count >= 1 and count == int(count):
            return f"{int(count)}{unit}"
    return f"{seconds:g}s"


def _read_secret(section: Section, *, needed: bool) -> bytes | None:
    name = section.str("secret_env", None)
    if not needed:
        return None
    value = os.environ.get(name or DEFAULT_SECRET_ENV)
    if value:
        if len(value) < MIN_SECRET_CHARS:
            raise section.error(
                "secret_env",
                f"names {name or DEFAULT_SECRET_ENV}, which holds {len(value)} characters; "
                f"the noise key needs at least {MIN_SECRET_CHARS}",
            )
        return value.encode("utf-8")
    if name is not None:
        raise section.error("secret_env", f"names environment variable {name}, which is not set")
    log.warning(
        "privacy: %s is not set; consistent noise uses a random key for this process only "
        "(set it, the same on every replica, to keep answers consistent across restarts)",
        DEFAULT_SECRET_ENV,
    )
    return os.urandom(32)


def _store(env: StageEnv) -> BudgetStore:
    if env.state is not None:
        return env.state
    # A stage built on its own (tests, tools): budgets live in this process.
    from guard.state.memory import MemoryStore

    return MemoryStore()

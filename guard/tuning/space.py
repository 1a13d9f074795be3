"""What ``guard tune`` may change: a declared search space per stage type.

The tuned model's stages are read once into their typed options
(:func:`typed_model`). Each stage that has a space (``_SPACES``: blacklight,
prada, squeeze_detect, privacy, certify; the grids are tabulated in
docs/tuning.md, "The search space") contributes :class:`Param` s, grids
centred on the value the stage uses now (its default when the policy leaves
the key out: the options dataclass says which), always one of the grid points.
``small`` grids have three points per parameter, ``full`` grids five (and a
few extra parameters). ``squeeze_detect``'s threshold is derived instead:
calibrated on benign data at half the false-positive bound
(:func:`calibrate_squeeze`).

Other stages (``validate``, ``budget``, ``squeeze``) are measured as they are:
quotas and input rules are the operator's decisions, not trade-offs to search.
For the same reason a ``privacy`` budget keeps the number of scored answers it
allows: its ``epsilon`` follows the searched noise (:func:`apply`).
A ``certify`` parameter is judged on its own objective (the average certified
radius): it changes only the certified answers, never what the attacks or the
benign clients get, so it is tuned apart from the others (``group``).
A candidate is the model's configuration with its options replaced
(:func:`dataclasses.replace`), served as it is: no YAML in between.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from guard.configreader import Section
from guard.stages import StageEnv, stage_class
from guard.stages.options import OptionError, read_options
from guard.stages.scale import declared_scale

if TYPE_CHECKING:
    from guard.config import ModelConfig, Policy
    from guard.defenses.privacy import Cost
    from guard.stages.blacklight import BlacklightOptions
    from guard.stages.certify import CertifyOptions
    from guard.stages.prada import PradaOptions
    from guard.stages.privacy import PrivacyOptions
    from guard.stages.squeeze_detect import SqueezeDetectOptions
    from guard.subject import Subject

NOISY = ("laplace", "gaussian")


@dataclass(frozen=True, slots=True)
class Param:
    """One searched option: ``stage``'s ``key`` at position ``index`` of the model's stages."""

    stage: str
    index: int
    key: str
    values: tuple[Any, ...]
    base: Any
    group: str = "risk"  # "risk": judged by the attacks; "certified": by the certified radius

    @property
    def name(self) -> str:
        return f"{self.stage}.{self.key}"


def typed_model(policy: Policy, model: str) -> ModelConfig:
    """``model``'s configuration with each stage's options read once into its options
    class (a stage without one keeps its mapping); raises PolicyError. The model's
    local copy, when it has one, gives the metadata the options are checked against."""
    from guard.backends.onnx import OnnxBackend

    config = policy.models[model]
    local = None
    if config.model_file is not None:
        local = OnnxBackend(config.model_file, name=model, device="cpu")
    metadata = local.model_metadata if local else None
    env = StageEnv(
        model=model,
        backend=local,
        local=local,
        metadata=metadata,
        scale=declared_scale(config.stages, config.model_file, metadata),
        version=(config.upstream.version or "") if config.upstream else "",
        environ=policy.environ,
    )
    stages = []
    for entry in config.stages:
        cls = getattr(stage_class(entry.kind), "Options", None)
        if cls is not None and not isinstance(entry.options, cls):
            section = Section(entry.options, source=policy.source, path=entry.path)
            entry = replace(entry, options=read_options(cls, section, env))
        stages.append(entry)
    return replace(config, stages=tuple(stages))


def search_space(config: ModelConfig, *, grid: str, n_classes: int) -> list[Param]:
    """The parameters of the stages of ``config`` (from :func:`typed_model`), in order."""
    full = grid == "full"
    params = []
    for index, entry in enumerate(config.stages):
        builder = _SPACES.get(entry.kind)
        if builder is None:
            continue
        group = "certified" if entry.kind == "certify" else "risk"
        for key, values, base in builder(entry.options, full, n_classes):
            grid_values = tuple(_unique([*values, base]))
            params.append(Param(entry.kind, index, key, _ordered(grid_values), base, group))
    return params


def apply(
    config: ModelConfig,
    params: Sequence[Param],
    values: dict[str, Any],
    *,
    source: str = "guard tune",
) -> ModelConfig:
    """``config`` with each param's option replaced by ``values[param.name]``; PolicyError
    (naming the option in ``source``) when a value breaks a rule of its stage.

    A ``privacy`` budget follows its mechanism: when the noise changes, the budget's
    ``epsilon`` is rescaled so that it still allows as many scored answers per
    client as in ``config`` (:func:`rescaled_budget`). The quota is the
    operator's decision; the tuner searches the noise, not the quota."""
    changes: dict[int, dict[str, Any]] = {}
    for param in params:
        changes.setdefault(param.index, {})[param.key] = values[param.name]
    stages = list(config.stages)
    for index, change in changes.items():
        entry = stages[index]
        try:
            options = _replaced(entry.kind, entry.options, change)
        except OptionError as exc:
            raise Section({}, source=source, path=entry.path).error(exc.key, exc.message) from None
        stages[index] = replace(entry, options=options)
    return replace(config, stages=tuple(stages))


def _replaced(kind: str, options: Any, change: dict[str, Any]) -> Any:
    if kind != "privacy":
        return replace(options, **change)
    if change.get("mechanism", options.mechanism) != options.mechanism:
        change = {**change, "delta": None}  # the new mechanism's own: gaussian's, else unset
    return rescaled_budget(options, replace(options, **change))


def budget_answers(options: PrivacyOptions) -> float | None:
    """How many scored answers a ``privacy`` stage's budget allows per client and window
    (None without a budget or a noisy mechanism)."""
    from guard.defenses.accountant import Budget

    cost = _cost(options)
    if cost is None or options.budget is None:
        return None
    delta = _delta(options) if cost.unit == "rho" else None
    budget = Budget.of_epsilon(options.budget.epsilon, unit=cost.unit, window_s=None, delta=delta)
    return float(budget.limit / cost.amount)


def rescaled_budget(base: PrivacyOptions, options: PrivacyOptions) -> PrivacyOptions:
    """``options`` with the budget ``epsilon`` that gives its mechanism as many scored
    answers as ``base``'s budget gives its own (as it is without a noisy mechanism or
    a budget on either)."""
    from guard.defenses.accountant import zcdp_epsilon

    answers, cost = budget_answers(base), _cost(options)
    if answers is None or cost is None or options.budget is None:
        return options
    spent = answers * cost.amount
    epsilon = _round(zcdp_epsilon(spent, _delta(options)) if cost.unit == "rho" else spent, 4)
    if math.isclose(epsilon, options.budget.epsilon):
        return options
    return replace(options, budget=replace(options.budget, epsilon=epsilon))


def _cost(options: PrivacyOptions) -> Cost | None:
    """One answer's cost in the budget's unit: ε (laplace) or ρ (gaussian)."""
    return options.build(options.delta).cost


def _delta(options: PrivacyOptions) -> float:
    from guard.stages.privacy import DEFAULT_DELTA

    return options.delta or DEFAULT_DELTA


# -- the spaces: searched options of a stage's typed options --------------------------

Space = list[tuple[str, list[Any], Any]]  # (key, grid, the value the stage uses now)


def _blacklight(o: BlacklightOptions, full: bool, n_classes: int) -> Space:
    step, reach = max(1, o.top // 10), 2 if full else 1
    span = range(o.threshold - reach * step, o.threshold + reach * step + 1, step)
    factors = (0.5, 2 / 3, 1.0, 4 / 3, 5 / 3) if full else (2 / 3, 1.0, 4 / 3)
    q = o.quantize  # the base value itself in the grid, not its rounding (0.1875, not 0.188)
    space: Space = [
        ("threshold", [t for t in span if 0 <= t <= o.top - 1], o.threshold),
        ("quantize", [q if f == 1 else _round(q * f) for f in factors], q),
    ]
    if full:
        space.append(("matches", list(range(max(1, o.matches - 1), o.matches + 3)), o.matches))
    return space


def _prada(o: PradaOptions, full: bool, n_classes: int) -> Space:
    # Downwards far enough to reach a delta that spares heavy honest clients: on a
    # user's 20-feature model the default 0.9 misdirected 10% of their answers, 0.8 none.
    offsets = (-0.2, -0.1, -0.05, 0.0, 0.03, 0.06) if full else (-0.1, -0.04, 0.0, 0.04)
    deltas = [round(o.delta + d, 3) for d in offsets if 0.0 < o.delta + d < 1.0]
    space: Space = [("delta", deltas, o.delta)]
    if full:
        counts = [max(3, min(o.max_distances, round(o.min_queries * f))) for f in (0.5, 1.0, 2.0)]
        space.append(("min_queries", counts, o.min_queries))
    return space


def _squeeze_detect(o: SqueezeDetectOptions, full: bool, n_classes: int) -> Space:
    from guard.stages.squeeze import SqueezerOptions as S

    ranged = o.range is not None
    sets: list[tuple[Any, ...]] = []
    if ranged:
        sets += [(S(bits=2),), (S(bits=3),)]
        if full:
            sets += [(S(bits=2), S(bits=3)), (S(bits=4),)]
    if full and o.image is not None:
        sets += [(S(median=2),), *([(S(bits=2), S(median=2))] if ranged else [])]
    return [("squeezers", sets, o.squeezers)]


def _privacy(o: PrivacyOptions, full: bool, n_classes: int) -> Space:
    wide = (0.25, 0.5, 1.0, 2.0, 4.0) if full else (0.5, 1.0, 2.0)
    mechanism, value = o.mechanism, o.value  # value: as set, else the mechanism's default
    if mechanism in NOISY:
        key = "sigma" if mechanism == "gaussian" and o.epsilon is None else "epsilon"
        space: Space = [(key, [_round(value(key) * f) for f in wide], value(key))]
        if full and key == "epsilon":
            space.append(("mechanism", list(NOISY), mechanism))
        return space
    if mechanism == "round":
        return [("decimals", [1, 2, 3], value("decimals"))]
    if mechanism == "topk":
        return [("k", [v for v in (1, 2, 3) if v < n_classes], value("k"))]
    if mechanism == "reverse_sigmoid":
        return [("beta", [_round(value("beta") * f) for f in wide], value("beta"))]
    return []


def _certify(o: CertifyOptions, full: bool, n_classes: int) -> Space:
    factors = (0.5, 1.0, 2.0, 4.0) if full else (0.5, 1.0, 2.0)
    return [("sigma", [_round(o.sigma * f) for f in factors], o.sigma)]


_SPACES: dict[str, Callable[[Any, bool, int], Space]] = {
    "blacklight": _blacklight,
    "prada": _prada,
    "squeeze_detect": _squeeze_detect,
    "privacy": _privacy,
    "certify": _certify,
}


def _round(value: float, digits: int = 3) -> float:
    """``value`` to ``digits`` significant digits (grids read as a person would write them)."""
    if value == 0:
        return 0.0
    return round(value, digits - 1 - math.floor(math.log10(abs(value))))


def _unique(values: Sequence[Any]) -> list[Any]:
    out: list[Any] = []
    for value in values:
        if value is not None and value not in out:
            out.append(value)
    return out


def _ordered(values: tuple[Any, ...]) -> tuple[Any, ...]:
    """Numbers ascending; anything else (squeezer sets, mechanisms) as declared."""
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return tuple(sorted(values))
    return values


# -- derived: squeeze_detect's threshold -------------------------------------------


def calibrate_squeeze(
    options: SqueezeDetectOptions, *, subject: Subject, benign: np.ndarray, fpr: float
) -> tuple[float, int]:
    """``squeeze_detect``'s threshold for the squeezers of ``options`` (its typed
    options): at most ``fpr`` of ``benign`` score above it (rounded up to 4 significant
    digits), and how many inputs it was calibrated on. The squeezers are built by the
    stage itself, on the subject's local model file (a model served only by an upstream
    cannot be calibrated here: give the policy its ``model:`` file)."""
    from guard.backends.onnx import OnnxBackend
    from guard.defenses.squeeze import calibrate_threshold
    from guard.stages.squeeze_detect import SqueezeDetect

    if subject.model_file is None:
        raise OptionError(
            "threshold",
            f"calibrating squeeze_detect needs {subject.name}'s model file (models."
            f"{subject.name}.model), or a threshold set in the policy",
        )
    local = OnnxBackend(subject.model_file, name=subject.name, device="cpu")
    env = StageEnv(model=subject.name, backend=local, local=local, metadata=local.model_metadata)
    stage = SqueezeDetect(options, env)
    name, output = options.input or local.inputs[0].name, options.output
    shape = subject.input_shape

    def scores(batch: np.ndarray) -> np.ndarray:
        return local.run({name: batch.reshape(len(batch), *shape).astype(np.float32)}, [output])[
            output
        ]

    threshold = calibrate_threshold(scores, benign, stage.squeezers, fpr)
    return _round_up(threshold), len(benign)


def _round_up(value: float, digits: int = 4) -> float:
    """``value`` rounded up to ``digits`` significant digits: never below ``value``."""
    if value <= 0.0:
        return 0.0
    scale = 10.0 ** (digits - 1 - math.floor(math.log10(value)))
    rounded = math.ceil(value * scale) / scale
    return rounded if rounded >= value else value

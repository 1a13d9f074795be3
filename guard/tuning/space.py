"""What ``guard tune`` may change: a declared search space per stage type.

Each stage of the tuned model that has a space contributes :class:`Param` s,
grids centred on the base policy's value (its default when the key is
absent), which is always one of the grid points. ``small`` grids have three
points per parameter, ``full`` grids five (and a few extra parameters):

============== ===================================== =====================================
stage          searched                               derived
============== ===================================== =====================================
blacklight     ``threshold`` (± top/10 steps),
               ``quantize`` (x 2/3 .. 4/3);
               full: ``matches``
prada          ``delta`` (± 0.04; full ± 0.03 steps);
               full: ``min_queries`` (x 1/2 .. 2)
squeeze_detect ``squeezers`` (the base set, bits=2,   ``threshold``: calibrated on benign
               bits=3; full: bits 2+3, bits=4, and    data at half the false-positive
               median variants for images)            bound (:func:`calibrate_squeeze`)
privacy        laplace/gaussian ``epsilon`` (or
               ``sigma``) x 1/2 .. 2 (full x 1/4 ..
               4; full: ``mechanism`` laplace or
               gaussian); round ``decimals``; topk
               ``k``; reverse_sigmoid ``beta``
certify        ``sigma`` (x 1/2 .. 2; full .. 4)
============== ===================================== =====================================

Other stages (``validate``, ``budget``, ``squeeze``) are measured as they are:
quotas and input rules are the operator's decisions, not trade-offs to search.
For the same reason a ``privacy`` budget keeps the number of scored answers it
allows: its ``epsilon`` follows the searched noise (:func:`apply`).
A ``certify`` parameter is judged on its own objective (the average certified
radius): it changes only the certified answers, never what the attacks or the
benign clients get, so it is tuned apart from the others (``group``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

TUNABLE = ("blacklight", "prada", "squeeze_detect", "privacy", "certify")
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


def stage_entries(document: dict[str, Any], model: str) -> list[tuple[str, dict[str, Any]]]:
    """``(kind, options)`` of each stage of ``model`` (options copied; ``{}`` when bare)."""
    entries: list[tuple[str, dict[str, Any]]] = []
    for raw in document["models"][model].get("stages") or []:
        if isinstance(raw, str):
            entries.append((raw, {}))
        else:
            ((kind, options),) = raw.items()
            entries.append((kind, copy.deepcopy(dict(options or {}))))
    return entries


def search_space(
    document: dict[str, Any], model: str, *, grid: str, n_classes: int, image: bool
) -> list[Param]:
    """The parameters of ``model``'s stages, in stage order."""
    full = grid == "full"
    params = []
    for index, (kind, options) in enumerate(stage_entries(document, model)):
        builder = _SPACES.get(kind)
        if builder is None:
            continue
        for key, values, base, group in builder(options, full, n_classes, image):
            grid_values = tuple(_unique([*values, base]))
            params.append(Param(kind, index, key, _ordered(grid_values), base, group))
    return params


def apply(
    document: dict[str, Any], model: str, params: Sequence[Param], values: dict[str, Any]
) -> dict[str, Any]:
    """A copy of ``document`` with each param's option set to ``values[param.name]``.

    A ``privacy`` budget follows its mechanism: when the noise changes, the budget's
    ``epsilon`` is rescaled so that it still allows as many scored answers per
    client as in ``document`` (:func:`rescaled_budget`). The quota is the
    operator's decision; the tuner searches the noise, not the quota."""
    doc = copy.deepcopy(document)
    stages = doc["models"][model]["stages"]
    for param in params:
        raw = stages[param.index]
        if isinstance(raw, str):
            raw = stages[param.index] = {raw: {}}
        if raw[param.stage] is None:
            raw[param.stage] = {}
        raw[param.stage][param.key] = copy.deepcopy(values[param.name])
    base = stage_entries(document, model)
    for index, (kind, options) in enumerate(stage_entries(doc, model)):
        if kind == "privacy" and isinstance(options.get("budget"), dict):
            epsilon = rescaled_budget(base[index][1], options)
            if epsilon is not None and not math.isclose(epsilon, options["budget"]["epsilon"]):
                stages[index]["privacy"]["budget"]["epsilon"] = epsilon
    return doc


def budget_answers(options: dict[str, Any]) -> float | None:
    """How many scored answers a ``privacy`` stage's budget allows per client and window
    (None without a budget or a noisy mechanism)."""
    cost, capacity = _cost(options), _capacity(options)
    return capacity / cost if cost and capacity else None


def rescaled_budget(base: dict[str, Any], options: dict[str, Any]) -> float | None:
    """The budget ``epsilon`` that gives ``options``' mechanism as many scored answers as
    ``base``'s budget gives its own; None when either has no noisy mechanism or budget."""
    from guard.defenses.accountant import zcdp_epsilon

    answers, cost = budget_answers(base), _cost(options)
    if answers is None or cost is None or options["budget"].get("epsilon") is None:
        return None
    if options.get("mechanism") == "gaussian":
        return _round(zcdp_epsilon(answers * cost, float(options.get("delta", 1e-6))), 4)
    return _round(answers * cost, 4)


def _cost(options: dict[str, Any]) -> float | None:
    """One answer's cost in the budget's unit: ε (laplace) or ρ (gaussian)."""
    from guard.defenses.accountant import zcdp_rho
    from guard.defenses.privacy import gaussian_rho

    mechanism, delta = options.get("mechanism"), float(options.get("delta", 1e-6))
    if mechanism == "laplace" and "epsilon" in options:
        return float(options["epsilon"])
    if mechanism == "gaussian" and "epsilon" in options:
        return zcdp_rho(float(options["epsilon"]), delta)
    if mechanism == "gaussian" and "sigma" in options:
        return gaussian_rho(float(options["sigma"]))
    return None


def _capacity(options: dict[str, Any]) -> float | None:
    """The budget's limit in the mechanism's unit."""
    from guard.defenses.accountant import zcdp_rho

    budget = options.get("budget")
    if not isinstance(budget, dict) or budget.get("epsilon") is None:
        return None
    epsilon = float(budget["epsilon"])
    if options.get("mechanism") == "gaussian":
        return zcdp_rho(epsilon, float(options.get("delta", 1e-6)))
    return epsilon


# -- the spaces ------------------------------------------------------------------

Space = list[tuple[str, list[Any], Any, str]]  # (key, grid, base value, group)


def _blacklight(options: dict[str, Any], full: bool, n_classes: int, image: bool) -> Space:
    top = int(options.get("top", 50))
    threshold = int(options.get("threshold", top // 2))
    step = max(1, top // 10)
    reach = 2 if full else 1
    thresholds = [
        t
        for t in range(threshold - reach * step, threshold + reach * step + 1, step)
        if 0 <= t <= top - 1
    ]
    quantize = float(options.get("quantize", 3.0))
    factors = (0.5, 2 / 3, 1.0, 4 / 3, 5 / 3) if full else (2 / 3, 1.0, 4 / 3)
    space: Space = [
        ("threshold", thresholds, threshold, "risk"),
        ("quantize", [_round(quantize * f) for f in factors], quantize, "risk"),
    ]
    if full:
        matches = int(options.get("matches", 2))
        space.append(("matches", list(range(max(1, matches - 1), matches + 3)), matches, "risk"))
    return space


def _prada(options: dict[str, Any], full: bool, n_classes: int, image: bool) -> Space:
    delta = float(options.get("delta", 0.9))
    offsets = (-0.06, -0.03, 0.0, 0.03, 0.06) if full else (-0.04, 0.0, 0.04)
    deltas = [round(delta + o, 3) for o in offsets if 0.0 < delta + o < 1.0]
    space: Space = [("delta", deltas, delta, "risk")]
    if full:
        least = int(options.get("min_queries", 100))
        ceiling = int(options.get("max_distances", 1000))
        counts = [max(3, min(ceiling, round(least * f))) for f in (0.5, 1.0, 2.0)]
        space.append(("min_queries", counts, least, "risk"))
    return space


def _squeeze_detect(options: dict[str, Any], full: bool, n_classes: int, image: bool) -> Space:
    base = options.get("squeezers")
    sets: list[Any] = []
    if "range" in options:
        sets += [[{"bits": 2}], [{"bits": 3}]]
        if full:
            sets += [[{"bits": 2}, {"bits": 3}], [{"bits": 4}]]
    if full and "image" in options:
        sets += [[{"median": 2}], [{"bits": 2}, {"median": 2}] if "range" in options else []]
    return [("squeezers", [s for s in sets if s], base, "risk")]


def _privacy(options: dict[str, Any], full: bool, n_classes: int, image: bool) -> Space:
    mechanism = options.get("mechanism")
    wide = (0.25, 0.5, 1.0, 2.0, 4.0) if full else (0.5, 1.0, 2.0)
    space: Space = []
    if mechanism in NOISY:
        key = "sigma" if mechanism == "gaussian" and "epsilon" not in options else "epsilon"
        if key in options:
            value = float(options[key])
            space.append((key, [_round(value * f) for f in wide], value, "risk"))
            if full and key == "epsilon":
                space.append(("mechanism", list(NOISY), mechanism, "risk"))
    elif mechanism == "round":
        decimals = int(options.get("decimals", 2))
        space.append(("decimals", [1, 2, 3], decimals, "risk"))
    elif mechanism == "topk":
        k = int(options.get("k", 1))
        space.append(("k", [v for v in (1, 2, 3) if v < n_classes], k, "risk"))
    elif mechanism == "reverse_sigmoid":
        beta = float(options.get("beta", 1.0))
        space.append(("beta", [_round(beta * f) for f in wide], beta, "risk"))
    return space


def _certify(options: dict[str, Any], full: bool, n_classes: int, image: bool) -> Space:
    if "sigma" not in options:
        return []
    sigma = float(options["sigma"])
    factors = (0.5, 1.0, 2.0, 4.0) if full else (0.5, 1.0, 2.0)
    return [("sigma", [_round(sigma * f) for f in factors], sigma, "certified")]


_SPACES: dict[str, Callable[[dict[str, Any], bool, int, bool], Space]] = {
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
    options: dict[str, Any], *, data_name: str, benign: np.ndarray, fpr: float
) -> tuple[float, int]:
    """``squeeze_detect``'s threshold for ``options``' squeezers: at most ``fpr`` of
    ``benign`` score above it (rounded up to 4 significant digits), and how many
    inputs it was calibrated on. The squeezers are read by the stage itself."""
    from guard.backends.onnx import OnnxBackend
    from guard.configreader import Section
    from guard.defenses.squeeze import calibrate_threshold
    from guard.models import model_path
    from guard.stages.env import StageEnv
    from guard.stages.squeeze_detect import SqueezeDetect

    local = OnnxBackend(model_path(data_name), name=data_name, device="cpu")
    env = StageEnv(model=data_name, backend=local, local=local, metadata=local.model_metadata)
    stage = SqueezeDetect.from_config(
        Section({**options, "threshold": 0.0}, source="guard tune", path="squeeze_detect"), env
    )
    name, output = stage.options.input or local.inputs[0].name, stage.options.output

    def scores(batch: np.ndarray) -> np.ndarray:
        return local.run({name: batch.astype(np.float32)}, [output])[output]

    threshold = calibrate_threshold(scores, benign, stage.squeezers, fpr)
    return _round_up(threshold), len(benign)


def _round_up(value: float, digits: int = 4) -> float:
    """``value`` rounded up to ``digits`` significant digits: never below ``value``."""
    if value <= 0.0:
        return 0.0
    scale = 10.0 ** (digits - 1 - math.floor(math.log10(value)))
    rounded = math.ceil(value * scale) / scale
    return rounded if rounded >= value else value

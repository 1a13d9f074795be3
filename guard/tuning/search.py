"""Search a policy's space for the candidate that meets the operator's constraints.

**Constraints** (:class:`Constraints`), each measured on the benign traffic:
false-positive rate (queries a detector fired on), accuracy loss (the bare
model's accuracy on the same inputs minus the guard's; a refused query is
wrong), added latency (mean time per request in the policy's stages), and
optionally the change of the released probabilities (mean L1 distance; noise
of a ``privacy`` stage). With a ``certify`` stage, the certified label's
accuracy loss is held to the accuracy bound too.

**Risk**: for each attack, the gain it made before being caught (see
:mod:`guard.tuning.attackers`) as a share of what it gets from the bare model;
the mean over attacks. 0: every attacker caught before it got anything; 1: the
guard changed nothing. Attacks the bare model already defeats are left out.

**Choice** (:func:`pick`): among candidates that meet every constraint, those
whose risk is within ``tolerance`` of the lowest (by default twice the standard
deviation of the difference between two draws, from the base policy measured
with three seeds: the resolution of the measurement); of those, the one that
uses least of what the constraints allow (:attr:`Candidate.cost`, the sum of
each measure's share of its bound), costs within the latency's own resolution
counting as a tie; of those, the one with fewest changes from the base policy.
So a candidate that is as safe but cheaper for benign clients wins, and nothing
moves unless the move measurably helps.
``certify`` parameters are chosen for the largest average certified radius
instead. When no candidate meets the constraints, the same rule runs among
those that exceed them least.

**Search** (:func:`tune`): coordinate descent from the base policy. Each pass
visits the parameters in a seeded random order; for each, every grid value is
measured with the others held, and the choice above moves there. Passes stop
early once nothing moves; measurements are cached, and the final choice is
made over every candidate measured. Every candidate sees the same seeded
traffic, so their differences are the policy's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from guard.config import ModelConfig, Policy
from guard.errors import PolicyError
from guard.stages.options import OptionError, to_yaml
from guard.tuning.measure import Baseline, Measurement, measure_baseline, measure_policy
from guard.tuning.space import Param, apply, calibrate_squeeze, search_space, typed_model
from guard.tuning.workload import Interface, TuneData, Workload, attacks_for

SIMPLEX_L1 = 2.0  # the largest L1 distance between two probability vectors
NEGLIGIBLE = 0.02  # an attack whose bare success is below this is left out of the risk
NOISE_SEEDS = 2  # extra draws of the base policy that measure the noise of risk
# Two standard deviations of the difference between two independent draws (sd x sqrt 2).
DIFFERENCE = 2.0 * math.sqrt(2.0)
MIN_TOLERANCE = 0.02
FALLBACK_TOLERANCE = 0.05  # when the noise cannot be measured (the base does not load)
COST_TOLERANCE = 0.25  # costs this close (a quarter of one allowance) are a tie
# Noise on the calibration rows, a fraction of the range: twice the honest mix's sensor noise
CALIBRATION_NOISE = 0.02


@dataclass(frozen=True, kw_only=True, slots=True)
class Constraints:
    max_false_positive: float = 0.001
    max_accuracy_loss: float = 0.01
    max_added_latency_ms: float = 2.0
    max_score_change: float | None = None

    def measures(self, m: Measurement) -> list[tuple[str, float, float]]:
        """``(what, measured, bound)`` for every constrained quantity of ``m``."""
        rows = [
            ("false positives", m.benign.fp_rate, self.max_false_positive),
            ("accuracy loss", m.benign.accuracy_loss, self.max_accuracy_loss),
            ("added latency ms", m.benign.added_ms, self.max_added_latency_ms),
        ]
        if self.max_score_change is not None:
            rows.append(("score change", m.benign.score_change, self.max_score_change))
        if m.certified is not None:
            rows.append(
                ("certified accuracy loss", m.certified.accuracy_loss, self.max_accuracy_loss)
            )
        return rows

    def violations(self, m: Measurement) -> tuple[str, ...]:
        return tuple(
            f"{what} {value:.4g} > {bound:g}"
            for what, value, bound in self.measures(m)
            if value > bound + 1e-12
        )

    def excess(self, m: Measurement) -> float:
        """How far past the bounds, each excess as a share of its bound."""
        return sum(max(0.0, _share(value, bound) - 1.0) for _, value, bound in self.measures(m))

    def cost(self, m: Measurement) -> float:
        """What a candidate uses of the allowance: each measure's share of its bound
        (score change against ``max_score_change``, or the whole range of 2 without one)."""
        total = sum(max(0.0, _share(value, bound)) for _, value, bound in self.measures(m))
        if self.max_score_change is None:
            total += m.benign.score_change / SIMPLEX_L1
        return total


def _share(value: float, bound: float) -> float:
    if bound > 0:
        return value / bound
    return 0.0 if value <= 0 else math.inf


def risk(m: Measurement, baseline: Baseline) -> float:
    """Mean over attacks of the undetected gain as a share of the bare model's."""
    shares = [
        a.undetected / baseline.attacks[a.attack].success
        for a in m.attacks
        if baseline.attacks[a.attack].success >= NEGLIGIBLE
    ]
    return float(np.mean(shares)) if shares else 0.0


@dataclass(frozen=True, slots=True)
class Candidate:
    values: dict[str, Any]  # param name -> value, every param
    calibrated: dict[str, tuple[float, int]]  # derived option -> (value, inputs it came from)
    measurement: Measurement | None  # None: the policy did not load (``error``)
    error: str | None
    risk: float
    violations: tuple[str, ...]
    excess: float
    cost: float
    config: ModelConfig | None = None  # the model as this candidate configures it

    @property
    def feasible(self) -> bool:
        return self.measurement is not None and not self.violations

    def objective(self, group: str) -> float:
        """What the choice minimises: risk, or minus the average certified radius."""
        if group == "certified":
            certified = self.measurement.certified if self.measurement else None
            return -certified.acr if certified else 0.0
        return self.risk


def pick(
    candidates: list[Candidate],
    group: str,
    tolerance: float,
    base: dict[str, Any] | None = None,
    cost_tolerance: float = COST_TOLERANCE,
    grids: dict[str, tuple[Any, ...]] | None = None,
) -> Candidate:
    """The choice the module describes. Within the risk band, candidates whose cost is
    within ``cost_tolerance`` of the cheapest count as equally cheap (on a shared
    machine the latency moves by a few tenths of a millisecond between candidates
    that cost the same), and of those the one with fewest
    changes from ``base`` wins (then the fewest grid steps away from it, when ``grids``
    gives each parameter's grid): the search moves only where a move measurably
    helps, and no further than it must. Without a feasible candidate the same rule
    runs among those that exceed the constraints least."""
    valid = [c for c in candidates if c.measurement is not None] or candidates
    pool = [c for c in valid if c.feasible]
    if not pool:
        least = min(c.excess for c in valid)
        pool = [c for c in valid if c.excess <= least + 1e-9]
    best = min(c.objective(group) for c in pool)
    slack = tolerance if group == "risk" else 0.0
    band = [c for c in pool if c.objective(group) <= best + slack + 1e-12]
    cheapest = min(c.cost for c in band)
    band = [c for c in band if c.cost <= cheapest + cost_tolerance or c.cost == cheapest]

    def changes(c: Candidate) -> tuple[int, int]:
        moved = [k for k, v in (base or {}).items() if c.values[k] != v]
        steps = 0
        for k in moved:
            grid = (grids or {}).get(k, ())
            if c.values[k] in grid and base is not None and base[k] in grid:
                steps += abs(grid.index(c.values[k]) - grid.index(base[k]))
        return len(moved), steps

    return min(band, key=lambda c: (changes(c), c.objective(group), c.cost))


@dataclass(frozen=True, slots=True)
class TuneResult:
    config: ModelConfig  # the base policy's model, its options typed (candidates replace them)
    data: str
    params: tuple[Param, ...]
    attacks: tuple[str, ...]
    baseline: Baseline
    candidates: tuple[Candidate, ...]  # in the order measured; the first is the base policy
    chosen: Candidate
    constraints: Constraints
    workload: Workload
    seed: int
    tolerance: float
    cost_tolerance: float
    seconds: float
    calibration_inputs: int = 0
    noise: tuple[float, ...] = ()  # the base policy's risk over seeds, when measured

    @property
    def model(self) -> str:
        return self.config.name

    @property
    def base(self) -> Candidate:
        return self.candidates[0]

    def tried(self, param: Param) -> list[Candidate]:
        """Candidates that differ from the choice in ``param`` alone (and the choice)."""
        others = {k: v for k, v in self.chosen.values.items() if k != param.name}
        return [c for c in self.candidates if all(c.values[k] == v for k, v in others.items())]


def tune(
    policy: Policy,
    *,
    model: str,
    data: TuneData,
    workload: Workload,
    constraints: Constraints,
    seed: int = 0,
    tolerance: float | None = None,
    search: bool = True,
    interface: Interface | None = None,
    progress: Callable[[str], None] | None = None,
) -> TuneResult:
    """Search ``policy``'s space for ``model`` (see the module). Without ``search``,
    measure the policy as it is: the result's only candidate is the base.

    ``tolerance`` None: measured. The base policy is measured again with
    :data:`NOISE_SEEDS` other seeds; the tolerance is twice the standard deviation
    of the difference between two draws (``2 sqrt(2)`` times that of its risk over
    the three draws, at least :data:`MIN_TOLERANCE`): a candidate must beat another
    by more than the draw alone would. The cost tolerance is the same for the added
    latency, as a share of its bound (at least :data:`COST_TOLERANCE`): latency is
    the noisy part of the cost."""
    started = time.perf_counter()
    say = progress or (lambda _: None)
    config = typed_model(policy, model)
    params = search_space(config, grid=workload.grid, n_classes=data.spec.n_classes)
    kinds = {p.stage for p in params}
    attacks = attacks_for(kinds, workload, data)
    say(f"baseline: {', '.join(attacks) or 'benign traffic'} against the bare model")
    baseline = measure_baseline(data, workload, attacks, seed)
    rng = np.random.default_rng([seed, 99])
    calibration = _calibration_inputs(data, rng)
    thresholds: dict[Any, tuple[float, int]] = {}
    cache: dict[tuple[Any, ...], Candidate] = {}
    order: list[Candidate] = []

    def evaluate(values: dict[str, Any]) -> Candidate:
        key = tuple(sorted(values.items()))
        if key not in cache:
            cache[key] = candidate = _measure(values)
            order.append(candidate)
            say(_progress_line(len(order), candidate, params))
        return cache[key]

    def _measure(
        values: dict[str, Any], draw: int = seed, against: Baseline = baseline
    ) -> Candidate:
        try:
            candidate = apply(config, params, values, source=policy.source)
            candidate, calibrated = _calibrate(
                candidate, data, calibration, constraints, thresholds
            )
            m = measure_policy(
                policy,
                candidate,
                data=data,
                workload=workload,
                attacks=attacks,
                baseline=against,
                seed=draw,
                interface=interface or Interface(),
            )
        except (PolicyError, OptionError) as exc:
            return Candidate(dict(values), {}, None, str(exc), math.inf, (), math.inf, math.inf)
        return Candidate(
            dict(values),
            calibrated,
            m,
            None,
            risk(m, against),
            constraints.violations(m),
            constraints.excess(m),
            constraints.cost(m),
            candidate,
        )

    base_values = {p.name: p.base for p in params}
    grids = {p.name: p.values for p in params}
    current = evaluate(base_values)
    noise: tuple[float, ...] = ()
    cost_tolerance = COST_TOLERANCE
    if tolerance is None:
        tolerance = FALLBACK_TOLERANCE
        if search and params and current.measurement is not None:
            draws = [current]
            for draw in range(seed + 1, seed + 1 + NOISE_SEEDS):
                say(f"  the base policy again with seed {draw}: how much the draw alone moves it")
                draws.append(
                    _measure(base_values, draw, measure_baseline(data, workload, attacks, draw))
                )
            noise = tuple(c.risk for c in draws)
            tolerance = max(MIN_TOLERANCE, DIFFERENCE * float(np.std(noise, ddof=1)))
            latency = [c.measurement.benign.added_ms for c in draws if c.measurement]
            spread = DIFFERENCE * float(np.std(latency, ddof=1)) if len(latency) > 1 else 0.0
            cost_tolerance = max(COST_TOLERANCE, _share(spread, constraints.max_added_latency_ms))
            say(
                f"  risk {' / '.join(f'{r:.3f}' for r in noise)}: tolerances {tolerance:.3f} "
                f"(risk), {cost_tolerance:.3f} (cost)"
            )
    for _ in range(workload.passes if search else 0):
        moved = False
        for index in rng.permutation(len(params)):
            param = params[index]
            options = [evaluate({**current.values, param.name: v}) for v in param.values]
            best = pick(options, param.group, tolerance, base_values, cost_tolerance, grids)
            moved |= best is not current
            current = best
        if not moved:
            break
    certified = {p.name for p in params if p.group == "certified"}
    final = [c for c in order if all(c.values[n] == current.values[n] for n in certified)]
    if search and len(certified) < len(params):
        chosen = pick(final, "risk", tolerance, base_values, cost_tolerance, grids)
    else:
        chosen = current
    return TuneResult(
        config=config,
        data=data.subject.data_label,
        params=tuple(params),
        attacks=attacks,
        baseline=baseline,
        candidates=tuple(order),
        chosen=chosen,
        constraints=constraints,
        workload=workload,
        seed=seed,
        tolerance=tolerance,
        cost_tolerance=cost_tolerance,
        seconds=time.perf_counter() - started,
        calibration_inputs=len(calibration) if thresholds else 0,
        noise=noise,
    )


def _calibration_inputs(data: TuneData, rng: np.random.Generator) -> np.ndarray:
    """The calibration rows as benign clients send them: with their Gaussian noise."""
    spec = data.spec
    noisy = data.calibration + rng.normal(0.0, 1.0, data.calibration.shape) * (
        CALIBRATION_NOISE * (spec.hi - spec.lo)
    )
    return spec.clip(noisy).astype(np.float32)


def _calibrate(
    config: ModelConfig,
    data: TuneData,
    calibration: np.ndarray,
    constraints: Constraints,
    cache: dict[Any, tuple[float, int]],
) -> tuple[ModelConfig, dict[str, tuple[float, int]]]:
    """``config`` with each ``squeeze_detect`` threshold calibrated on benign data at half
    the false-positive bound (the other half is margin: for new benign traffic, where the
    rate is the target only in expectation, and for the other detectors), and what was set."""
    derived = {}
    stages = list(config.stages)
    for index, entry in enumerate(stages):
        if entry.kind != "squeeze_detect":
            continue
        key = replace(entry.options, threshold=0.0)
        if key not in cache:
            cache[key] = calibrate_squeeze(
                key,
                subject=data.subject,
                benign=calibration,
                fpr=constraints.max_false_positive / 2,
            )
        stages[index] = replace(entry, options=replace(entry.options, threshold=cache[key][0]))
        derived["squeeze_detect.threshold"] = cache[key]
    return replace(config, stages=tuple(stages)), derived


def _progress_line(n: int, c: Candidate, params: list[Param]) -> str:
    settings = ", ".join(f"{p.name}={_short(c.values[p.name])}" for p in params) or "base"
    if c.measurement is None:
        return f"  #{n:<3} {settings}: does not load ({c.error})"
    m = c.measurement
    verdict = "ok" if c.feasible else "; ".join(c.violations)
    return (
        f"  #{n:<3} {settings}: FP {m.benign.false_positives}/{m.benign.queries}, "
        f"+{m.benign.added_ms:.2f} ms, risk {c.risk:.3f} [{verdict}] ({m.seconds:.1f} s)"
    )


def _short(value: Any) -> str:
    value = to_yaml(value)
    if isinstance(value, list):
        return "+".join(
            ",".join(f"{k}={v}" for k, v in item.items()) if isinstance(item, dict) else str(item)
            for item in value
        )
    return str(value)

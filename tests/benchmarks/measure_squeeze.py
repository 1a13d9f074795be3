"""Feature squeezing on a built-in model: what it costs and what it catches.

    python tests/benchmarks/measure_squeeze.py [--model digits] [--samples 100] [--budget 1000]
        [--seed 0]

Prints three markdown tables (used in docs/squeezing.md):

1. per squeezer: clean accuracy with it as preprocessing, and as a detector the
   threshold calibrated at 1% false positives on one half of the held-out
   samples with the false positive rate then measured on the other half;
2. per attack (the project's black-box suite, :mod:`guard.attacks.evasion`, run
   against the bare model): success rate, then for its adversarial examples the
   detection rate of each detector and the share still misclassified once squeezed;
3. the same attacks run against ``model ∘ squeeze`` (the attacker queries a guard
   whose ``squeeze`` stage is on, and adapts to it): their success rate.

The value range, the image layout (for the median) and the input shape come
from the model's sidecar (:mod:`tests.benchmarks.model_inputs`); median
squeezers are left out for a model whose rows are not images. The attacks'
radii are fractions of the input range: L-inf 0.25, SimBA steps of 0.125, L2
1.0 of it (4, 2 and 16 on digits' 0..16). On a colour image model the paper's
CIFAR squeezers are added (bits=4, bits=5, and bits=5 + median=2 joint).

Everything is seeded; the numbers are the run's, not hard-coded.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from guard.attacks.evasion import HopSkipJump, SimBA, SquareLinf, run_evasion  # noqa: E402
from guard.attacks.targets import Answers, Target, TargetSpec  # noqa: E402
from guard.backends.onnx import OnnxBackend  # noqa: E402
from guard.defenses.squeeze import Image, Squeezer, calibrate_threshold, l1_distances  # noqa: E402
from guard.models import model_path  # noqa: E402
from tests.benchmarks.model_inputs import (  # noqa: E402
    image,
    input_range,
    model_choices,
    samples,
    to_model,
)

FPR = 0.01


@dataclass(frozen=True)
class Detector:
    name: str
    squeezers: tuple[Squeezer, ...]


def detectors(value_range: tuple[float, float], layout: Image | None) -> list[Detector]:
    """Bits 1-3, median 2 and 3 (images only) and bits 2 + 3 jointly; on colour images
    also the paper's CIFAR squeezers (bits 4 and 5, bits 5 + median 2 jointly)."""

    def bits(n: int) -> Squeezer:
        return Squeezer(bits=n, value_range=value_range)

    def median(k: int) -> Squeezer:
        return Squeezer(median=k, image=layout)

    found = [
        Detector("bits=1", (bits(1),)),
        Detector("bits=2", (bits(2),)),
        Detector("bits=3", (bits(3),)),
    ]
    colour = layout is not None and layout.channels > 1
    if colour:
        found += [Detector("bits=4", (bits(4),)), Detector("bits=5", (bits(5),))]
    if layout is not None:
        found += [Detector("median=2", (median(2),)), Detector("median=3", (median(3),))]
    found.append(Detector("bits=2 + bits=3 (joint)", (bits(2), bits(3))))
    if colour:
        found.append(Detector("bits=5 + median=2 (joint)", (bits(5), median(2))))
    return found


class FunctionTarget(Target):
    """A target answering with ``probabilities(x)``: the bare model or model ∘ squeeze."""

    def __init__(self, name: str, probabilities: Callable[[np.ndarray], np.ndarray]) -> None:
        super().__init__(TargetSpec.builtin(name), batch_size=4096)
        self.probabilities = probabilities

    def _send(self, x: np.ndarray) -> tuple[Answers, int, str | None]:
        scores = self.probabilities(x).astype(np.float64)
        return Answers(scores, scores.argmax(axis=1)), 200, None


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits", choices=model_choices())
    parser.add_argument("--samples", type=int, default=100, help="samples attacked per attack")
    parser.add_argument("--budget", type=int, default=1000, help="queries per attacked sample")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    name = args.model
    lo, hi = input_range(name)
    span = hi - lo

    model = OnnxBackend(model_path(name), name=name, device="cpu", threads=1)

    def probabilities(x: np.ndarray) -> np.ndarray:
        return model.run({"input": to_model(x, name)}, ["probabilities"])["probabilities"]

    x, y = samples(name)
    order = np.random.default_rng(args.seed).permutation(len(x))
    half = len(x) // 2
    calib, (test_x, test_y) = x[order[:half]], (x[order[half:]], y[order[half:]])
    dets = detectors((lo, hi), image(name))
    thresholds = {d.name: calibrate_threshold(probabilities, calib, d.squeezers, FPR) for d in dets}

    def scores(d: Detector, inputs: np.ndarray) -> np.ndarray:
        return l1_distances(probabilities, inputs, d.squeezers).max(axis=1)

    def accuracy(inputs: np.ndarray, labels: np.ndarray) -> float:
        return float((probabilities(inputs).argmax(axis=1) == labels).mean())

    print(
        f"{name}: {half} held-out samples calibrate each threshold at {FPR:.0%} false "
        f"positives; {len(test_x)} others measure it. Clean accuracy "
        f"{accuracy(test_x, test_y):.3f}. Input range {lo:g}..{hi:g}.\n"
    )
    print("| squeezer | clean accuracy squeezed | threshold | benign false positives |")
    print("|---|---:|---:|---:|")
    for d in dets:
        squeezed = (
            "-" if len(d.squeezers) > 1 else f"{accuracy(d.squeezers[0](test_x), test_y):.3f}"
        )
        fp = float((scores(d, test_x) > thresholds[d.name]).mean())
        print(f"| {d.name} | {squeezed} | {thresholds[d.name]:.3f} | {fp:.3f} |")

    linf, step, l2 = 0.25 * span, 0.125 * span, 1.0 * span  # 4, 2 and 16 on digits
    attacks = [SquareLinf(epsilon=linf), SimBA(epsilon=step), HopSkipJump(epsilon=l2)]
    norms = {
        "square-linf": f"L∞ ≤ {linf:g}",
        "simba": f"steps of {step:g}",
        "hopskipjump": f"L2 ≤ {l2:g}",
    }
    targets_x, targets_y = test_x[: args.samples], test_y[: args.samples]
    print(
        f"\nAttacks on the bare model: {args.samples} held-out samples, {args.budget} queries each. "
        "Detection: share of the successful adversarial examples scoring above the threshold; "
        "still fooled: share of them misclassified after squeezing.\n"
    )
    print(
        "| attack | success | "
        + " | ".join(f"{d.name}: detected / still fooled" for d in dets)
        + " |"
    )
    print("|---|---:|" + "---:|" * len(dets))
    for attack in attacks:
        run = run_evasion(
            attack,
            FunctionTarget(name, probabilities),
            targets_x,
            targets_y,
            budget=args.budget,
            rng=np.random.default_rng(args.seed),
        )
        wins = [s for s in run.attacked if s.success and s.x_adv is not None]
        success = len(wins) / max(1, len(run.attacked))
        cells = []
        for d in dets:
            if not wins:
                cells.append("n/a")
                continue
            adv = np.stack([s.x_adv for s in wins]).astype(np.float32)
            labels = np.array([s.label for s in wins])
            detected = float((scores(d, adv) > thresholds[d.name]).mean())
            if len(d.squeezers) > 1:  # a joint detector is no single preprocessing
                cells.append(f"{detected:.2f} / -")
                continue
            fooled = 1.0 - accuracy(d.squeezers[0](adv), labels)
            cells.append(f"{detected:.2f} / {fooled:.2f}")
        label = f"{attack.name} ({norms[attack.name]})"
        print(
            f"| {label} | {success:.2f} ({len(wins)}/{len(run.attacked)}) | "
            + " | ".join(cells)
            + " |"
        )

    print(
        f"\nThe same attacks against model ∘ squeeze (adaptive: the attacker queries through the "
        f"squeeze stage), {args.samples} samples, {args.budget} queries each: success rate.\n"
    )
    preprocessors = [d for d in dets if len(d.squeezers) == 1]
    print("| attack | bare model | " + " | ".join(d.name for d in preprocessors) + " |")
    print("|---|---:|" + "---:|" * len(preprocessors))
    for attack in attacks:
        rates = []
        for squeeze in [None, *(d.squeezers[0] for d in preprocessors)]:
            fn = (
                probabilities
                if squeeze is None
                else (lambda v, s=squeeze: probabilities(s(v.astype(np.float32))))
            )
            run = run_evasion(
                attack,
                FunctionTarget(name, fn),
                targets_x,
                targets_y,
                budget=args.budget,
                rng=np.random.default_rng(args.seed),
            )
            attacked = run.attacked
            rates.append(
                f"{sum(s.success for s in attacked) / max(1, len(attacked)):.2f} ({len(attacked)})"
            )
        print(f"| {attack.name} ({norms[attack.name]}) | " + " | ".join(rates) + " |", flush=True)


if __name__ == "__main__":
    main()

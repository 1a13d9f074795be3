"""Feature squeezing on the digits model: what it costs and what it catches.

    python tests/benchmarks/measure_squeeze.py [--samples 100] [--budget 1000] [--seed 0]

Prints three markdown tables (used in docs/squeezing.md):

1. per squeezer: clean accuracy with it as preprocessing, and as a detector the
   threshold calibrated at 1% false positives on one half of the held-out
   digits with the false positive rate then measured on the other half;
2. per attack (the project's black-box suite, :mod:`guard.attacks.evasion`, run
   against the bare model): success rate, then for its adversarial examples the
   detection rate of each detector and the share still misclassified once squeezed;
3. the same attacks run against ``model ∘ squeeze`` (the attacker queries a guard
   whose ``squeeze`` stage is on, and adapts to it): their success rate.

Everything is seeded; the numbers are the run's, not hard-coded.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from guard.attacks.evasion import HopSkipJump, SimBA, SquareLinf, run_evasion
from guard.attacks.targets import Answers, Target, TargetSpec
from guard.backends.onnx import OnnxBackend
from guard.defenses.squeeze import Image, Squeezer, calibrate_threshold, l1_distances
from guard.models import load_samples, model_path

FPR = 0.01
RANGE = (0.0, 16.0)
IMAGE = Image(8, 8)


@dataclass(frozen=True)
class Detector:
    name: str
    squeezers: tuple[Squeezer, ...]


def detectors() -> list[Detector]:
    def bits(n: int) -> Squeezer:
        return Squeezer(bits=n, value_range=RANGE)

    def median(k: int) -> Squeezer:
        return Squeezer(median=k, image=IMAGE)

    return [
        Detector("bits=1", (bits(1),)),
        Detector("bits=2", (bits(2),)),
        Detector("bits=3", (bits(3),)),
        Detector("median=2", (median(2),)),
        Detector("median=3", (median(3),)),
        Detector("bits=2 + bits=3 (joint)", (bits(2), bits(3))),
    ]


class FunctionTarget(Target):
    """A target answering with ``probabilities(x)``: the bare model or model ∘ squeeze."""

    def __init__(self, probabilities: Callable[[np.ndarray], np.ndarray]) -> None:
        super().__init__(TargetSpec.builtin("digits"), batch_size=4096)
        self.probabilities = probabilities

    def _send(self, x: np.ndarray) -> tuple[Answers, int, str | None]:
        scores = self.probabilities(x).astype(np.float64)
        return Answers(scores, scores.argmax(axis=1)), 200, None


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100, help="digits attacked per attack")
    parser.add_argument("--budget", type=int, default=1000, help="queries per attacked digit")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    model = OnnxBackend(model_path("digits"), name="digits", device="cpu", threads=1)

    def probabilities(x: np.ndarray) -> np.ndarray:
        return model.run({"input": np.asarray(x, dtype=np.float32)}, ["probabilities"])[
            "probabilities"
        ]

    x, y = load_samples("digits")
    order = np.random.default_rng(args.seed).permutation(len(x))
    half = len(x) // 2
    calib, (test_x, test_y) = x[order[:half]], (x[order[half:]], y[order[half:]])
    dets = detectors()
    thresholds = {d.name: calibrate_threshold(probabilities, calib, d.squeezers, FPR) for d in dets}

    def scores(d: Detector, inputs: np.ndarray) -> np.ndarray:
        return l1_distances(probabilities, inputs, d.squeezers).max(axis=1)

    def accuracy(inputs: np.ndarray, labels: np.ndarray) -> float:
        return float((probabilities(inputs).argmax(axis=1) == labels).mean())

    print(
        f"digits: {half} held-out digits calibrate each threshold at {FPR:.0%} false positives; "
        f"{len(test_x)} others measure it. Clean accuracy {accuracy(test_x, test_y):.3f}.\n"
    )
    print("| squeezer | clean accuracy squeezed | threshold | benign false positives |")
    print("|---|---:|---:|---:|")
    for d in dets:
        squeezed = (
            "-" if len(d.squeezers) > 1 else f"{accuracy(d.squeezers[0](test_x), test_y):.3f}"
        )
        fp = float((scores(d, test_x) > thresholds[d.name]).mean())
        print(f"| {d.name} | {squeezed} | {thresholds[d.name]:.3f} | {fp:.3f} |")

    attacks = [SquareLinf(epsilon=4.0), SimBA(epsilon=2.0), HopSkipJump(epsilon=16.0)]
    norms = {"square-linf": "L∞ ≤ 4", "simba": "steps of 2", "hopskipjump": "L2 ≤ 16"}
    targets_x, targets_y = test_x[: args.samples], test_y[: args.samples]
    print(
        f"\nAttacks on the bare model: {args.samples} held-out digits, {args.budget} queries each. "
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
            FunctionTarget(probabilities),
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
        name = f"{attack.name} ({norms[attack.name]})"
        print(
            f"| {name} | {success:.2f} ({len(wins)}/{len(run.attacked)}) | "
            + " | ".join(cells)
            + " |"
        )

    print(
        f"\nThe same attacks against model ∘ squeeze (adaptive: the attacker queries through the "
        f"squeeze stage), {args.samples} digits, {args.budget} queries each: success rate.\n"
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
                FunctionTarget(fn),
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

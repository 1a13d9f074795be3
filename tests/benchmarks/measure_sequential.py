"""Sequential certification against fixed n = 10⁵ on the digits model, and its error rate.

    python tests/benchmarks/measure_sequential.py [--inputs 150] [--sigma 0.25 0.5]
                                                  [--alpha 0.001] [--runs 20000] [--json FILE]

Part 1, digits (``guard.models``: the shipped model, trained with Gaussian noise
at σ ∈ {0.25, 0.5, 1, 2} in pixel units 0–16, so σ here is in those units): for
each σ, ``--inputs`` held-out samples evenly spaced, each certified by

- ``fixed``: CERTIFY with n0 = 100, n = 10⁵ (:class:`guard.defenses.smoothing.Smooth`);
- ``target``: TARGET at r = σ, n0 = 100, at most 10⁵ (``certify_radius``);
- ``adaptive T``: the largest radius within 10⁵, stopping once the rest of the
  budget would add at most T·σ, T ∈ {0.1, 0.5} (``certify_adaptive``).

It prints certified accuracy at each radius, mean and 95th percentile samples
per input (n0 included), seconds per input (wall clock, same process, same
onnxruntime session, one thread), and the targets: at r = σ, target's certified
accuracy within 1 point of fixed's, with ≥ 20× fewer samples on average.
"disagree" counts inputs where target certified r but fixed n = 10⁵ did not
(or the reverse).

Part 2, the guarantee at α: TARGET on the linear classifier of
tests/unit/test_sequential.py at a point whose pA is just below Φ(r/σ) (every
certificate there is wrong), ``--runs`` seeds, n ≤ 2000: the wrong-certificate
rate with its 95% Clopper–Pearson interval, against α.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import beta, norm

from guard.backends.onnx import OnnxBackend
from guard.defenses.sampling import labels_from_output
from guard.defenses.sequential import SequentialSmooth
from guard.defenses.smoothing import Smooth
from guard.models import load_samples, model_path

N0, N = 100, 100_000
TOLERANCES = (0.1, 0.5)  # adaptive: radius the rest of the budget may add, in σ
RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)


def digits(inputs: int, sigmas: list[float], alpha: float) -> dict[str, object]:
    x, y = load_samples("digits")
    indices = [i * len(x) // inputs for i in range(inputs)]
    local = OnnxBackend(model_path("digits"), name="digits", device="cpu", threads=1)

    def labels(batch: np.ndarray) -> np.ndarray:
        return labels_from_output(local.run({"input": batch}, ["label"])["label"], len(batch))

    out: dict[str, object] = {}
    for sigma in sigmas:
        out[str(sigma)] = result = modes(labels, x, y, indices, sigma, alpha)
        _print(sigma, result, inputs)
    return out


def modes(
    labels: Callable[[np.ndarray], np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    indices: list[int],
    sigma: float,
    alpha: float,
) -> dict[str, dict[str, object]]:
    fixed, seq = Smooth(labels, sigma), SequentialSmooth(labels, sigma)
    procedures: dict[str, Callable[[np.ndarray, np.random.Generator], Any]] = {
        "fixed": lambda v, r: fixed.certify(v, N0, N, alpha, rng=r),
        "target": lambda v, r: seq.certify_radius(v, sigma, N0, N, alpha, rng=r),
    }

    def adaptive(tolerance: float) -> Callable[[np.ndarray, np.random.Generator], Any]:
        return lambda v, r: seq.certify_adaptive(v, N0, N, alpha, rng=r, tolerance=tolerance)

    procedures.update({f"adaptive {t:g}": adaptive(t) for t in TOLERANCES})
    result: dict[str, dict[str, object]] = {}
    for mode, certify in procedures.items():
        rng = np.random.default_rng(0)
        radius, correct, samples, seconds = [], [], [], []
        for i in indices:
            started = time.perf_counter()
            cert = certify(x[i], rng)
            seconds.append(time.perf_counter() - started)
            radius.append(cert.radius)
            correct.append(cert.label == int(y[i]))
            samples.append(N0 + N if mode == "fixed" else cert.samples)
        r, c = np.array(radius), np.array(correct)
        result[mode] = {
            "accuracy": {str(t): float(np.mean(c & (r >= t))) for t in RADII},
            "at_sigma": float(np.mean(c & (r >= sigma))),
            "certified_at_sigma": (c & (r >= sigma)).tolist(),
            "mean_samples": float(np.mean(samples)),
            "p95_samples": float(np.percentile(samples, 95)),
            "seconds": float(np.mean(seconds)),
        }
    return result


def _print(sigma: float, result: dict[str, dict], inputs: int) -> None:
    print(f"\n## digits, σ = {sigma:g}, {inputs} held-out inputs, n0 = {N0}, n ≤ {N:,}")
    modes = list(result)
    print("| radius | " + " | ".join(modes) + " |\n|---:|" + "---:|" * len(modes))
    for t in RADII:
        cells = " | ".join(f"{result[m]['accuracy'][str(t)]:.3f}" for m in modes)
        print(f"| {t:g} | {cells} |")
    for key, fmt in (("mean_samples", "{:.0f}"), ("p95_samples", "{:.0f}"), ("seconds", "{:.4f}")):
        print(f"| {key} | " + " | ".join(fmt.format(result[m][key]) for m in modes) + " |")
    fixed, target = result["fixed"], result["target"]
    gap = 100 * (fixed["at_sigma"] - target["at_sigma"])
    ratio = fixed["mean_samples"] / target["mean_samples"]
    disagree = sum(
        a != b
        for a, b in zip(fixed["certified_at_sigma"], target["certified_at_sigma"], strict=True)
    )
    speed = fixed["seconds"] / target["seconds"]
    print(
        f"target at r = σ: accuracy {target['at_sigma']:.3f} vs fixed {fixed['at_sigma']:.3f} "
        f"({gap:+.1f} points; target ≤ 1) · samples {ratio:.0f}× fewer (target ≥ 20) · "
        f"time {speed:.0f}× less · disagree on {disagree}/{inputs}"
    )


W = np.array([3.0, -1.0, 0.5, 2.0])
B, SIGMA = -0.25, 0.5


def guarantee(runs: int, alpha: float, gap: float = 0.002) -> dict[str, float]:
    def linear(v: np.ndarray) -> np.ndarray:
        return (v @ W + B > 0).astype(np.int64)

    pStar = norm.cdf(1.0)
    distance = SIGMA * norm.ppf(pStar - gap)
    x = (distance * np.linalg.norm(W) - B) * W / (W @ W)
    smooth = SequentialSmooth(linear, SIGMA, batch=2048)
    started = time.perf_counter()
    wrong = sum(
        not smooth.certify_radius(x, SIGMA, 10, 2000, alpha, rng=np.random.default_rng(s)).abstained
        for s in range(runs)
    )
    low = float(beta.ppf(0.025, wrong, runs - wrong + 1)) if wrong else 0.0
    high = float(beta.ppf(0.975, wrong + 1, runs - wrong))
    print(
        f"\n## guarantee: linear model, pA = Φ(1) − {gap}, r = σ, α = {alpha:g}, {runs} seeds, "
        f"n ≤ 2000 ({time.perf_counter() - started:.0f} s)\nwrong certificates {wrong}/{runs} = "
        f"{wrong / runs:.5f}, 95% CI [{low:.5f}, {high:.5f}] against α = {alpha:g}: "
        f"{'holds' if low <= alpha else 'VIOLATED'}"
    )
    return {"runs": runs, "wrong": wrong, "rate": wrong / runs, "ci_low": low, "ci_high": high}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=150)
    parser.add_argument("--sigma", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--runs", type=int, default=20_000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, numpy {np.__version__}")
    report = {
        "digits": digits(args.inputs, args.sigma, args.alpha),
        "guarantee": guarantee(args.runs, args.alpha),
    }
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

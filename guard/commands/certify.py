"""``guard certify``: certified accuracy against radius of a smoothed demo model.

Runs CERTIFY (Cohen, Rosenfeld and Kolter, ICML 2019) on the model's held-out
(non-member) samples through its local ONNX copy, for one or more noise levels,
and prints the certified accuracy at a few radii, in the model's input units
(pixel values for digits), plus the abstain rate. ``--report`` writes one CSV
row per sample, σ and mode (sigma, index, label, predict, radius, correct,
abstained, time, mode, samples; ``predict`` is -1 when abstained); ``--plot``
draws certified accuracy against radius, one curve per σ and mode, as in the
paper's figures (needs matplotlib).
Certified accuracy at radius r is the share of samples whose certified label is
right with a radius of at least r; abstentions count as wrong.

``--mode`` picks the procedures to compare (:mod:`guard.defenses.sequential`):
``fixed`` (CERTIFY, n samples), ``target`` (is the radius at least
``--target-radius``, σ by default? stops as soon as that is known; its table
column is exact at that radius and a lower bound above it) and ``adaptive`` (the
largest radius, stopping once the rest of the n samples would add at most
``--tolerance``·σ, or after ``--budget-ms``). The table adds the mean and 95th
percentile of samples used per input (n0 included).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TABLE_RADII = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0)
CSV_HEADER = (
    *("sigma", "index", "label", "predict", "radius", "correct", "abstained", "time"),
    *("mode", "samples"),
)


@dataclass(frozen=True, slots=True)
class Row:
    sigma: float
    mode: str
    index: int
    label: int
    predict: int  # -1 when abstained
    radius: float
    correct: bool
    abstained: bool
    time: float
    samples: int


def add_parser(commands: Any) -> None:
    from guard.defenses.sequential import MODES
    from guard.models import MODELS

    parser = commands.add_parser(
        "certify",
        help="certified accuracy of a smoothed demo model (randomized smoothing)",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument(
        "--model", required=True, choices=MODELS, help="the built-in demo model to certify"
    )
    parser.add_argument(
        "--sigma", type=float, nargs="+", required=True, help="noise level(s), input units"
    )
    parser.add_argument(
        "--mode", nargs="+", choices=MODES, default=["fixed"], help="procedures to compare (fixed)"
    )
    parser.add_argument(
        "--n",
        type=int,
        default=100_000,
        help="estimation samples; the most for target and adaptive (100000)",
    )
    parser.add_argument(
        "--target-radius", type=float, help="target mode's radius, input units (default: each σ)"
    )
    parser.add_argument(
        "--tolerance", type=float, default=0.1, help="adaptive: radius left, in sigmas (0.1)"
    )
    parser.add_argument(
        "--budget-ms", type=float, help="adaptive: stop after this many ms per input (none)"
    )
    parser.add_argument("--n0", type=int, default=100, help="selection samples (100)")
    parser.add_argument("--alpha", type=float, default=0.001, help="failure probability (0.001)")
    parser.add_argument("--samples", type=int, help="held-out samples, evenly spaced (all)")
    parser.add_argument("--batch", type=int, default=1000, help="samples per model call (1000)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the Gaussian noise draws (default: 0)"
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="onnxruntime device: cuda when available (auto), or force one (default: auto)",
    )
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads (0: all cores)")
    parser.add_argument("--report", type=Path, help="per-sample CSV")
    parser.add_argument("--plot", type=Path, help="certified accuracy curves (PNG)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import time

    import numpy as np

    from guard.backends.onnx import OnnxBackend
    from guard.defenses.sampling import labels_from_output
    from guard.defenses.sequential import SequentialSmooth, adaptive_plan, target_plan
    from guard.defenses.smoothing import ParameterError, Smooth, check_parameters
    from guard.extras import hint, installed
    from guard.models import load_samples, model_info, model_path
    from guard.progress import Progress

    try:
        largest = {
            s: check_parameters(sigma=s, n0=args.n0, n=args.n, alpha=args.alpha) for s in args.sigma
        }
        for s in args.sigma:
            if "target" in args.mode:
                target_plan(s, _target(args, s), args.n0, args.n, args.alpha)
            if "adaptive" in args.mode:
                adaptive_plan(s, args.n0, args.n, args.alpha, args.tolerance)
    except ParameterError as exc:
        print(f"guard certify: --{exc}", file=sys.stderr)
        return 2
    if args.batch < 1 or (args.samples is not None and args.samples < 1):
        print("guard certify: --batch and --samples must be >= 1", file=sys.stderr)
        return 2
    if args.plot is not None and not installed("matplotlib"):
        print(f"guard certify: --plot needs matplotlib {hint('matplotlib')}", file=sys.stderr)
        return 2

    x, y = load_samples(args.model)
    passes = len(args.sigma) * len(args.mode)
    spaced = _evenly_spaced(len(x), args.samples)
    indices = Progress("certify", passes * len(spaced)).each(spaced)  # stderr, terminal only
    local = OnnxBackend(
        model_path(args.model), name=args.model, device=args.device, threads=args.threads
    )

    shape = model_info(args.model)["input_shape"]  # flat rows -> the model's input

    def labels(batch: np.ndarray) -> np.ndarray:
        batch = batch.reshape(len(batch), *shape)
        return labels_from_output(local.run({"input": batch}, ["label"])["label"], len(batch))

    budget = None if args.budget_ms is None else args.budget_ms / 1000
    rows: list[Row] = []
    for sigma, mode in ((s, m) for s in args.sigma for m in args.mode):
        fixed = Smooth(labels, sigma, batch=args.batch)
        sequential = SequentialSmooth(labels, sigma, batch=args.batch)
        rng = np.random.default_rng(args.seed)
        for index in indices:
            started = time.perf_counter()
            if mode == "fixed":
                cert: Any = fixed.certify(x[index], args.n0, args.n, args.alpha, rng=rng)
                samples = args.n0 + args.n
            elif mode == "target":
                cert = sequential.certify_radius(
                    x[index], _target(args, sigma), args.n0, args.n, args.alpha, rng=rng
                )
                samples = cert.samples
            else:
                cert = sequential.certify_adaptive(
                    x[index],
                    args.n0,
                    args.n,
                    args.alpha,
                    rng=rng,
                    tolerance=args.tolerance,
                    seconds=budget,
                )
                samples = cert.samples
            elapsed = time.perf_counter() - started
            predict = -1 if cert.label is None else cert.label
            label = int(y[index])
            correct = predict == label
            rows.append(
                Row(
                    sigma,
                    mode,
                    index,
                    label,
                    predict,
                    cert.radius,
                    correct,
                    cert.abstained,
                    elapsed,
                    samples,
                )
            )

    print(
        f"{args.model}: n={args.n} n0={args.n0} alpha={args.alpha:g}, {len(indices)} held-out "
        f"samples, {local.providers[0]}"
    )
    print(_table(rows, args.sigma, args.mode, largest))
    if args.report is not None:
        _write_csv(args.report, rows)
        print(f"report: {args.report}")
    if args.plot is not None:
        title = f"{args.model}, n = {args.n:,}, α = {args.alpha:g}"
        _plot(args.plot, rows, args.sigma, largest, title)
        print(f"plot: {args.plot}")
    return 0


def certified_accuracy(radius: Any, correct: Any, r: float) -> float:
    """Share of samples certified correct with a radius of at least ``r``."""
    import numpy as np

    return float(np.mean(np.asarray(correct, dtype=bool) & (np.asarray(radius) >= r)))


def _target(args: argparse.Namespace, sigma: float) -> float:
    return sigma if args.target_radius is None else float(args.target_radius)


def _table(
    rows: list[Row], sigmas: list[float], modes: list[str], largest: dict[float, float]
) -> str:
    import numpy as np

    keys = [(s, m) for s in sigmas for m in modes]
    columns = {k: [r for r in rows if (r.sigma, r.mode) == k] for k in keys}
    names = (f"σ = {s:g}" + ("" if modes == ["fixed"] else f" {m}") for s, m in keys)
    lines = ["| radius | " + " | ".join(names) + " |"]
    lines.append("|---:|" + "---:|" * len(keys))
    for r in TABLE_RADII:
        cells = (
            certified_accuracy([c.radius for c in col], [c.correct for c in col], r)
            for col in columns.values()
        )
        lines.append(f"| {r:g} | " + " | ".join(f"{a:.3f}" for a in cells) + " |")
    summary = [
        ("abstained", lambda col: f"{sum(c.abstained for c in col) / len(col):.1%}"),
        ("largest certifiable radius", lambda col: f"{largest[col[0].sigma]:.3f}"),
        ("seconds per certification", lambda col: f"{sum(c.time for c in col) / len(col):.3f}"),
        ("mean samples", lambda col: f"{np.mean([c.samples for c in col]):.0f}"),
        ("p95 samples", lambda col: f"{np.percentile([c.samples for c in col], 95):.0f}"),
    ]
    for name, cell in summary:
        lines.append(f"| {name} | " + " | ".join(cell(col) for col in columns.values()) + " |")
    return "\n".join(lines)


def _evenly_spaced(total: int, wanted: int | None) -> list[int]:
    if wanted is None or wanted >= total:
        return list(range(total))
    return [i * total // wanted for i in range(wanted)]


def _write_csv(path: Path, rows: list[Row]) -> None:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_HEADER)
        for r in rows:
            writer.writerow(
                (
                    f"{r.sigma:g}",
                    r.index,
                    r.label,
                    r.predict,
                    f"{r.radius:.6f}",
                    int(r.correct),
                    int(r.abstained),
                    f"{r.time:.4f}",
                    r.mode,
                    r.samples,
                )
            )


def _plot(
    path: Path, rows: list[Row], sigmas: list[float], largest: dict[float, float], title: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    top = max([*largest.values(), *(r.radius for r in rows)]) * 1.05
    grid = np.linspace(0.0, top, 500)
    figure, axes = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    for sigma, mode in ((s, m) for s in sigmas for m in sorted({r.mode for r in rows})):
        radius = [r.radius for r in rows if (r.sigma, r.mode) == (sigma, mode)]
        correct = [r.correct for r in rows if (r.sigma, r.mode) == (sigma, mode)]
        curve = [certified_accuracy(radius, correct, g) for g in grid]
        axes.plot(grid, curve, label=f"σ = {sigma:g} {mode}")
    axes.set_xlabel("radius (L2, input units)")
    axes.set_ylabel("certified accuracy")
    axes.set_ylim(0.0, 1.0)
    axes.set_xlim(0.0, top)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower left")
    axes.set_title(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)

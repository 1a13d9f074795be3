"""The defaults derived from a model's declared input scale, judged on held-out data.

    python tests/benchmarks/measure_input_scale.py [--rows 400] [--seed 0]
        [--npz FILE --range LO HI]   # your own rows (array x) instead of the built-ins

For each built-in model (its sidecar's ``input_range``, its input's shape) or the
given rows, the defaults of ``blacklight`` and ``provenance`` are read as a policy
that leaves them out gets them (guard/stages/scale.py), and measured against the
fixed defaults of the digits demo (quantize 3.0, window 20) as the baseline:

* provenance ``distance``: the held-out rows' nearest-neighbour L2 distances (min,
  1st percentile, median) and the share of held-out rows within ``distance`` of
  another one (honest rows linked: should be 0);
* blacklight: the share of pairs of distinct held-out rows whose fingerprints match
  (share more than ``threshold`` hashes; should be ~0), and the share of rows that
  match a near-duplicate of themselves (should be high): Gaussian noise of 0.3% and 1%
  of the range on every value, or 1% and 5% of the values redrawn anywhere in the range.

Everything is seeded (the fingerprint key too); the numbers are the run's.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from guard.configreader import Section  # noqa: E402
from guard.defenses.blacklight import Fingerprinter, FingerprintKey  # noqa: E402
from guard.models import MODELS, load_samples, model_info  # noqa: E402
from guard.stages.blacklight import BlacklightOptions  # noqa: E402
from guard.stages.env import StageEnv  # noqa: E402
from guard.stages.options import read_options  # noqa: E402
from guard.stages.provenance import ProvenanceOptions  # noqa: E402
from guard.stages.scale import InputScale, sidecar_range  # noqa: E402

KEY = FingerprintKey.derive(b"measure_input_scale")
NOISE = (0.003, 0.01)  # dense Gaussian noise, as a share of the range
SPARSE = (0.01, 0.05)  # shares of the values redrawn uniformly over the range


def derived(scale: InputScale) -> tuple[BlacklightOptions, ProvenanceOptions]:
    """The options a policy that leaves the scale's keys out gets."""
    env = StageEnv(model="m", backend=None, local=None, metadata=None, scale=scale)
    read = [read_options(c, Section({}, source="-", path=c.__name__), env) for c in
            (BlacklightOptions, ProvenanceOptions)]  # fmt: skip
    return read[0], read[1]


def nearest(x: np.ndarray) -> np.ndarray:
    """Each row's L2 distance to its nearest other row."""
    x = x.astype(np.float64)
    sq = (x * x).sum(axis=1)
    d = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0))
    np.fill_diagonal(d, np.inf)
    return d.min(axis=1)


def near_duplicates(
    x: np.ndarray, lo: float, hi: float, rng: np.random.Generator
) -> list[tuple[str, np.ndarray]]:
    """Copies of ``x`` an attack's next query could be: dense Gaussian noise (a fraction of
    the range), and a few values redrawn anywhere in the range (SimBA, Square's patches)."""
    span = hi - lo
    out = [
        (f"noise {level:.1%}", np.clip(x + rng.normal(scale=level * span, size=x.shape), lo, hi))
        for level in NOISE
    ]
    for share in SPARSE:
        moved = rng.random(x.shape) < share
        out.append((f"{share:.0%} redrawn", np.where(moved, rng.uniform(lo, hi, x.shape), x)))
    return out


def matching(
    o: BlacklightOptions, x: np.ndarray, lo: float, hi: float, rng: np.random.Generator
) -> tuple[float, list[tuple[str, float]]]:
    """(share of distinct pairs that match, share of rows matching each near-duplicate)."""
    fp = Fingerprinter(KEY, o.quantize, o.window, o.stride, o.top)
    prints = [set(f) for f in fp(x)]
    pairs = [len(a & b) > o.threshold for a, b in itertools.combinations(prints, 2)]
    near = []
    for label, copy in near_duplicates(x, lo, hi, rng):
        shared = [len(a & set(b)) for a, b in zip(prints, fp(copy.astype(np.float32)), strict=True)]
        near.append((label, float(np.mean([n > o.threshold for n in shared]))))
    return float(np.mean(pairs)), near


def report(name: str, x: np.ndarray, lo: float, hi: float, seed: int) -> None:
    x = x.reshape(len(x), -1).astype(np.float32)
    scale = InputScale((lo, hi), (x.shape[1],), "measured")
    blacklight, provenance = derived(scale)
    gaps = nearest(x)
    diameter = (hi - lo) * math.sqrt(x.shape[1])
    print(f"\n### {name}: {len(x)} held-out rows of {x.shape[1]} values in [{lo:g}, {hi:g}]\n")
    print(
        "| provenance | distance | NN min | NN p1 | NN median | distance / NN min | rows linked |"
    )
    print("|---|---|---|---|---|---|---|")
    print(
        f"| derived (3/64 of the diameter {diameter:.4g}) | {provenance.distance:.4g} | "
        f"{gaps.min():.4g} | {np.percentile(gaps, 1):.4g} | {np.median(gaps):.4g} | "
        f"{provenance.distance / gaps.min():.2f} | {np.mean(gaps <= provenance.distance):.1%} |"
    )
    fixed = BlacklightOptions(threshold=25)  # the digits demo's 3.0 and 20: the baseline
    rows = []
    for label, o in (("derived", blacklight), ("fixed (baseline)", fixed)):
        pairs, near = matching(o, x, lo, hi, np.random.default_rng(seed))
        cells = [f"{o.quantize:.4g}", str(o.window), str(o.threshold), f"{pairs:.2%}"]
        rows.append((label, cells + [f"{share:.1%}" for _, share in near], [n for n, _ in near]))
    head = ["quantize", "window", "threshold", "distinct pairs matching"]
    head += [f"near-duplicates ({n}) matching" for n in rows[0][2]]
    print("\n| blacklight | " + " | ".join(head) + " |")
    print("|---|" + "---|" * len(head))
    for label, cells, _ in rows:
        print(f"| {label} | " + " | ".join(cells) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=400, help="held-out rows used (default 400)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--npz", type=Path, help="rows of your own: an .npz with array x")
    parser.add_argument("--range", type=float, nargs=2, metavar=("LO", "HI"))
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    if args.npz is not None:
        if args.range is None:
            parser.error("--npz needs --range LO HI")
        with np.load(args.npz) as data:
            x = data["x"]
        x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x
        sets = [(args.npz.name, x, *args.range)]
    else:
        sets = []
        for name in MODELS:
            x, _ = load_samples(name)
            sets.append((name, x, *sidecar_range(model_info(name))))
    for name, x, lo, hi in sets:
        rows = rng.choice(len(x), size=min(args.rows, len(x)), replace=False)
        report(name, np.asarray(x)[rows], float(lo), float(hi), args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

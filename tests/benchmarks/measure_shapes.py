"""The numbers behind the default policy's ``shapes`` settings, and the generator's speed.

    python tests/benchmarks/measure_shapes.py [--seed 0]

Prints, on the model's 4,000 held-out images (rows 20,000-23,999 of
:func:`guard.models.imagegen.dataset`):

* nearest-neighbour L2 distances between distinct held-out images (over the 3,072 values in
  [0, 1]): ``provenance.distance`` must stay well below them;
* the accuracy below and above the privacy ``bins`` cut of 0.5 (the ``confidences``);
* the generator's throughput, against the time to copy the same bytes (the baseline of the
  same run).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort

from guard.models import imagegen, model_info, model_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    info = model_info("shapes")
    start = info["train_size"]
    x, y = imagegen.dataset(args.seed, start, start + info["test_size"])
    rows = x.reshape(len(x), -1).astype(np.float32) / np.float32(255)

    squares = (rows.astype(np.float64) ** 2).sum(axis=1)
    gram = rows.astype(np.float64) @ rows.T.astype(np.float64)
    d2 = squares[:, None] + squares[None, :] - 2 * gram
    np.fill_diagonal(d2, np.inf)
    nearest = np.sqrt(np.maximum(d2.min(axis=1), 0.0))
    q = np.quantile(nearest, [0.001, 0.01, 0.5])
    print(
        f"held-out nearest-neighbour L2 ({len(rows)} images): min {nearest.min():.2f}, "
        f"0.1% {q[0]:.2f}, 1% {q[1]:.2f}, median {q[2]:.2f}"
    )

    session = ort.InferenceSession(str(model_path("shapes")), providers=["CPUExecutionProvider"])
    labels, probabilities = session.run(None, {"input": rows.reshape(x.shape)})
    right = labels == y
    unsure = probabilities.max(axis=1) < 0.5
    print(
        f"accuracy {right.mean():.4f}; below the 0.5 cut ({unsure.mean():.1%} of images) "
        f"{right[unsure].mean():.3f}, above it {right[~unsure].mean():.3f}"
    )

    n = 2000
    started = time.perf_counter()
    images, _ = imagegen.generate(n, np.random.default_rng(args.seed))
    generate = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(10):
        images.copy()
    copy = (time.perf_counter() - started) / 10
    print(
        f"generate: {n / generate:.0f} images/s ({generate:.2f} s for {n}); "
        f"{generate / copy:.0f}x the time of copying their bytes"
    )


if __name__ == "__main__":
    main()

"""CERTIFY on a built-in model: certifications per second against the floor, memory against n.

    python tests/benchmarks/bench_certify.py [--model digits] [--n 1000 10000 100000]
        [--batch 250 1000 4000] [--repeat 5] [--min-time 0.3] [--clock cpu|wall]

``--model`` names a built-in model (default ``digits``); the noise is drawn in the
model's input shape (``input_shape`` of its sidecar, e.g. ``[32, 32, 3]`` for
``shapes``) and σ = 0.25 is in its input units.

The floor is what no implementation can avoid, measured in the same run on the
same onnxruntime session: drawing the Gaussian noise of n samples into a reused
float32 buffer and running the model on them in batches, nothing else (no
scaling or shifting, no votes, no statistics, no selection samples). CERTIFY is
:meth:`guard.defenses.smoothing.Smooth.certify` with n0 = 100, so it does the n0
selection samples on top of the floor's n. Each figure is the best of
``--repeat`` runs of at least ``--min-time`` seconds, floor and CERTIFY runs
interleaved; by default the clock is the process's CPU time, which other work on
a shared machine disturbs far less than wall time (onnxruntime runs in the
calling thread with one intra-op thread, so the two agree on an idle machine).
The load average is printed with the tables.

Memory: the tracemalloc peak of one certification (numpy allocations; the
onnxruntime arena is outside it and does not grow with n either) beside the
size the n noisy copies would take if they were built at once.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import tracemalloc
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from guard.backends.onnx import OnnxBackend  # noqa: E402
from guard.defenses.sampling import labels_from_output  # noqa: E402
from guard.defenses.smoothing import Smooth  # noqa: E402
from guard.models import MODELS, model_path  # noqa: E402
from tests.benchmarks.model_inputs import samples, to_model  # noqa: E402

SIGMA, N0, ALPHA = 0.25, 100, 0.001


def best_seconds(
    calls: dict[str, Callable[[], object]],
    *,
    repeat: int,
    min_time: float,
    clock: Callable[[], float],
) -> dict[str, float]:
    """Best seconds per call of each, timing runs interleaved so both see the same load."""
    for call in calls.values():
        call()  # warm up
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(repeat):
        for name, call in calls.items():
            number, started = 0, clock()
            while (elapsed := clock() - started) < min_time or number == 0:
                call()
                number += 1
            best[name] = min(best[name], elapsed / number)
    return best


def floor(local: OnnxBackend, x: np.ndarray, n: int, batch: int, rng: np.random.Generator) -> None:
    buffer = np.empty((min(batch, n), *x.shape), np.float32)
    done = 0
    while done < n:
        chunk = buffer[: min(batch, n - done)]
        rng.standard_normal(out=chunk, dtype=np.float32)
        local.session.run(["label"], {"input": chunk})
        done += len(chunk)


def peak_bytes(call: Callable[[], object]) -> int:
    tracemalloc.start()
    call()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits", choices=MODELS)
    parser.add_argument("--n", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--batch", type=int, nargs="+", default=[250, 500, 1000, 2000, 4000])
    parser.add_argument("--repeat", type=int, default=5, help="timing runs per figure (best kept)")
    parser.add_argument("--min-time", type=float, default=0.3, help="seconds per timing run")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="process CPU time (steady on a shared machine; default) or wall time",
    )
    parser.add_argument("--memory-batch", type=int, default=1000, help="batch of the memory column")
    args = parser.parse_args(argv)

    name = args.model
    local = OnnxBackend(model_path(name), name=name, device="auto", threads=args.threads)
    x = to_model(samples(name)[0][0], name)[0]  # one sample in the model's input shape
    rng = np.random.default_rng(0)

    def labels(batch: np.ndarray) -> np.ndarray:
        return labels_from_output(local.run({"input": batch}, ["label"])["label"], len(batch))

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    timing = {"repeat": args.repeat, "min_time": args.min_time, "clock": clock}
    load = os.getloadavg()
    print(
        f"{name} (sample shape {list(x.shape)}); "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{local.providers[0]} with {args.threads} thread(s), NumPy {np.__version__}; "
        f"{args.clock} time; load average {load[0]:.2f} at start"
    )
    print("\n| n | batch | floor (cert/s) | CERTIFY (cert/s) | CERTIFY / floor |")
    print("|---:|---:|---:|---:|---:|")
    timings: dict[int, list[tuple[int, float, float]]] = {}  # n -> (batch, floor s, certify s)
    for n in args.n:
        for batch in args.batch:
            smooth = Smooth(labels, SIGMA, batch=batch)
            calls = {
                "floor": partial(floor, local, x, n, batch, rng),
                "certify": partial(smooth.certify, x, N0, n, ALPHA, rng=rng),
            }
            seconds = best_seconds(calls, **timing)
            f, c = seconds["floor"], seconds["certify"]
            timings.setdefault(n, []).append((batch, f, c))
            print(f"| {n:,} | {batch} | {1 / f:,.1f} | {1 / c:,.1f} | {f / c:.0%} |")

    print(
        "\n| n | best floor (cert/s, batch) | best CERTIFY (cert/s, batch) | ratio "
        f"| peak memory (batch {args.memory_batch}) | the n copies |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for n, rows in timings.items():
        floor_batch, f, _ = min(rows, key=lambda row: row[1])
        certify_batch, _, c = min(rows, key=lambda row: row[2])
        smooth = Smooth(labels, SIGMA, batch=args.memory_batch)
        peak = peak_bytes(partial(smooth.certify, x, N0, n, ALPHA, rng=rng))
        copies = n * x.size * 4
        print(
            f"| {n:,} | {1 / f:,.1f} ({floor_batch}) | {1 / c:,.1f} ({certify_batch}) | {f / c:.0%} "
            f"| {peak / 1024:,.0f} KiB | {copies / 2**20:,.1f} MiB |"
        )
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()

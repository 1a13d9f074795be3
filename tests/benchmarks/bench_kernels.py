"""Compiled kernels against their pure-Python twins, in microseconds per call.

    python tests/benchmarks/bench_kernels.py [--repeat 7] [--min-time 0.2]

Prints a markdown table. Each figure is the best of ``--repeat`` timing runs of
at least ``--min-time`` seconds each (the minimum is the least disturbed by
other work on the machine). Inputs are checked to agree before they are timed.
"""

from __future__ import annotations

import argparse
import platform
import timeit
from collections.abc import Callable
from typing import Any

import numpy as np

from guard._py import bins as bins_twin
from guard._py import check as twin

try:
    from guard._ext import bins as bins_ext
    from guard._ext import check as ext
except ImportError:
    ext = bins_ext = None

# Tabular features (64 values), a CIFAR-10 image (3072), an ImageNet one (150528).
SIZES = (64, 3072, 150528)


def per_call_us(call: Callable[[], Any], *, repeat: int, min_time: float) -> float:
    timer = timeit.Timer(call)
    number, elapsed = timer.autorange()
    number = max(number, int(number * min_time / max(elapsed, 1e-9)))
    return min(timer.repeat(repeat=repeat, number=number)) / number * 1e6


def bench_check_and_cast(size: int, *, repeat: int, min_time: float) -> tuple[float | None, float]:
    """float64 -> float32 within [0, 1], no violation: the validate stage's common case."""
    x = np.random.default_rng(size).random(size)
    args = (x, np.float32, 0.0, 1.0, False)
    want = twin.check_and_cast(*args)
    twin_us = per_call_us(lambda: twin.check_and_cast(*args), repeat=repeat, min_time=min_time)
    if ext is None:
        return None, twin_us
    got = ext.check_and_cast(*args)
    if got[0].tobytes() != want[0].tobytes() or got[1:] != want[1:]:
        raise SystemExit(f"check_and_cast: kernel and twin disagree at size {size}")
    return per_call_us(lambda: ext.check_and_cast(*args), repeat=repeat, min_time=min_time), twin_us


# (rows, classes, ranked): digits' default (one row, 10 classes, the runner-up ranked), a
# batch of them, ImageNet's 1,000 classes ranked the same, and ranked all the way (a sort).
BINS = ((1, 10, 1), (64, 10, 1), (1, 1000, 1), (1, 1000, None))


def bench_bins(
    rows: int, classes: int, ranked: int | None, *, repeat: int, min_time: float
) -> tuple[float | None, float]:
    """The privacy stage's confidence bins on softmax rows (float32), two bins."""
    scores = np.random.default_rng(classes).dirichlet(np.full(classes, 0.3), rows)
    scores = scores.astype(np.float32)
    args = (scores, *bins_twin.tables((0.5,), (0.48, 0.975), ranked, classes), 0.999, 1.001)
    want = bins_twin.release(*args)
    twin_us = per_call_us(lambda: bins_twin.release(*args), repeat=repeat, min_time=min_time)
    if bins_ext is None:
        return None, twin_us
    got = bins_ext.release(*args)
    if got[0].tobytes() != want[0].tobytes() or got[1] != want[1]:
        raise SystemExit(f"release_bins: kernel and twin disagree at {rows}x{classes}")
    return per_call_us(lambda: bins_ext.release(*args), repeat=repeat, min_time=min_time), twin_us


def ratio_row(name: str, size: str, ext_us: float | None, twin_us: float) -> str:
    cython = "n/a" if ext_us is None else f"{ext_us:.2f}"
    ratio = "n/a" if ext_us is None else f"{twin_us / ext_us:.1f}x"
    return f"| {name} | {size} | {cython} | {twin_us:.2f} | {ratio} |"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7, help="timing runs per figure (best kept)")
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds per timing run")
    args = parser.parse_args(argv)

    print(
        f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, "
        f"NumPy {np.__version__}" + ("" if ext else "; extension not built")
    )
    print()
    print("| kernel | values | Cython µs/call | twin µs/call | twin / Cython |")
    print("|---|---:|---:|---:|---:|")
    for size in SIZES:
        ext_us, twin_us = bench_check_and_cast(size, repeat=args.repeat, min_time=args.min_time)
        print(ratio_row("check_and_cast f64→f32", str(size), ext_us, twin_us))
    for rows, classes, ranked in BINS:
        ext_us, twin_us = bench_bins(
            rows, classes, ranked, repeat=args.repeat, min_time=args.min_time
        )
        name = f"release_bins, ranked {'all' if ranked is None else ranked}"
        print(ratio_row(name, f"{rows}×{classes}", ext_us, twin_us))


if __name__ == "__main__":
    main()

"""Feature-squeezing kernels against their numpy twins and scipy.ndimage, in µs per call.

    python tests/benchmarks/bench_squeeze.py [--repeat 5] [--min-time 0.1] [--batches 1 32]

Prints a markdown table: one row per kernel, image shape and batch size (float32,
HWC). Each figure is the best of ``--repeat`` timing runs of at least
``--min-time`` seconds (the minimum is the least disturbed by other work on the
machine). Every kernel is first checked to agree with its twin bit for bit, and
the median with ``scipy.ndimage.median_filter`` (the twin of bit depth and clip
is numpy itself, so scipy has no column there).
"""

from __future__ import annotations

import argparse
import os
import platform
import timeit
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import ndimage

from guard._py import squeeze as twin

try:
    from guard._ext import squeeze as ext
except ImportError:
    ext = None

IMAGES = ((8, 8, 1), (28, 28, 1), (32, 32, 3), (224, 224, 3))


def per_call_us(call: Callable[[], Any], *, repeat: int, min_time: float) -> float:
    timer = timeit.Timer(call)
    number, elapsed = timer.autorange()
    number = max(1, int(number * min_time / max(elapsed, 1e-9)))
    return min(timer.repeat(repeat=repeat, number=number)) / number * 1e6


def cases(x: np.ndarray, image: tuple[int, int, int]) -> dict[str, tuple[tuple[Any, ...], Any]]:
    """kernel label -> (twin/kernel arguments after x, the scipy call or None)."""
    h, w, c = image
    return {
        "median 2x2": ((2, h, w, c), lambda: ndimage.median_filter(x, size=(1, 2, 2, 1))),
        "median 3x3": ((3, h, w, c), lambda: ndimage.median_filter(x, size=(1, 3, 3, 1))),
        "bits 4": ((4, 0.0, 1.0), None),
        "clip": ((0.1, 0.9), None),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="timing runs per figure (best kept)")
    parser.add_argument("--min-time", type=float, default=0.1, help="seconds per timing run")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    args = parser.parse_args(argv)
    timing = {"repeat": args.repeat, "min_time": args.min_time}

    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, NumPy {np.__version__}"
        + ("" if ext else "; extension not built")
    )
    print()
    print(
        "| kernel | image | batch | Cython µs | twin µs | scipy µs | twin / Cython | scipy / Cython |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for image in IMAGES:
        for batch in args.batches:
            x = rng.random((batch, *image), dtype=np.float32)
            for label, (rest, scipy_call) in cases(x, image).items():
                fn = (
                    label.split()[0]
                    .replace("median", "median_smooth")
                    .replace("bits", "reduce_bits")
                )
                want = getattr(twin, fn)(x, *rest)
                if scipy_call is not None and not np.array_equal(scipy_call(), want):
                    raise SystemExit(f"{label}: twin and scipy disagree on {image} x {batch}")
                twin_us = per_call_us(
                    lambda fn=fn, rest=rest, x=x: getattr(twin, fn)(x, *rest), **timing
                )
                scipy_us = per_call_us(scipy_call, **timing) if scipy_call else None
                ext_us = None
                if ext is not None:
                    if getattr(ext, fn)(x, *rest).tobytes() != want.tobytes():
                        raise SystemExit(f"{label}: kernel and twin disagree on {image} x {batch}")
                    ext_us = per_call_us(
                        lambda fn=fn, rest=rest, x=x: getattr(ext, fn)(x, *rest), **timing
                    )
                print(
                    f"| {label} | {'x'.join(map(str, image))} | {batch} | {_fmt(ext_us)} | {_fmt(twin_us)} "
                    f"| {_fmt(scipy_us)} | {_ratio(twin_us, ext_us)} | {_ratio(scipy_us, ext_us)} |",
                    flush=True,
                )


def _fmt(us: float | None) -> str:
    if us is None:
        return "n/a"
    return f"{us:.1f}" if us < 1000 else f"{us:,.0f}"


def _ratio(slow: float | None, fast: float | None) -> str:
    return "n/a" if slow is None or fast is None else f"{slow / fast:.1f}x"


if __name__ == "__main__":
    main()

"""Blacklight's fingerprint kernel against its pure-numpy twin, in microseconds per query.

    python tests/benchmarks/bench_fingerprint.py [--repeat 7] [--min-time 0.2]

Prints a markdown table: one query (a batch of one row) of the digits demo
(64 values), a CIFAR-10 image (3072) and an ImageNet one (150528, with the
paper's window 50 and stride 25 there), and a batch of 64 digits queries. Each
figure is the best of ``--repeat`` timing runs of at least ``--min-time``
seconds (the least disturbed by other work on the machine). Both
implementations are checked to agree before they are timed.
"""

from __future__ import annotations

import argparse
import platform
import timeit
from collections.abc import Callable
from typing import Any

import numpy as np

from guard._py import fingerprint as twin
from guard.defenses.blacklight import Fingerprinter, FingerprintKey

try:
    from guard._ext import fingerprint as ext
except ImportError:
    ext = None

# (label, rows, values per row, step, window, stride)
CASES = (
    ("digits query", 1, 64, 3.0, 20, 1),
    ("CIFAR-10 query", 1, 3072, 50.0, 20, 1),
    ("ImageNet query", 1, 150528, 50.0, 50, 25),
    ("64 digits queries", 64, 64, 3.0, 20, 1),
)


def per_call_us(call: Callable[[], Any], *, repeat: int, min_time: float) -> float:
    timer = timeit.Timer(call)
    number, elapsed = timer.autorange()
    number = max(number, int(number * min_time / max(elapsed, 1e-9)))
    return min(timer.repeat(repeat=repeat, number=number)) / number * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7, help="timing runs per figure (best kept)")
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds per timing run")
    args = parser.parse_args(argv)
    key = FingerprintKey.derive(b"benchmark")

    print(
        f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, "
        f"NumPy {np.__version__}" + ("" if ext else "; extension not built")
    )
    print()
    print("| input | values | Cython µs/call | twin µs/call | twin / Cython |")
    print("|---|---:|---:|---:|---:|")
    for label, rows, size, step, window, stride in CASES:
        x = np.random.default_rng(size).uniform(0, 16 * step / 3, (rows, size)).astype(np.float32)
        offsets = Fingerprinter(key=key, step=step).offsets(size)
        call = (x, offsets, step, window, stride, 50, key.multiplier, key.k1, key.k2)
        want = twin.fingerprint(*call)
        twin_us = per_call_us(
            lambda call=call: twin.fingerprint(*call), repeat=args.repeat, min_time=args.min_time
        )
        if ext is None:
            print(f"| {label} | {rows}x{size} | n/a | {twin_us:.1f} | n/a |")
            continue
        got = ext.fingerprint(*call)
        if not (np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])):
            raise SystemExit(f"fingerprint: kernel and twin disagree on {label}")
        ext_us = per_call_us(
            lambda call=call: ext.fingerprint(*call), repeat=args.repeat, min_time=args.min_time
        )
        print(
            f"| {label} | {rows}x{size} | {ext_us:.1f} | {twin_us:.1f} | {twin_us / ext_us:.1f}x |"
        )


if __name__ == "__main__":
    main()

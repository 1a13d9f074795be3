"""PRADA's nearest-member search on a full growing set: the pruned search against the scan.

For each width, a growing set at ``max_per_class`` (200 by default) of uniform random
members and fresh uniform queries; per query, the µs of

- ``scan``: the ``prada_scan`` kernel over the stored table (every member in float64,
  the search before the growing sets kept their norms), the baseline;
- ``pruned``: :meth:`guard.defenses.prada.GrowingSet.nearest` (float32 comparison
  first, exact distances for the members within the error bound; the plain kernel
  below 16,384 values);
- ``twin``: the pure-numpy twin's :func:`guard._py.prada.nearest` (what
  ``GUARD_NO_EXTENSIONS=1`` runs).

All three answers are checked equal on every query. The least of ``--repeat`` runs.

    python tests/benchmarks/bench_prada.py [--members 200] [--widths 64 3072] [--queries 200]
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from guard import _native
from guard._py import prada as twin
from guard.defenses.prada import GrowingSet


def full_scan(table: np.ndarray, x: np.ndarray) -> float:
    return _native.prada_scan(table, x)[0]


def twin_search(members: np.ndarray, x: np.ndarray) -> float:
    return twin.nearest(members, x)


def per_query(search: Callable[[np.ndarray], float], queries: np.ndarray, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        for x in queries:
            search(x)
        best = min(best, (time.perf_counter() - started) / len(queries))
    return best * 1e6


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=200)
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 3072])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    print(f"kernels built: {_native.USING_EXTENSIONS}")
    print("| width | members | scan µs | pruned µs (ratio) | twin µs (ratio) |")
    print("|---:|---:|---:|---:|---:|")
    for width in args.widths:
        growing = GrowingSet(width, args.members)
        for i in range(args.members):
            growing.add(rng.uniform(0, 1, width).astype(np.float32), float(i))
        table = growing.table
        queries = rng.uniform(0, 1, (args.queries, width)).astype(np.float32)
        for x in queries:
            want = _native.prada_scan(table, x)[0]
            if not growing.nearest(x) == twin.nearest(growing.members, x) == want:
                raise SystemExit(f"width {width}: the searches disagree")
        members = growing.members
        scan = per_query(functools.partial(full_scan, table), queries, args.repeat)
        pruned = per_query(growing.nearest, queries, args.repeat)
        slow = per_query(functools.partial(twin_search, members), queries, args.repeat)
        print(
            f"| {width} | {args.members} | {scan:.1f} | {pruned:.1f} ({pruned / scan:.2f}) "
            f"| {slow:.1f} ({slow / scan:.2f}) |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

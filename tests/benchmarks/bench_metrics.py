"""What the metrics path costs per request, one process against ``--workers`` (multiprocess).

Per request the guard does ``in_flight.inc()``, :meth:`GuardMetrics.observe` (the
requests counter, the request and upstream histograms, one stage histogram per stage)
and ``in_flight.dec()``. This times exactly that, for a request through the default
policy's five ``digits`` stages with latencies drawn from a seeded generator, in two
modes, each in a fresh interpreter (prometheus_client picks its value class once per
process):

``single``        one process: values in memory on the injected registry (the baseline)
``multiprocess``  a worker of ``guard serve --workers N``: every value also written to
                  the worker's memory-mapped file (:func:`guard.metrics.use_multiprocess`)

Rounds alternate the modes; each figure is the median over ``--rounds`` of the mean
µs per request over ``--requests``. The scrape is timed too: ``generate_latest`` of one
process's registry against the aggregated registry of ``W`` workers' files (each worker
having served the same traffic), for each ``--scrape-workers W``.

    PYTHONPATH=. python tests/benchmarks/bench_metrics.py [--requests 20000] [--rounds 5]
        [--scrape-workers 2 --scrape-workers 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

STAGES = ("validate", "privacy", "blacklight", "prada", "budget")  # the default policy's
SCRAPES = 200


def child(mode: str, requests: int, directory: str | None, scrape: bool, seed: int) -> dict:
    """Run in a fresh interpreter: time the metrics path (and a scrape) in ``mode``."""
    import numpy as np
    from prometheus_client import CollectorRegistry, generate_latest

    from guard.clients import Client
    from guard.inference import InferRequest
    from guard.metrics import GuardMetrics, use_multiprocess
    from guard.pipeline import RequestContext

    if mode == "multiprocess":
        if directory is None:
            raise SystemExit("bench_metrics: --child multiprocess needs --dir")
        use_multiprocess(directory)
    metrics = GuardMetrics(CollectorRegistry())
    rng = np.random.default_rng(seed)
    client = Client(name="bench")
    request = InferRequest(model_name="digits", inputs={"input": np.zeros((1, 64), np.float32)})
    contexts = []
    for _ in range(min(requests, 1000)):  # built up front: only the metrics are timed
        ctx = RequestContext(request_id="r", model="digits", client=client, request=request)
        ctx.upstream_seconds = float(rng.lognormal(-7.5, 0.5))
        ctx.stage_seconds = {s: float(rng.lognormal(-10, 0.7)) for s in STAGES}
        contexts.append((ctx, float(rng.lognormal(-7, 0.5))))
    observe, in_flight = metrics.observe, metrics.in_flight
    for ctx, seconds in contexts:  # warm: every child and file entry exists
        observe(ctx, protocol="v2", code=200, seconds=seconds)
    started = time.perf_counter()
    for i in range(requests):
        ctx, seconds = contexts[i % len(contexts)]
        in_flight.inc()
        observe(ctx, protocol="v2", code=200, seconds=seconds)
        in_flight.dec()
    result: dict[str, Any] = {"us_per_request": (time.perf_counter() - started) / requests * 1e6}
    if scrape:
        registry = metrics.aggregate(directory) if mode == "multiprocess" else metrics.registry
        size = len(generate_latest(registry))
        started = time.perf_counter()
        for _ in range(SCRAPES):
            generate_latest(registry)
        result["scrape_ms"] = (time.perf_counter() - started) / SCRAPES * 1e3
        result["scrape_bytes"] = size
    return result


def run_child(mode: str, requests: int, directory: str | None, scrape: bool, seed: int) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--requests", str(requests)]
    command += ["--seed", str(seed)] + (["--dir", directory] if directory else [])
    command += ["--scrape"] if scrape else []
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    return dict(json.loads(done.stdout))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--scrape-workers", type=int, action="append")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", choices=("single", "multiprocess"), help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--scrape", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.requests, args.dir, args.scrape, args.seed)))
        return

    per_request: dict[str, list[float]] = {"single": [], "multiprocess": []}
    for round_ in range(args.rounds):
        for mode in ("single", "multiprocess") if round_ % 2 == 0 else ("multiprocess", "single"):
            with tempfile.TemporaryDirectory(prefix="bench-metrics-") as directory:
                figure = run_child(mode, args.requests, directory, False, args.seed + round_)
            per_request[mode].append(figure["us_per_request"])
    single = statistics.median(per_request["single"])
    multi = statistics.median(per_request["multiprocess"])
    print(
        f"metrics path per request ({len(STAGES)} stages, {args.requests} requests, "
        f"median of {args.rounds} rounds)"
    )
    print(
        f"  single process      {single:7.2f} µs   (rounds: "
        f"{', '.join(f'{v:.2f}' for v in per_request['single'])})"
    )
    print(
        f"  multiprocess        {multi:7.2f} µs   (rounds: "
        f"{', '.join(f'{v:.2f}' for v in per_request['multiprocess'])})"
    )
    print(f"  multiprocess ÷ single: {multi / single:.2f}   (+{multi - single:.2f} µs per request)")

    scrapes: dict[str, Any] = {}
    if args.scrape_workers:
        figure = run_child("single", 2000, None, True, args.seed)
        scrapes["single"] = figure
        print(f"scrape (generate_latest, mean of {SCRAPES})")
        print(f"  single process      {figure['scrape_ms']:7.2f} ms  ({figure['scrape_bytes']} B)")
        for workers in args.scrape_workers:
            with tempfile.TemporaryDirectory(prefix="bench-metrics-") as directory:
                for index in range(workers):  # each worker's files, as after the same traffic
                    last = index == workers - 1
                    figure = run_child("multiprocess", 2000, directory, last, args.seed + index)
            scrapes[f"multiprocess-{workers}"] = figure
            ratio = figure["scrape_ms"] / scrapes["single"]["scrape_ms"]
            print(
                f"  {workers:2d} workers' files   {figure['scrape_ms']:7.2f} ms  "
                f"({figure['scrape_bytes']} B; ÷ single {ratio:.1f})"
            )
    if args.json:
        document = {
            "requests": args.requests,
            "rounds": args.rounds,
            "us_per_request": per_request,
            "median_us": {"single": single, "multiprocess": multi},
            "ratio": multi / single,
            "scrape": scrapes,
        }
        args.json.write_text(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()

"""What the metrics path costs per request, one process against ``--workers`` (multiprocess).

Per request the guard does ``in_flight.inc()``, :meth:`GuardMetrics.observe` (the
requests counter, the request and upstream histograms, one stage histogram per stage)
and ``in_flight.dec()``. This times exactly that, for a request through the default
policy's five ``digits`` stages with latencies drawn from a seeded generator, in three
modes, each in a fresh interpreter (prometheus_client picks its value class once per
process):

``single``   one process: values in memory on the injected registry (the baseline)
``flushed``  a worker of ``guard serve --workers N``: values in memory, written to the
             worker's multiprocess files by a flush (:mod:`guard.workerfiles`), here
             once a second of the timed loop as the worker does (the flush included)
``mmap``     prometheus_client's own multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``
             set before import): every value written through to the worker's
             memory-mapped file as it changes (what the guard does not use)

Rounds rotate the modes; each figure is the median over ``--rounds`` of the mean CPU
time (``time.process_time``: the machine may be shared) per request over
``--requests``. The scrape is timed too: ``generate_latest`` of one
process's registry against the aggregated registry of ``W`` workers' files (each worker
having served the same traffic), for each ``--scrape-workers W``.

    PYTHONPATH=. python tests/benchmarks/bench_metrics.py [--requests 50000] [--rounds 7]
        [--scrape-workers 2 --scrape-workers 16] [--json out.json]     # ~1 minute
"""

from __future__ import annotations

import argparse
import json
import os
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
    from guard.metrics import GuardMetrics
    from guard.pipeline import RequestContext
    from guard.workerfiles import FLUSH_S, use_worker_files

    files = None
    if mode != "single" and directory is None:
        raise SystemExit(f"bench_metrics: --child {mode} needs --dir")
    folder = directory or ""
    if mode == "flushed":
        files = use_worker_files(folder)
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
    started = time.process_time()  # CPU time: the machine is shared, wall time is not ours
    flushed_at = time.perf_counter()
    for i in range(requests):
        ctx, seconds = contexts[i % len(contexts)]
        in_flight.inc()
        observe(ctx, protocol="v2", code=200, seconds=seconds)
        in_flight.dec()
        if files is not None and i % 256 == 0 and time.perf_counter() - flushed_at > FLUSH_S:
            files.flush()
            flushed_at = time.perf_counter()
    if files is not None:
        files.flush()
    result: dict[str, Any] = {"us_per_request": (time.process_time() - started) / requests * 1e6}
    if files is not None:
        started = time.process_time()
        for _ in range(SCRAPES):
            files.flush()
        result["flush_us"] = (time.process_time() - started) / SCRAPES * 1e6
    if scrape:
        flush = files.flush if files is not None else None
        registry = metrics.registry if mode == "single" else metrics.aggregate(folder, flush)
        size = len(generate_latest(registry))
        started = time.process_time()
        for _ in range(SCRAPES):
            generate_latest(registry)
        result["scrape_ms"] = (time.process_time() - started) / SCRAPES * 1e3
        result["scrape_bytes"] = size
    return result


def run_child(mode: str, requests: int, directory: str | None, scrape: bool, seed: int) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--requests", str(requests)]
    command += ["--seed", str(seed)] + (["--dir", directory] if directory else [])
    command += ["--scrape"] if scrape else []
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    if mode == "mmap":  # prometheus_client's own switch, read when it is imported
        env["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True, env=env)
    return dict(json.loads(done.stdout))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=50000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--scrape-workers", type=int, action="append")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", choices=("single", "flushed", "mmap"), help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--scrape", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.requests, args.dir, args.scrape, args.seed)))
        return

    modes = ("single", "flushed", "mmap")
    per_request: dict[str, list[float]] = {mode: [] for mode in modes}
    flush_us: list[float] = []
    for round_ in range(args.rounds):
        for mode in modes[round_ % 3 :] + modes[: round_ % 3]:
            with tempfile.TemporaryDirectory(prefix="bench-metrics-") as directory:
                figure = run_child(mode, args.requests, directory, False, args.seed + round_)
            per_request[mode].append(figure["us_per_request"])
            if mode == "flushed":
                flush_us.append(figure["flush_us"])
    median = {mode: statistics.median(per_request[mode]) for mode in modes}
    print(
        f"metrics path, CPU per request ({len(STAGES)} stages, {args.requests} requests, "
        f"median of {args.rounds} rounds; load average {os.getloadavg()[0]:.2f})"
    )
    for mode in modes:
        rounds = ", ".join(f"{v:.2f}" for v in per_request[mode])
        ratio = median[mode] / median["single"]
        print(f"  {mode:8s} {median[mode]:7.2f} µs  ÷ single {ratio:4.2f}   (rounds: {rounds})")
    print(f"  one flush of a worker's files: {statistics.median(flush_us):.1f} µs (once a second)")

    scrapes: dict[str, Any] = {}
    if args.scrape_workers:
        figure = run_child("single", 2000, None, True, args.seed)
        scrapes["single"] = figure
        print(f"scrape (generate_latest, CPU, mean of {SCRAPES})")
        print(f"  single process      {figure['scrape_ms']:7.2f} ms  ({figure['scrape_bytes']} B)")
        for workers in args.scrape_workers:
            with tempfile.TemporaryDirectory(prefix="bench-metrics-") as directory:
                for index in range(workers):  # each worker's files, as after the same traffic
                    last = index == workers - 1
                    figure = run_child("flushed", 2000, directory, last, args.seed + index)
            scrapes[f"workers-{workers}"] = figure
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
            "median_us": median,
            "ratio_to_single": {mode: median[mode] / median["single"] for mode in modes},
            "flush_us": flush_us,
            "scrape": scrapes,
        }
        args.json.write_text(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()

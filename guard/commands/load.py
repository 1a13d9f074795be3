"""``guard load``: drive a deployment at a fixed request rate and report what it did.

Open-loop pacing (latency counted from each request's scheduled send time, so a
stall is not hidden by coordinated omission), inputs from the demo models'
held-out samples; prints throughput, latency percentiles, status codes and
errors, and with ``--json`` writes them. Exit status 1 when any request went
unanswered or was answered with a 5xx; 2 for bad arguments. See
:mod:`guard.loadgen` and docs/deployment.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

# guard.loadgen's PROTOCOLS and INPUTS (a test keeps them equal): that module imports
# aiohttp and numpy, which building the parser of every other command must not pay for.
PROTOCOLS = ("v2", "v2-binary", "tf")
INPUTS = ("samples", "blend")


def add_parser(commands: Any) -> None:
    from guard.models import MODELS

    parser = commands.add_parser(
        "load",
        help="open-loop load against a deployment: throughput, latency, status codes",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("url", help="the deployment's base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", required=True, help="model name the deployment serves")
    parser.add_argument("--rate", type=float, default=100.0, help="requests per second (100)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds (10)")
    parser.add_argument("--connections", type=int, default=32, help="keep-alive connections (32)")
    parser.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="v2",
        help="V2 JSON, V2 with the binary tensor extension, or TF Serving REST (default: v2)",
    )
    parser.add_argument(
        "--clients",
        type=int,
        default=1,
        help="distinct clients as X-Forwarded-For addresses (needs trust_forwarded_for)",
    )
    parser.add_argument(
        "--api-key", action="append", default=[], help="API key (repeat to rotate several)"
    )
    parser.add_argument(
        "--key-header", default="X-API-Key", help="header carrying --api-key (X-API-Key)"
    )
    parser.add_argument(
        "--samples", choices=MODELS, help="built-in data set to draw inputs from (default: --model)"
    )
    parser.add_argument(
        "--inputs",
        choices=INPUTS,
        default="samples",
        help="held-out samples in order, or a random blend of two per request",
    )
    parser.add_argument("--batch", type=int, default=1, help="rows per request (1)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per request (10)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the input order and blends (default: 0)"
    )
    parser.add_argument("--insecure", action="store_true", help="do not verify TLS certificates")
    parser.add_argument("--json", type=Path, help="also write the report as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from guard.loadgen import LoadConfig, run_load
    from guard.models import MODELS

    samples = args.samples or args.model
    if samples not in MODELS:
        print(
            f"guard load: model {args.model!r} is not a built-in data set; "
            f"name one with --samples ({', '.join(MODELS)})",
            file=sys.stderr,
        )
        return 2
    config = LoadConfig(
        url=args.url,
        model=args.model,
        rate=args.rate,
        duration=args.duration,
        connections=args.connections,
        protocol=args.protocol,
        clients=args.clients,
        api_keys=tuple(args.api_key),
        key_header=args.key_header,
        samples=samples,
        inputs=args.inputs,
        batch=args.batch,
        timeout=args.timeout,
        seed=args.seed,
        verify_tls=not args.insecure,
    )
    try:
        config.check()
    except ValueError as exc:
        print(f"guard load: {exc}", file=sys.stderr)
        return 2
    report = _run(_with_progress(run_load(config), config.duration))
    print("\n".join(report.lines()))
    if args.json:
        args.json.write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    return 1 if report.failed else 0


async def _with_progress(coro: Any, duration: float) -> Any:
    """Run ``coro`` under a bar of the seconds of the run (stderr, on a terminal only)."""
    import time

    from guard.progress import Progress

    with Progress("load", duration, unit=" s") as bar:
        if not bar.enabled:
            return await coro
        started = time.monotonic()

        async def tick() -> None:
            while True:
                bar.update(round(min(time.monotonic() - started, duration), 1))
                await asyncio.sleep(0.2)

        ticker = asyncio.create_task(tick())
        try:
            return await coro
        finally:
            ticker.cancel()
            bar.update(duration)


def _run(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)

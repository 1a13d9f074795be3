"""gRPC beside REST: throughput and latency of one guard serving both, default policy.

One ``guard serve --grpc-port`` process runs the built-in default policy
(``guard/policies/default.yaml``: validate, privacy, budget, Blacklight, provenance,
PRADA, coverage on ``digits``) with its quotas raised (the ``budget`` stage's limits
and the privacy budget: the run measures the pipeline's cost, not a quota's 429s).
Every request carries a fresh input (64 values drawn uniformly from [0, 16] by a
seeded numpy Generator, never repeated within or across rounds), batch 1, so the
detectors do their full work and no answer comes from a repeat. Targets, each
driven by a load generator in its own process with ``--concurrency`` requests in
flight:

``rest``         V2 REST, JSON tensors (aiohttp client, keep-alive connections)
``rest-binary``  V2 REST, binary tensor extension (input and outputs binary)
``grpc``         V2 gRPC ``ModelInfer`` with ``raw_input_contents`` (one grpc.aio channel)

Rounds are interleaved (rest, rest-binary, grpc, rest, ...) after a warm-up of each,
so background load on a shared machine is shared out. Per target: the median over
rounds of req/s, p50 and p99 latency, and the guard process's CPU time per request
(Linux ``/proc``); the figures are the ratios against ``rest`` measured in this run.

    python tests/benchmarks/bench_grpc.py [--seconds 5] [--rounds 3] [--concurrency 16]
        [--loop uvloop|asyncio] [--policy base.yaml] [--json out.json]

``--policy`` swaps the base policy (quotas raised the same way; its ``digits`` model
is served), e.g. a validate-only one to see the front ends' own cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[2]
POLICY = ROOT / "guard" / "policies" / "default.yaml"
TARGETS = ("rest", "rest-binary", "grpc")
UNLIMITED = 1_000_000_000
METHOD = "/inference.GRPCInferenceService/ModelInfer"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bench_policy(directory: Path, base: Path = POLICY) -> Path:
    """``base`` with its quotas raised; the digits model only."""
    document: dict[str, Any] = yaml.safe_load(base.read_text())
    document["models"] = {"digits": document["models"]["digits"]}
    for stage in document["models"]["digits"]["stages"]:
        if "budget" in stage:
            stage["budget"]["limits"] = [
                {"queries": UNLIMITED, "per": q["per"]} for q in stage["budget"]["limits"]
            ]
        if "privacy" in stage and "budget" in stage["privacy"]:
            stage["privacy"]["budget"]["epsilon"] = UNLIMITED
    path = directory / "policy.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


# -- load generators (run in their own process: ``--worker TARGET``) -----------------


def inputs(seed: int, count: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.0, 16.0, (count, 64)).astype(np.float32)


def bodies(target: str, x: np.ndarray) -> list[tuple[bytes, dict[str, str]]]:
    import orjson

    out: list[tuple[bytes, dict[str, str]]] = []
    for row in x:
        if target == "rest":
            doc = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32"}]}
            doc["inputs"][0]["data"] = row.tolist()
            out.append((orjson.dumps(doc), {"Content-Type": "application/json"}))
        elif target == "rest-binary":
            doc = {
                "inputs": [
                    {
                        "name": "input",
                        "shape": [1, 64],
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": 256},
                    }
                ],
                "parameters": {"binary_data_output": True},
            }
            head = orjson.dumps(doc)
            headers = {"Inference-Header-Content-Length": str(len(head))}
            out.append((head + row.astype("<f4").tobytes(), headers))
        else:
            from guard.protocols.grpc import inference_pb2 as pb

            message = pb.ModelInferRequest(model_name="digits")
            message.inputs.add(name="input", datatype="FP32", shape=[1, 64])
            message.raw_input_contents.append(row.astype("<f4").tobytes())
            out.append((message.SerializeToString(), {}))
    return out


async def drive(
    target: str, url: str, seconds: float, concurrency: int, seed: int
) -> dict[str, Any]:
    x = inputs(seed, max(20_000, int(seconds * 4000)))
    work = bodies(target, x)
    latencies: list[float] = []
    errors = 0
    next_index = 0
    deadline = 0.0

    async def loop_rest(session: Any) -> None:
        nonlocal errors, next_index
        while time.perf_counter() < deadline and next_index < len(work):
            body, headers = work[next_index]
            next_index += 1
            started = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as reply:
                await reply.read()
                if reply.status != 200:
                    errors += 1
            latencies.append(time.perf_counter() - started)

    async def loop_grpc(call: Any) -> None:
        nonlocal errors, next_index
        import grpc

        while time.perf_counter() < deadline and next_index < len(work):
            body = work[next_index][0]
            next_index += 1
            started = time.perf_counter()
            try:
                await call(body)
            except grpc.aio.AioRpcError:
                errors += 1
            latencies.append(time.perf_counter() - started)

    if target == "grpc":
        import grpc

        async with grpc.aio.insecure_channel(url) as channel:
            call = channel.unary_unary(METHOD)
            began = time.perf_counter()
            deadline = began + seconds
            await asyncio.gather(*(loop_grpc(call) for _ in range(concurrency)))
            elapsed = time.perf_counter() - began
    else:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:
            began = time.perf_counter()
            deadline = began + seconds
            await asyncio.gather(*(loop_rest(session) for _ in range(concurrency)))
            elapsed = time.perf_counter() - began
    ordered = sorted(latencies)
    return {
        "requests": len(latencies),
        "errors": errors,
        "seconds": elapsed,
        "p50_ms": 1000 * ordered[len(ordered) // 2] if ordered else float("nan"),
        "p99_ms": 1000 * ordered[int(len(ordered) * 0.99)] if ordered else float("nan"),
    }


def worker(args: argparse.Namespace) -> int:
    result = asyncio.run(drive(args.worker, args.url, args.seconds, args.concurrency, args.seed))
    print(json.dumps(result))
    return 0


# -- the run ---------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"guard exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=1) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise SystemExit("guard did not become ready")


def run_worker(target: str, url: str, seconds: float, concurrency: int, seed: int) -> Any:
    command = [sys.executable, __file__, "--worker", target, "--url", url]
    command += ["--seconds", str(seconds), "--concurrency", str(concurrency)]
    command += ["--seed", str(seed)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"load generator for {target} failed:\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per target and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--policy", type=Path, default=POLICY, help="base policy (default: the built-in default)"
    )
    parser.add_argument("--worker", choices=TARGETS, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    urls = {
        "rest": f"http://127.0.0.1:{port}/v2/models/digits/infer",
        "rest-binary": f"http://127.0.0.1:{port}/v2/models/digits/infer",
        "grpc": f"127.0.0.1:{grpc_port}",
    }
    with tempfile.TemporaryDirectory() as tmp:
        policy = bench_policy(Path(tmp), args.policy)
        command = [sys.executable, "-m", "guard.cli", "serve", "--policy", str(policy)]
        command += ["--port", str(port), "--grpc-port", str(grpc_port)]
        command += ["--metrics-port", str(metrics_port), "--loop", args.loop]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        guard = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            wait_ready(f"http://127.0.0.1:{port}", guard)
            seed = 1
            for target in TARGETS:
                run_worker(target, urls[target], args.warmup, args.concurrency, seed)
                seed += 1
            rounds: dict[str, list[dict[str, Any]]] = {t: [] for t in TARGETS}
            for _ in range(args.rounds):
                for target in TARGETS:
                    before = cpu_seconds(guard.pid)
                    result = run_worker(target, urls[target], args.seconds, args.concurrency, seed)
                    result["cpu_us_per_request"] = (
                        1e6 * (cpu_seconds(guard.pid) - before) / max(result["requests"], 1)
                    )
                    rounds[target].append(result)
                    seed += 1
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as reply:
                metrics = reply.read().decode()
        finally:
            guard.terminate()
            guard.wait(timeout=30)

    table: dict[str, dict[str, float]] = {}
    for target, runs in rounds.items():
        table[target] = {
            "rps": statistics.median(r["requests"] / r["seconds"] for r in runs),
            "p50_ms": statistics.median(r["p50_ms"] for r in runs),
            "p99_ms": statistics.median(r["p99_ms"] for r in runs),
            "cpu_us_per_request": statistics.median(r["cpu_us_per_request"] for r in runs),
            "errors": sum(r["errors"] for r in runs),
            "requests": sum(r["requests"] for r in runs),
        }
    rest = table["rest"]
    figures = {
        "grpc_rps_over_rest": table["grpc"]["rps"] / rest["rps"],
        "grpc_rps_over_rest_binary": table["grpc"]["rps"] / table["rest-binary"]["rps"],
        "grpc_cpu_over_rest": table["grpc"]["cpu_us_per_request"] / rest["cpu_us_per_request"],
        "rest_binary_rps_over_rest": table["rest-binary"]["rps"] / rest["rps"],
    }
    verdicts = [
        line
        for line in metrics.splitlines()
        if line.startswith("guard_requests_total{") or line.startswith("guard_findings_total{")
    ]
    load = os.getloadavg()
    print(
        f"### {args.loop}, {args.concurrency} in flight, {args.rounds} rounds of "
        f"{args.seconds:g} s, policy {args.policy.name}; load average {load[0]:.2f} on "
        f"{os.cpu_count()} CPUs\n"
    )
    print("| target | req/s | p50 ms | p99 ms | guard CPU µs/req | requests | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for target, row in table.items():
        print(
            f"| {target} | {row['rps']:.0f} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | "
            f"{row['cpu_us_per_request']:.0f} | {row['requests']} | {row['errors']} |"
        )
    print("\n| figure | value |\n|---|---:|")
    for name, value in figures.items():
        print(f"| {name} | {value:.2f} |")
    print("\nguard's counters at the end (warm-up included):")
    for line in verdicts:
        print("   ", line)
    if args.json:
        report = {"targets": table, "figures": figures, "rounds": rounds, "counters": verdicts}
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

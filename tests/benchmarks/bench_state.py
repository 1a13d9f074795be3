"""What the shared state costs: throughput of one guard on memory, one Redis and a
three-node Redis Cluster, and the Redis work each request makes, by policy.

For each policy (``default``: ``policies/default.yaml``'s ``digits`` model, every
stage; ``budget`` and ``blacklight``: its validate and that one stage) and each backend:

``memory``     the in-process store (the baseline)
``redis``      one ``redis-server`` on loopback
``cluster``    three ``redis-server --cluster-enabled yes`` joined by ``redis-cli``,
               fingerprint tables in 3 shards (the default with ``cluster: true``)
``cluster-N``  the same cluster, fingerprint tables in N shards (``cluster-1``: one slot)
``cluster-client``  the same cluster, each client's fingerprints in its own slot
               (``fingerprint_scope: client``)

a ``guard serve`` process is driven by ``guard.loadgen`` (open loop, API keys of 64
clients rotated, ``blend`` inputs: distinct queries) at ``--rate`` for ``--duration``
seconds. Reported per run: answered req/s and p50/p99, the guard's CPU per request
(``/proc``), and from every Redis node after ``CONFIG RESETSTAT``: commands per
request by name (``INFO commandstats``; an ``evalsha`` is one script run) and Redis
CPU per request (``INFO cpu``, main thread and I/O together), summed over the nodes
and on the busiest node. Throughput is reported as a ratio to ``memory`` in the same run.

    PYTHONPATH=. python tests/benchmarks/bench_state.py [--duration 8] [--rate 400]
        [--policy default] [--policy budget] [--backend memory] ... [--json out.json]

Runs every server as its own process and stops them all however it ends. Needs
``redis-server`` and ``redis-cli`` (the ``redis-server`` package).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from guard.clients import key_digest  # noqa: E402
from guard.loadgen import LoadConfig, run_load  # noqa: E402
from tests.integration.redis_server import (  # noqa: E402
    HOST,
    RedisServer,
    _free_port,
    redis_cli,
    redis_executable,
    running_cluster,
    running_redis,
)

# and cluster-N: N fingerprint shards; cluster-client: fingerprint_scope client
BACKENDS = ("memory", "redis", "cluster", "cluster-1", "cluster-client")
POLICIES = ("default", "budget", "blacklight")
CLIENTS = 64
BLACKLIGHT_ENV = "GUARD_BENCH_BLACKLIGHT_KEY"


@dataclass(frozen=True, slots=True)
class Result:
    policy: str
    backend: str
    answered: int
    rps: float
    p50_ms: float
    p99_ms: float
    statuses: dict[str, int]
    guard_cpu_us: float  # guard process CPU per answered request
    redis_commands: dict[str, float]  # per answered request, by command
    redis_cpu_us: float  # all nodes together, per answered request
    redis_cpu_us_busiest: float  # the busiest node, per answered request


def policy_document(name: str, state: dict[str, Any]) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((ROOT / "policies" / "default.yaml").read_text())
    digits = document["models"]["digits"]
    if name != "default":
        keep = {"validate", name}
        digits["stages"] = [stage for stage in digits["stages"] if keep & set(stage)]
    for stage in digits["stages"]:
        if "blacklight" in stage:
            stage["blacklight"]["key_env"] = BLACKLIGHT_ENV
    document["models"] = {"digits": digits}
    document["state"] = state
    document["clients"] = {"keys_file": "keys.yaml"}
    document.pop("listen", None)
    return document


def guard_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def running_guard(workdir: Path, document: dict[str, Any]) -> Iterator[tuple[str, int]]:
    keys = {f"client{i}": f"bench-key-{i}" for i in range(CLIENTS)}
    entries = {name: {"key_sha256": key_digest(k)} for name, k in keys.items()}
    (workdir / "keys.yaml").write_text(yaml.safe_dump({"clients": entries}))
    (workdir / "policy.yaml").write_text(yaml.safe_dump(document))
    port = _free_port()
    env = os.environ | {BLACKLIGHT_ENV: "bench secret", "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-c", "import sys; from guard.cli import main; sys.exit(main())",
            "serve", "--policy", str(workdir / "policy.yaml"),
            "--port", str(port), "--metrics-port", "off", "--workers", "1"]  # fmt: skip
    log = (workdir / "guard.log").open("wb")
    process = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://{HOST}:{port}/v2/health/ready", timeout=1):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((workdir / "guard.log").read_text()[-3000:]) from None
                time.sleep(0.2)
        yield f"http://{HOST}:{port}", process.pid
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def node_stats(nodes: list[RedisServer]) -> list[tuple[dict[str, int], float]]:
    """Per node: calls by command, and CPU seconds (main thread and I/O threads)."""
    out = []
    for node in nodes:
        with node.client() as client:
            stats = client.info("commandstats")
            cpu = client.info("cpu")
        calls = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}
        out.append((calls, float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])))
    return out


def measure(
    policy: str, backend: str, nodes: list[RedisServer], state: dict[str, Any], args: Any
) -> Result:
    with (
        tempfile.TemporaryDirectory() as tmp,
        running_guard(Path(tmp), policy_document(policy, state)) as (url, pid),
    ):
        keys = [f"bench-key-{i}" for i in range(CLIENTS)]
        config = LoadConfig(url=url, model="digits", rate=args.rate, duration=args.warmup,
                            connections=16, api_keys=keys, inputs="blend", seed=1)  # fmt: skip
        asyncio.run(run_load(config))  # warm-up: sessions, scripts, slot maps
        for node in nodes:
            with node.client() as client:
                client.config_resetstat()
        before = node_stats(nodes)
        cpu0 = guard_cpu_seconds(pid)
        measured = LoadConfig(url=url, model="digits", rate=args.rate, duration=args.duration,
                              connections=16, api_keys=keys, inputs="blend", seed=2)  # fmt: skip
        report = asyncio.run(run_load(measured))
        cpu1 = guard_cpu_seconds(pid)
        after = node_stats(nodes)
    n = max(report.answered, 1)
    commands: dict[str, float] = {}
    for (calls, _), (_, _) in zip(after, before, strict=True):
        for name, count in calls.items():
            if name not in ("info", "config|resetstat", "config", "cluster|slots", "ping"):
                commands[name] = commands.get(name, 0.0) + count / n
    cpu = [a[1] - b[1] for a, b in zip(after, before, strict=True)]
    return Result(
        policy=policy,
        backend=backend,
        answered=report.answered,
        rps=report.throughput,
        p50_ms=report.latency_ms.get("p50", float("nan")),
        p99_ms=report.latency_ms.get("p99", float("nan")),
        statuses=report.statuses,
        guard_cpu_us=(cpu1 - cpu0) / n * 1e6,
        redis_commands={k: round(v, 3) for k, v in sorted(commands.items())},
        redis_cpu_us=sum(cpu) / n * 1e6,
        redis_cpu_us_busiest=max(cpu, default=0.0) / n * 1e6,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds (8)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds (2)")
    parser.add_argument("--rate", type=float, default=400.0, help="offered req/s (400)")
    parser.add_argument("--policy", action="append", choices=POLICIES)
    parser.add_argument("--backend", action="append", help=f"{', '.join(BACKENDS)} or cluster-N")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    policies, backends = args.policy or list(POLICIES), args.backend or list(BACKENDS)
    redis_executable(), redis_cli()  # fail early without them
    results: list[Result] = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        (Path(tmp) / "single").mkdir()
        (Path(tmp) / "cluster").mkdir()
        single = (
            stack.enter_context(running_redis(Path(tmp) / "single"))
            if "redis" in backends
            else None
        )
        cluster = (
            stack.enter_context(running_cluster(Path(tmp) / "cluster"))
            if any(b.startswith("cluster") for b in backends)
            else None
        )
        for policy in policies:
            for backend in backends:
                nodes: list[RedisServer] = []
                state: dict[str, Any] = {"backend": "memory"}
                if backend == "redis" and single is not None:
                    single.flush()
                    nodes, state = [single], {"backend": "redis", "url": single.url}
                elif cluster is not None and backend.startswith("cluster"):
                    cluster.flush()
                    nodes = cluster.nodes
                    state = {"backend": "redis", "url": cluster.url, "cluster": True}
                    if backend == "cluster-client":
                        state["fingerprint_scope"] = "client"
                    elif backend != "cluster":
                        state["fingerprint_shards"] = int(backend.removeprefix("cluster-"))
                result = measure(policy, backend, nodes, state, args)
                results.append(result)
                print(json.dumps(asdict(result)), flush=True)
    print()
    print(f"offered {args.rate:g} req/s for {args.duration:g} s, 16 connections, {CLIENTS} clients")
    print(
        "policy   backend    req/s  x memory  p50 ms  p99 ms  guard µs/req  redis µs/req "
        "(busiest node)  commands/req"
    )
    for r in results:
        base = next((b for b in results if b.policy == r.policy and b.backend == "memory"), None)
        ratio = f"{r.rps / base.rps:7.2f}" if base else "      -"  # memory not measured
        total = sum(r.redis_commands.values())
        top = ", ".join(f"{k} {v:.2f}" for k, v in r.redis_commands.items() if v >= 0.01)
        print(f"{r.policy:8} {r.backend:9} {r.rps:7.1f}  {ratio}  {r.p50_ms:6.1f}"
              f"  {r.p99_ms:6.1f}  {r.guard_cpu_us:12.0f}  {r.redis_cpu_us:7.0f} "
              f"({r.redis_cpu_us_busiest:4.0f})  {total:.2f}: {top}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the guard costs on the wire: throughput and latency against a bare proxy.

One run, one load generator, V2 JSON infer requests (batch 1, the first of the
64-float ``digits`` samples) on loopback against:

``direct``       a guard serving ``digits`` embedded with no stages (the backend)
``passthrough``  ``passthrough.py``, a bare aiohttp proxy, in front of ``direct``
``guard``        the guard with the ``validate`` stage, ``direct`` as its HTTP upstream
``embedded``     the guard with ``validate`` serving ``digits`` itself (no hop)

Every server is its own process, started on the event loop under test; all of them
are stopped when the run ends, however it ends (and, on Linux, when this process
dies). The load generator is ``wrk`` when it is on the PATH (percentiles read from
its latency histogram by a Lua ``done`` hook), else a Python one (asyncio + aiohttp,
N keep-alive connections, in its own process); the report names which.

Each target gets a warm-up run, then ``--rounds`` measured runs interleaved with
the other targets' (so a change in background load is shared out, not pinned on
one target). Per target, the median over the rounds of: req/s, p50, p99, and the
CPU time its process spent per request (Linux ``/proc``).

    python tests/benchmarks/bench_proxy.py [--duration 10] [--connections 16]
        [--loop uvloop] [--loop asyncio] [--rounds 5] [--generator auto|wrk|python]
        [--pin] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

ROOT = Path(__file__).resolve().parents[2]
PASSTHROUGH = Path(__file__).resolve().with_name("passthrough.py")
INFER = "/v2/models/digits/infer"
TARGETS = ("direct", "passthrough", "guard", "embedded")
ADDED_P50_MS = 0.5  # the guard's targets: p50 added latency at 1 connection ...
THROUGHPUT_RATIO = 0.80  # ... and throughput relative to the pass-through at N connections
VALIDATE = {"validate": {"min": 0.0, "max": 16.0}}


@dataclass(frozen=True, slots=True)
class Run:
    """One load-generator run against one target."""

    requests: int
    errors: int  # connect, read, write and timeout errors, and non-2xx answers
    seconds: float
    p50_ms: float
    p99_ms: float


@dataclass(frozen=True, slots=True)
class Measurement:
    loop: str
    connections: int
    target: str
    rounds: int
    requests: int
    errors: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_request: float | None  # the target's own process; None off Linux

    def line(self) -> str:
        return (
            f"  {self.loop:8} c={self.connections:<3} {self.target:12} {self.rps:7.0f} req/s  "
            f"p50 {self.p50_ms:7.3f} ms  p99 {self.p99_ms:7.3f} ms  errors {self.errors}"
        )


@dataclass(frozen=True, slots=True)
class Server:
    url: str
    pid: int


# -- servers ------------------------------------------------------------------


def _die_with_parent() -> None:
    """In a child: be sent SIGTERM when the benchmark dies, even by SIGKILL (Linux)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Servers:
    """The server processes of one run; :meth:`stop_all` ends every one of them."""

    def __init__(self, workdir: Path, cpus: set[int] | None) -> None:
        self.workdir = workdir
        self.cpus = cpus
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str], port: int) -> Server:
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        cpus = self.cpus

        def setup() -> None:
            _die_with_parent()
            if cpus:
                os.sched_setaffinity(0, cpus)

        with (self.workdir / f"{name}.log").open("wb") as log:
            self.procs[name] = subprocess.Popen(
                argv,
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": path},
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=setup,
            )
        server = Server(f"http://127.0.0.1:{port}", self.procs[name].pid)
        self._wait_ready(name, server.url)
        return server

    def _wait_ready(self, name: str, url: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs[name].poll() is not None:
                raise RuntimeError(
                    f"{name} exited with {self.procs[name].returncode}:\n{self.log_tail(name)}"
                )
            try:
                with urllib.request.urlopen(url + "/v2/health/ready", timeout=1) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{name} not ready at {url} after {timeout:g} s:\n{self.log_tail(name)}")

    def log_tail(self, name: str, lines: int = 20) -> str:
        text = (self.workdir / f"{name}.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 5.0
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()


@contextmanager
def servers(
    workdir: Path, loop: str, targets: Sequence[str], cpus: set[int] | None
) -> Iterator[dict[str, Server]]:
    """Start ``targets`` (and ``direct``, their upstream) on ``loop``; stop them all on exit."""
    running = Servers(workdir, cpus)
    started: dict[str, Server] = {}
    try:
        for target in ("direct", *(t for t in targets if t != "direct")):
            port = free_port()
            upstream = started["direct"].url if started else ""
            argv = _command(target, workdir, port, loop, upstream)
            started[target] = running.start(target, argv, port)
        yield {t: started[t] for t in targets}
    finally:
        running.stop_all()


def _command(target: str, workdir: Path, port: int, loop: str, upstream: str) -> list[str]:
    """The command line serving ``target`` on ``port``; ``upstream`` is the direct server."""
    serve = ["--port", str(port), "--loop", loop]
    if target == "passthrough":
        return [sys.executable, str(PASSTHROUGH), "--upstream", upstream, *serve]
    model: dict[str, object] = {"stages": [] if target == "direct" else [VALIDATE]}
    if target == "guard":
        model["upstream"] = {"url": upstream}
    else:
        model["model"] = "builtin:digits"
    policy = workdir / f"{target}.json"  # JSON is YAML
    policy.write_text(json.dumps({"version": 1, "models": {"digits": model}}))
    return [
        sys.executable,
        "-m",
        "guard.cli",
        "--log-level",
        "warning",
        "serve",
        "--policy",
        str(policy),
        *serve,
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of process ``pid`` (all its threads), from ``/proc``; None elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # the command name may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def request_body() -> bytes:
    from guard.models import load_samples

    x = load_samples("digits")[0][:1]
    tensor = {
        "name": "input",
        "shape": list(x.shape),
        "datatype": "FP32",
        "data": x.ravel().tolist(),
    }
    return json.dumps({"inputs": [tensor]}).encode()


def check_answers(running: dict[str, Server], body: bytes) -> None:
    """Every target answers 200 with the same label, or the run stops."""
    labels = {}
    for target, server in running.items():
        req = urllib.request.Request(
            server.url + INFER, data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=5) as reply:
            outputs = json.loads(reply.read())["outputs"]
        labels[target] = next(o["data"] for o in outputs if o["name"] == "label")
    if len({json.dumps(v) for v in labels.values()}) != 1:
        raise RuntimeError(f"targets disagree: {labels}")


# -- load generators ----------------------------------------------------------

WRK_SCRIPT = """\
wrk.method = "POST"
wrk.body = [==[{body}]==]
wrk.headers["Content-Type"] = "application/json"

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("WRK_RESULT %d %d %d %.3f %.3f\\n",
    summary.requests, summary.duration, e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50.0), latency:percentile(99.0)))
end
"""


def _taskset(cpus: set[int] | None) -> list[str]:
    return ["taskset", "-c", ",".join(map(str, sorted(cpus)))] if cpus else []


class Generator(Protocol):
    name: str

    def run(self, url: str, connections: int, seconds: int) -> Run: ...


class Wrk:
    """``wrk`` with one thread (the machine this targets has 2 cores)."""

    def __init__(self, workdir: Path, body: bytes, cpus: set[int] | None) -> None:
        self.script = workdir / "post.lua"
        self.script.write_text(WRK_SCRIPT.format(body=body.decode()))
        self.prefix = _taskset(cpus)
        version = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
        self.name = (version.stdout or version.stderr).split("Copyright")[0].strip() or "wrk"

    def run(self, url: str, connections: int, seconds: int) -> Run:
        argv = [
            *self.prefix,
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            "--timeout",
            "10s",
            "-s",
            str(self.script),
            url + INFER,
        ]
        out = subprocess.run(
            argv, capture_output=True, text=True, check=True, preexec_fn=_die_with_parent
        ).stdout
        line = next((ln for ln in out.splitlines() if ln.startswith("WRK_RESULT ")), None)
        if line is None:
            raise RuntimeError(f"wrk printed no result:\n{out}")
        requests, duration_us, errors, p50_us, p99_us = line.split()[1:]
        return Run(
            int(requests),
            int(errors),
            int(duration_us) / 1e6,
            float(p50_us) / 1e3,
            float(p99_us) / 1e3,
        )


class PythonLoad:
    """asyncio + aiohttp load from a separate process (``bench_proxy.py loadgen ...``)."""

    name = "python (asyncio + aiohttp, uvloop when installed)"

    def __init__(self, workdir: Path, body: bytes, cpus: set[int] | None) -> None:
        self.body_file = workdir / "body.json"
        self.body_file.write_bytes(body)
        self.prefix = _taskset(cpus)

    def run(self, url: str, connections: int, seconds: int) -> Run:
        argv = [
            *self.prefix,
            sys.executable,
            __file__,
            "loadgen",
            url + INFER,
            str(self.body_file),
            str(connections),
            str(seconds),
        ]
        out = subprocess.run(
            argv, capture_output=True, text=True, check=True, preexec_fn=_die_with_parent
        ).stdout
        return Run(**json.loads(out))


async def _load(url: str, body: bytes, connections: int, seconds: float) -> Run:
    import aiohttp
    import numpy as np

    latencies: list[float] = []
    errors = 0
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections)) as session:
        started = time.perf_counter()
        deadline = started + seconds

        async def worker() -> None:
            nonlocal errors
            while (sent := time.perf_counter()) < deadline:
                try:
                    async with session.post(url, data=body, headers=headers) as reply:
                        await reply.read()
                        errors += reply.status >= 300
                except aiohttp.ClientError:
                    errors += 1
                latencies.append(time.perf_counter() - sent)

        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - started
    p50, p99 = (
        (float(p) for p in np.percentile(np.array(latencies) * 1e3, [50, 99]))
        if latencies
        else (math.nan,) * 2
    )
    return Run(len(latencies), errors, elapsed, p50, p99)


def loadgen_main(argv: Sequence[str]) -> int:
    url, body_file, connections, seconds = argv
    coro = _load(url, Path(body_file).read_bytes(), int(connections), float(seconds))
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(coro)
    else:
        result = uvloop.run(coro)
    print(json.dumps(asdict(result)))
    return 0


# -- the run ------------------------------------------------------------------


def benchmark(args: argparse.Namespace, workdir: Path) -> tuple[str, list[Measurement]]:
    body = request_body()
    server_cpus = load_cpus = None
    if args.pin:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            raise SystemExit("--pin needs at least 2 CPUs")
        load_cpus, server_cpus = {cpus[0]}, set(cpus[1:])
    use_wrk = args.generator == "wrk" or (args.generator == "auto" and shutil.which("wrk"))
    generator = (Wrk if use_wrk else PythonLoad)(workdir, body, load_cpus)
    targets = [t for t in TARGETS if t != "embedded" or not args.no_embedded]
    slice_s = max(1, round(args.duration / args.rounds))  # wrk takes whole seconds
    results = []
    for loop in args.loop or ["uvloop", "asyncio"]:
        with servers(workdir, loop, targets, server_cpus) as running:
            check_answers(running, body)
            for connections in dict.fromkeys([args.connections, 1]):
                for target in targets if args.warmup else ():
                    generator.run(running[target].url, connections, args.warmup)
                runs: dict[str, list[tuple[Run, float | None]]] = {t: [] for t in targets}
                for _ in range(args.rounds):
                    for target in targets:
                        runs[target].append(timed(generator, running[target], connections, slice_s))
                for target in targets:
                    results.append(summarize(loop, connections, target, runs[target]))
                    print(results[-1].line(), file=sys.stderr, flush=True)
    return generator.name, results


def timed(
    generator: Generator, server: Server, connections: int, seconds: int
) -> tuple[Run, float | None]:
    """One run, and the CPU seconds the server's process spent in it."""
    before = cpu_seconds(server.pid)
    run = generator.run(server.url, connections, seconds)
    after = cpu_seconds(server.pid)
    return run, None if before is None or after is None else after - before


def summarize(
    loop: str, connections: int, target: str, rounds: list[tuple[Run, float | None]]
) -> Measurement:
    """The rounds of one target as one measurement: medians, robust to a disturbed round."""
    runs = [run for run, _ in rounds]
    cpu = [
        spent / run.requests * 1e6 for run, spent in rounds if spent is not None and run.requests
    ]
    return Measurement(
        loop=loop,
        connections=connections,
        target=target,
        rounds=len(runs),
        requests=sum(r.requests for r in runs),
        errors=sum(r.errors for r in runs),
        seconds=sum(r.seconds for r in runs),
        rps=statistics.median(r.requests / r.seconds for r in runs),
        p50_ms=statistics.median(r.p50_ms for r in runs),
        p99_ms=statistics.median(r.p99_ms for r in runs),
        cpu_us_per_request=statistics.median(cpu) if len(cpu) == len(runs) else None,
    )


def figures(rows: dict[str, Measurement]) -> dict[str, float | bool]:
    """The ratios for one loop and concurrency, and whether the guard meets its target."""
    direct, bare, guard = rows["direct"], rows["passthrough"], rows["guard"]
    out: dict[str, float | bool] = {
        "guard_rps_over_passthrough": guard.rps / bare.rps,
        "guard_added_p50_ms": guard.p50_ms - direct.p50_ms,
        "passthrough_added_p50_ms": bare.p50_ms - direct.p50_ms,
        "guard_minus_passthrough_p50_ms": guard.p50_ms - bare.p50_ms,
    }
    if "embedded" in rows:
        out["embedded_added_p50_ms"] = rows["embedded"].p50_ms - direct.p50_ms
    if guard.cpu_us_per_request and bare.cpu_us_per_request:
        # Requests one core serves, guard / pass-through: the throughput ratio without contention.
        out["guard_capacity_over_passthrough"] = bare.cpu_us_per_request / guard.cpu_us_per_request
    if guard.connections == 1:
        out["meets_added_p50"] = out["guard_added_p50_ms"] <= ADDED_P50_MS
    else:
        out["meets_throughput"] = out["guard_rps_over_passthrough"] >= THROUGHPUT_RATIO
    return out


def report(
    results: list[Measurement], generator: str, pinned: bool
) -> tuple[str, list[dict[str, object]]]:
    """Markdown tables, one per loop and concurrency, and the figures as data."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [
        f"Load generator: {generator}. CPUs: {os.cpu_count()}, "
        f"{'load generator on CPU 0, servers on the rest' if pinned else 'unpinned'}; "
        f"load average at the end: {load}.",
        "",
    ]
    summary: list[dict[str, object]] = []
    for loop, connections in dict.fromkeys((m.loop, m.connections) for m in results):
        rows = {m.target: m for m in results if (m.loop, m.connections) == (loop, connections)}
        plural = "s" if connections > 1 else ""
        lines += [
            f"### {loop}, {connections} connection{plural}, {next(iter(rows.values())).rounds} rounds",
            "",
            "| target | req/s | p50 ms | p99 ms | CPU µs/req | errors |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for m in rows.values():
            cpu = f"{m.cpu_us_per_request:.0f}" if m.cpu_us_per_request is not None else "n/a"
            lines.append(
                f"| {m.target} | {m.rps:.0f} | {m.p50_ms:.3f} | {m.p99_ms:.3f} | {cpu} | {m.errors} |"
            )
        values = figures(rows)
        lines += ["", "| figure | value |", "|---|---:|"]
        lines += [
            f"| {k} | {v} |" if isinstance(v, bool) else f"| {k} | {v:.3f} |"
            for k, v in values.items()
        ]
        lines.append("")
        summary.append({"loop": loop, "connections": connections, **values})
    return "\n".join(lines), summary


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["loadgen"]:
        return loadgen_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--duration",
        type=float,
        default=10.0,
        help="measured seconds per target and concurrency (default 10)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="interleaved runs the duration is split into (default 5)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="seconds of unmeasured load per target first (default 2)",
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=16,
        help="the high-concurrency run; a 1-connection run follows",
    )
    parser.add_argument(
        "--loop", action="append", choices=["uvloop", "asyncio"], help="repeatable; default: both"
    )
    parser.add_argument("--generator", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument(
        "--pin", action="store_true", help="load generator on the first CPU, servers on the others"
    )
    parser.add_argument(
        "--no-embedded", action="store_true", help="skip the guard serving digits itself"
    )
    parser.add_argument("--json", type=Path, help="also write the measurements and figures here")
    args = parser.parse_args(argv)
    if args.connections < 1 or args.duration <= 0 or args.rounds < 1 or args.warmup < 0:
        parser.error("--connections and --rounds must be >= 1, --duration > 0, --warmup >= 0")
    if args.generator == "wrk" and not shutil.which("wrk"):
        parser.error("--generator wrk: wrk is not on the PATH")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanups on SIGTERM too

    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp:
        generator, results = benchmark(args, Path(tmp))
    text, summary = report(results, generator, args.pin)
    print(text)
    if args.json:
        doc = {
            "generator": generator,
            "cpus": os.cpu_count(),
            "pinned": args.pin,
            "results": [asdict(m) for m in results],
            "figures": summary,
        }
        args.json.write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

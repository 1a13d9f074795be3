"""What the guard costs on the wire: throughput and latency against a bare proxy.

One run, one load generator, V2 JSON infer requests (batch 1, the first of the
64-float ``digits`` samples) on loopback against:

``direct``       a guard serving ``digits`` embedded with no stages (the backend)
``passthrough``  ``passthrough.py``, a bare aiohttp proxy, in front of ``direct``
``guard``        the guard with the ``validate`` stage, ``direct`` as its HTTP upstream
``embedded``     the guard with ``validate`` serving ``digits`` itself (no hop)

Every server is its own process; all of them are stopped when the run ends, however
it ends (and, on Linux, when this process dies). The load generator is ``wrk`` when it
is on the PATH (latency percentiles read from its HdrHistogram in a Lua ``done``
hook), else a Python one (asyncio + aiohttp, N keep-alive connections, in its own
process); the report names which. Each target gets a warm-up run before its measured
run, at each concurrency and event loop.

    python tests/benchmarks/bench_proxy.py [--duration 10] [--connections 16]
        [--loop uvloop --loop asyncio] [--generator auto|wrk|python] [--pin] [--json out.json]
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
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PASSTHROUGH = Path(__file__).resolve().with_name("passthrough.py")
INFER = "/v2/models/digits/infer"
TARGETS = ("direct", "passthrough", "guard", "embedded")
ADDED_P50_MS = 0.5  # the guard's targets: p50 added latency at 1 connection ...
THROUGHPUT_RATIO = 0.80  # ... and throughput relative to the pass-through at N connections


@dataclass(frozen=True, slots=True)
class Measurement:
    loop: str
    connections: int
    target: str
    requests: int
    errors: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float


# -- servers ------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the benchmark dies, even by SIGKILL (Linux)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Servers:
    """The servers of one run; :meth:`stop_all` ends every one of them."""

    def __init__(self, workdir: Path, cpus: set[int] | None) -> None:
        self.workdir = workdir
        self.cpus = cpus
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str], port: int) -> str:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        log = (self.workdir / f"{name}.log").open("wb")
        cpus = self.cpus

        def setup() -> None:
            _die_with_parent()
            if cpus:
                os.sched_setaffinity(0, cpus)

        self.procs[name] = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=setup
        )
        log.close()
        url = f"http://127.0.0.1:{port}"
        self._wait_ready(name, url)
        return url

    def _wait_ready(self, name: str, url: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"{name} exited with {self.procs[name].returncode}:\n{self.log_tail(name)}")
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
def servers(workdir: Path, loop: str, targets: Sequence[str], cpus: set[int] | None) -> Iterator[dict[str, str]]:
    """Start the targets on ``loop``; yield ``{target: base URL}``; stop them all on exit."""
    policies = {
        "direct": {"model": "builtin:digits", "stages": []},
        "guard": {"upstream": {"url": ""}, "stages": [{"validate": {"min": 0.0, "max": 16.0}}]},
        "embedded": {"model": "builtin:digits", "stages": [{"validate": {"min": 0.0, "max": 16.0}}]},
    }
    running = Servers(workdir, cpus)
    urls: dict[str, str] = {}
    try:
        for target in ("direct", *(t for t in targets if t != "direct")):
            port = free_port()
            if target == "passthrough":
                argv = [sys.executable, str(PASSTHROUGH), "--upstream", urls["direct"], "--port", str(port), "--loop", loop]
            else:
                model = policies[target]
                if "upstream" in model:
                    model = {**model, "upstream": {"url": urls["direct"]}}
                path = workdir / f"{target}.json"  # JSON is YAML: no writer needed
                path.write_text(json.dumps({"version": 1, "models": {"digits": model}}))
                argv = [sys.executable, "-m", "guard.cli", "--log-level", "warning", "serve",
                        "--policy", str(path), "--port", str(port), "--loop", loop]  # fmt: skip
            urls[target] = running.start(target, argv, port)
        yield {t: urls[t] for t in targets}
    finally:
        running.stop_all()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def request_body() -> bytes:
    from guard.models import load_samples

    x = load_samples("digits")[0][:1]
    tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
    return json.dumps({"inputs": [tensor]}).encode()


def check_answers(urls: dict[str, str], body: bytes) -> None:
    """Every target answers 200 with the same label, or the run stops."""
    labels = {}
    for target, url in urls.items():
        req = urllib.request.Request(url + INFER, data=body, headers={"Content-Type": "application/json"})
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
  io.write(string.format(
    "WRK_RESULT %d %d %d %.3f %.3f\\n", summary.requests, summary.duration,
    e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50.0), latency:percentile(99.0)))
end
"""


class Wrk:
    name = "wrk"

    def __init__(self, workdir: Path, body: bytes, cpus: set[int] | None) -> None:
        self.script = workdir / "post.lua"
        self.script.write_text(WRK_SCRIPT.format(body=body.decode()))
        self.prefix = ["taskset", "-c", ",".join(map(str, sorted(cpus)))] if cpus else []
        version = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
        self.version = (version.stdout or version.stderr).split("[")[0].strip()

    def run(self, url: str, connections: int, seconds: float) -> tuple[int, int, float, float, float]:
        """``(requests, errors, seconds, p50 ms, p99 ms)`` of one run."""
        argv = [*self.prefix, "wrk", "-t1", f"-c{connections}", f"-d{max(1, math.ceil(seconds))}s",
                "--timeout", "10s", "--latency", "-s", str(self.script), url + INFER]  # fmt: skip
        out = subprocess.run(argv, capture_output=True, text=True, check=True, preexec_fn=_die_with_parent).stdout
        line = next((ln for ln in out.splitlines() if ln.startswith("WRK_RESULT ")), None)
        if line is None:
            raise RuntimeError(f"wrk printed no result:\n{out}")
        requests, duration_us, errors, p50_us, p99_us = line.split()[1:]
        return int(requests), int(errors), int(duration_us) / 1e6, float(p50_us) / 1e3, float(p99_us) / 1e3


class PythonLoad:
    """asyncio + aiohttp load in a separate process: ``bench_proxy.py loadgen ...``."""

    name = "python (asyncio + aiohttp)"
    version = ""

    def __init__(self, workdir: Path, body: bytes, cpus: set[int] | None) -> None:
        self.body_file = workdir / "body.json"
        self.body_file.write_bytes(body)
        self.prefix = ["taskset", "-c", ",".join(map(str, sorted(cpus)))] if cpus else []

    def run(self, url: str, connections: int, seconds: float) -> tuple[int, int, float, float, float]:
        argv = [*self.prefix, sys.executable, __file__, "loadgen", url + INFER, str(self.body_file),
                str(connections), str(seconds)]  # fmt: skip
        out = subprocess.run(argv, capture_output=True, text=True, check=True, preexec_fn=_die_with_parent).stdout
        r = json.loads(out)
        return r["requests"], r["errors"], r["seconds"], r["p50_ms"], r["p99_ms"]


async def _load(url: str, body: bytes, connections: int, seconds: float) -> dict[str, float]:
    import aiohttp
    import numpy as np

    latencies: list[float] = []
    errors = 0
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        deadline = started + seconds

        async def worker() -> None:
            nonlocal errors
            while (sent := time.perf_counter()) < deadline:
                async with session.post(url, data=body, headers=headers) as reply:
                    await reply.read()
                    errors += reply.status != 200
                latencies.append(time.perf_counter() - sent)

        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - started
    p50, p99 = np.percentile(np.array(latencies) * 1e3, [50, 99]) if latencies else (math.nan, math.nan)
    return {"requests": len(latencies), "errors": errors, "seconds": elapsed, "p50_ms": p50, "p99_ms": p99}


def loadgen_main(argv: Sequence[str]) -> int:
    url, body_file, connections, seconds = argv
    coro = _load(url, Path(body_file).read_bytes(), int(connections), float(seconds))
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(coro)
    else:
        result = uvloop.run(coro)
    print(json.dumps(result))
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
    results = []
    for loop in args.loop or ["uvloop", "asyncio"]:
        with servers(workdir, loop, targets, server_cpus) as urls:
            check_answers(urls, body)
            for connections in dict.fromkeys([args.connections, 1]):
                for target in targets:
                    generator.run(urls[target], connections, args.warmup)
                    requests, errors, seconds, p50, p99 = generator.run(urls[target], connections, args.duration)
                    m = Measurement(loop, connections, target, requests, errors, seconds,
                                    requests / seconds, p50, p99)  # fmt: skip
                    print(f"  {loop:8} c={connections:<3} {target:12} {m.rps:9.0f} req/s  "
                          f"p50 {p50:7.3f} ms  p99 {p99:7.3f} ms  errors {errors}", file=sys.stderr, flush=True)  # fmt: skip
                    results.append(m)
    return f"{generator.name} {generator.version}".strip(), results


def report(results: list[Measurement], generator: str, pinned: bool) -> tuple[str, list[dict[str, object]]]:
    """The markdown tables and, per loop and concurrency, the ratios and targets."""
    lines = [f"Load generator: {generator}. CPUs: {os.cpu_count()}, "
             f"{'load generator on CPU 0, servers on the rest' if pinned else 'unpinned'}.", ""]  # fmt: skip
    summary: list[dict[str, object]] = []
    groups = dict.fromkeys((m.loop, m.connections) for m in results)
    for loop, connections in groups:
        rows = {m.target: m for m in results if (m.loop, m.connections) == (loop, connections)}
        lines += [f"### loop {loop}, {connections} connection{'s' if connections > 1 else ''}", "",
                  "| target | req/s | p50 ms | p99 ms | errors |", "|---|---:|---:|---:|---:|"]  # fmt: skip
        lines += [f"| {m.target} | {m.rps:.0f} | {m.p50_ms:.3f} | {m.p99_ms:.3f} | {m.errors} |" for m in rows.values()]
        direct, bare, guard = rows["direct"], rows["passthrough"], rows["guard"]
        figures: dict[str, object] = {
            "loop": loop,
            "connections": connections,
            "guard_over_passthrough_rps": guard.rps / bare.rps,
            "guard_added_p50_ms": guard.p50_ms - direct.p50_ms,
            "passthrough_added_p50_ms": bare.p50_ms - direct.p50_ms,
            "guard_minus_passthrough_p50_ms": guard.p50_ms - bare.p50_ms,
        }
        if "embedded" in rows:
            figures["embedded_added_p50_ms"] = rows["embedded"].p50_ms - direct.p50_ms
        if connections == 1:
            figures["meets_added_p50"] = figures["guard_added_p50_ms"] <= ADDED_P50_MS  # type: ignore[operator]
        else:
            figures["meets_throughput"] = figures["guard_over_passthrough_rps"] >= THROUGHPUT_RATIO  # type: ignore[operator]
        summary.append(figures)
        lines += ["", "| figure | value |", "|---|---:|"]
        for key, value in figures.items():
            if key not in ("loop", "connections"):
                lines.append(f"| {key} | {value:.3f} |" if isinstance(value, float) and not isinstance(value, bool)
                             else f"| {key} | {value} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines), summary


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["loadgen"]:
        return loadgen_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured per target (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of unmeasured load first (default 2)")
    parser.add_argument("--connections", type=int, default=16, help="the high-concurrency run (a 1-connection run follows)")
    parser.add_argument("--loop", action="append", choices=["uvloop", "asyncio"], help="repeatable; default: both")
    parser.add_argument("--generator", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument("--pin", action="store_true", help="load generator on the first CPU, servers on the others")
    parser.add_argument("--no-embedded", action="store_true", help="skip the guard serving digits itself")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.connections < 1 or args.duration <= 0 or args.warmup < 0:
        parser.error("--connections must be >= 1, --duration > 0, --warmup >= 0")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanups on SIGTERM too

    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp:
        generator, results = benchmark(args, Path(tmp))
    text, summary = report(results, generator, args.pin)
    print(text)
    if args.json:
        doc = {"generator": generator, "cpus": os.cpu_count(), "pinned": args.pin, "duration_s": args.duration,
               "results": [asdict(m) for m in results], "summary": summary}  # fmt: skip
        args.json.write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

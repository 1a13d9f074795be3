"""``guard demo``: the built-in default policy, served and exercised for real.

It starts the guard on loopback with both demo models embedded, sends it
ordinary traffic in each protocol it speaks, then hostile input, and prints
what the guard answered and measured.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
import orjson
from aiohttp import web

from guard.config import load_policy
from guard.inference import InferRequest
from guard.models import load_samples
from guard.protocols import v2
from guard.server import create_app, make_runner

DEFAULT_POLICY = Path(__file__).parent / "policies" / "default.yaml"


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    correct: int = 0
    answered: int = 0

    def row(self, name: str) -> str:
        ok = self.statuses.get(200, 0)
        p50 = statistics.median(self.latencies) * 1e3 if self.latencies else float("nan")
        p99 = np.percentile(self.latencies, 99) * 1e3 if self.latencies else float("nan")
        accuracy = self.correct / self.answered if self.answered else float("nan")
        total = sum(self.statuses.values())
        return f"  {name:<22}{total:>8}{ok:>6}{p50:>9.2f}{p99:>9.2f}{accuracy:>10.3f}"


async def run_demo(*, port: int = 0, requests: int = 400, seed: int = 0, keep: bool = False) -> int:
    policy = load_policy(DEFAULT_POLICY)
    app = create_app(policy, policy_path=DEFAULT_POLICY)
    runner = make_runner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    bound = runner.addresses[0][1]
    base = f"http://127.0.0.1:{bound}"
    print(f"inference-guard demo: digits and breast_cancer served embedded at {base}")
    print(f"policy: {DEFAULT_POLICY} (mode {policy.mode})\n")
    rng = np.random.default_rng(seed)
    try:
        async with aiohttp.ClientSession(base) as http:
            await _benign(http, requests, rng)
            await _hostile(http)
            await _metrics(http)
        print(f"\nmetrics: {base}/metrics")
        if keep:
            print("serving until interrupted (Ctrl-C)")
            await asyncio.Event().wait()
    finally:
        await runner.cleanup()
    return 0


async def _benign(http: aiohttp.ClientSession, requests: int, rng: np.random.Generator) -> None:
    senders: dict[str, Callable[..., object]] = {
        "digits  v2 json": lambda x: _v2(http, "digits", x, binary=False),
        "digits  v2 binary": lambda x: _v2(http, "digits", x, binary=True),
        "breast_cancer  tf rows": lambda x: _tf(http, "breast_cancer", x),
        "breast_cancer  v2 json": lambda x: _v2(http, "breast_cancer", x, binary=False),
    }
    data = {name: load_samples(name) for name in ("digits", "breast_cancer")}
    tallies = {name: Tally() for name in senders}
    names = list(senders)
    print(f"benign traffic: {requests} requests, 4 concurrent, batches of 1-4 held-out samples")

    async def worker(count: int) -> None:
        for _ in range(count):
            name = names[int(rng.integers(len(names)))]
            x_all, y_all = data[name.split()[0]]
            rows = rng.choice(len(x_all), size=int(rng.integers(1, 5)), replace=False)
            started = time.perf_counter()
            status, labels = await senders[name](x_all[rows])  # type: ignore[misc]
            tally = tallies[name]
            tally.latencies.append(time.perf_counter() - started)
            tally.statuses[status] += 1
            if labels is not None:
                tally.answered += len(rows)
                tally.correct += int(np.sum(np.asarray(labels) == y_all[rows]))

    await asyncio.gather(*(worker(requests // 4) for _ in range(4)))
    print(f"  {'route':<22}{'sent':>8}{'200':>6}{'p50 ms':>9}{'p99 ms':>9}{'accuracy':>10}")
    for name in names:
        print(tallies[name].row(name))


async def _v2(
    http: aiohttp.ClientSession, model: str, x: np.ndarray, *, binary: bool
) -> tuple[int, object]:
    request = InferRequest(
        model_name=model, inputs={"input": x.astype(np.float32)}, binary_outputs=binary
    )
    body, headers = v2.encode_request(request, binary=binary)
    async with http.post(f"/v2/models/{model}/infer", data=body, headers=headers) as reply:
        payload = await reply.read()
        if reply.status != 200:
            return reply.status, None
        length = reply.headers.get(v2.HEADER_LENGTH)
        response = v2.decode_response(payload, header_length=int(length) if length else None)
        return reply.status, response.outputs["label"]


async def _tf(http: aiohttp.ClientSession, model: str, x: np.ndarray) -> tuple[int, object]:
    body = orjson.dumps({"instances": x.tolist()})
    async with http.post(f"/v1/models/{model}:predict", data=body) as reply:
        payload = await reply.json(loads=orjson.loads)
        if reply.status != 200:
            return reply.status, None
        return reply.status, [p["label"] for p in payload["predictions"]]


HOSTILE: list[tuple[str, str, bytes]] = [
    ("malformed JSON", "/v2/models/digits/infer", b'{"inputs": [{"name": "input",'),
    (
        "wrong shape",
        "/v2/models/digits/infer",
        orjson.dumps(
            {
                "inputs": [
                    {"name": "input", "shape": [1, 63], "datatype": "FP32", "data": [0.0] * 63}
                ]
            }
        ),
    ),
    (
        "wrong datatype",
        "/v2/models/digits/infer",
        orjson.dumps(
            {
                "inputs": [
                    {"name": "input", "shape": [1, 64], "datatype": "BYTES", "data": ["x"] * 64}
                ]
            }
        ),
    ),
    (
        "NaN in input",
        "/v2/models/digits/infer",
        b'{"inputs": [{"name": "input", "shape": [1, 64], '
        b'"datatype": "FP64", "data": [' + b"1.0, " * 10 + b"NaN" + b", 1.0" * 53 + b"]}]}",
    ),
    (
        "out of range",
        "/v2/models/digits/infer",
        orjson.dumps(
            {
                "inputs": [
                    {
                        "name": "input",
                        "shape": [1, 64],
                        "datatype": "FP32",
                        "data": [0.0] * 63 + [255.0],
                    }
                ]
            }
        ),
    ),
    (
        "data/shape mismatch",
        "/v2/models/digits/infer",
        orjson.dumps(
            {
                "inputs": [
                    {"name": "input", "shape": [1000000, 64], "datatype": "FP32", "data": [1.0]}
                ]
            }
        ),
    ),
    ("oversized body", "/v2/models/digits/infer", b" " * (9 << 20)),
    ("unknown model", "/v2/models/imagenet/infer", b"{}"),
    (
        "TF: ragged instances",
        "/v1/models/breast_cancer:predict",
        orjson.dumps({"instances": [[1.0] * 30, [1.0] * 29]}),
    ),
]


async def _hostile(http: aiohttp.ClientSession) -> None:
    print("\nhostile input: each refused in the protocol's error format, the guard stays up")
    for name, path, body in HOSTILE:
        async with http.post(path, data=body) as reply:
            text = await reply.text()
            try:
                message = orjson.loads(text)["error"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                message = text
        print(f"  {name:<22}{reply.status:>5}  {message[:90]}")


async def _metrics(http: aiohttp.ClientSession) -> None:
    async with http.get("/metrics") as reply:
        text = await reply.text()
    lines = [line for line in text.splitlines() if line.startswith("guard_requests_total{")]
    print("\nwhat the guard counted (guard_requests_total):")
    for line in sorted(lines):
        print(f"  {line}")

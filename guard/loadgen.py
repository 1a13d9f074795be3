"""Open-loop load against any guard deployment: the engine behind ``guard load``.

The i-th request is *scheduled* at ``start + i / rate`` and sent then, whether
or not earlier ones have been answered (an open loop), and its latency is
measured from that scheduled time. A server that stalls for a second therefore
shows the stall in every request that should have gone out during it, instead
of hiding it by holding the generator back (coordinated omission). At most
``connections`` requests are on the wire at once, over keep-alive connections;
a request that waits for a free connection is late, and the wait counts.

Inputs are the held-out samples shipped with the demo models
(:func:`guard.models.load_samples`), in order (``samples``), or a fresh random
blend of two of them per request (``blend``: distinct queries, so query-pattern
detectors such as ``blacklight`` see ordinary traffic rather than thousands of
repeats). Requests come from one client, from ``clients`` distinct addresses in
``X-Forwarded-For`` (one address each, as a balancer writes it: the guard must
trust the generator as its proxy, with ``clients.trust_forwarded_for: true`` or
``clients.trusted_proxies`` covering its address), or rotate over API keys.

Guarantees: the schedule and the inputs are fixed by ``seed``; every scheduled
request is either answered (counted by status), failed (counted by error kind:
``timeout``, ``connection``, ``client``) or, when ``max_outstanding`` requests
are already waiting, not sent (``backlog``); nothing is dropped silently.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import aiohttp
import numpy as np
import orjson

from guard.inference import DATATYPES, InferRequest
from guard.protocols import v2

PROTOCOLS = ("v2", "v2-binary", "tf")
INPUTS = ("samples", "blend")
MAX_CLIENTS = 1 << 24  # distinct addresses in 10.0.0.0/8
PERCENTILES = (50, 90, 99)


@dataclass(frozen=True, kw_only=True, slots=True)
class LoadConfig:
    """What to send, where, and how fast. Validated by :meth:`check`."""

    url: str  # the deployment's base URL, e.g. http://127.0.0.1:8000
    model: str
    rate: float  # requests per second
    duration: float  # seconds of schedule
    connections: int = 32
    protocol: str = "v2"
    clients: int = 1  # > 1: distinct X-Forwarded-For addresses
    api_keys: Sequence[str] = ()  # rotated over requests
    key_header: str = "X-API-Key"
    samples: str | None = None  # built-in data set; default: the model's name
    inputs: str = "samples"
    batch: int = 1
    timeout: float = 10.0  # seconds per request, waiting for a connection included
    seed: int = 0
    max_outstanding: int = 10_000
    verify_tls: bool = True

    def check(self) -> None:
        """Raise ValueError naming the first bad setting."""
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://; got {self.url!r}")
        if not (self.rate > 0 and self.duration > 0 and self.timeout > 0):
            raise ValueError("rate, duration and timeout must be > 0")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}")
        if self.inputs not in INPUTS:
            raise ValueError(f"inputs must be one of {', '.join(INPUTS)}")
        if not 1 <= self.clients <= MAX_CLIENTS:
            raise ValueError(f"clients must be in [1, {MAX_CLIENTS}]")
        if min(self.connections, self.batch, self.max_outstanding) < 1:
            raise ValueError("connections, batch and max_outstanding must be >= 1")


@dataclass(frozen=True, kw_only=True, slots=True)
class LoadReport:
    """What happened. Latencies are from each request's scheduled send time."""

    url: str
    model: str
    protocol: str
    target_rate: float
    duration_s: float
    connections: int
    clients: int
    scheduled: int
    sent: int
    answered: int
    elapsed_s: float  # first scheduled send to last answer
    throughput: float  # answers per second over elapsed_s
    statuses: dict[str, int]
    errors: dict[str, int]
    latency_ms: dict[str, float]  # p50, p90, p99, max, mean over answered requests
    send_lag_p99_ms: float  # how late the generator itself sent: large means it was the bottleneck
    first_error: str | None = None  # the first failure's message, e.g. why connecting failed

    @property
    def server_errors(self) -> int:
        return sum(n for code, n in self.statuses.items() if code.startswith("5"))

    @property
    def failed(self) -> bool:
        """Any request not answered, or answered with a 5xx."""
        return bool(self.errors) or self.server_errors > 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        lat = self.latency_ms
        clients = f"{self.clients} clients" if self.clients > 1 else "1 client"
        statuses = "  ".join(f"{code}: {n}" for code, n in sorted(self.statuses.items()))
        errors = "  ".join(f"{kind}: {n}" for kind, n in sorted(self.errors.items()))
        return [
            f"{self.url} model {self.model} ({self.protocol}): {self.target_rate:g} req/s for "
            f"{self.duration_s:g} s, {self.connections} connections, {clients}",
            f"  scheduled {self.scheduled}  sent {self.sent}  answered {self.answered}",
            f"  throughput {self.throughput:.1f} req/s over {self.elapsed_s:.2f} s",
            "  latency    "
            + "  ".join(f"{k} {lat[k]:.2f} ms" for k in ("p50", "p90", "p99", "max") if k in lat),
            f"  status     {statuses or '-'}",
            f"  errors     {errors or 'none'}"
            + (f"  (first: {self.first_error})" if self.first_error else ""),
            f"  generator  send lag p99 {self.send_lag_p99_ms:.2f} ms",
        ]


@dataclass(slots=True)
class _Tally:
    latencies: list[float] = field(default_factory=list)
    lags: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    sent: int = 0
    last_answer: float = 0.0
    first_error: str | None = None

    def fail(self, kind: str, exc: BaseException) -> None:
        self.errors[kind] += 1
        if self.first_error is None:
            self.first_error = f"{type(exc).__name__}: {exc}"[:300]


class Bodies:
    """Request bodies and headers, request by request, fixed by the config's seed."""

    def __init__(self, config: LoadConfig, x: np.ndarray, input_name: str, datatype: str) -> None:
        self.config = config
        self.input_name = input_name
        self.x = x.astype(DATATYPES.get(datatype, np.dtype(np.float32)), copy=False)
        self.datatype = datatype if datatype in DATATYPES else "FP32"
        self.rng = np.random.default_rng(config.seed)
        self._cache: dict[int, tuple[bytes, dict[str, str]]] = {}

    def make(self, i: int) -> tuple[bytes, dict[str, str]]:
        config = self.config
        if config.inputs == "samples":
            cached = self._cache.get(i % len(self.x))
            if cached is None:
                rows = np.take(
                    self.x, range(i * config.batch, (i + 1) * config.batch), axis=0, mode="wrap"
                )
                cached = self._cache[i % len(self.x)] = self._encode(rows)
            body, headers = cached
        else:
            a, b = self.rng.integers(len(self.x), size=(2, config.batch))
            weight = self.rng.random((config.batch,) + (1,) * (self.x.ndim - 1), np.float32)
            rows = (weight * self.x[a] + (1 - weight) * self.x[b]).astype(self.x.dtype)
            body, headers = self._encode(rows)
        headers = dict(headers)
        if config.clients > 1:
            headers["X-Forwarded-For"] = address(int(self.rng.integers(config.clients)))
        if config.api_keys:
            headers[config.key_header] = config.api_keys[i % len(config.api_keys)]
        return body, headers

    def path(self) -> str:
        if self.config.protocol == "tf":
            return f"/v1/models/{self.config.model}:predict"
        return f"/v2/models/{self.config.model}/infer"

    def _encode(self, rows: np.ndarray) -> tuple[bytes, dict[str, str]]:
        if self.config.protocol == "tf":
            return orjson.dumps({"instances": rows.tolist()}), {"Content-Type": "application/json"}
        request = InferRequest(model_name=self.config.model, inputs={self.input_name: rows})
        body, headers = v2.encode_request(request, binary=self.config.protocol == "v2-binary")
        headers.setdefault("Content-Type", "application/json")
        return body, headers


def address(client: int) -> str:
    """The synthetic address of client number ``client`` (in 10.0.0.0/8)."""
    return f"10.{client >> 16 & 255}.{client >> 8 & 255}.{client & 255}"


async def input_spec(session: aiohttp.ClientSession, config: LoadConfig) -> tuple[str, str]:
    """``(input name, datatype)`` from the model's V2 metadata; ``("input", "FP32")`` without it."""
    headers = {config.key_header: config.api_keys[0]} if config.api_keys else {}
    try:
        async with session.get(f"{config.url}/v2/models/{config.model}", headers=headers) as reply:
            if reply.status == 200:
                first = (await reply.json(loads=orjson.loads))["inputs"][0]
                return str(first["name"]), str(first["datatype"])
    except (aiohttp.ClientError, asyncio.TimeoutError, KeyError, IndexError, TypeError, ValueError):
        pass
    return "input", "FP32"


async def run_load(config: LoadConfig) -> LoadReport:
    """Drive ``config.url`` at ``config.rate`` for ``config.duration`` seconds; report."""
    config.check()
    from guard.models import load_samples, model_info

    samples = config.samples or config.model
    x, _ = load_samples(samples)
    x = x.reshape(len(x), *model_info(samples)["input_shape"])  # images: [N, 32, 32, 3]
    url = config.url.rstrip("/")
    config = replace(config, url=url)
    connector = aiohttp.TCPConnector(limit=config.connections, ssl=config.verify_tls)
    timeout = aiohttp.ClientTimeout(total=config.timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        name, datatype = await input_spec(session, config)
        bodies = Bodies(config, x, name, datatype)
        target = url + bodies.path()
        tally = _Tally()
        loop = asyncio.get_running_loop()
        scheduled = max(1, round(config.rate * config.duration))
        pending: set[asyncio.Task[None]] = set()
        # perf_counter, not loop.time(): uvloop's clock ticks in whole milliseconds.
        start = time.perf_counter() + 0.05
        for i in range(scheduled):
            at = start + i / config.rate
            if (delay := at - time.perf_counter()) > 0:
                await asyncio.sleep(delay)
            if len(pending) >= config.max_outstanding:
                tally.errors["backlog"] += 1
                continue
            body, headers = bodies.make(i)
            task = loop.create_task(_send(session, target, body, headers, at, tally))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.wait(pending)
    return _report(config, scheduled, start, tally)


async def _send(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: dict[str, str],
    at: float,
    tally: _Tally,
) -> None:
    tally.lags.append(time.perf_counter() - at)
    tally.sent += 1
    try:
        async with session.post(url, data=body, headers=headers) as reply:
            await reply.read()
    except asyncio.TimeoutError as exc:
        tally.fail("timeout", exc)
        return
    except aiohttp.ClientConnectionError as exc:
        tally.fail("connection", exc)
        return
    except aiohttp.ClientError as exc:
        tally.fail("client", exc)
        return
    now = time.perf_counter()
    tally.latencies.append(now - at)
    tally.statuses[str(reply.status)] += 1
    tally.last_answer = max(tally.last_answer, now)


def _report(config: LoadConfig, scheduled: int, start: float, tally: _Tally) -> LoadReport:
    answered = len(tally.latencies)
    elapsed = max(tally.last_answer - start, 1e-9) if answered else 0.0
    latency: dict[str, float] = {}
    if answered:
        ms = np.asarray(tally.latencies) * 1e3
        values = np.percentile(ms, PERCENTILES)
        latency = {f"p{p}": float(v) for p, v in zip(PERCENTILES, values, strict=True)}
        latency |= {"max": float(ms.max()), "mean": float(ms.mean())}
    lag = float(np.percentile(np.asarray(tally.lags) * 1e3, 99)) if tally.lags else 0.0
    return LoadReport(
        url=config.url,
        model=config.model,
        protocol=config.protocol,
        target_rate=config.rate,
        duration_s=config.duration,
        connections=config.connections,
        clients=config.clients,
        scheduled=scheduled,
        sent=tally.sent,
        answered=answered,
        elapsed_s=elapsed,
        throughput=answered / elapsed if answered else 0.0,
        statuses=dict(tally.statuses),
        errors=dict(tally.errors),
        latency_ms=latency,
        send_lag_p99_ms=lag,
        first_error=tally.first_error,
    )

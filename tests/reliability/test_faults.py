"""Faults under load, with real processes: the upstream killed and restarted, frozen and
resumed; Redis killed and restarted under each ``on_error``. The guard is never
restarted: it answers clearly while the fault lasts and recovers by itself."""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np
import pytest

from guard.loadgen import address
from guard.models import load_samples
from tests.integration.redis_server import RedisServer
from tests.reliability.conftest import (
    GuardProcess,
    GuardSpawner,
    assert_healthy,
    digits_model,
    metric_value,
    scrape,
    v2_body,
)

INFER = "/v2/models/digits/infer"
RECOVERY_S = 10.0  # seconds a recovery may take before the test calls it failed
BLACKLIGHT_KEY = "GUARD_TEST_BLACKLIGHT_KEY"


@dataclass(frozen=True, slots=True)
class Outcome:
    at: float  # monotonic time the request was sent
    seconds: float
    status: int  # 0: no answer (connection failed)
    verdict: str | None
    error: str


async def drive(
    url: str,
    request_for: Callable[[int], tuple[bytes, dict[str, str]]],
    stop: asyncio.Event,
    outcomes: list[Outcome],
    *,
    workers: int = 4,
    pause: float = 0.03,
    timeout: float = 10.0,
) -> None:
    """Closed-loop traffic from ``workers`` clients until ``stop``; appends every outcome."""
    counter = itertools.count()

    async def worker(session: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            body, headers = request_for(next(counter))
            sent = time.monotonic()
            try:
                async with session.post(url, data=body, headers=headers) as reply:
                    payload = await reply.read()
                    error = payload.decode(errors="replace")[:200] if reply.status != 200 else ""
                    outcome = Outcome(sent, time.monotonic() - sent, reply.status,
                                      reply.headers.get("X-Guard-Verdict"), error)  # fmt: skip
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                outcome = Outcome(sent, time.monotonic() - sent, 0, None, repr(exc))
            outcomes.append(outcome)
            await asyncio.sleep(pause)

    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(timeout=client_timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(workers)))
    outcomes.sort(key=lambda o: o.at)


def window(outcomes: list[Outcome], start: float, end: float) -> list[Outcome]:
    """The outcomes of requests sent at or after ``start`` and answered before ``end``."""
    return [o for o in outcomes if start <= o.at and o.at + o.seconds < end]


def summary(outcomes: list[Outcome]) -> Counter[tuple[int, str | None, str]]:
    """What came back, for assertion messages."""
    return Counter((o.status, o.verdict, o.error[:80]) for o in outcomes)


async def recovery(
    outcomes: list[Outcome],
    stop: asyncio.Event,
    since: float,
    good: Callable[[Outcome], bool],
    clean_for: float = 2.0,
) -> float | None:
    """When the last bad outcome sent after ``since`` was sent, once ``clean_for`` seconds
    of good ones followed it; then stops the load. None when that takes past RECOVERY_S."""
    deadline = since + RECOVERY_S + clean_for
    while (now := time.monotonic()) < deadline:
        await asyncio.sleep(0.1)
        recent = [o for o in outcomes if o.at >= since]
        last_bad = max((o.at for o in recent if not good(o)), default=since)
        if now - last_bad >= clean_for and sum(o.at > last_bad for o in recent) >= 10:
            stop.set()
            return last_bad
    stop.set()
    return None


def rows() -> Callable[[int], tuple[bytes, dict[str, str]]]:
    """Distinct held-out rows, each from its own client address."""
    x = load_samples("digits")[0]
    return lambda i: (v2_body(x[i % len(x)][None]), {"X-Forwarded-For": address(i)})


async def start(spawn_guard: GuardSpawner, policy: dict[str, Any], **kw: Any) -> GuardProcess:
    return await asyncio.to_thread(spawn_guard, policy, **kw)


def upstream_policy() -> dict[str, Any]:
    return {"version": 1, "models": {"digits": {"model": "builtin:digits", "stages": []}}}


def front_policy(upstream: GuardProcess, timeout: float) -> dict[str, Any]:
    model = {
        "upstream": {"url": upstream.url, "timeout": timeout, "connect_timeout": 0.5},
        "stages": [{"validate": {"shape": [64], "dtype": "FP32", "min": 0.0, "max": 16.0}}],
    }
    return {"version": 1, "models": {"digits": model}}


async def test_upstream_killed_mid_run_is_503_until_it_returns(spawn_guard: GuardSpawner) -> None:
    upstream = await start(spawn_guard, upstream_policy())
    guard = await start(spawn_guard, front_policy(upstream, timeout=2.0))
    stop = asyncio.Event()
    outcomes: list[Outcome] = []
    load = asyncio.create_task(drive(guard.url + INFER, rows(), stop, outcomes))
    await asyncio.sleep(1.0)
    killed = time.monotonic()
    upstream.kill()  # SIGKILL: no goodbye, connections reset
    await asyncio.sleep(2.0)
    restarting = time.monotonic()
    await start(spawn_guard, upstream_policy(), port=upstream.port)
    back = time.monotonic()
    await asyncio.sleep(1.5)
    stop.set()
    await load

    assert {o.status for o in outcomes} <= {200, 502, 503}, {o.error for o in outcomes}
    before = window(outcomes, 0, killed)
    assert all(o.status == 200 for o in before), summary(before)
    down = window(outcomes, killed + 0.2, restarting)
    assert len(down) > 20 and all(o.status == 503 for o in down)
    assert all(o.seconds < 1.0 for o in down), "refusals while the upstream is down must be quick"
    assert all("unreachable" in o.error for o in down)
    after = window(outcomes, back + 0.5, float("inf"))
    assert len(after) > 10 and all(o.status == 200 for o in after)
    text = scrape(guard)
    assert metric_value(text, "guard_errors_total", kind="UpstreamUnavailable") >= len(down)
    assert_healthy(guard)


async def test_frozen_upstream_is_504_within_the_timeout_and_recovers(
    spawn_guard: GuardSpawner,
) -> None:
    upstream = await start(spawn_guard, upstream_policy())
    guard = await start(spawn_guard, front_policy(upstream, timeout=0.5))
    stop = asyncio.Event()
    outcomes: list[Outcome] = []
    load = asyncio.create_task(drive(guard.url + INFER, rows(), stop, outcomes))
    await asyncio.sleep(0.8)
    frozen = time.monotonic()
    upstream.signal(signal.SIGSTOP)  # alive, accepting (the kernel's backlog), never answering
    try:
        await asyncio.sleep(3.0)
    finally:
        resumed = time.monotonic()
        upstream.signal(signal.SIGCONT)
    await asyncio.sleep(1.5)
    stop.set()
    await load

    assert {o.status for o in outcomes} <= {200, 504}, {o.error for o in outcomes}
    stuck = window(outcomes, frozen + 0.1, resumed - 0.6)
    assert len(stuck) >= 4 and all(o.status == 504 for o in stuck)
    assert all(0.4 < o.seconds < 1.5 for o in stuck), [o.seconds for o in stuck]
    after = window(outcomes, resumed + 0.5, float("inf"))
    assert len(after) > 10 and all(o.status == 200 for o in after)
    assert_healthy(guard)


@pytest.mark.parametrize("on_error", ["open", "closed"])
async def test_redis_killed_under_load_applies_on_error_and_state_resumes(
    spawn_guard: GuardSpawner, redis_server: RedisServer, on_error: str
) -> None:
    probe_limit = 5
    stages = [
        {"budget": {"limits": [{"queries": probe_limit, "per": "1m"}], "on_error": on_error}},
        {"blacklight": {"key_env": BLACKLIGHT_KEY, "on_error": on_error}},
        {"prada": {"on_error": on_error}},
    ]
    policy = {
        "version": 1,
        "models": {"digits": digits_model(*stages)},
        "clients": {"trust_forwarded_for": True},
        "state": {"backend": "redis", "url": redis_server.url, "timeout": 0.2},
    }
    guard = await start(spawn_guard, policy, env={BLACKLIGHT_KEY: "the deployment's secret"})
    stop = asyncio.Event()
    outcomes: list[Outcome] = []
    load = asyncio.create_task(drive(guard.url + INFER, rows(), stop, outcomes))
    await asyncio.sleep(1.0)
    killed = time.monotonic()
    redis_server.process.kill()  # SIGKILL under load: connections die mid-command
    redis_server.process.wait()
    await asyncio.sleep(1.5)
    restarting = time.monotonic()
    await asyncio.to_thread(redis_server.start)
    back = time.monotonic()
    recovered = await recovery(
        outcomes, stop, back, lambda o: (o.status, o.verdict) == (200, "allow")
    )
    await load

    assert all(o.status in (200, 503) for o in outcomes), {(o.status, o.error) for o in outcomes}
    before = window(outcomes, 0, killed)
    assert all((o.status, o.verdict) == (200, "allow") for o in before), summary(before)
    down = window(outcomes, killed + 0.3, restarting)
    assert len(down) > 10
    if on_error == "open":  # served, flagged: nobody is refused for the store's fault
        assert all((o.status, o.verdict) == (200, "flag") for o in down)
    else:
        # Refused, and told to retry, not which store failed (disclose.reasons is off).
        assert all(o.status == 503 and "try again shortly" in o.error for o in down)
        assert not any("redis" in o.error or "state store" in o.error for o in down)
    # Each pooled connection to the dead server fails once (then a 0.5 s backoff), so the
    # guard flaps for a few seconds before it is clean again.
    assert recovered is not None, summary(window(outcomes, back, float("inf")))
    assert recovered - back < RECOVERY_S

    # State resumed: a fresh client's budget is counted in the restarted Redis again.
    x = load_samples("digits")[0]
    probe = {"X-Forwarded-For": "192.0.2.1"}
    statuses = []
    async with aiohttp.ClientSession() as session:
        for row in x[-(probe_limit + 1) :]:
            async with session.post(guard.url + INFER, data=v2_body(row[None]), headers=probe) as r:
                statuses.append(r.status)
    assert statuses == [200] * probe_limit + [429]
    assert metric_value(scrape(guard), "guard_state_errors_total", backend="redis") > 0
    assert_healthy(guard)
    assert np.isfinite(guard.rss_bytes())

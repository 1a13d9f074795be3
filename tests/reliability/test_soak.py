"""A soak: a fixed rate from 100,000 distinct clients (``X-Forwarded-For``) through every
detection stage, the state store capped small so that eviction runs all along. No
request fails and the guard's resident memory (``/proc``) stays bounded.

``GUARD_SOAK_SECONDS`` (default 25) and ``GUARD_SOAK_RATE`` (requests/s, default 300)
lengthen it: ``GUARD_SOAK_SECONDS=600`` is the on-demand run.
"""

from __future__ import annotations

import asyncio
import time

from guard.loadgen import LoadConfig, run_load
from tests.reliability.conftest import (
    GuardSpawner,
    assert_healthy,
    digits_model,
    env_int,
    metric_value,
    scrape,
)

SECONDS = env_int("GUARD_SOAK_SECONDS", 25)
RATE = env_int("GUARD_SOAK_RATE", 300)
CLIENTS = 100_000
MAX_CLIENTS = 2_000  # the memory store's LRU cap: reached within the first seconds
GROWTH_LIMIT = 32 << 20  # bytes of RSS growth allowed once the caps are reached


async def test_soak_from_many_clients_keeps_memory_bounded(spawn_guard: GuardSpawner) -> None:
    policy = {
        "version": 1,
        "models": {
            "digits": digits_model(
                {"budget": {"limits": [{"queries": 600, "per": "1m"}]}},
                {"blacklight": {"action": "flag", "max_queries": 2_000}},
                {"prada": {"action": "flag", "min_queries": 20}},
            )
        },
        "clients": {"trust_forwarded_for": True},
        "state": {"backend": "memory", "max_clients": MAX_CLIENTS, "max_bytes": 4 << 20},
    }
    guard = await asyncio.to_thread(spawn_guard, policy)
    config = LoadConfig(
        url=guard.url,
        model="digits",
        rate=RATE,
        duration=SECONDS,
        connections=16,
        clients=CLIENTS,
        inputs="blend",  # distinct queries: ordinary traffic, not a thousand repeats
        timeout=10.0,
    )
    samples: list[tuple[float, int]] = []
    done = asyncio.Event()

    async def sample_rss() -> None:
        while not done.is_set():
            samples.append((time.monotonic(), guard.rss_bytes()))
            await asyncio.sleep(0.5)

    sampler = asyncio.create_task(sample_rss())
    started = time.monotonic()
    try:
        report = await run_load(config)
    finally:
        done.set()
        await sampler

    assert report.errors == {} and report.answered == report.scheduled, report.lines()
    assert report.server_errors == 0, report.statuses
    assert set(report.statuses) == {"200"}, report.statuses  # no client came near its budget
    assert report.throughput > 0.9 * RATE, report.lines()

    warm = started + SECONDS / 3  # by then MAX_CLIENTS clients have been seen: caps reached
    baseline = max(rss for at, rss in samples if at <= warm)
    peak = max(rss for _, rss in samples)
    assert peak - baseline < GROWTH_LIMIT, [
        (round(at - started, 1), rss >> 20) for at, rss in samples
    ]
    text = scrape(guard)
    assert metric_value(text, "guard_requests_total", code="200") == report.answered
    assert_healthy(guard)

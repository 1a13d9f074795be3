"""The guard on a primary found by Redis Sentinel (``state: {sentinel: ...}``): a failover
mid-run gives the policy's on_error while it lasts, then the guard follows the new primary."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from guard.models import load_samples
from tests.integration.conftest import StartGuard
from tests.integration.redis_server import RedisSentinelServers
from tests.integration.test_detection import BLACKLIGHT_KEY, infer, probes
from tests.integration.test_redis_cluster import CLIENTS, start


@pytest.fixture(autouse=True)
def blacklight_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.integration import test_detection

    monkeypatch.setenv(BLACKLIGHT_KEY, "the deployment's secret")
    for name in CLIENTS:
        monkeypatch.setitem(test_detection.KEYS, name, f"key-{name}")


def sentinel_policy(servers: RedisSentinelServers, on_error: str) -> dict[str, Any]:
    stages = [
        {"validate": {"min": 0.0, "max": 16.0}},
        {"budget": {"limits": [{"queries": 100, "per": "1m"}], "on_error": on_error}},
        {"blacklight": {"key_env": BLACKLIGHT_KEY, "on_error": on_error}},
    ]
    return {
        "version": 1,
        "models": {"digits": {"model": "builtin:digits", "stages": stages}},
        "state": {
            "backend": "redis",
            "sentinel": {"master": servers.MASTER, "addresses": [servers.address]},
            "timeout": 0.5,
        },
    }


@pytest.mark.parametrize(("on_error", "status"), [("closed", 503), ("open", 200)])
async def test_the_primary_killed_mid_run_gives_on_error_until_the_failover(
    start_guard: StartGuard,
    http: aiohttp.ClientSession,
    redis_sentinel: RedisSentinelServers,
    on_error: str,
    status: int,
) -> None:
    guard = await start(start_guard, sentinel_policy(redis_sentinel, on_error))
    x, _ = load_samples("digits")
    assert [(await infer(http, guard, x[i], c))[0] for i, c in enumerate(CLIENTS)] == [200] * 10
    old = redis_sentinel.primary()
    old.kill()
    killed = time.monotonic()
    switch = asyncio.create_task(asyncio.to_thread(redis_sentinel.wait_switch, old))
    seen: list[tuple[int, str]] = []
    i = 0
    while not switch.done() or not seen or seen[-1] != (200, "allow"):
        got, _, headers = await infer(http, guard, x[100 + i % 500], CLIENTS[i % 10])
        seen.append((got, headers["X-Guard-Verdict"]))
        i += 1
        await asyncio.sleep(0.02)
        assert time.monotonic() - killed < 30, seen[-5:]
    await switch
    outage = time.monotonic() - killed
    # While the primary was gone: on_error (closed: 503, open: served and flagged), never a 500.
    down = [s for s in seen if s != (200, "allow")]
    assert down and set(down) == {(status, "flag" if status == 200 else "error")}
    print(f"{on_error}: {len(down)} of {len(seen)} requests in on_error, served in {outage:.1f} s")
    # The new primary serves every client, and blacklight catches a walk again.
    after = [(await infer(http, guard, x[600 + j], c))[0] for j, c in enumerate(CLIENTS)]
    assert after == [200] * 10
    assert [(await infer(http, guard, q, "c9"))[0] for q in probes(5, seed=4)] == [
        200,
        200,
        200,
        403,
        403,
    ]

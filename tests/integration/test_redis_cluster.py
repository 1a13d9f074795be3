"""The guard on a real three-node Redis Cluster (``state: {cluster: true}``), through sockets."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from guard.clients import key_digest
from guard.models import load_samples
from tests.integration import test_detection
from tests.integration.conftest import StartGuard
from tests.integration.redis_server import RedisClusterServers
from tests.integration.test_detection import BLACKLIGHT_KEY, infer, probes

DEFAULT_POLICY = Path(__file__).resolve().parents[2] / "policies" / "default.yaml"
CLIENTS = [f"c{i}" for i in range(10)]


@pytest.fixture(autouse=True)
def blacklight_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BLACKLIGHT_KEY, "the deployment's secret")
    for name in CLIENTS:  # infer() sends test_detection.KEYS[client]
        monkeypatch.setitem(test_detection.KEYS, name, f"key-{name}")


def default_policy(state: dict[str, Any]) -> dict[str, Any]:
    """The built-in default policy, its state in Redis, its clients identified by key."""
    document: dict[str, Any] = yaml.safe_load(DEFAULT_POLICY.read_text())
    for stage in document["models"]["digits"]["stages"]:
        if "blacklight" in stage:
            stage["blacklight"]["key_env"] = BLACKLIGHT_KEY  # required with a shared store
    document["state"] = state
    return document


async def start(start_guard: StartGuard, document: dict[str, Any]) -> Any:
    document["clients"] = {"keys_file": "keys.yaml"}
    entries = {name: {"key_sha256": key_digest(test_detection.KEYS[name])} for name in CLIENTS}
    return await start_guard(document, files={"keys.yaml": yaml.safe_dump({"clients": entries})})


def cluster_state(servers: RedisClusterServers, **extra: Any) -> dict[str, Any]:
    return {"backend": "redis", "url": servers.url, "timeout": 2.0, **extra}


async def serve_every_client(
    start_guard: StartGuard, http: aiohttp.ClientSession, state: dict[str, Any]
) -> list[list[int]]:
    guard = await start(start_guard, default_policy(state))
    x, _ = load_samples("digits")
    return [
        [(await infer(http, guard, x[10 * i + j], client))[0] for j in range(3)]
        for i, client in enumerate(CLIENTS)
    ]


async def test_the_default_policy_on_a_cluster_serves_every_client(
    start_guard: StartGuard, http: aiohttp.ClientSession, redis_cluster: RedisClusterServers
) -> None:
    statuses = await serve_every_client(
        start_guard, http, cluster_state(redis_cluster, cluster=True)
    )
    assert statuses == [[200, 200, 200]] * len(CLIENTS)
    # Every node holds some of the clients' state: the keys are spread, not on one node.
    assert all(keys for keys in redis_cluster.keys().values())


async def test_a_single_node_client_on_a_cluster_fails_as_reported(
    start_guard: StartGuard, http: aiohttp.ClientSession, redis_cluster: RedisClusterServers
) -> None:
    """The issue's reproduction: without ``cluster: true``, keys on the other nodes
    answer MOVED, and the stages apply their on_error (closed: 503)."""
    statuses = await serve_every_client(start_guard, http, cluster_state(redis_cluster))
    refused = sum(s == [503, 503, 503] for s in statuses)
    print("single-node client on a cluster:", statuses)
    assert refused >= len(CLIENTS) // 2, statuses


@pytest.mark.parametrize(("on_error", "status"), [("closed", 503), ("open", 200)])
async def test_a_cluster_node_killed_mid_run_applies_on_error_and_detection_resumes(
    start_guard: StartGuard,
    http: aiohttp.ClientSession,
    redis_cluster: RedisClusterServers,
    on_error: str,
    status: int,
) -> None:
    stages = [
        {"validate": {"min": 0.0, "max": 16.0}},
        {"budget": {"limits": [{"queries": 100, "per": "1m"}], "on_error": on_error}},
        {"blacklight": {"key_env": BLACKLIGHT_KEY, "on_error": on_error}},
    ]
    document = {
        "version": 1,
        "models": {"digits": {"model": "builtin:digits", "stages": stages}},
        "state": cluster_state(redis_cluster, cluster=True, timeout=0.5),
    }
    guard = await start(start_guard, document)
    x, _ = load_samples("digits")
    assert [(await infer(http, guard, x[i], c))[0] for i, c in enumerate(CLIENTS)] == [200] * 10
    victim = redis_cluster.nodes[1]
    victim.kill()  # SIGKILL: its slots (a third of the clients, every fingerprint table) fail
    for i, client in enumerate(CLIENTS):
        got, data, headers = await infer(http, guard, x[20 + i], client)
        # Every fingerprint lookup touches the dead node: each request gets on_error.
        assert got == status
        assert headers["X-Guard-Verdict"] == ("flag" if status == 200 else "error")
        if status == 503:
            assert "try again shortly" in data["error"] and "redis" not in data["error"]
    await asyncio.to_thread(redis_cluster.restart, victim)
    await asyncio.sleep(1.2)  # past the reconnect backoff and the client's topology refresh
    served = [(await infer(http, guard, x[40 + i], c)) for i, c in enumerate(CLIENTS)]
    assert [(s, h["X-Guard-Verdict"]) for s, _, h in served] == [(200, "allow")] * 10
    # Detection works again (the restarted node is empty and reloads the scripts).
    walk = [(await infer(http, guard, q, "c0"))[0] for q in probes(5, seed=3)]
    assert walk == [200, 200, 200, 403, 403]


async def test_three_guards_on_a_cluster_catch_a_split_walk_and_share_budgets(
    start_guard: StartGuard, http: aiohttp.ClientSession, redis_cluster: RedisClusterServers
) -> None:
    stages = [
        {"validate": {"min": 0.0, "max": 16.0}},
        {"budget": {"limits": [{"queries": 8, "per": "1m"}]}},
        {"blacklight": {"key_env": BLACKLIGHT_KEY}},
    ]
    document = {
        "version": 1,
        "models": {"digits": {"model": "builtin:digits", "stages": stages}},
        "state": cluster_state(redis_cluster, cluster=True),
    }
    fleet = [await start(start_guard, dict(document)) for _ in range(3)]
    walk = probes(5, seed=6)
    statuses = [(await infer(http, fleet[i % 3], q, "c1"))[0] for i, q in enumerate(walk)]
    assert statuses == [200, 200, 200, 403, 403]  # the 4th matches 3 sent to the other guards
    x, _ = load_samples("digits")  # 5 counted above: 3 more across the fleet, then 429
    assert [(await infer(http, fleet[i % 3], x[300 + i], "c1"))[0] for i in range(4)] == [
        200,
        200,
        200,
        429,
    ]
    assert (await infer(http, fleet[2], x[310], "c2"))[0] == 200  # others unaffected

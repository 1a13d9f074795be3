"""The guard on a real three-node Redis Cluster (``state: {cluster: true}``), through sockets."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from guard.clients import key_digest
from guard.models import load_samples
from tests.integration import test_detection
from tests.integration.conftest import StartGuard
from tests.integration.redis_server import RedisClusterServers, running_cluster
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
    for model in document["models"].values():
        for stage in model["stages"]:
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


@pytest.mark.parametrize("scope", ["table", "client"])
async def test_three_guards_on_a_cluster_catch_a_split_walk_and_share_budgets(
    start_guard: StartGuard,
    http: aiohttp.ClientSession,
    redis_cluster: RedisClusterServers,
    scope: str,
) -> None:
    stages = [
        {"validate": {"min": 0.0, "max": 16.0}},
        {"budget": {"limits": [{"queries": 8, "per": "1m"}]}},
        {"blacklight": {"key_env": BLACKLIGHT_KEY}},
    ]
    document = {
        "version": 1,
        "models": {"digits": {"model": "builtin:digits", "stages": stages}},
        "state": cluster_state(redis_cluster, cluster=True, fingerprint_scope=scope),
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


@pytest.fixture(scope="module")
def replicated_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    """Three primaries with a replica each: a primary lost is replaced by its replica."""
    with running_cluster(tmp_path_factory.mktemp("redis-replicated"), replicas=1) as servers:
        yield servers


async def test_a_primary_killed_fails_over_to_its_replica_and_the_guard_follows(
    start_guard: StartGuard,
    http: aiohttp.ClientSession,
    replicated_cluster: RedisClusterServers,
) -> None:
    """The issue's target: a node killed gives the policy's on_error for at most the
    failover time, and no 5xx beyond it."""
    stages = [
        {"validate": {"min": 0.0, "max": 16.0}},
        {"budget": {"limits": [{"queries": 1000, "per": "1m"}]}},
        {"blacklight": {"key_env": BLACKLIGHT_KEY}},
    ]
    document = {
        "version": 1,
        "models": {"digits": {"model": "builtin:digits", "stages": stages}},
        "state": cluster_state(replicated_cluster, cluster=True, timeout=0.5),
    }
    guard = await start(start_guard, document)
    x, _ = load_samples("digits")
    assert [(await infer(http, guard, x[i], c))[0] for i, c in enumerate(CLIENTS)] == [200] * 10
    (victim, *_) = replicated_cluster.primaries()
    victim.kill()
    killed = time.monotonic()
    seen: list[tuple[float, int, str]] = []
    i = 0
    while time.monotonic() - killed < 30:
        got, _, headers = await infer(http, guard, x[100 + i % 600], CLIENTS[i % 10])
        seen.append((time.monotonic() - killed, got, headers["X-Guard-Verdict"]))
        i += 1
        if len(seen) > 20 and all(s[1:] == (200, "allow") for s in seen[-20:]):
            break
        await asyncio.sleep(0.01)
    assert {s[1:] for s in seen} <= {(200, "allow"), (503, "error")}  # on_error, never a 500
    refused = [t for t, status, _ in seen if status == 503]
    assert refused and seen[-1][1:] == (200, "allow")
    print(f"503s from {refused[0]:.1f} s to {refused[-1]:.1f} s after the kill; {len(seen)} sent")
    # Once failed over: every later request served, and detection works on the new primary.
    after = [(await infer(http, guard, x[800 + j], c))[0] for j, c in enumerate(CLIENTS)]
    assert after == [200] * 10
    walk = [(await infer(http, guard, q, "c5"))[0] for q in probes(5, seed=3)]
    assert walk == [200, 200, 200, 403, 403]

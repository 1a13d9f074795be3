"""Byte logs (``append_bytes`` / ``read_bytes``) on memory, Redis, a Redis Cluster and a
primary found by a sentinel."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from guard.state import SentinelConfig, StateStore, client_key
from guard.state.memory import MemoryStore
from guard.state.redis import RedisStore
from tests.integration.redis_server import RedisClusterServers, RedisSentinelServers, RedisServer

TICK = 1.0  # long enough to act within on a loaded machine


@pytest.fixture(params=["memory", "redis", "cluster", "sentinel"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[StateStore]:
    if request.param == "memory":
        built: StateStore = MemoryStore()
    elif request.param == "sentinel":
        servers: RedisSentinelServers = request.getfixturevalue("redis_sentinel")
        where = SentinelConfig(master=servers.MASTER, addresses=(servers.sentinel_address,))
        built = RedisStore(None, sentinel=where, key_prefix="b:", timeout=5.0)
        await built.append_bytes("warm-up", b"", 1, 1.0)
    elif request.param == "cluster":
        cluster: RedisClusterServers = request.getfixturevalue("redis_cluster")
        built = RedisStore(cluster.url, cluster=True, key_prefix="b:", timeout=5.0)
        await built.append_bytes("warm-up", b"", 1, 1.0)  # learn the slots, load the script
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        built = RedisStore(server.url, key_prefix="b:", timeout=5.0)
        await built.append_bytes("warm-up", b"", 1, 1.0)  # load the script once
    yield built
    await built.close()


async def test_a_log_keeps_its_newest_bytes(store: StateStore) -> None:
    key = client_key("alice", "log")
    assert await store.read_bytes(key) == b""
    assert await store.append_bytes(key, b"abcd", 10, 60.0) == 4
    assert await store.append_bytes(key, b"efgh", 10, 60.0) == 8
    assert await store.append_bytes(key, b"ij", 10, 60.0) == 10  # up to a quarter more
    assert await store.append_bytes(key, b"kl", 8, 60.0) == 8  # past it: trimmed to 8
    assert await store.read_bytes(key) == b"efghijkl"
    assert await store.append_bytes(key, b"0123456789ABC", 10, 60.0) == 10
    assert await store.read_bytes(key) == b"3456789ABC"
    assert await store.read_bytes(client_key("bob", "log")) == b""


async def test_a_log_expires_after_its_last_append(store: StateStore) -> None:
    key = client_key("alice", "log")
    await store.append_bytes(key, b"\x00\xff" * 8, 100, TICK)
    await asyncio.sleep(TICK / 2)
    await store.append_bytes(key, b"\x01", 100, TICK)  # renews the expiry
    await asyncio.sleep(TICK * 0.75)
    assert await store.read_bytes(key) == b"\x00\xff" * 8 + b"\x01"
    await asyncio.sleep(TICK * 1.5)
    assert await store.read_bytes(key) == b""


async def test_memory_logs_count_towards_the_byte_bound() -> None:
    store = MemoryStore(max_bytes=10_000)
    for i in range(5):
        await store.append_bytes(client_key(f"c{i}", "log"), b"x" * 3000, 3000, 60.0)
    assert store.nbytes <= 10_000
    assert await store.read_bytes(client_key("c0", "log")) == b""  # least recently used: evicted
    assert await store.read_bytes(client_key("c4", "log")) == b"x" * 3000

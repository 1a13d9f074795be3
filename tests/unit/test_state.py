"""The state stores: one suite run against memory, a real Redis and a real three-node Redis
Cluster, then each one's own bounds."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
import redis.asyncio as aioredis

from guard.configreader import Section
from guard.errors import PolicyError, StateUnavailable
from guard.state import (
    CLUSTER_FINGERPRINT_SHARDS,
    FingerprintMatch,
    SentinelConfig,
    StateConfig,
    StateStore,
    build_store,
    client_key,
    read_state_config,
)
from guard.state.memory import MemoryStore
from guard.state.redis import RedisStore, _hex
from tests.integration.redis_server import (
    RedisClusterServers,
    RedisSentinelServers,
    RedisServer,
    TlsRedisServer,
)

TICK = (
    0.5  # a window or ttl long enough to act within on a loaded machine, short enough to wait out
)


def open_redis(request: pytest.FixtureRequest, kind: str, **options: Any) -> RedisStore:
    """A RedisStore on a fresh single server (``redis``), three-node cluster (``cluster``) or
    primary found by a sentinel (``sentinel``)."""
    options.setdefault("timeout", 5.0)  # CI machines can be slow
    if kind == "sentinel":
        servers: RedisSentinelServers = request.getfixturevalue("redis_sentinel")
        where = SentinelConfig(master=servers.MASTER, addresses=(servers.sentinel_address,))
        return RedisStore(None, sentinel=where, **options)
    if kind == "cluster":
        cluster: RedisClusterServers = request.getfixturevalue("redis_cluster")
        return RedisStore(cluster.url, cluster=True, **options)
    server: RedisServer = request.getfixturevalue("redis_server")
    return RedisStore(server.url, **options)


@pytest.fixture(params=["memory", "redis", "cluster", "sentinel"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[StateStore]:
    """Each store as a policy opens it: the cluster's fingerprint tables sharded by default."""
    if request.param == "memory":
        built: StateStore = MemoryStore()
    elif request.param == "cluster":
        built = open_redis(
            request, "cluster", key_prefix="t:", fingerprint_shards=CLUSTER_FINGERPRINT_SHARDS
        )
    else:
        built = open_redis(request, request.param, key_prefix="t:")
    yield built
    await built.close()


@pytest.fixture(params=["redis", "cluster", "sentinel"])
async def shared(request: pytest.FixtureRequest) -> AsyncIterator[RedisStore]:
    """A RedisStore on a single server, a cluster and a sentinel's primary, fingerprint
    tables in one slot."""
    built = open_redis(request, request.param)
    yield built
    await built.close()


@pytest.fixture(params=["redis", "cluster"])
async def sharded(request: pytest.FixtureRequest) -> AsyncIterator[RedisStore]:
    """A RedisStore whose fingerprint tables are sharded: 5 shards on a single server
    (all in one pipeline), the default 3 on a cluster (one per node)."""
    shards = CLUSTER_FINGERPRINT_SHARDS if request.param == "cluster" else 5
    built = open_redis(request, request.param, fingerprint_shards=shards)
    yield built
    await built.close()


def fingerprint_args(**overrides: Any) -> dict[str, Any]:
    return {"threshold": 2, "max_queries": 100, "ttl_s": 60.0, "max_per_hash": 64} | overrides


# -- counters -------------------------------------------------------------------------


async def test_incr_counts_within_a_window_then_resets(store: StateStore) -> None:
    key = client_key("alice", "n")
    assert (await store.incr(key, 2, TICK))[0] == 2
    count, reset = await store.incr(key, 3, TICK)
    assert count == 5
    assert 0 < reset <= TICK
    await asyncio.sleep(TICK + 0.05)
    assert (await store.incr(key, 1, TICK))[0] == 1


async def test_counters_are_per_key(store: StateStore) -> None:
    await store.incr(client_key("alice", "n"), 5, 10)
    assert (await store.incr(client_key("bob", "n"), 1, 10))[0] == 1
    assert (await store.incr(client_key("alice", "m"), 1, 10))[0] == 1


# -- budgets --------------------------------------------------------------------------


async def test_spend_is_all_or_nothing(store: StateStore) -> None:
    key = client_key("alice", "eps")
    assert await store.spend(key, 600, 1000, None) == (True, 600)
    assert await store.spend(key, 500, 1000, None) == (False, 600)
    assert await store.spend(key, 400, 1000, None) == (True, 1000)
    assert await store.spend(key, 1, 1000, None) == (False, 1000)
    assert await store.spend(key, 0, 1000, None) == (True, 1000)


async def test_spend_over_the_limit_at_once_is_refused(store: StateStore) -> None:
    assert await store.spend(client_key("alice", "eps"), 11, 10, None) == (False, 0)


async def test_windowed_budget_resets_and_unwindowed_does_not(store: StateStore) -> None:
    windowed, forever = client_key("a", "w"), client_key("a", "f")
    assert await store.spend(windowed, 10, 10, TICK) == (True, 10)
    assert await store.spend(forever, 10, 10, None) == (True, 10)
    await asyncio.sleep(TICK + 0.05)
    assert await store.spend(windowed, 10, 10, TICK) == (True, 10)
    assert await store.spend(forever, 1, 10, None) == (False, 10)


async def test_concurrent_spends_never_exceed_the_limit(store: StateStore) -> None:
    key = client_key("alice", "eps")
    results = await asyncio.gather(*(store.spend(key, 3, 100, None) for _ in range(60)))
    granted = [used for ok, used in results if ok]
    assert len(granted) == 33  # floor(100 / 3)
    assert sorted(granted) == list(range(3, 100, 3))
    assert await store.spend(key, 1, 100, None) == (True, 100)


# -- marks ----------------------------------------------------------------------------


async def test_marks_expire_and_renew(store: StateStore) -> None:
    key = client_key("alice", "degrade", "digits")
    assert not await store.marked(key)
    await store.mark(key, TICK)
    assert await store.marked(key)
    await asyncio.sleep(TICK / 2)
    await store.mark(key, TICK)  # renewed: outlives the first ttl
    await asyncio.sleep(TICK / 2 + 0.05)
    assert await store.marked(key)
    await asyncio.sleep(TICK)
    assert not await store.marked(key)


# -- histories --------------------------------------------------------------------------


async def test_push_keeps_the_newest_items_in_order(store: StateStore) -> None:
    key = client_key("alice", "h")
    assert await store.items(key) == []
    assert await store.push(key, [b"a", b"b"], 3, 10) == 2
    assert await store.push(key, [b"c", b"d", b"e"], 3, 10) == 3
    assert await store.items(key) == [b"c", b"d", b"e"]
    assert await store.push(key, [], 3, 10) == 3


async def test_history_expires_after_its_last_push(store: StateStore) -> None:
    key = client_key("alice", "h")
    await store.push(key, [b"\x00\xff" * 8], 10, TICK)
    await asyncio.sleep(TICK / 2)
    await store.push(key, [b"x"], 10, TICK)
    await asyncio.sleep(TICK / 2 + 0.05)
    assert await store.items(key) == [b"\x00\xff" * 8, b"x"]  # binary-safe, ttl renewed
    await asyncio.sleep(TICK)
    assert await store.items(key) == []


# -- fingerprints -----------------------------------------------------------------------


async def test_a_match_shares_more_than_threshold_hashes(store: StateStore) -> None:
    first = await store.match_fingerprints("t", "alice", [[1, 2, 3, 4]], **fingerprint_args())
    assert (first[0].matches, first[0].best) == (0, 0)
    got = await store.match_fingerprints(
        "t", "bob", [[1, 2, 9], [1, 2, 3, 10], [2**64 - 1, 2**63]], **fingerprint_args()
    )
    # [1,2,9] shares 2 (not > 2) with the first; [1,2,3,10] shares 3 with it and 2 with [1,2,9].
    assert [(m.matches, m.client_matches, m.best) for m in got] == [(0, 0, 2), (1, 0, 3), (0, 0, 0)]
    again = await store.match_fingerprints("t", "alice", [[1, 2, 3, 4]], **fingerprint_args())
    assert (again[0].matches, again[0].client_matches, again[0].best) == (2, 1, 4)


async def test_tables_are_separate(store: StateStore) -> None:
    await store.match_fingerprints("a", "c", [[1, 2, 3, 4]], **fingerprint_args())
    got = await store.match_fingerprints("b", "c", [[1, 2, 3, 4]], **fingerprint_args())
    assert got[0].matches == 0


async def test_fingerprint_table_keeps_max_queries(store: StateStore) -> None:
    args = fingerprint_args(threshold=0, max_queries=3)
    for i in range(5):
        await store.match_fingerprints("t", "c", [[100 + i, 7]], **args)
    got = await store.match_fingerprints("t", "c", [[7]], **args)
    assert got[0].matches == 3  # only the newest 3 of the 5 were kept


async def test_fingerprints_expire(store: StateStore) -> None:
    args = fingerprint_args(threshold=0, ttl_s=TICK)
    await store.match_fingerprints("t", "c", [[5, 6]], **args)
    await asyncio.sleep(TICK + 0.05)
    assert (await store.match_fingerprints("t", "c", [[5, 6]], **args))[0].matches == 0


async def test_popular_hashes_index_only_the_newest_queries(store: StateStore) -> None:
    args = fingerprint_args(threshold=0, max_per_hash=4)
    for _ in range(10):
        await store.match_fingerprints("t", "c", [[42]], **args)
    assert (await store.match_fingerprints("t", "c", [[42]], **args))[0].matches == 4


async def test_stores_agree_on_a_random_workload(shared: RedisStore) -> None:
    rng = np.random.default_rng(5)
    memory = MemoryStore()
    args = fingerprint_args(threshold=3, max_queries=40, max_per_hash=8)
    for _ in range(60):
        batch = [
            sorted({int(h) for h in rng.integers(0, 24, size=int(rng.integers(1, 10)))})
            for _ in range(int(rng.integers(1, 4)))
        ]
        client = f"c{rng.integers(3)}"
        want = await memory.match_fingerprints("t", client, batch, **args)
        assert await shared.match_fingerprints("t", client, batch, **args) == want


async def test_stores_agree_on_long_fingerprints_under_every_bound(shared: RedisStore) -> None:
    """Fingerprints longer than the script's index slices (it reads and writes the index
    a fingerprint at a time, in slices), with exact repeats, while the per-hash, per-client
    and table bounds all evict."""
    rng = np.random.default_rng(8)
    memory = MemoryStore()
    args = fingerprint_args(threshold=40, max_queries=12, max_per_hash=3, max_per_client=5)
    pool = [sorted({int(h) for h in rng.integers(0, 900, size=700)}) for _ in range(30)]
    assert min(len(p) for p in pool) > 256  # past a slice of hashes, and of HSET's pairs
    matched = 0
    for _ in range(45):
        picks = [int(rng.integers(len(pool))) for _ in range(int(rng.integers(1, 3)))]
        batch, digests = [pool[i] for i in picks], [bytes([i]) for i in picks]
        client = f"c{rng.integers(3)}"
        want = await memory.match_fingerprints("t", client, batch, digests=digests, **args)
        got = await shared.match_fingerprints("t", client, batch, digests=digests, **args)
        assert got == want
        matched += sum(m.matches > 0 for m in got)
    assert matched > 5


async def test_sharded_tables_agree_with_memory_while_no_bound_binds(sharded: RedisStore) -> None:
    """Split by hash value, a table's shares add up to the same counts, repeats included
    (the bounds apply per shard: see test_sharded_bounds_hold_per_shard)."""
    rng = np.random.default_rng(11)
    memory = MemoryStore()
    args = fingerprint_args(threshold=3, max_queries=10_000, max_per_hash=10_000)
    # Queries drawn from a pool, so some are exact repeats (a digest names its query's bytes).
    pool = [
        sorted({int(h) for h in rng.integers(0, 60, size=int(rng.integers(0, 12)))})
        for _ in range(60)
    ]
    repeats = 0
    for _ in range(80):
        picks = [int(rng.integers(len(pool))) for _ in range(int(rng.integers(1, 4)))]
        batch, digests = [pool[i] for i in picks], [bytes([i]) for i in picks]
        client = f"c{rng.integers(3)}"
        want = await memory.match_fingerprints("t", client, batch, digests=digests, **args)
        got = await sharded.match_fingerprints("t", client, batch, digests=digests, **args)
        assert got == want
        repeats += sum(m.repeat for m in got)
    assert repeats > 10


async def test_sharded_bounds_hold_per_shard(sharded: RedisStore) -> None:
    """max_queries bounds each shard: a shard keeps the newest queries holding one of its
    hashes, so a query a full shard dropped still counts in the others."""
    args = fingerprint_args(threshold=0, max_queries=3)
    for i in range(4):  # hash 0 in every query (shard 0); the other in shards 1 to 4
        await sharded.match_fingerprints("t", "c", [[0, 1 + i]], **args)
    assert (await sharded.match_fingerprints("t", "c", [[0]], **args))[0].matches == 3
    # The first query left shard 0 (in one table it would be gone) but shard 1 keeps it.
    assert (await sharded.match_fingerprints("t", "c", [[1]], **args))[0].matches == 1


async def test_a_sharded_table_spreads_one_model_over_every_node(
    redis_cluster: RedisClusterServers,
) -> None:
    store = RedisStore(
        redis_cluster.url,
        cluster=True,
        key_prefix="g:",
        timeout=5.0,
        fingerprint_shards=CLUSTER_FINGERPRINT_SHARDS,
    )
    rng = np.random.default_rng(3)
    try:  # a blacklight-like load: 50 hashes of 64 bits per query
        for client in ("alice", "bob"):
            rows = [sorted({int(h) for h in rng.integers(0, 2**63, 50)}) for _ in range(4)]
            got = await store.match_fingerprints(
                "blacklight:digits", client, rows, **fingerprint_args(threshold=25)
            )
            assert [m.matches for m in got] == [0, 0, 0, 0]
            again = await store.match_fingerprints(
                "blacklight:digits", client, rows[:1], **fingerprint_args(threshold=25)
            )
            assert (again[0].matches, again[0].client_matches, again[0].best) == (1, 1, 50)
    finally:
        await store.close()
    held = redis_cluster.keys()
    table = {port: [k for k in keys if "blacklight:digits#" in k] for port, keys in held.items()}
    assert all(table.values()), {port: len(keys) for port, keys in table.items()}
    indexes = {k.split("}")[0] for keys in table.values() for k in keys}
    assert len(indexes) == CLUSTER_FINGERPRINT_SHARDS  # every shard holds some of the hashes


@pytest.fixture(params=["redis", "cluster"])
async def scoped(request: pytest.FixtureRequest) -> AsyncIterator[RedisStore]:
    """A RedisStore keeping each client's fingerprints in the client's own table."""
    built = open_redis(request, request.param, fingerprint_scope="client")
    yield built
    await built.close()


async def test_a_client_scoped_table_counts_the_clients_own_queries(scoped: RedisStore) -> None:
    args = fingerprint_args(threshold=2)
    await scoped.match_fingerprints("t", "alice", [[1, 2, 3, 4]], digests=[b"a"], **args)
    bob = await scoped.match_fingerprints("t", "bob", [[1, 2, 3, 5]], digests=[b"a"], **args)
    assert bob == [FingerprintMatch(0, 0, 0)]  # alice's query is not in bob's table
    alice = await scoped.match_fingerprints("t", "alice", [[1, 2, 3, 6]], **args)
    assert alice == [FingerprintMatch(1, 1, 3)]
    again = await scoped.match_fingerprints("t", "alice", [[1, 2, 3, 4]], digests=[b"a"], **args)
    assert again == [FingerprintMatch(0, 0, 0, repeat=True)]


async def test_client_scoped_tables_agree_with_a_memory_table_per_client(
    scoped: RedisStore,
) -> None:
    rng = np.random.default_rng(13)
    memory = MemoryStore()
    args = fingerprint_args(threshold=2, max_queries=30, max_per_hash=6, max_per_client=12)
    for _ in range(120):
        batch = [
            sorted({int(h) for h in rng.integers(0, 24, size=int(rng.integers(1, 8)))})
            for _ in range(int(rng.integers(1, 4)))
        ]
        digests = [bytes([int(rng.integers(0, 12))]) for _ in batch]
        client = f"c{rng.integers(4)}"
        want = await memory.match_fingerprints(
            f"t/{client}", client, batch, digests=digests, **args
        )
        got = await scoped.match_fingerprints("t", client, batch, digests=digests, **args)
        assert got == want


async def test_client_scoped_fingerprints_live_in_the_clients_slot(
    redis_cluster: RedisClusterServers,
) -> None:
    store = RedisStore(
        redis_cluster.url, cluster=True, key_prefix="s:", timeout=5.0, fingerprint_scope="client"
    )
    clients = [f"client{i}" for i in range(12)]
    try:
        for client in clients:
            await store.spend(client_key(client, "eps"), 1, 10, 60)
            await store.match_fingerprints("blacklight:m", client, [[1, 2]], **fingerprint_args())
    finally:
        await store.close()
    held = redis_cluster.keys()
    where = {key: port for port, keys in held.items() for key in keys}
    for client in clients:
        fingerprints = [k for k in where if k.startswith(f"s:{{{client}}}:fp:blacklight:m")]
        assert fingerprints and {where[k] for k in fingerprints} == {where[f"s:{{{client}}}:eps"]}
    assert all(held.values())


# -- keys -------------------------------------------------------------------------------


def test_client_keys_carry_an_unambiguous_hash_tag() -> None:
    assert client_key("alice", "budget", "digits") == "{alice}:budget:digits"
    assert client_key("a}b", "x") == "{a%7Db}:x"
    assert client_key("a%7Db", "x") != client_key("a}b", "x")
    assert client_key("addr:::1", "x") == "{addr:::1}:x"


async def test_redis_keys_are_prefixed_and_tagged(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url, key_prefix="g1:", timeout=5.0)
    try:
        await store.incr(client_key("alice", "n"), 1, 10)
        await store.match_fingerprints("blacklight:digits", "alice", [[1]], **fingerprint_args())
        async with aioredis.Redis.from_url(redis_server.url) as raw:
            keys = sorted(k.decode() for k in await raw.keys("*"))
            ttls = [await raw.pttl(k) for k in keys]
    finally:
        await store.close()
    assert keys == [
        "g1:{alice}:n",
        "g1:{blacklight:digits}:idx",
        "g1:{blacklight:digits}:meta",
        "g1:{blacklight:digits}:n",
        "g1:{blacklight:digits}:o:alice",
        "g1:{blacklight:digits}:q",
    ]
    assert all(t > 0 for t in ttls)  # nothing is kept forever


async def test_on_a_cluster_each_operation_keys_live_on_one_node(
    redis_cluster: RedisClusterServers,
) -> None:
    store = RedisStore(redis_cluster.url, cluster=True, key_prefix="g1:", timeout=5.0)
    clients = [f"client{i}" for i in range(12)]
    try:
        for client in clients:
            await store.spend(client_key(client, "eps"), 1, 10, 60)
            await store.push(client_key(client, "h"), [b"x"], 4, 60)
            await store.match_fingerprints("blacklight:m", client, [[1, 2]], **fingerprint_args())
    finally:
        await store.close()
    held = redis_cluster.keys()
    where = {key: port for port, keys in held.items() for key in keys}
    for client in clients:
        tag = f"{{{client}}}"
        assert where[f"g1:{tag}:eps"] == where[f"g1:{tag}:h"]  # a client: one slot, one node
    assert all(held.values())  # twelve clients are spread over all three nodes


async def test_a_single_node_client_on_a_cluster_names_the_fix(
    redis_cluster: RedisClusterServers,
) -> None:
    errors: list[str] = []
    store = RedisStore(redis_cluster.url, timeout=5.0, on_error=errors.append)
    elsewhere = next(  # a client whose keys live on another node than the URL's
        client_key(f"c{i}", "n")
        for i in range(100)
        if redis_cluster.node_of(client_key(f"c{i}", "n")) is not redis_cluster.nodes[0]
    )
    try:
        with pytest.raises(StateUnavailable, match=r"MovedError.*set cluster: true"):
            await store.incr(elsewhere, 1, 60)
    finally:
        await store.close()
    assert errors == ["incr"]


# -- memory bounds ----------------------------------------------------------------------


async def test_memory_store_evicts_least_recently_used_clients() -> None:
    store = MemoryStore(max_clients=2)
    await store.incr(client_key("a", "n"), 1, 60)
    await store.incr(client_key("b", "n"), 1, 60)
    await store.incr(client_key("a", "n"), 1, 60)  # a is now the most recent
    await store.incr(client_key("c", "n"), 1, 60)
    assert store.clients == 2
    assert (await store.incr(client_key("a", "n"), 1, 60))[0] == 3
    assert (await store.incr(client_key("b", "n"), 1, 60))[0] == 1  # b was evicted


async def test_memory_store_bounds_history_bytes() -> None:
    store = MemoryStore(max_bytes=10_000)
    for client in range(20):
        await store.push(client_key(str(client), "h"), [bytes(1000)], 5, 60)
    assert store.nbytes <= 10_000
    assert 5 <= store.clients < 20
    assert await store.items(client_key("19", "h")) == [bytes(1000)]
    assert await store.items(client_key("0", "h")) == []


async def test_memory_store_follows_its_clock() -> None:
    now = [0.0]
    store = MemoryStore(clock=lambda: now[0])
    await store.mark("{a}:m", 10)
    now[0] = 9.9
    assert await store.marked("{a}:m")
    now[0] = 10.0
    assert not await store.marked("{a}:m")


# -- Redis failures -----------------------------------------------------------------------


async def test_redis_down_raises_state_unavailable_counts_and_recovers(
    redis_server: RedisServer,
) -> None:
    errors: list[str] = []
    store = RedisStore(redis_server.url, timeout=0.2, backoff_s=0.1, on_error=errors.append)
    key = client_key("alice", "n")
    try:
        assert (await store.incr(key, 1, 60))[0] == 1
        redis_server.stop()
        with pytest.raises(StateUnavailable, match="state store unavailable"):
            await store.incr(key, 1, 60)
        with pytest.raises(StateUnavailable):  # within the backoff: refused without a wait
            await store.match_fingerprints("t", "alice", [[1]], **fingerprint_args())
        assert errors == ["incr", "fingerprints"]
        redis_server.start()
        await asyncio.sleep(0.15)
        assert (await store.incr(key, 1, 60))[0] == 1  # a fresh server: state was not persisted
        assert (await store.match_fingerprints("t", "a", [[1]], **fingerprint_args()))[
            0
        ].matches == 0
    finally:
        await store.close()


@pytest.mark.parametrize("kind", ["redis", "cluster"])
async def test_too_many_operations_at_once_are_busy_not_a_dead_server(
    request: pytest.FixtureRequest, kind: str
) -> None:
    errors: list[str] = []
    store = open_redis(request, kind, max_connections=2, on_error=errors.append)
    try:
        got = await asyncio.gather(
            *(store.incr(client_key("alice", "n"), 1, 60) for _ in range(40)),
            return_exceptions=True,
        )
        busy = [g for g in got if isinstance(g, StateUnavailable)]
        assert busy and all("state store busy" in str(b) for b in busy)
        assert len(errors) == len(busy) < 40
        # No backoff: the server was never down, the next operation goes through.
        assert (await store.incr(client_key("alice", "n"), 1, 60))[0] == 41 - len(busy)
    finally:
        await store.close()


async def test_unreachable_redis_fails_within_the_timeout() -> None:
    store = RedisStore("redis://127.0.0.1:1/0", timeout=0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        with pytest.raises(StateUnavailable):
            await store.spend("{a}:b", 1, 10, None)
    finally:
        await store.close()
    assert loop.time() - started < 1.0


# -- configuration ----------------------------------------------------------------------


ENVIRON = {
    "REDIS_URL": "redis://:secret@h:6379/0",
    "REDIS_PASSWORD": "s3cret",
    "SENTINEL_PASSWORD": "watch",
}


def read(data: Any) -> StateConfig:
    return read_state_config(Section(data, source="p.yaml", path="state"), ENVIRON)


def test_state_config_defaults_to_memory() -> None:
    assert read(None) == StateConfig()
    assert isinstance(build_store(read({})), MemoryStore)


def test_state_config_reads_redis() -> None:
    config = read(
        {"backend": "redis", "url": "redis://h:6379/1", "key_prefix": "x:", "timeout": 0.5}
    )
    assert (config.url, config.key_prefix, config.timeout) == ("redis://h:6379/1", "x:", 0.5)
    assert not config.cluster
    assert read({"backend": "redis", "url_env": "REDIS_URL"}).url == "redis://:secret@h:6379/0"
    assert config.fingerprint_shards == 1  # one server: one table, one script, exact bounds
    assert config.max_connections == 256 and config.fingerprint_scope == "table"
    scoped = read({"backend": "redis", "url": "redis://h", "fingerprint_scope": "client"})
    assert scoped.fingerprint_scope == "client"
    assert read({"backend": "redis", "url": "redis://h", "max_connections": 8}).max_connections == 8
    clustered = read({"backend": "redis", "url": "redis://h:7000", "cluster": True})
    assert clustered.cluster and clustered.url == "redis://h:7000"
    assert clustered.fingerprint_shards == CLUSTER_FINGERPRINT_SHARDS
    one = read({"backend": "redis", "url": "redis://h", "cluster": True, "fingerprint_shards": 1})
    assert one.fingerprint_shards == 1


def test_state_config_reads_sentinel_and_acl() -> None:
    config = read(
        {
            "backend": "redis",
            "sentinel": {
                "master": "guard",
                "addresses": ["s0:26379", "10.0.0.7:26380", "[::1]:26381"],
                "password_env": "SENTINEL_PASSWORD",
            },
            "username": "guard",
            "password_env": "REDIS_PASSWORD",
        }
    )
    assert config.url is None  # the sentinels give the address
    assert config.sentinel == SentinelConfig(
        master="guard",
        addresses=(("s0", 26379), ("10.0.0.7", 26380), ("::1", 26381)),
        password="watch",
    )
    assert (config.username, config.password) == ("guard", "s3cret")
    assert "s3cret" not in repr(config) and "watch" not in repr(config)
    tls = read(
        {
            "backend": "redis",
            "url": "rediss://x/2",
            "sentinel": {"master": "m", "addresses": ["s:1"]},
        }
    )
    assert tls.url == "rediss://x/2" and tls.sentinel is not None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"backend": "etcd"}, "state.backend must be one of memory, redis"),
        ({"backend": "redis"}, "takes url or url_env"),
        ({"backend": "redis", "url": "http://h"}, "must be a redis://"),
        ({"backend": "redis", "url_env": "GUARD_TEST_UNSET"}, "which is not set"),
        ({"backend": "redis", "url": "redis://h", "max_clients": 5}, "max_clients does not apply"),
        ({"url": "redis://h"}, "state.url does not apply to backend memory"),
        ({"max_clients": 0}, "max_clients must be >= 1"),
        ({"backend": "redis", "url": "redis://h", "timeout": 0}, "timeout must be > 0"),
        ({"backend": "redis", "url": "redis://h/2", "cluster": True}, "cluster takes database 0"),
        ({"backend": "redis", "url": "redis://h?db=1", "cluster": True}, "takes database 0"),
        ({"backend": "redis", "url": "redis://h", "cluster": "yes"}, "cluster must be"),
        ({"cluster": True}, "state.cluster does not apply to backend memory"),
        ({"backend": "redis", "url": "redis://h", "fingerprint_shards": 0}, "must be >= 1"),
        ({"fingerprint_shards": 4}, "fingerprint_shards does not apply to backend memory"),
        ({"backend": "redis", "url": "redis://h", "fingerprint_scope": "model"}, "one of table"),
        (
            {
                "backend": "redis",
                "url": "redis://h",
                "fingerprint_scope": "client",
                "fingerprint_shards": 3,
            },
            "does not apply to fingerprint_scope client",
        ),
        ({"backend": "redis", "sentinel": {"addresses": ["s:1"]}}, "sentinel.master is required"),
        ({"backend": "redis", "sentinel": {"master": "m"}}, "sentinel.addresses is required"),
        ({"backend": "redis", "sentinel": {"master": "m", "addresses": []}}, "at least one"),
        (
            {"backend": "redis", "sentinel": {"master": "m", "addresses": ["s"]}},
            r"sentinel.addresses\[0\] must be host:port",
        ),
        (
            {
                "backend": "redis",
                "url": "redis://h",
                "cluster": True,
                "sentinel": {"master": "m", "addresses": ["s:1"]},
            },
            "exclude each other",
        ),
        (
            {"backend": "redis", "sentinel": {"master": "m", "addresses": ["s:1"], "port": 1}},
            "unknown key",
        ),
        (
            {"backend": "redis", "url": "redis://:pw@h", "password_env": "REDIS_PASSWORD"},
            "give one of them",
        ),
        ({"backend": "redis", "url": "redis://h", "password_env": "UNSET_X"}, "not set"),
        (
            {"backend": "redis", "url": "redis://:pw@h/0?ssl_ca_certs=/ca.pem"},
            "url has an option redis-py does not take: got an unexpected keyword argument "
            "'ssl_ca_certs'",
        ),
        ({"sentinel": {"master": "m", "addresses": ["s:1"]}}, "does not apply to backend memory"),
        ({"size": 3}, "unknown key"),
    ],
)
def test_state_config_errors(data: Any, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        read(data)


async def test_an_acl_user_and_password_from_the_environment(redis_server: RedisServer) -> None:
    with redis_server.client() as admin:
        admin.execute_command("ACL", "SETUSER", "guard", "on", ">s3cret", "~guard:*", "+@all")
    try:
        config = read(
            {
                "backend": "redis",
                "url": redis_server.url,
                "username": "guard",
                "password_env": "REDIS_PASSWORD",
            }
        )
        store = build_store(config)
        try:
            assert (await store.incr(client_key("alice", "n"), 1, 60))[0] == 1
        finally:
            await store.close()
        intruder = RedisStore(redis_server.url, username="guard", password="wrong", timeout=5.0)
        try:
            with pytest.raises(StateUnavailable, match="AuthenticationError"):
                await intruder.incr(client_key("alice", "n"), 1, 60)
        finally:
            await intruder.close()
        confined = RedisStore(  # the user may touch guard:* keys only
            redis_server.url, key_prefix="other:", username="guard", password="s3cret"
        )
        try:
            with pytest.raises(StateUnavailable, match="state store error"):
                await confined.incr(client_key("alice", "n"), 1, 60)
        finally:
            await confined.close()
    finally:
        with redis_server.client() as admin:
            admin.execute_command("ACL", "DELUSER", "guard")


async def test_tls_with_the_servers_ca_and_not_without(redis_tls: TlsRedisServer) -> None:
    store = build_store(read({"backend": "redis", "url": redis_tls.url}))
    try:
        assert await store.spend(client_key("alice", "eps"), 3, 10, None) == (True, 3)
        assert await store.match_fingerprints("t", "alice", [[1, 2]], **fingerprint_args()) == [
            FingerprintMatch(0, 0, 0)
        ]
    finally:
        await store.close()
    plain = RedisStore(redis_tls.url.split("?")[0].replace("rediss://", "redis://"), timeout=2.0)
    untrusted = RedisStore(redis_tls.url.split("?")[0], timeout=2.0)  # the system's CAs
    try:
        for wrong in (plain, untrusted):
            with pytest.raises(StateUnavailable, match="state store unavailable"):
                await wrong.incr(client_key("alice", "n"), 1, 60)
    finally:
        await plain.close()
        await untrusted.close()


# -- exact repeats and per-client shares ---------------------------------------------------


async def test_exact_repeats_are_neither_compared_nor_inserted(store: StateStore) -> None:
    args = fingerprint_args(threshold=0)
    first = await store.match_fingerprints("t", "alice", [[1, 2]], digests=[b"d1"], **args)
    assert not first[0].repeat
    # Anyone repeating the exact query gets repeat=True and no counts, however often.
    for client in ("alice", "bob", "alice"):
        got = await store.match_fingerprints("t", client, [[1, 2]], digests=[b"d1"], **args)
        assert got[0] == FingerprintMatch(0, 0, 0, repeat=True)
    # A near duplicate (other bytes) still matches the one stored query, not the repeats.
    near = await store.match_fingerprints("t", "alice", [[1, 2, 3]], digests=[b"d2"], **args)
    assert (near[0].matches, near[0].client_matches, near[0].repeat) == (1, 1, False)


async def test_a_repeat_expires_with_its_query(store: StateStore) -> None:
    args = fingerprint_args(threshold=0, ttl_s=TICK)
    await store.match_fingerprints("t", "a", [[1]], digests=[b"x"], **args)
    await asyncio.sleep(TICK + 0.05)
    got = await store.match_fingerprints("t", "a", [[1]], digests=[b"x"], **args)
    assert not got[0].repeat


async def test_one_client_cannot_evict_another_clients_history(store: StateStore) -> None:
    args = fingerprint_args(threshold=0, max_queries=20, max_per_client=5)
    await store.match_fingerprints("t", "alice", [[7, 8]], digests=[b"alice"], **args)
    for i in range(200):  # a flood of junk, one row at a time and in batches
        await store.match_fingerprints(
            "t", "mallory", [[1000 + i]], digests=[i.to_bytes(4, "little")], **args
        )
    got = await store.match_fingerprints("t", "bob", [[7, 8]], digests=[b"bob"], **args)
    assert got[0].matches == 1  # alice's query is still there
    # mallory kept only its share: its oldest junk is gone, its newest is not.
    old = await store.match_fingerprints("t", "x", [[1000]], **args)
    new = await store.match_fingerprints("t", "x", [[1199]], **args)
    assert (old[0].matches, new[0].matches) == (0, 1)


async def test_a_full_table_evicts_from_the_largest_holder(store: StateStore) -> None:
    args = fingerprint_args(threshold=0, max_queries=6)
    await store.match_fingerprints("t", "alice", [[1], [2]], **args)
    for i in range(10):  # many accounts, each under its share, fill the table
        await store.match_fingerprints("t", "mallory", [[100 + i]], **args)
    got = await store.match_fingerprints("t", "carol", [[1], [2]], **args)
    assert [m.matches for m in got] == [1, 1]  # alice's two queries survived


async def test_stores_agree_with_repeats_and_shares(shared: RedisStore) -> None:
    rng = np.random.default_rng(9)
    memory = MemoryStore()
    args = fingerprint_args(threshold=2, max_queries=30, max_per_hash=6, max_per_client=12)
    for _ in range(120):
        batch = [
            sorted({int(h) for h in rng.integers(0, 24, size=int(rng.integers(1, 8)))})
            for _ in range(int(rng.integers(1, 4)))
        ]
        digests = [bytes([int(rng.integers(0, 12))]) for _ in batch]
        client = f"c{rng.integers(4)}"
        want = await memory.match_fingerprints("t", client, batch, digests=digests, **args)
        got = await shared.match_fingerprints("t", client, batch, digests=digests, **args)
        assert got == want


def test_fingerprint_hashes_are_sent_as_sixteen_hex_digits_each() -> None:
    hashes = [0, 1, 0xFEDCBA9876543210, 2**64 - 1, 0x0123456789ABCDEF]
    assert _hex(hashes) == "".join(f"{h:016x}" for h in hashes)  # the script's reading
    assert _hex([]) == ""

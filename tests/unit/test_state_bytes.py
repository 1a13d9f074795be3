"""Byte logs (``append_bytes`` / ``read_bytes``) on memory, Redis, a Redis Cluster and a
primary found by a sentinel."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from guard.state import SentinelConfig, StateStore, client_key
from guard.state.memory import MemoryStore
from guard.state.redis import RedisStore
from guard.state.views import LogViews
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


# -- offset logs and their views --------------------------------------------------------


async def test_an_offset_log_returns_what_the_caller_has_not_seen(store: StateStore) -> None:
    key = client_key("alice", "olog")
    end, tail = await store.append_log(key, b"ab", 8, 60.0, None)
    assert tail == b"ab"
    first = end - 2  # the log's random start
    end2, tail = await store.append_log(key, b"cd", 8, 60.0, end)
    assert (end2, tail) == (first + 4, b"cd")
    end3, tail = await store.append_log(key, b"ef", 8, 60.0, first)  # an older view
    assert (end3, tail) == (first + 6, b"abcdef")
    assert await store.append_log(key, b"", 8, 60.0, end3) == (end3, b"")  # a read
    end4, tail = await store.append_log(key, b"ghijk", 8, 60.0, end3)  # 11 > 8 + 2: trimmed
    assert (end4, tail) == (first + 11, b"ghijk")
    end5, tail = await store.append_log(key, b"", 8, 60.0, first)  # trimmed past: all kept
    assert (end5, tail) == (end4, b"defghijk")
    assert end5 - len(tail) != first  # ...which the caller tells apart
    assert (await store.append_log(key, b"", 8, 60.0, end4 + 100))[1] == b"defghijk"


async def test_an_expired_offset_log_starts_again_elsewhere(store: StateStore) -> None:
    key = client_key("alice", "olog")
    end, _ = await store.append_log(key, b"abcd", 100, TICK, None)
    await asyncio.sleep(TICK * 1.5)
    again, tail = await store.append_log(key, b"xy", 100, TICK, end)
    assert tail == b"xy"
    assert again - 2 != end  # a new random start: the old view is not continued


class Letters:
    """A view that keeps every record (one byte each) it folded."""

    def __init__(self) -> None:
        self.seen = bytearray()
        self.folds = 0

    @property
    def nbytes(self) -> int:
        return len(self.seen)

    def fold(self, records: bytes) -> None:
        self.seen += records
        self.folds += 1


async def test_views_fold_each_record_once_across_replicas(store: StateStore) -> None:
    # Two replicas (two LogViews on one store) append to one log in turn: each view folds
    # its own records and the other's, in the log's order, each once.
    one, two = LogViews(Letters), LogViews(Letters)
    key = client_key("alice", "views")
    for i, views in enumerate([one, two, one, one, two, two, one]):
        view = await views.append(store, key, bytes([65 + i]), 100, 60.0)
        assert view.seen == b"ABCDEFG"[: i + 1]
    assert len(one) == len(two) == 1


async def test_views_rebuild_when_the_log_moved_past_them(store: StateStore) -> None:
    one, two = LogViews(Letters), LogViews(Letters)
    key = client_key("alice", "views")
    await one.append(store, key, b"ab", 4, 60.0)
    for letter in b"cdefg":  # the other replica trims the log past one's view
        await two.append(store, key, bytes([letter]), 4, 60.0)
    view = await one.append(store, key, b"h", 4, 60.0)
    assert view.seen == b"efgh" and view.folds == 1  # rebuilt from the kept log


async def test_concurrent_appends_to_one_view_fold_each_record_once() -> None:
    # A remote store's answers can come back in either order; simulated with a store
    # whose append_log waits a while chosen per call.
    class Slow(MemoryStore):
        delays = iter([0.05, 0.0, 0.0])

        async def append_log(self, *args: object) -> tuple[int, bytes]:
            answer = await super().append_log(*args)  # type: ignore[arg-type]
            await asyncio.sleep(next(self.delays))
            return answer

    store, views = Slow(), LogViews(Letters)
    key = client_key("alice", "views")
    await views.append(store, key, b"a", 100, 60.0)
    first, second = await asyncio.gather(
        views.append(store, key, b"b", 100, 60.0), views.append(store, key, b"c", 100, 60.0)
    )
    assert first is second and first.seen == b"abc"


async def test_views_are_bounded_by_their_bytes() -> None:
    store, views = MemoryStore(), LogViews(Letters, max_bytes=10)
    for i in range(4):
        await views.append(store, client_key(f"c{i}", "views"), b"x" * 4, 100, 60.0)
    assert views.nbytes <= 10 and len(views) == 2
    assert views.peek(client_key("c0", "views")) is None  # evicted
    assert views.peek(client_key("c3", "views")).seen == b"xxxx"  # type: ignore[union-attr]
    view = await views.append(store, client_key("c0", "views"), b"y", 100, 60.0)
    assert view.seen == b"xxxxy"  # evicted here, rebuilt from the store

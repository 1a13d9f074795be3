"""The lean pipelined Redis client (:mod:`guard.state.resp`) against a real redis-server,
and against sockets that misbehave."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from guard.state.resp import RespClient, _encode, _Incomplete, _parse
from tests.integration.redis_server import RedisServer


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[RespClient]:
    built = RespClient.from_url(redis_server.url, timeout=5.0)
    yield built
    await built.aclose()


async def test_concurrent_commands_get_their_own_replies(client: RespClient) -> None:
    await asyncio.gather(*(client.set(f"k{i}", b"v%d" % i) for i in range(200)))
    got = await asyncio.gather(*(client.get(f"k{i}") for i in range(200)))
    assert got == [b"v%d" % i for i in range(200)]
    assert await client.exists("k0", "k1", "nope") == 2
    assert await client.get("nope") is None


async def test_a_reply_larger_than_one_read_arrives_whole(client: RespClient) -> None:
    big = bytes(range(256)) * 20_000  # 5 MB: many reads
    await client.set("big", big)
    assert await client.get("big") == big
    await client.execute("RPUSH", "list", b"a", b"", b"c")
    assert await client.lrange("list", 0, -1) == [b"a", b"", b"c"]


async def test_scripts_are_loaded_again_after_a_flush(client: RespClient) -> None:
    script = client.register_script("return {KEYS[1], ARGV[1] + 1, {'nested'}}")
    assert await script(keys=["k"], args=[41]) == [b"k", 42, [b"nested"]]
    await client.execute("SCRIPT", "FLUSH")
    with pytest.raises(NoScriptError):
        await client.evalsha(script.sha, 0)
    assert await script(keys=["k"], args=[1]) == [b"k", 2, [b"nested"]]  # EVAL, then cached
    await client.set("k0", b"x")
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await client.lrange("k0", 0, -1)
    assert await client.get("k0") == b"x"  # the error did not put replies out of step


async def test_a_server_that_never_answers_times_out_and_the_next_command_reconnects(
    redis_server: RedisServer,
) -> None:
    mute = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    port = mute.getsockname()[1]
    stuck = RespClient("127.0.0.1", port, timeout=0.3)
    try:
        started = asyncio.get_running_loop().time()
        results = await asyncio.gather(stuck.get("a"), stuck.get("b"), return_exceptions=True)
        assert all(isinstance(r, RedisTimeoutError) for r in results)
        assert asyncio.get_running_loop().time() - started < 2.0
    finally:
        await stuck.aclose()
        mute.close()
    client = RespClient.from_url(redis_server.url, timeout=5.0)
    try:
        await client.set("a", b"1")
        redis_server.stop()
        with pytest.raises(RedisConnectionError):
            await client.get("a")
        redis_server.start()
        assert await client.get("a") is None  # a fresh connection to a fresh server
    finally:
        await client.aclose()


async def test_a_refused_port_is_a_connection_error() -> None:
    client = RespClient("127.0.0.1", 1, timeout=1.0)
    with pytest.raises(RedisConnectionError, match="cannot connect"):
        await client.get("a")


def test_the_parser_reads_every_reply_type_and_waits_for_the_rest() -> None:
    stream = b"+OK\r\n:-7\r\n$3\r\nabc\r\n$-1\r\n*2\r\n*1\r\n:1\r\n$0\r\n\r\n-ERR no\r\n"
    buf, pos, got = bytearray(stream), 0, []
    while pos < len(buf):
        value, pos = _parse(buf, pos)
        got.append(value)
    assert got[:5] == [b"OK", -7, b"abc", None, [[1], b""]]
    assert isinstance(got[5], ResponseError) and str(got[5]) == "ERR no"
    for cut in range(1, len(b"*2\r\n$3\r\nabc\r\n:5\r\n")):
        with pytest.raises(_Incomplete):
            _parse(bytearray(b"*2\r\n$3\r\nabc\r\n:5\r\n"[:cut]), 0)
    assert (
        _encode(["SET", b"k", 3, 0.5]) == b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n3\r\n$3\r\n0.5\r\n"
    )

"""The state process of ``guard serve --workers N`` on a memory store: a real server on a
Unix socket, reached by LocalStore as each worker reaches it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from guard.config import Policy, parse_policy
from guard.errors import StateUnavailable
from guard.state import build_store
from guard.state.base import client_key
from guard.state.local import SOCKET_ENV, LocalStore, serve_state, serving
from guard.state.memory import MemoryStore
from guard.workers import needs_state_process


def policy_with(stage: dict[str, object]) -> Policy:
    doc = {"version": 1, "models": {"digits": {"model": "builtin:digits", "stages": [stage]}}}
    return parse_policy(doc, source="test", base=Path.cwd())


@contextlib.asynccontextmanager
async def state_server(path: Path) -> AsyncIterator[MemoryStore]:
    store = MemoryStore()
    task = asyncio.create_task(serve_state(str(path), store))
    for _ in range(200):
        if path.exists():
            break
        await asyncio.sleep(0.005)
    assert await asyncio.to_thread(serving, str(path))
    try:
        yield store
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_every_operation_answers_as_the_memory_store_does(tmp_path: Path) -> None:
    path = tmp_path / "s"
    rng = np.random.default_rng(0)
    alone = MemoryStore()
    async with state_server(path):
        shared = LocalStore(str(path))
        try:
            for i in range(120):
                client = f"c{rng.integers(4)}"
                key = client_key(client, "k")
                rows = rng.integers(0, 2**16, (int(rng.integers(1, 4)), 8)).astype(np.int16)
                fingerprints = [sorted({int(h) for h in rng.integers(0, 40, 12)}) for _ in rows]
                digests = [r.tobytes()[:16] for r in rows]
                calls = [
                    ("incr", (client_key(client, "n"), int(rng.integers(1, 3)), 60.0), {}),
                    ("spend", (client_key(client, "b"), 1, 30, None), {}),
                    ("push", (key, [bytes([i % 256])], 5, 60.0), {}),
                    ("items", (key,), {}),
                    ("append_bytes", (client_key(client, "a"), rows.tobytes(), 64, 60.0), {}),
                    ("read_bytes", (client_key(client, "a"),), {}),
                    ("append_log", (client_key(client, "l"), rows.tobytes(), 96, 60.0, None), {}),
                    ("marked", (client_key(client, "m"),), {}),
                    (
                        "match_fingerprints",
                        ("t", client, fingerprints),
                        {
                            "threshold": 3,
                            "max_queries": 30,
                            "ttl_s": 60.0,
                            "max_per_hash": 8,
                            "digests": digests,
                            "max_per_client": 12,
                        },
                    ),
                ]
                if i % 17 == 0:
                    calls.append(("mark", (client_key(client, "m"), 60.0), {}))
                for name, args, kwargs in calls:
                    got = await getattr(shared, name)(*args, **kwargs)
                    want = await getattr(alone, name)(*args, **kwargs)
                    if name == "append_log":  # offsets start at a random point per log
                        got, want = got[1], want[1]
                    elif name == "incr":  # the window's time left, read a moment apart
                        assert got[1] == pytest.approx(want[1], abs=1.0)
                        got, want = got[0], want[0]
                    assert got == want, (i, name)
        finally:
            await shared.close()


async def test_two_workers_see_one_state(tmp_path: Path) -> None:
    path = tmp_path / "s"
    async with state_server(path):
        one, two = LocalStore(str(path)), LocalStore(str(path))
        try:
            args = {"threshold": 2, "max_queries": 100, "ttl_s": 60.0, "max_per_hash": 64}
            await one.match_fingerprints("t", "mallory", [[1, 2, 3, 4]], **args)
            found = await two.match_fingerprints("t", "mallory", [[1, 2, 3, 9]], **args)
            assert (found[0].matches, found[0].client_matches) == (1, 1)
            key = client_key("mallory", "n")
            counts = await asyncio.gather(*(s.incr(key, 1, 60.0) for s in (one, two) * 5))
            assert sorted(c for c, _ in counts) == list(range(1, 11))  # each counted once
            end, tail = await one.append_log(key + ":log", b"ab", 64, 60.0, None)
            end_two, tail_two = await two.append_log(key + ":log", b"cd", 64, 60.0, end)
            assert (tail, tail_two, end_two) == (b"ab", b"cd", end + 2)
        finally:
            await one.close()
            await two.close()


async def test_a_refused_operation_fails_alone_and_the_connection_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "s"
    failed: list[str] = []
    async with state_server(path):
        store = LocalStore(str(path), on_error=failed.append)
        try:
            with pytest.raises(StateUnavailable, match="incr: TypeError"):
                await store.incr("{c}:n", "not a number", 60.0)  # type: ignore[arg-type]
            with pytest.raises(StateUnavailable, match="no operation 'close'"):
                await store._call("close")
            assert (await store.incr("{c}:n", 2, 60.0))[0] == 2
        finally:
            await store.close()
    assert failed == ["incr", "close"]


async def test_a_missing_state_process_fails_fast_then_is_found_again(tmp_path: Path) -> None:
    path = tmp_path / "s"
    failed: list[str] = []
    store = LocalStore(str(path), on_error=failed.append)
    try:
        with pytest.raises(StateUnavailable, match="state process"):
            await store.marked("{c}:m")
        async with state_server(path):
            assert await store.marked("{c}:m") is False
        with pytest.raises(StateUnavailable, match="state process"):  # it stopped
            await store.marked("{c}:m")
        assert path.exists() and not serving(str(path))  # its socket file is left, dead
        path.unlink()
        async with state_server(path):  # a new one, as the master starts after a crash
            assert (await store.incr("{c}:n", 1, 60.0))[0] == 1  # empty, as it starts
    finally:
        await store.close()
    assert failed == ["marked", "marked"]


def test_workers_reach_the_state_process_named_in_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = policy_with({"budget": {"limits": [{"queries": 5, "per": "1m"}]}}).state
    assert isinstance(build_store(config), MemoryStore)
    monkeypatch.setenv(SOCKET_ENV, str(tmp_path / "s"))
    store = build_store(config)
    assert isinstance(store, LocalStore) and store.shared and store.path == str(tmp_path / "s")


def test_only_several_workers_with_state_in_memory_need_the_state_process() -> None:
    budget = policy_with({"budget": {"limits": [{"queries": 5, "per": "1m"}]}})
    assert needs_state_process(budget, 2) and not needs_state_process(budget, 1)
    assert not needs_state_process(policy_with({"validate": {}}), 4)  # nothing to share


async def test_an_unreadable_message_drops_its_connection_only(tmp_path: Path) -> None:
    path = tmp_path / "s"
    async with state_server(path):
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write((5).to_bytes(4, "little") + b"junk!")
        assert await reader.read() == b""  # closed without a reply
        writer.close()
        store = LocalStore(str(path))
        try:
            assert (await store.incr("{c}:n", 1, 60.0))[0] == 1  # the others are served
        finally:
            await store.close()

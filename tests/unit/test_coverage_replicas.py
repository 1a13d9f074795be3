"""The coverage stage on several replicas: one client's requests spread over guards that share
a state store (memory, or a real Redis) reach the findings one guard reaches, because every
replica folds the same log of raw records."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest

from guard.pipeline import RequestContext
from guard.state.base import StateStore
from guard.state.memory import MemoryStore
from guard.state.redis import RedisStore
from tests.integration.redis_server import RedisServer
from tests.unit.test_coverage_stage import ask, build, honest, knockoff

Stores = Callable[[], StateStore]


@pytest.fixture(params=["memory", "redis"])
async def stores(request: pytest.FixtureRequest) -> AsyncIterator[Stores]:
    """Clients of one shared store: the same MemoryStore, or a new connection to one Redis."""
    made: list[RedisStore] = []
    if request.param == "memory":
        shared = MemoryStore()
        yield lambda: shared
    else:
        server: RedisServer = request.getfixturevalue("redis_server")

        def connect() -> StateStore:
            made.append(RedisStore(server.url, key_prefix="cov:", timeout=5.0))
            return made[-1]

        yield connect
    for store in made:
        await store.close()


def mixed() -> np.ndarray:
    """An honest stretch, then an extraction, then honest again: findings come and go."""
    return np.concatenate([honest(120, seed=1), knockoff(260, seed=2), honest(120, seed=3)])


async def findings(
    replicas: list[Any], queries: np.ndarray, pick: Callable[[int], int], client: str = "alice"
) -> list[tuple[int, float, str]]:
    """``(request, score, message)`` of every coverage finding, request ``i`` served by
    ``replicas[pick(i)]``."""
    out = []
    for i, q in enumerate(queries):
        stage = replicas[pick(i)]
        ctx: RequestContext = await ask(stage, q, client)
        await stage.on_response(ctx)
        out += [(i, f.score, f.message) for f in ctx.findings if f.stage == "coverage"]
    return out


OPTIONS: dict[str, Any] = {
    "action": "flag",
    "window": 100,
    "min_novel": 60,
    "shard_novel": 30,
    "max_novel": 90,
}


async def test_replicas_alternating_find_what_one_finds(stores: Stores) -> None:
    queries = mixed()
    alone = await findings([build(MemoryStore(), **OPTIONS)], queries, lambda i: 0)
    assert alone and alone[-1][0] < 400  # found during the extraction, not after it
    a, b = build(stores(), **OPTIONS), build(stores(), **OPTIONS)
    assert await findings([a, b], queries, lambda i: i % 2, "bob") == alone


async def test_a_replica_joining_late_rebuilds_the_window_from_a_trimmed_log(
    stores: Stores,
) -> None:
    queries = mixed()
    alone = await findings([build(MemoryStore(), **OPTIONS)], queries, lambda i: 0)
    a, late = build(stores(), **OPTIONS), build(stores(), **OPTIONS)
    # the first 250 on one replica (the log, 2 x 100 records kept, is trimmed by then),
    # then three of every four on the other, whose first request rebuilds its window
    split = await findings([a, late], queries, lambda i: 0 if i < 250 or i % 4 == 0 else 1)
    assert split == alone


async def test_accounts_split_over_replicas_are_pooled_as_on_one(stores: Stores) -> None:
    options = {"action": "flag", "min_novel": 150, "shard_novel": 50, "every": 25}
    queries = knockoff(180)
    sybils = ["s0", "s1", "s2"]

    async def pool(replicas: list[Any]) -> dict[str, list[int]]:
        found: dict[str, list[int]] = {s: [] for s in sybils}
        for i, q in enumerate(queries):
            stage = replicas[(i // 3) % len(replicas)]
            ctx = await ask(stage, q, sybils[i % 3])
            await stage.on_response(ctx)
            if ctx.findings:
                found[sybils[i % 3]].append(i // 3 + 1)
        return found

    one = await pool([build(MemoryStore(), **options)])
    assert one == {"s0": [], "s1": [], "s2": [50]}
    assert await pool([build(stores(), **options), build(stores(), **options)]) == one

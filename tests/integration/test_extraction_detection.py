"""Natural-data model extraction (Knockoff) through a real guard: caught, while honest clients
with popular inputs, retries and jitter are not; an extraction split over accounts is pooled."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest
import yaml
from aiohttp.test_utils import TestServer

from guard.attacks.extraction import augment
from guard.attacks.targets import TargetSpec
from guard.clients import key_digest
from guard.errors import PolicyError
from guard.models import load_samples
from tests.integration.conftest import StartGuard
from tests.integration.redis_server import RedisServer

CLIENTS = ["mallory", "alice", "bob", "carol", "s0", "s1", "s2"]


async def start(start_guard: StartGuard, coverage: dict[str, Any]) -> TestServer:
    keys = {"clients": {c: {"key_sha256": key_digest(f"key-{c}")} for c in CLIENTS}}
    document = {
        "version": 1,
        "models": {
            "digits": {
                "model": "builtin:digits",
                "stages": [
                    {"validate": {"min": 0.0, "max": 16.0}},
                    {"coverage": {"reference": "builtin:digits", **coverage}},
                ],
            }
        },
        "clients": {"keys_file": "keys.yaml"},
        "audit": {"path": "audit.jsonl"},
    }
    return await start_guard(document, files={"keys.yaml": yaml.safe_dump(keys)})


async def infer(
    http: aiohttp.ClientSession, guard: TestServer, x: np.ndarray, client: str
) -> tuple[int, dict[str, Any]]:
    x = np.atleast_2d(x).astype(np.float32)
    body = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "data": x.ravel().tolist(),
                }
            ]
        }
    )
    async with http.post(
        guard.make_url("/v2/models/digits/infer"), data=body, headers={"X-API-Key": f"key-{client}"}
    ) as reply:
        return reply.status, await reply.json()


def audit(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "audit.jsonl"
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_text().splitlines()]


def knockoff(n: int, seed: int) -> np.ndarray:
    """Knockoff's stream (:class:`guard.attacks.extraction.Knockoff`): the attacker's natural
    pool once in a random order, then augmented repeats (shifts and noise)."""
    x, _ = load_samples("digits")
    rng = np.random.default_rng(seed)
    pool = x[rng.permutation(len(x))[: len(x) // 2]]
    order = np.concatenate([rng.permutation(len(pool)), rng.integers(0, len(pool), n)])[:n]
    queries = pool[order].astype(np.float64)
    repeats = np.arange(n) >= len(pool)
    spec = TargetSpec.builtin("digits")
    queries[repeats] = augment(queries[repeats], spec, rng, noise=0.05, shift=1, shape=(8, 8))
    return queries.astype(np.float32)


def honest(n: int, seed: int, popular: np.ndarray) -> np.ndarray:
    """Popular inputs many clients send, retries of the last request, jittered copies (sensor
    noise of 2 % of the range) and fresh inputs."""
    x, _ = load_samples("digits")
    rng = np.random.default_rng(seed)
    queries: list[np.ndarray] = []
    for _ in range(n):
        kind = rng.choice(4, p=[0.3, 0.15, 0.2, 0.35])
        if kind == 0 or not queries:
            queries.append(popular[rng.integers(len(popular))])
        elif kind == 1:
            queries.append(queries[-1])
        elif kind == 2:
            queries.append(
                np.clip(queries[rng.integers(len(queries))] + rng.normal(0, 0.32, 64), 0, 16)
            )
        else:
            queries.append(np.clip(x[rng.integers(len(x))] + rng.normal(0, 0.32, 64), 0, 16))
    return np.asarray(queries, dtype=np.float32)


async def test_knockoff_is_degraded_silently_while_honest_clients_are_not(
    start_guard: StartGuard, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    guard = await start(start_guard, {"action": "degrade", "degrade_for": "1h"})
    x, _ = load_samples("digits")
    popular = x[np.random.default_rng(7).choice(len(x), 10, replace=False)]
    streams = {
        "mallory": knockoff(300, seed=1),
        **{
            c: honest(300, seed=i, popular=popular) for i, c in enumerate(("alice", "bob", "carol"))
        },
    }
    answers: dict[str, list[dict[str, Any]]] = {c: [] for c in streams}
    for i in range(300):  # interleaved, one row per request
        for client, queries in streams.items():
            status, data = await infer(http, guard, queries[i], client)
            assert status == 200  # degrade never refuses
            answers[client].append(data)
    records = [r for r in audit(tmp_path) if r["stage"] == "coverage"]
    assert {r["client"] for r in records} == {"mallory"}
    first = records[0]
    assert (first["action"], first["technique"], first["score"]) == (
        "degrade",
        "AML.T0024.002",
        150,
    )

    def one_hot(data: dict[str, Any]) -> bool:
        scores = next(o["data"] for o in data["outputs"] if o["name"] == "probabilities")
        return sorted(set(scores)) == [0.0, 1.0]

    # from its 150th query on, the extractor gets labels alone; nobody else does
    assert not any(one_hot(d) for d in answers["mallory"][:149])
    assert all(one_hot(d) for d in answers["mallory"][150:])
    for client in ("alice", "bob", "carol"):
        assert not any(one_hot(d) for d in answers[client])


async def test_an_extraction_split_over_accounts_is_pooled_and_bystanders_are_not(
    start_guard: StartGuard, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    guard = await start(start_guard, {"action": "flag", "min_novel": 150, "shard_novel": 50})
    x, _ = load_samples("digits")
    queries = knockoff(240, seed=2)
    bystander = honest(240, seed=5, popular=x[:10])
    for i, q in enumerate(queries):
        assert (await infer(http, guard, q, f"s{i % 3}"))[0] == 200
        assert (await infer(http, guard, bystander[i], "alice"))[0] == 200
    records = [r for r in audit(tmp_path) if r["stage"] == "coverage"]
    assert {r["client"] for r in records} == {"s0", "s1", "s2"}  # 80 novel each, 240 pooled
    assert all("several accounts" in r["message"] for r in records)


async def test_two_guards_sharing_redis_see_one_extraction(
    start_guard: StartGuard, http: aiohttp.ClientSession, redis_server: RedisServer
) -> None:
    state = {"backend": "redis", "url": redis_server.url, "key_prefix": "cov:", "timeout": 2.0}
    keys = {"clients": {c: {"key_sha256": key_digest(f"key-{c}")} for c in CLIENTS}}
    document = {
        "version": 1,
        "models": {
            "digits": {
                "model": "builtin:digits",
                "stages": [{"coverage": {"reference": "builtin:digits", "action": "deny"}}],
            }
        },
        "clients": {"keys_file": "keys.yaml"},
        "state": state,
    }
    files = {"keys.yaml": yaml.safe_dump(keys)}
    guards = [await start_guard(document, files=files) for _ in range(2)]
    statuses = [
        (await infer(http, guards[i % 2], q, "mallory"))[0]
        for i, q in enumerate(knockoff(160, seed=3))
    ]
    assert statuses.index(403) == 149 and statuses[150:] == [403] * 10  # 75 per guard


async def test_a_policy_without_radius_or_reference_stops_the_load(
    start_guard: StartGuard,
) -> None:
    document = {
        "version": 1,
        "models": {"digits": {"model": "builtin:digits", "stages": [{"coverage": {}}]}},
    }
    with pytest.raises(PolicyError, match=r"stages\[0\]\.coverage\.radius is required"):
        await start_guard(document)


async def test_the_example_policy_serves(
    start_guard: StartGuard, http: aiohttp.ClientSession
) -> None:
    document = yaml.safe_load((Path(__file__).parents[2] / "policies/extraction.yaml").read_text())
    document["clients"] = {"keys_file": "keys.yaml"}
    keys = {"clients": {c: {"key_sha256": key_digest(f"key-{c}")} for c in CLIENTS}}
    guard = await start_guard(document, files={"keys.yaml": yaml.safe_dump(keys)})
    x, _ = load_samples("digits")
    assert (await infer(http, guard, x[0], "alice"))[0] == 200

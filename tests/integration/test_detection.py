"""Query-pattern detection through real sockets: actions, audit, shared Redis state, outages."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest
import yaml
from aiohttp.test_utils import TestServer

from guard.appkeys import LIVE
from guard.clients import key_digest
from guard.models import load_samples
from tests.integration.conftest import StartGuard
from tests.integration.redis_server import RedisServer

ADMIN = "admin-token"
KEYS = {"alice": "key-alice", "bob": "key-bob", "mallory": "key-mallory"}
BLACKLIGHT_KEY = "GUARD_TEST_BLACKLIGHT_KEY"


def keys_file() -> str:
    return yaml.safe_dump(
        {"clients": {name: {"key_sha256": key_digest(k)} for name, k in KEYS.items()}}
    )


def policy(
    stages: list[dict[str, Any]], *, state: dict[str, Any] | None = None, **extra: Any
) -> dict[str, Any]:
    document: dict[str, Any] = {
        "version": 1,
        "models": {
            "digits": {
                "model": "builtin:digits",
                "stages": [{"validate": {"min": 0.0, "max": 16.0}}, *stages],
            }
        },
        "clients": {"keys_file": "keys.yaml"},
        "admin": {"token_sha256": key_digest(ADMIN)},
        **extra,
    }
    if state is not None:
        document["state"] = state
    return document


async def start(start_guard: StartGuard, document: dict[str, Any]) -> TestServer:
    return await start_guard(document, files={"keys.yaml": keys_file()})


def probes(n: int, seed: int = 0) -> np.ndarray:
    """A boundary walk: one held-out digit nudged a little each time."""
    x, _ = load_samples("digits")
    rng = np.random.default_rng(seed)
    return np.clip(x[seed] + rng.normal(0, 0.02, (n, 64)), 0, 16).astype(np.float32)


async def infer(
    http: aiohttp.ClientSession, guard: TestServer, x: np.ndarray, client: str
) -> tuple[int, Any, Any]:
    x = np.atleast_2d(x)
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
        guard.make_url("/v2/models/digits/infer"), data=body, headers={"X-API-Key": KEYS[client]}
    ) as reply:
        data = await reply.json()
        return reply.status, data, reply.headers


def outputs(data: Any) -> dict[str, list[Any]]:
    return {o["name"]: o["data"] for o in data["outputs"]}


async def metric_lines(http: aiohttp.ClientSession, guard: TestServer, name: str) -> list[str]:
    async with http.get(guard.ops_url("/metrics")) as reply:
        text = await reply.text()
    return [line for line in text.splitlines() if line.startswith(name)]


@pytest.fixture(autouse=True)
def blacklight_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BLACKLIGHT_KEY, "the deployment's secret")


def audit_records(guard: TestServer) -> list[dict[str, Any]]:
    """The guard's audit records so far (its writer thread has written all it was given)."""
    audit = guard.app[LIVE].current().audit
    assert audit.flush() and audit.target is not None
    path = Path(audit.target)
    return [orjson.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def test_blacklight_denies_a_boundary_walk_and_audits_it(
    start_guard: StartGuard, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    guard = await start(
        start_guard,
        policy([{"blacklight": {"key_env": BLACKLIGHT_KEY}}], audit={"path": "audit.jsonl"}),
    )
    x, _ = load_samples("digits")
    statuses = [(await infer(http, guard, q, "mallory"))[0] for q in probes(6)]
    assert statuses[:3] == [200] * 3 and statuses[3:] == [403] * 3
    assert (await infer(http, guard, probes(1)[0], "mallory"))[0] == 200  # an exact repeat
    status, data, headers = await infer(http, guard, probes(7)[6], "mallory")
    # The client is told it was refused, not by which stage (disclose.reasons is off).
    assert status == 403 and data["error"] == "request refused by policy"
    assert headers["X-Guard-Verdict"] == "deny"
    for row in x[100:110]:  # others are unaffected
        assert (await infer(http, guard, row, "alice"))[0] == 200
    records = audit_records(guard)
    record = records[0]
    assert {k: record[k] for k in ("client", "stage", "action", "technique", "model")} == {
        "client": "mallory",
        "stage": "blacklight",
        "action": "deny",
        "technique": "AML.T0043",
        "model": "digits",
    }
    assert record["score"] >= record["threshold"] == 3.0 and record["request_id"]
    assert (
        'guard_findings_total{action="deny",model="digits",stage="blacklight"} 4.0'
        in await metric_lines(http, guard, "guard_findings_total")
    )


async def test_budget_answers_429_with_retry_after(
    start_guard: StartGuard, http: aiohttp.ClientSession
) -> None:
    guard = await start(
        start_guard, policy([{"budget": {"limits": [{"queries": 3, "per": "1m"}]}}])
    )
    x, _ = load_samples("digits")
    assert (await infer(http, guard, x[:3], "alice"))[0] == 200
    status, data, headers = await infer(http, guard, x[3], "alice")
    assert status == 429 and data["error"].startswith("quota exhausted for this model; retry")
    assert 55 <= int(headers["Retry-After"]) <= 60
    assert (await infer(http, guard, x[3], "bob"))[0] == 200


async def test_degraded_clients_get_label_only_answers(
    start_guard: StartGuard, http: aiohttp.ClientSession
) -> None:
    guard = await start(
        start_guard,
        policy(
            [{"blacklight": {"key_env": BLACKLIGHT_KEY, "action": "degrade", "degrade_for": "1m"}}]
        ),
    )
    x, _ = load_samples("digits")
    before = outputs((await infer(http, guard, x[7], "mallory"))[1])
    assert sorted(set(before["probabilities"])) != [0.0, 1.0]
    for q in probes(4):
        status, data, headers = await infer(http, guard, q, "mallory")
    assert status == 200 and headers["X-Guard-Verdict"] == "degrade"
    # From now on, for a minute, every answer to this client carries the label alone, silently.
    status, data, headers = await infer(http, guard, x[7], "mallory")
    after = outputs(data)
    assert status == 200 and headers["X-Guard-Verdict"] == "allow"
    assert sorted(set(after["probabilities"])) == [0.0, 1.0]
    assert after["label"] == before["label"] == [int(np.argmax(after["probabilities"]))]
    other = outputs((await infer(http, guard, x[7], "alice"))[1])
    assert other["probabilities"] == before["probabilities"]


async def test_prada_degrades_an_extraction_run(
    start_guard: StartGuard, http: aiohttp.ClientSession
) -> None:
    guard = await start(start_guard, policy([{"prada": {"action": "degrade"}}]))
    x, _ = load_samples("digits")
    rng = np.random.default_rng(0)
    queries = list(x[rng.choice(len(x), 10, replace=False)])
    while len(queries) < 120:  # JbDA-style: sign steps off earlier queries
        queries.append(
            np.clip(queries[rng.integers(len(queries))] + np.sign(rng.normal(size=64)), 0, 16)
        )
    verdicts = [(await infer(http, guard, q, "mallory"))[2]["X-Guard-Verdict"] for q in queries]
    assert verdicts.index("degrade") == 109
    data = (await infer(http, guard, x[0], "mallory"))[1]
    assert sorted(set(outputs(data)["probabilities"])) == [0.0, 1.0]


# -- shared state -------------------------------------------------------------------------


def redis_state(server: RedisServer, **extra: Any) -> dict[str, Any]:
    return {"backend": "redis", "url": server.url, "key_prefix": "test:", "timeout": 2.0, **extra}


def shared_state(request: pytest.FixtureRequest, kind: str) -> dict[str, Any]:
    """The state section of one Redis (``redis``) or a three-node cluster (``cluster``)."""
    if kind == "cluster":
        cluster = request.getfixturevalue("redis_cluster")
        return {"backend": "redis", "url": cluster.url, "cluster": True, "timeout": 2.0}
    return redis_state(request.getfixturevalue("redis_server"))


async def test_two_guards_sharing_redis_catch_an_attack_split_between_them(
    start_guard: StartGuard, http: aiohttp.ClientSession, redis_server: RedisServer
) -> None:
    document = policy(
        [
            {"budget": {"limits": [{"queries": 7, "per": "1m"}]}},
            {"blacklight": {"key_env": BLACKLIGHT_KEY}},
        ],
        state=redis_state(redis_server),
    )
    a, b = await start(start_guard, document), await start(start_guard, document)
    assert a.app[LIVE].state is not b.app[LIVE].state  # one store (one Redis client) per app
    statuses = [
        (await infer(http, (a, b)[i % 2], q, "mallory"))[0] for i, q in enumerate(probes(5))
    ]
    assert statuses == [200, 200, 200, 403, 403]  # the 4th matches 3 sent to either guard
    # Budgets are shared too: 5 queries counted above, 2 more allowed across both guards.
    x, _ = load_samples("digits")
    assert [(await infer(http, (a, b)[i % 2], x[200 + i], "mallory"))[0] for i in range(3)] == [
        200,
        200,
        429,
    ]


async def test_without_a_key_blacklight_refuses_a_shared_store(
    start_guard: StartGuard, redis_server: RedisServer
) -> None:
    from guard.errors import PolicyError

    with pytest.raises(PolicyError, match="needs key_env with a shared state store"):
        await start(start_guard, policy([{"blacklight": {}}], state=redis_state(redis_server)))


@pytest.mark.parametrize(("on_error", "status"), [("closed", 503), ("open", 200)])
async def test_redis_outage_applies_on_error_and_the_guard_recovers(
    start_guard: StartGuard,
    http: aiohttp.ClientSession,
    redis_server: RedisServer,
    on_error: str,
    status: int,
) -> None:
    stages = [
        {"budget": {"limits": [{"queries": 100, "per": "1m"}], "on_error": on_error}},
        {"blacklight": {"key_env": BLACKLIGHT_KEY, "on_error": on_error}},
    ]
    guard = await start(start_guard, policy(stages, state=redis_state(redis_server)))
    x, _ = load_samples("digits")
    assert (await infer(http, guard, x[0], "alice"))[0] == 200
    redis_server.stop()
    for row in x[1:4]:
        got, data, headers = await infer(http, guard, row, "alice")
        assert got == status
        # Served open: flagged. Refused closed: an error, not a verdict on the client.
        assert headers["X-Guard-Verdict"] == ("flag" if status == 200 else "error")
        if status == 503:
            assert "try again shortly" in data["error"] and "redis" not in data["error"]
    errors = await metric_lines(http, guard, "guard_state_errors_total{")
    assert errors and all('backend="redis"' in line for line in errors)
    assert sum(float(line.rsplit(" ", 1)[1]) for line in errors) >= 3
    redis_server.start()
    await asyncio.sleep(0.6)  # past the store's reconnect backoff
    got, _, headers = await infer(http, guard, x[5], "alice")
    assert (got, headers["X-Guard-Verdict"]) == (200, "allow")


async def test_reload_keeps_the_store_unless_the_state_section_changes(
    start_guard: StartGuard, http: aiohttp.ClientSession, tmp_path: Path, redis_server: RedisServer
) -> None:
    stages = [{"budget": {"limits": [{"queries": 3, "per": "1m"}]}}]
    guard = await start(start_guard, policy(stages))
    live = guard.app[LIVE]
    first = live.state
    x, _ = load_samples("digits")
    assert (await infer(http, guard, x[:3], "alice"))[0] == 200
    admin = {"Authorization": f"Bearer {ADMIN}"}

    async def reload(document: dict[str, Any]) -> None:
        (tmp_path / "policy.yaml").write_text(yaml.safe_dump(document))
        async with http.post(guard.ops_url("/admin/reload"), headers=admin) as reply:
            assert reply.status == 200, await reply.text()

    await reload(policy([{"budget": {"limits": [{"queries": 4, "per": "1m"}]}}]))
    assert live.state is first  # same state section: same store, counts carried over
    assert (await infer(http, guard, x[3], "alice"))[0] == 200
    assert (await infer(http, guard, x[4], "alice"))[0] == 429
    await reload(policy(stages, state=redis_state(redis_server)))
    assert live.state is not first and live.state.backend == "redis"
    assert (await infer(http, guard, x[:3], "alice"))[0] == 200  # a fresh store
    await asyncio.sleep(0.1)  # the old runtime retires, then its store closes
    assert first not in live.stores and live.stores == {live.state}


# -- honest traffic never pays; attackers are misled, not told ------------------------------
# Each test below reproduces a failure measured on the earlier design (a shared count over
# all clients, a FIFO table, visible refusals); each fails there.

FLEET = {f"user{i}": f"key-user{i}" for i in range(8)}


def fleet_keys() -> str:
    keys = {**KEYS, **FLEET}
    return yaml.safe_dump({"clients": {n: {"key_sha256": key_digest(k)} for n, k in keys.items()}})


def default_digits_stages(**blacklight: Any) -> list[dict[str, Any]]:
    """The default policy's digits detectors, quotas raised so only detection decides."""
    from guard.cli import DEFAULT_POLICY  # the file `guard demo` runs

    document = yaml.safe_load(DEFAULT_POLICY.read_text())
    stages = []
    for stage in document["models"]["digits"]["stages"][1:]:
        ((name, options),) = stage.items()
        if name == "budget":
            options = {"limits": [{"queries": 100_000, "per": "1m"}]}
        if name == "blacklight":
            options = {**options, "key_env": BLACKLIGHT_KEY, **blacklight}
        stages.append({name: options})
    return stages


async def start_fleet(start_guard: StartGuard, stages: list[dict[str, Any]], **extra: Any) -> Any:
    return await start_guard(policy(stages, **extra), files={"keys.yaml": fleet_keys()})


async def infer_as(
    http: aiohttp.ClientSession, guard: TestServer, x: np.ndarray, key: str
) -> tuple[int, Any, Any]:
    x = np.atleast_2d(x).astype(np.float32)
    tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32"}
    body = orjson.dumps({"inputs": [{**tensor, "data": x.ravel().tolist()}]})
    async with http.post(
        guard.make_url("/v2/models/digits/infer"), data=body, headers={"X-API-Key": key}
    ) as reply:
        return reply.status, await reply.json(), reply.headers


@pytest.mark.parametrize("state", ["memory", "redis", "cluster"])
async def test_exact_repeats_by_one_or_many_clients_are_free(
    start_guard: StartGuard,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    state: str,
) -> None:
    extra: dict[str, Any] = {"audit": {"path": "audit.jsonl"}}
    if state != "memory":
        extra["state"] = shared_state(request, state)
    guard = await start_fleet(start_guard, default_digits_stages(), **extra)
    x, _ = load_samples("digits")
    answers = set()
    for _ in range(6):  # one client, the same input six times (was refused from the 3rd)
        status, data, headers = await infer_as(http, guard, x[11], KEYS["alice"])
        assert status == 200 and headers["X-Guard-Verdict"] == "allow"
        answers.add(tuple(outputs(data)["probabilities"]))
    for key in FLEET.values():  # eight clients, once each (was refused from the 6th)
        status, data, headers = await infer_as(http, guard, x[11], key)
        assert status == 200 and headers["X-Guard-Verdict"] == "allow"
        answers.add(tuple(outputs(data)["probabilities"]))
    assert len(answers) == 1  # consistent: everyone asking the same question gets one answer
    assert audit_records(guard) == []


async def test_priming_accounts_cannot_get_honest_requests_refused(
    start_guard: StartGuard, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """Five accounts send twenty guessed inputs once each (exactly or jittered); honest
    clients then send them (was: 20/20 refused)."""
    guard = await start_fleet(start_guard, default_digits_stages(), audit={"path": "audit.jsonl"})
    x, _ = load_samples("digits")
    rng = np.random.default_rng(5)
    guessed = x[300:320]
    primers = list(FLEET.values())[:5]
    for n, key in enumerate(primers):
        for row in guessed:
            jitter = rng.normal(0, 0.3, 64) if n % 2 else 0.0
            await infer_as(http, guard, np.clip(row + jitter, 0, 16), key)
    honest = [KEYS["alice"], KEYS["bob"], *list(FLEET.values())[5:]]
    for i, row in enumerate(guessed):
        key = honest[i % len(honest)]
        for sent in (row, np.clip(row + rng.normal(0, 0.3, 64), 0, 16)):
            status, _, headers = await infer_as(http, guard, sent, key)
            assert status == 200 and headers["X-Guard-Verdict"] == "allow"
    honest_names = {"alice", "bob", "user5", "user6", "user7"}
    assert not [r for r in audit_records(guard) if r["client"] in honest_names]


async def test_a_flood_of_junk_cannot_flush_another_clients_history(
    start_guard: StartGuard, http: aiohttp.ClientSession
) -> None:
    """One client's junk rows (here 600, the table holds 500) let a repeat through before."""
    guard = await start_fleet(
        start_guard,
        [{"blacklight": {"key_env": BLACKLIGHT_KEY, "max_queries": 500, "max_per_client": 100}}],
    )
    walk = probes(5)
    for q in walk[:3]:
        assert (await infer(http, guard, q, "mallory"))[0] == 200
    rng = np.random.default_rng(6)
    for _ in range(6):  # 600 random rows from another account, in batches of 100
        junk = rng.uniform(0, 16, (100, 64)).astype(np.float32)
        assert (await infer(http, guard, junk, "bob"))[0] == 200
    assert (await infer(http, guard, walk[3], "mallory"))[0] == 403


@pytest.mark.parametrize("state", ["memory", "redis", "cluster"])
async def test_misdirected_attackers_get_plain_answers_that_lead_nowhere(
    start_guard: StartGuard,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    state: str,
) -> None:
    """A caught client is answered 200 with the usual headers, from its walk's first query;
    operators see every finding."""
    extra: dict[str, Any] = {"audit": {"path": "audit.jsonl"}}
    if state != "memory":
        extra["state"] = shared_state(request, state)
    guard = await start_fleet(
        start_guard,
        [{"blacklight": {"key_env": BLACKLIGHT_KEY, "action": "misdirect", "degrade_for": "1m"}}],
        **extra,
    )
    x, _ = load_samples("digits")
    walk = probes(6)
    first = outputs((await infer(http, guard, walk[0], "mallory"))[1])
    header_names = None
    for q in walk[1:]:
        status, data, headers = await infer(http, guard, q, "mallory")
        assert status == 200 and headers["X-Guard-Verdict"] == "allow"
        names = sorted(h for h in headers if h.lower().startswith("x-guard"))
        assert header_names in (None, names)
        header_names = names
    # Far away inputs too (a fresh transform, another digit): the anchor's answer.
    other_digit = 0
    while (
        outputs((await infer(http, guard, x[other_digit], "alice"))[1])["label"] == first["label"]
    ):
        other_digit += 1
    status, data, _ = await infer(http, guard, x[other_digit], "mallory")
    assert status == 200 and outputs(data)["label"] == first["label"]
    truthful = outputs((await infer(http, guard, x[other_digit], "bob"))[1])
    assert truthful["label"] != first["label"]
    records = [r for r in audit_records(guard) if r["client"] == "mallory"]
    assert records and {r["action"] for r in records} == {"misdirect"}
    assert (
        'guard_findings_total{action="misdirect",model="digits",stage="blacklight"} '
        f"{float(len(records))}" in await metric_lines(http, guard, "guard_findings_total")
    )


@pytest.mark.parametrize("state", ["memory", "redis", "cluster"])
async def test_provenance_catches_fresh_random_noise_that_blacklight_misses(
    start_guard: StartGuard,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    state: str,
) -> None:
    """OARS-style: a fresh random transform on every query, large enough to break the hashes."""
    extra: dict[str, Any] = {"audit": {"path": "audit.jsonl"}}
    if state != "memory":
        extra["state"] = shared_state(request, state)
    guard = await start_fleet(
        start_guard,
        [
            {"blacklight": {"key_env": BLACKLIGHT_KEY, "action": "flag"}},
            {"provenance": {"distance": 6.0, "links": 8, "action": "flag"}},
        ],
        **extra,
    )
    x, _ = load_samples("digits")
    rng = np.random.default_rng(7)
    for _ in range(30):
        q = np.clip(x[40] + rng.normal(0, 0.5, 64), 0, 16)  # L2 about 4 from the digit
        await infer(http, guard, q, "mallory")
    stages = [r["stage"] for r in audit_records(guard)]
    assert "provenance" in stages
    first = stages.index("provenance")
    assert first <= 8 and stages.count("provenance") >= 20

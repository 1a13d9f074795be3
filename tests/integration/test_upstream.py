"""The guard in front of a real HTTP upstream: re-encoding, faults, reloads."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest
from aiohttp import web

from guard.clients import key_digest
from guard.models import load_samples
from tests.integration.conftest import StartGuard, digits_policy
from tests.integration.test_server import post, v2_body

ADMIN = "admin-token-for-tests"


def upstream_policy(url: str, **upstream: Any) -> dict[str, Any]:
    return {
        "version": 1,
        "admin": {"token_sha256": key_digest(ADMIN)},
        "models": {
            "digits": {
                "upstream": {"url": url, "timeout": 1.0, **upstream},
                "stages": [{"validate": {"shape": [64], "dtype": "FP32", "min": 0, "max": 16}}],
            }
        },
    }


@pytest.fixture
def x() -> np.ndarray:
    return load_samples("digits")[0][:8]


async def test_binary_client_reaches_a_json_only_upstream(
    start_guard: StartGuard, http: aiohttp.ClientSession, x: np.ndarray
) -> None:
    upstream = await start_guard(digits_policy())
    guard = await start_guard(upstream_policy(str(upstream.make_url("")), binary=False))
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    )
    headers = {"Inference-Header-Content-Length": str(len(header))}
    async with http.post(
        guard.make_url("/v2/models/digits/infer"), data=header + x.tobytes(), headers=headers
    ) as reply:
        assert reply.status == 200, await reply.text()
        body = await reply.read()
        json_length = int(reply.headers["Inference-Header-Content-Length"])
    doc = orjson.loads(body[:json_length])
    assert [o["name"] for o in doc["outputs"]] == ["label", "probabilities"]
    _status, direct, _ = await post(http, upstream.make_url("/v2/models/digits/infer"), v2_body(x))
    expected = next(o["data"] for o in direct["outputs"] if o["name"] == "label")
    labels = np.frombuffer(body[json_length : json_length + 8 * len(x)], "<i8")
    assert labels.tolist() == expected


async def test_upstream_4xx_is_passed_on(
    start_guard: StartGuard, http: aiohttp.ClientSession, x: np.ndarray
) -> None:
    upstream = await start_guard(digits_policy())
    guard = await start_guard(upstream_policy(str(upstream.make_url("")), model="no-such-model"))
    status, body, _ = await post(http, guard.make_url("/v2/models/digits/infer"), v2_body(x))
    assert status == 404
    assert body["error"].startswith("upstream: unknown model 'no-such-model'")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_upstream_down_is_503(
    start_guard: StartGuard, http: aiohttp.ClientSession, x: np.ndarray
) -> None:
    guard = await start_guard(upstream_policy(f"http://127.0.0.1:{free_port()}"))
    status, body, _ = await post(http, guard.make_url("/v2/models/digits/infer"), v2_body(x))
    assert status == 503 and "unreachable" in body["error"]
    async with http.get(guard.make_url("/v2/models/digits/ready")) as reply:
        assert reply.status == 503


async def fake_upstream(aiohttp_server: Any, handler: Any) -> str:
    app = web.Application()
    app.router.add_post("/v2/models/{model}/infer", handler)
    server = await aiohttp_server(app)
    return str(server.make_url(""))


@pytest.mark.parametrize(
    ("reply", "status", "fragment"),
    [
        (
            lambda: web.Response(body=b"<html>oops</html>", content_type="text/html"),
            502,
            "upstream",
        ),
        (
            lambda: web.json_response({"error": "model crashed"}, status=500),
            502,
            "upstream for model digits answered 500",
        ),
        (lambda: web.json_response({"error": "busy"}, status=503), 503, "answered 503"),
        (lambda: web.json_response({"outputs": "nope"}), 502, "upstream"),
    ],
    ids=["not-json", "500", "503", "bad-outputs"],
)
async def test_upstream_garbage_is_502(
    start_guard: StartGuard,
    aiohttp_server: Any,
    http: aiohttp.ClientSession,
    x: np.ndarray,
    reply: Any,
    status: int,
    fragment: str,
) -> None:
    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return reply()

    guard = await start_guard(upstream_policy(await fake_upstream(aiohttp_server, handler)))
    got, body, _ = await post(http, guard.make_url("/v2/models/digits/infer"), v2_body(x))
    assert got == status, body
    assert fragment in body["error"]
    # The upstream's own text and address stay in the log, never in the client's answer.
    assert "crashed" not in body["error"] and "busy" not in body["error"]
    assert "127.0.0.1" not in body["error"]


async def test_upstream_reset_is_502(
    start_guard: StartGuard, aiohttp_server: Any, http: aiohttp.ClientSession, x: np.ndarray
) -> None:
    async def handler(request: web.Request) -> web.Response:
        assert request.transport is not None
        request.transport.close()  # drop the connection without an answer
        await asyncio.sleep(0.1)
        return web.Response()

    guard = await start_guard(upstream_policy(await fake_upstream(aiohttp_server, handler)))
    got, body, _ = await post(http, guard.make_url("/v2/models/digits/infer"), v2_body(x))
    assert got == 502 and "failed" in body["error"]


async def test_slow_upstream_is_504(
    start_guard: StartGuard, aiohttp_server: Any, http: aiohttp.ClientSession, x: np.ndarray
) -> None:
    async def handler(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response()

    guard = await start_guard(
        upstream_policy(await fake_upstream(aiohttp_server, handler), timeout=0.3)
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    got, body, _ = await post(http, guard.make_url("/v2/models/digits/infer"), v2_body(x))
    assert got == 504 and "did not answer in time" in body["error"]
    assert loop.time() - started < 2


async def test_reload_swaps_policy_without_dropping_requests_in_flight(
    start_guard: StartGuard,
    aiohttp_server: Any,
    http: aiohttp.ClientSession,
    x: np.ndarray,
    tmp_path: Any,
) -> None:
    upstream = await start_guard(digits_policy())
    direct = str(upstream.make_url(""))
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        body = await request.read()
        await release.wait()
        url = f"{direct}/v2/models/digits/infer"
        async with aiohttp.ClientSession() as session, session.post(url, data=body) as reply:
            return web.Response(body=await reply.read(), content_type="application/json")

    guard = await start_guard(
        upstream_policy(await fake_upstream(aiohttp_server, slow), timeout=10)
    )
    url = guard.make_url("/v2/models/digits/infer")
    in_flight = asyncio.ensure_future(post(http, url, v2_body(x)))
    await asyncio.sleep(0.2)

    admin = {"Authorization": f"Bearer {ADMIN}"}
    reload_url = guard.ops_url("/admin/reload")
    async with http.post(reload_url) as reply:
        assert reply.status == 401
    # A broken policy is refused and the old one stays in force.
    (tmp_path / "policy.yaml").write_text("version: 1\nmodels: {digits: {upstream: 'ftp://x'}}\n")
    async with http.post(reload_url, headers=admin) as reply:
        assert reply.status == 400
        assert "previous policy stays in force" in (await reply.json())["error"]
    # A good one is swapped in: the max bound tightens from 16 to 8.
    import yaml

    tighter = upstream_policy(direct)
    tighter["models"]["digits"]["stages"][0]["validate"]["max"] = 8
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(tighter))
    async with http.post(reload_url, headers=admin) as reply:
        assert reply.status == 200, await reply.text()

    release.set()
    status, body, _ = await in_flight
    assert status == 200, body  # served by the old runtime, not dropped
    status, body, _ = await post(http, url, v2_body(np.full((1, 64), 12.0, np.float32)))
    assert status == 400 and "above the maximum 8" in body["error"]

    async with http.get(guard.ops_url("/admin/status"), headers=admin) as reply:
        status_doc = await reply.json()
    assert status_doc["models"]["digits"]["backend"] == direct
    async with http.get(guard.ops_url("/metrics")) as reply:
        text = await reply.text()
    assert 'guard_policy_reloads_total{result="failure"} 1.0' in text
    assert 'guard_policy_reloads_total{result="success"} 1.0' in text


async def test_json_answer_passes_through_undecoded_when_nothing_reads_it(
    start_guard: StartGuard, http: aiohttp.ClientSession, x: np.ndarray
) -> None:
    upstream = await start_guard(digits_policy())
    guard = await start_guard(upstream_policy(str(upstream.make_url(""))))
    body = v2_body(x, id="same-id")
    async with http.post(upstream.make_url("/v2/models/digits/infer"), data=body) as reply:
        direct = await reply.read()
    async with http.post(guard.make_url("/v2/models/digits/infer"), data=body) as reply:
        assert reply.status == 200
        proxied = await reply.read()
    assert proxied == direct  # the upstream's bytes, not a re-encoding
    # Asking for binary outputs makes the guard decode and re-encode.
    binary = v2_body(x, id="same-id", parameters={"binary_data_output": True})
    async with http.post(guard.make_url("/v2/models/digits/infer"), data=binary) as reply:
        assert reply.status == 200 and "Inference-Header-Content-Length" in reply.headers


async def test_json_answer_passes_through_when_response_stages_only_read_it(
    start_guard: StartGuard, http: aiohttp.ClientSession, x: np.ndarray
) -> None:
    """prada reads the predicted class from the decoded answer; the client still gets the
    upstream's bytes. Once a finding degrades the client, the answer is the label only."""
    upstream = await start_guard(digits_policy())
    policy = upstream_policy(str(upstream.make_url("")))
    stages = policy["models"]["digits"]["stages"]
    stages.append({"prada": {"action": "degrade", "min_queries": 3, "every": 1, "delta": 0.9999}})
    guard = await start_guard(policy)
    rng = np.random.default_rng(0)
    answers = []
    for i in range(12):  # one digit, jittered: one class, so every query has a distance
        row = np.clip(x[:1] + rng.uniform(-1, 1, (1, 64)), 0, 16).astype(np.float32)
        body = v2_body(row, id=f"r{i}")
        async with http.post(upstream.make_url("/v2/models/digits/infer"), data=body) as reply:
            direct = await reply.read()
        async with http.post(guard.make_url("/v2/models/digits/infer"), data=body) as reply:
            assert reply.status == 200
            answers.append((direct, await reply.read(), reply.headers.get("X-Guard-Verdict")))
    verdicts = [verdict for _, _, verdict in answers]
    first = verdicts.index("degrade")
    assert first >= 3 and verdicts[:first] == ["allow"] * first
    assert all(proxied == direct for direct, proxied, _ in answers[:first])
    for direct, proxied, _ in answers[first:]:
        assert proxied != direct
        scores = next(o for o in orjson.loads(proxied)["outputs"] if o["name"] == "probabilities")[
            "data"
        ]
        assert sorted(scores)[-2:] == [0.0, 1.0]  # one-hot: the label only

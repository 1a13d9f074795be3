"""What a certificate releases through the guard (issue 21): the radius on the policy's grid,
one bit per row where the policy releases labels only or the client is degraded, the same
answer for the same input, and certification requests seen and counted like plain queries."""

from __future__ import annotations

from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp.test_utils import TestServer

from guard.appkeys import LIVE
from guard.models import load_samples
from guard.stages.certify import CertifyOptions
from tests.integration.conftest import StartGuard
from tests.integration.test_detection import BLACKLIGHT_KEY, KEYS, infer, policy, probes, start

SIGMA = 0.5
STEP = CertifyOptions(sigma=SIGMA, source="local").step  # σ/4
CERTIFY = {"sigma": SIGMA, "n": 2000, "n0": 50, "batch": 500}


@pytest.fixture(autouse=True)
def secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BLACKLIGHT_KEY, "the deployment's secret")
    monkeypatch.setenv("GUARD_CERTIFY_SECRET", "the certification noise key")


async def certify(
    http: aiohttp.ClientSession, guard: TestServer, x: np.ndarray, client: str = "alice"
) -> tuple[int, Any, Any]:
    """A certification request: a plain query with ``X-Guard-Certify: 1``."""
    x = np.atleast_2d(x).astype(np.float32)
    body = {
        "inputs": [
            {
                "name": "input",
                "shape": list(x.shape),
                "datatype": "FP32",
                "data": x.ravel().tolist(),
            }
        ]
    }
    headers = {"X-API-Key": KEYS[client], "X-Guard-Certify": "1"}
    async with http.post(
        guard.make_url("/v2/models/digits/infer"), json=body, headers=headers
    ) as reply:
        return reply.status, await reply.json(), reply.headers


def walk_to_boundary() -> np.ndarray:
    """Eight inputs from a digit towards one of another class: radii from large to none."""
    x, y = load_samples("digits")
    other = int(np.flatnonzero(y != y[0])[0])
    t = np.linspace(0.0, 0.6, 8)[:, None]
    return ((1 - t) * x[0] + t * x[other]).astype(np.float32)


def radii(body: Any) -> list[float]:
    value = body["parameters"]["certified_radius"]
    return value if isinstance(value, list) else [value]


def on_grid(radius: float, step: float) -> bool:
    steps = radius / step
    return abs(steps - round(steps)) < 1e-9


async def test_the_radius_is_released_on_the_step_grid_in_parameters_and_header(
    start_guard: StartGuard, http: aiohttp.ClientSession
) -> None:
    guard = await start(start_guard, policy([{"certify": CERTIFY}]))
    status, body, headers = await certify(http, guard, walk_to_boundary())
    assert status == 200, body
    released = radii(body)
    assert all(on_grid(r, STEP) for r in released), released
    assert len(set(released)) > 1  # the grid still tells radii apart: step σ/4, not a bit
    texts = headers["X-Guard-Certified-Radius"].split(",")
    for radius, text, abstained in zip(
        released, texts, body["parameters"]["abstained"], strict=True
    ):
        assert text == ("abstain" if abstained else f"{radius:.3f}")  # 0.125: three decimals


async def test_the_same_input_gets_the_same_answer_in_any_batch(
    start_guard: StartGuard, http: aiohttp.ClientSession
) -> None:
    guard = await start(start_guard, policy([{"certify": {**CERTIFY, "n": 500}}]))
    x, _ = load_samples("digits")
    _, alone, _ = await certify(http, guard, x[3])
    _, again, _ = await certify(http, guard, x[3], client="bob")
    _, batch, _ = await certify(http, guard, x[[5, 3]])
    assert alone["parameters"] == again["parameters"]
    assert radii(batch)[1] == radii(alone)[0]
    assert batch["parameters"]["certified_label"][1] == alone["parameters"]["certified_label"]


async def test_a_label_only_policy_releases_certified_at_one_step_or_abstained(
    start_guard: StartGuard, http: aiohttp.ClientSession
) -> None:
    stages = [{"privacy": {"mechanism": "label_only"}}, {"certify": CERTIFY}]
    guard = await start(start_guard, policy(stages))
    open_guard = await start(start_guard, policy([{"certify": CERTIFY}]))
    walk = walk_to_boundary()
    _, body, headers = await certify(http, guard, walk)
    _, open_body, _ = await certify(http, open_guard, walk)
    assert set(radii(body)) <= {0.0, STEP}
    assert set(headers["X-Guard-Certified-Radius"].split(",")) <= {"abstain", f"{STEP:.3f}"}
    assert max(radii(open_body)) > STEP  # the same inputs, scores released: more than a bit
    for bit, graded in zip(radii(body), radii(open_body), strict=True):
        assert bit == (STEP if graded >= STEP else 0.0)
    (certify_stage,) = [
        s for s in guard.app[LIVE].current().models["digits"].pipeline.stages if s.name == "certify"
    ]
    assert certify_stage.describe()["release"] == "certified"


async def test_a_degraded_client_gets_one_bit_certification_included(
    start_guard: StartGuard, http: aiohttp.ClientSession
) -> None:
    budget = {"limits": [{"queries": 1, "per": "1m"}], "action": "degrade", "count": "requests"}
    guard = await start(start_guard, policy([{"budget": budget}, {"certify": CERTIFY}]))
    x, _ = load_samples("digits")
    _, first, _ = await certify(http, guard, x[0])
    _, degraded, headers = await certify(http, guard, x[0])  # over its quota: degraded
    assert headers["X-Guard-Verdict"] == "degrade"
    assert radii(first)[0] > STEP  # this digit is certified well beyond one step
    assert radii(degraded) == [STEP] and headers["X-Guard-Certified-Radius"] == f"{STEP:.3f}"


async def test_certify_requests_are_counted_by_the_budget_their_samples_are_not(
    start_guard: StartGuard, http: aiohttp.ClientSession
) -> None:
    budget = {"limits": [{"queries": 3, "per": "1m"}]}
    guard = await start(start_guard, policy([{"budget": budget}, {"certify": CERTIFY}]))
    x, _ = load_samples("digits")
    for row in x[:3]:  # each draws 2,050 noisy samples: were they counted, the first would fail
        status, body, _ = await certify(http, guard, row)
        assert status == 200 and body["parameters"]["certified"] is True
    assert (await certify(http, guard, x[3]))[0] == 429  # the requests themselves were
    assert (await infer(http, guard, x[3], "alice"))[0] == 429
    assert (await certify(http, guard, x[3], client="bob"))[0] == 200


async def test_certify_requests_are_seen_by_blacklight_like_plain_queries(
    start_guard: StartGuard, http: aiohttp.ClientSession
) -> None:
    stages = [{"blacklight": {"key_env": BLACKLIGHT_KEY}}, {"certify": CERTIFY}]
    guard = await start(start_guard, policy(stages))
    plain_guard = await start(start_guard, policy([{"blacklight": {"key_env": BLACKLIGHT_KEY}}]))
    walk = probes(6)
    asked = [(await certify(http, guard, q, "mallory"))[0] for q in walk]
    plain = [(await infer(http, plain_guard, q, "mallory"))[0] for q in walk]
    # Denied at the same query as the plain walk: the requests were matched, and the 2,050
    # noisy samples of each were not (near-duplicates by the hundred: the second would fail).
    assert asked == plain == [200] * 3 + [403] * 3

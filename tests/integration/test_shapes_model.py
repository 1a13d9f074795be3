"""The ``shapes`` image model ([N, 32, 32, 3]) served embedded through real sockets: every
stage of the default policy, and squeezing and certification, take the 4-d input."""

from __future__ import annotations

from typing import Any

import aiohttp
import numpy as np
import orjson
import yaml

from guard.backends.onnx import OnnxBackend
from guard.cli import DEFAULT_POLICY
from guard.models import load_samples, model_path
from tests.integration.conftest import StartGuard

URL = "/v2/models/shapes/infer"


def images(n: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    x, y = load_samples("shapes")
    return x[start : start + n].reshape(n, 32, 32, 3), y[start : start + n]


def body(x: np.ndarray) -> bytes:
    tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32"}
    return orjson.dumps({"inputs": [{**tensor, "data": x.ravel().tolist()}]})


def default_shapes_policy(**extra_stages: Any) -> dict[str, Any]:
    document = yaml.safe_load(DEFAULT_POLICY.read_text())
    model = document["models"]["shapes"]
    model["stages"] = [*model["stages"], *({k: v} for k, v in extra_stages.items())]
    return {"version": 1, "models": {"shapes": model}, "disclose": {"headers": True}}


async def infer(
    http: aiohttp.ClientSession, guard: Any, x: np.ndarray, **headers: str
) -> tuple[int, Any, Any]:
    async with http.post(guard.make_url(URL), data=body(x), headers=headers) as reply:
        return reply.status, orjson.loads(await reply.read()), reply.headers


def outputs(payload: Any) -> dict[str, np.ndarray]:
    return {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in payload["outputs"]}


async def test_default_policy_serves_shapes_embedded(
    start_guard: StartGuard, http: aiohttp.ClientSession
) -> None:
    guard = await start_guard(default_shapes_policy())
    x, _ = images(4)
    bare = OnnxBackend(model_path("shapes"), name="shapes", device="cpu").run({"input": x})
    status, payload, headers = await infer(http, guard, x)
    assert status == 200, payload
    answer = outputs(payload)
    np.testing.assert_array_equal(answer["label"], bare["label"])  # bins keep the label
    assert answer["probabilities"].shape == (4, 10)
    assert headers.get("X-Guard-Verdict") == "allow"
    # A second, different request: the detectors' histories of 3,072-value rows work.
    status, payload, _ = await infer(http, guard, images(3, start=4)[0])
    assert status == 200, payload


async def test_validate_refuses_bad_images_naming_the_field(
    start_guard: StartGuard, http: aiohttp.ClientSession
) -> None:
    guard = await start_guard(default_shapes_policy())
    x, _ = images(1)
    for bad, words in (
        (x.reshape(1, 3072), "shape"),
        (x[:, :16], "shape"),
        (np.where(x > 0.5, 2.0, x).astype(np.float32), "input"),
    ):
        status, payload, _ = await infer(http, guard, bad)
        assert status == 400, payload
        assert words in payload["error"]


async def test_squeeze_and_certify_take_the_image(
    start_guard: StartGuard, http: aiohttp.ClientSession
) -> None:
    policy = default_shapes_policy(
        squeeze={
            "bits": 5,
            "median": 2,
            "range": [0.0, 1.0],
            "image": {"height": 32, "width": 32, "channels": 3},
        },
        certify={"sigma": 0.25, "n0": 20, "n": 100, "alpha": 0.01, "when": "always", "seed": 0},
    )
    # certify runs on the response side, before squeeze's input reached the model: it comes
    # first in the list so that it perturbs the client's input.
    stages = policy["models"]["shapes"]["stages"]
    stages.insert(1, stages.pop())
    guard = await start_guard(policy)
    x, _ = images(2)
    status, payload, headers = await infer(http, guard, x)
    assert status == 200, payload
    labels = outputs(payload)["label"]
    assert labels.shape == (2,)
    assert all(-1 <= label < 10 for label in labels)  # -1: the smoothed model abstains
    assert "X-Guard-Certified-Radius" in headers or "X-Guard-Verdict" in headers


async def test_guard_load_sends_shapes_as_images(start_guard: StartGuard) -> None:
    from guard.loadgen import LoadConfig, run_load

    guard = await start_guard(default_shapes_policy())
    url = str(guard.make_url("")).rstrip("/")
    for inputs, protocol in (("samples", "v2-binary"), ("blend", "v2")):
        config = LoadConfig(
            url=url, model="shapes", rate=20, duration=1, protocol=protocol, batch=2, inputs=inputs
        )
        report = await run_load(config)
        assert report.statuses == {"200": 20} and not report.failed, report.lines()

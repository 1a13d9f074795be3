"""The guard over real sockets, serving the digits model embedded."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest

from guard.backends.onnx import OnnxBackend
from guard.clients import key_digest
from guard.models import load_samples, model_path
from tests.integration.conftest import StartGuard, digits_policy


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Held-out inputs, labels, and what onnxruntime itself predicts for them."""
    x, y = load_samples("digits")
    x = x[:16]
    local = OnnxBackend(model_path("digits"), name="digits", device="cpu")
    return x, y[:16], local.run({"input": x})["label"]


def v2_body(x: np.ndarray, datatype: str = "FP32", **extra: Any) -> bytes:
    tensor = {
        "name": "input",
        "shape": list(x.shape),
        "datatype": datatype,
        "data": x.ravel().tolist(),
    }
    return orjson.dumps({"inputs": [tensor], **extra})


async def post(
    http: aiohttp.ClientSession, url: Any, body: bytes, **kw: Any
) -> tuple[int, Any, Any]:
    async with http.post(url, data=body, **kw) as reply:
        payload = await reply.read()
        try:
            data = orjson.loads(payload)
        except orjson.JSONDecodeError:
            data = payload
        return reply.status, data, reply.headers


async def test_health_metadata_and_readiness(
    start_guard: StartGuard, http: aiohttp.ClientSession
) -> None:
    guard = await start_guard(digits_policy())
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/digits/ready"):
        async with http.get(guard.make_url(path)) as reply:
            assert reply.status == 200, path
    async with http.get(guard.make_url("/v2")) as reply:
        server = await reply.json()
    assert server["name"] == "inference-guard" and "binary_tensor_data" in server["extensions"]
    async with http.get(guard.make_url("/v2/models/digits/versions/1")) as reply:
        meta = await reply.json()
    assert meta["name"] == "digits" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert {o["name"] for o in meta["outputs"]} == {"label", "probabilities"}
    async with http.get(guard.make_url("/v1/models/digits")) as reply:
        status = await reply.json()
    assert status["model_version_status"][0]["state"] == "AVAILABLE"


@pytest.mark.parametrize("path", ["/v2/models/digits/infer", "/v2/models/digits/versions/1/infer"])
async def test_v2_json_infer_matches_the_model(
    start_guard: StartGuard, http: aiohttp.ClientSession, digits: Any, path: str
) -> None:
    x, _, expected = digits
    guard = await start_guard(digits_policy())
    status, body, headers = await post(http, guard.make_url(path), v2_body(x, id="req-1"))
    assert status == 200, body
    assert body["model_name"] == "digits" and body["id"] == "req-1"
    outputs = {o["name"]: o for o in body["outputs"]}
    assert outputs["label"]["data"] == expected.tolist()
    assert outputs["probabilities"]["shape"] == [len(x), 10]
    assert headers["X-Guard-Verdict"] == "allow"


async def test_v2_binary_in_and_out(
    start_guard: StartGuard, http: aiohttp.ClientSession, digits: Any
) -> None:
    x, _, expected = digits
    guard = await start_guard(digits_policy())
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
            "outputs": [{"name": "label", "parameters": {"binary_data": True}}],
        }
    )
    body = header + x.astype("<f4").tobytes()
    headers = {
        "Inference-Header-Content-Length": str(len(header)),
        "Content-Type": "application/octet-stream",
    }
    async with http.post(
        guard.make_url("/v2/models/digits/infer"), data=body, headers=headers
    ) as reply:
        assert reply.status == 200
        payload = await reply.read()
        json_length = int(reply.headers["Inference-Header-Content-Length"])
    doc = orjson.loads(payload[:json_length])
    (label,) = doc["outputs"]
    assert label["name"] == "label" and label["parameters"]["binary_data_size"] == 8 * len(x)
    values = struct.unpack(f"<{len(x)}q", payload[json_length:])
    assert list(values) == expected.tolist()


@pytest.mark.parametrize(
    "body",
    [
        lambda x: {"instances": x.tolist()},
        lambda x: {"instances": [{"input": row} for row in x.tolist()]},
        lambda x: {"inputs": x.tolist()},
        lambda x: {"inputs": {"input": x.tolist()}},
    ],
    ids=["rows", "named-rows", "columnar", "named-columnar"],
)
async def test_tf_serving_predict(
    start_guard: StartGuard, http: aiohttp.ClientSession, digits: Any, body: Any
) -> None:
    x, _, expected = digits
    guard = await start_guard(digits_policy())
    for path in ("/v1/models/digits:predict", "/v1/models/digits/versions/1:predict"):
        status, reply, _ = await post(http, guard.make_url(path), orjson.dumps(body(x)))
        assert status == 200, reply
        if "predictions" in reply:
            labels = [p["label"] for p in reply["predictions"]]
        else:
            labels = reply["outputs"]["label"]
        assert labels == expected.tolist()


NAN_BODY = (
    b'{"inputs":[{"name":"input","shape":[1,64],"datatype":"FP64","data":['
    + b"1.0," * 5
    + b"NaN"
    + b",1.0" * 58
    + b"]}]}"
)


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (b'{"inputs": [', 400, "JSON"),
        (b"\xff\xfe not utf-8", 400, "JSON"),
        (b"[]", 400, "object"),
        (
            orjson.dumps(
                {
                    "inputs": [
                        {"name": "input", "shape": [1, 63], "datatype": "FP32", "data": [0] * 63}
                    ]
                }
            ),
            400,
            "inputs.input: shape [1, 63] does not match",
        ),
        (
            orjson.dumps(
                {
                    "inputs": [
                        {"name": "input", "shape": [1, 64], "datatype": "BYTES", "data": ["a"] * 64}
                    ]
                }
            ),
            400,
            "inputs.input: datatype BYTES",
        ),
        (
            orjson.dumps(
                {
                    "inputs": [
                        {"name": "input", "shape": [1, 64], "datatype": "FP99", "data": [0] * 64}
                    ]
                }
            ),
            400,
            "datatype",
        ),
        (
            orjson.dumps(
                {
                    "inputs": [
                        {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": ["a"] * 64}
                    ]
                }
            ),
            400,
            "inputs[0].data",
        ),
        (
            orjson.dumps(
                {
                    "inputs": [
                        {"name": "input", "shape": [10**9, 64], "datatype": "FP32", "data": [0]}
                    ]
                }
            ),
            400,
            "inputs[0]",
        ),
        (
            orjson.dumps(
                {"inputs": [{"name": "input", "shape": [-1, 64], "datatype": "FP32", "data": [0]}]}
            ),
            400,
            "inputs[0].shape",
        ),
        (NAN_BODY, 400, "inputs.input[0, 5]: value nan is NaN"),
        (
            orjson.dumps(
                {
                    "inputs": [
                        {
                            "name": "input",
                            "shape": [1, 64],
                            "datatype": "FP32",
                            "data": [0] * 63 + [17],
                        }
                    ]
                }
            ),
            400,
            "inputs.input[0, 63]: value 17.0 is above the maximum 16",
        ),
        (
            orjson.dumps(
                {
                    "inputs": [
                        {
                            "name": "input",
                            "shape": [300, 64],
                            "datatype": "FP32",
                            "data": [0] * 300 * 64,
                        }
                    ]
                }
            ),
            400,
            "exceeds max_batch 256",
        ),
        (
            orjson.dumps(
                {
                    "inputs": [
                        {"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": [0] * 64}
                    ]
                }
            ),
            400,
            "inputs: input 'input' is required",
        ),
    ],
)
async def test_bad_input_is_a_4xx_naming_the_field(
    start_guard: StartGuard, http: aiohttp.ClientSession, body: bytes, status: int, fragment: str
) -> None:
    guard = await start_guard(
        digits_policy(model={"stages": [{"validate": {"min": 0.0, "max": 16.0, "input": "input"}}]})
    )
    got, reply, headers = await post(http, guard.make_url("/v2/models/digits/infer"), body)
    assert got == status, reply
    assert headers["Content-Type"].startswith("application/json")
    assert fragment in reply["error"], reply["error"]
    assert "Traceback" not in reply["error"]


async def test_lying_binary_header_and_oversized_body(
    start_guard: StartGuard, http: aiohttp.ClientSession
) -> None:
    guard = await start_guard(digits_policy(limits={"max_body_bytes": 4096}))
    url = guard.make_url("/v2/models/digits/infer")
    status, reply, _ = await post(
        http, url, b"{}", headers={"Inference-Header-Content-Length": "999"}
    )
    assert status == 400 and "Inference-Header-Content-Length" in reply["error"]
    status, reply, _ = await post(
        http, url, b"{}", headers={"Inference-Header-Content-Length": "two"}
    )
    assert status == 400 and "must be a non-negative integer" in reply["error"]
    status, reply, _ = await post(http, url, b" " * 5000)
    assert status == 413 and "limit of 4096" in reply["error"]

    async def chunks() -> Any:
        for _ in range(10):
            yield b" " * 1000

    status, reply, _ = await post(http, url, chunks())  # chunked: no Content-Length
    assert status == 413 and "limit of 4096" in reply["error"]


async def test_unknown_model_and_route(
    start_guard: StartGuard, http: aiohttp.ClientSession
) -> None:
    guard = await start_guard(digits_policy())
    status, reply, _ = await post(http, guard.make_url("/v2/models/imagenet/infer"), b"{}")
    assert status == 404 and "unknown model 'imagenet'" in reply["error"]
    async with http.get(guard.make_url("/v3/anything")) as response:
        assert response.status == 404
        assert "no route" in (await response.json())["error"]


async def test_api_keys_and_per_model_access(
    start_guard: StartGuard, http: aiohttp.ClientSession, digits: Any
) -> None:
    x, _, _ = digits
    keys = (
        f"clients:\n  alice:\n    key_sha256: '{key_digest('alice-key')}'\n    models: [digits]\n"
        f"  bob:\n    key_sha256: '{key_digest('bob-key')}'\n    models: [other]\n"
    )
    policy = digits_policy(clients={"keys_file": "keys.yaml", "header": "X-API-Key"})
    guard = await start_guard(policy, files={"keys.yaml": keys})
    url = guard.make_url("/v2/models/digits/infer")
    assert (await post(http, url, v2_body(x)))[0] == 401
    assert (await post(http, url, v2_body(x), headers={"X-API-Key": "nope"}))[0] == 401
    status, reply, _ = await post(http, url, v2_body(x), headers={"X-API-Key": "bob-key"})
    assert status == 403 and "bob may not call model digits" in reply["error"]
    assert (await post(http, url, v2_body(x), headers={"X-API-Key": "alice-key"}))[0] == 200
    async with http.get(guard.make_url("/v2/models/digits")) as reply:
        assert reply.status == 401  # metadata needs a key too


async def test_metrics_count_requests_by_verdict_and_status(
    start_guard: StartGuard, http: aiohttp.ClientSession, digits: Any
) -> None:
    x, _, _ = digits
    guard = await start_guard(digits_policy())
    url = guard.make_url("/v2/models/digits/infer")
    for _ in range(3):
        await post(http, url, v2_body(x))
    await post(http, url, v2_body(np.full((1, 64), 99.0)))
    await post(http, guard.make_url("/v2/models/random-name-1/infer"), b"{}")
    async with http.get(guard.ops_url("/metrics")) as reply:
        text = await reply.text()
    assert (
        'guard_requests_total{code="200",model="digits",protocol="v2",verdict="allow"} 3.0' in text
    )
    assert (
        'guard_requests_total{code="400",model="digits",protocol="v2",verdict="rejected"} 1.0'
        in text
    )
    assert 'model="unknown"' in text and "random-name-1" not in text  # bounded labels
    assert 'guard_stage_duration_seconds_count{model="digits",stage="validate"} 4.0' in text
    assert 'guard_upstream_duration_seconds_count{model="digits"} 3.0' in text


async def test_concurrent_requests_all_answered(
    start_guard: StartGuard, http: aiohttp.ClientSession, digits: Any
) -> None:
    x, _, expected = digits
    guard = await start_guard(digits_policy())
    url = guard.make_url("/v2/models/digits/infer")
    results = await asyncio.gather(*(post(http, url, v2_body(x[i : i + 1])) for i in range(len(x))))
    labels = [r[1]["outputs"][0]["data"][0] for r in results]
    assert labels == expected.tolist()

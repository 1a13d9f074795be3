"""tritonclient → guard → MLServer: a real V2 server that speaks JSON only."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import numpy as np
import pytest
import tritonclient.http.aio as triton

from guard.models import load_samples
from tests.integration.conftest import StartGuard
from tests.integration.mlserver_upstream import MLServerProcess, trained_breast_cancer


def policy(url: str) -> dict[str, Any]:
    return {
        "version": 1,
        "models": {
            "breast_cancer": {
                "upstream": {"url": url, "timeout": 10},
                "stages": [
                    {"validate": {"shape": [30], "dtype": "FP32", "min": 0.0, "max": 10000.0}}
                ],
            }
        },
    }


@pytest.fixture(scope="module")
def rows() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = load_samples("breast_cancer")[0][:12]
    estimator = trained_breast_cancer().estimator
    return x, estimator.predict(x), estimator.predict_proba(x)


@pytest.mark.parametrize("binary", [True, False], ids=["binary-client", "json-client"])
async def test_triton_client_through_guard_to_mlserver(
    start_guard: StartGuard, mlserver_breast_cancer: MLServerProcess, rows: Any, binary: bool
) -> None:
    x, labels, probabilities = rows
    guard = await start_guard(policy(mlserver_breast_cancer.url))
    client = triton.InferenceServerClient(f"{guard.host}:{guard.port}")
    try:
        inputs = [triton.InferInput("input", list(x.shape), "FP32")]
        inputs[0].set_data_from_numpy(x, binary_data=binary)
        outputs = [
            triton.InferRequestedOutput(n, binary_data=binary) for n in ("predict", "predict_proba")
        ]
        result = await client.infer("breast_cancer", inputs, outputs=outputs)
    finally:
        await client.close()
    np.testing.assert_array_equal(result.as_numpy("predict").reshape(-1), labels)
    np.testing.assert_allclose(result.as_numpy("predict_proba"), probabilities, rtol=1e-6)


async def test_guard_refuses_what_mlserver_would_answer_with_a_traceback(
    start_guard: StartGuard, mlserver_breast_cancer: MLServerProcess, http: aiohttp.ClientSession
) -> None:
    guard = await start_guard(policy(mlserver_breast_cancer.url))
    url = guard.make_url("/v2/models/breast_cancer/infer")
    nan = {
        "inputs": [
            {
                "name": "input",
                "shape": [1, 30],
                "datatype": "FP64",
                "data": [1.0] * 29 + [float("nan")],
            }
        ]
    }
    import json

    async with http.post(url, data=json.dumps(nan)) as reply:  # stdlib json writes NaN
        body = await reply.json()
    assert reply.status == 400 and "is NaN" in body["error"]
    wrong = {
        "inputs": [{"name": "input", "shape": [1, 29], "datatype": "FP32", "data": [1.0] * 29}]
    }
    async with http.post(url, json=wrong) as reply:
        body = await reply.json()
    assert reply.status == 400 and "shape [1, 29] does not match" in body["error"]


async def test_mlserver_errors_come_back_in_the_guard_format(
    start_guard: StartGuard, mlserver_breast_cancer: MLServerProcess, http: aiohttp.ClientSession
) -> None:
    # No validate stage: MLServer itself sees the wrong feature count and answers 500
    # with a Python traceback as plain text, which must not reach the client.
    bare = policy(mlserver_breast_cancer.url)
    bare["models"]["breast_cancer"]["stages"] = []
    guard = await start_guard(bare)
    wrong = {
        "inputs": [{"name": "input", "shape": [1, 29], "datatype": "FP32", "data": [1.0] * 29}]
    }
    async with http.post(guard.make_url("/v2/models/breast_cancer/infer"), json=wrong) as reply:
        body = await reply.json()
    assert reply.status == 502
    assert "answered 500" in body["error"] and "Traceback" not in body["error"]
    # Unknown output: MLServer's own 400 message is passed on.
    request = {
        "inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32", "data": [1.0] * 30}],
        "outputs": [{"name": "decision_function"}],
    }
    async with http.post(guard.make_url("/v2/models/breast_cancer/infer"), json=request) as reply:
        body = await reply.json()
    assert reply.status == 400, body
    assert body["error"].startswith("upstream: ")
    await asyncio.sleep(0)

"""Unmodified Triton clients against the guard: JSON and binary tensors both ways."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton
import tritonclient.http.aio as triton_aio
from tritonclient.utils import InferenceServerException

from guard.backends.onnx import OnnxBackend
from guard.models import load_samples, model_path
from tests.integration.conftest import StartGuard, digits_policy


@pytest.fixture(scope="module")
def batch() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    x = load_samples("digits")[0][:5]
    local = OnnxBackend(model_path("digits"), name="digits", device="cpu")
    return x, local.run({"input": x})


def infer_sync(url: str, x: np.ndarray, binary: bool) -> dict[str, np.ndarray]:
    client = triton.InferenceServerClient(url)
    try:
        assert client.is_server_live() and client.is_model_ready("digits")
        inputs = [triton.InferInput("input", list(x.shape), "FP32")]
        inputs[0].set_data_from_numpy(x, binary_data=binary)
        outputs = [
            triton.InferRequestedOutput(n, binary_data=binary) for n in ("label", "probabilities")
        ]
        result = client.infer("digits", inputs, outputs=outputs)
        return {n: result.as_numpy(n) for n in ("label", "probabilities")}
    finally:
        client.close()


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
async def test_sync_client(start_guard: StartGuard, batch: Any, binary: bool) -> None:
    x, expected = batch
    guard = await start_guard(digits_policy())
    url = f"{guard.host}:{guard.port}"
    got = await asyncio.get_running_loop().run_in_executor(None, infer_sync, url, x, binary)
    np.testing.assert_array_equal(got["label"], expected["label"])
    np.testing.assert_allclose(got["probabilities"], expected["probabilities"], rtol=1e-6)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
async def test_aio_client_and_metadata(start_guard: StartGuard, batch: Any, binary: bool) -> None:
    x, expected = batch
    guard = await start_guard(digits_policy())
    client = triton_aio.InferenceServerClient(f"{guard.host}:{guard.port}")
    try:
        metadata = await client.get_model_metadata("digits")
        assert metadata["inputs"][0]["name"] == "input"
        inputs = [triton_aio.InferInput("input", list(x.shape), "FP32")]
        inputs[0].set_data_from_numpy(x, binary_data=binary)
        outputs = [triton_aio.InferRequestedOutput("label", binary_data=binary)]
        result = await client.infer("digits", inputs, outputs=outputs)
        np.testing.assert_array_equal(result.as_numpy("label"), expected["label"])
        assert result.as_numpy("probabilities") is None  # only what was asked for

        bad = [triton_aio.InferInput("input", [1, 64], "FP32")]
        bad[0].set_data_from_numpy(np.full((1, 64), np.inf, np.float32), binary_data=binary)
        with pytest.raises(InferenceServerException) as info:
            await client.infer("digits", bad)
        assert "inputs.input[0, 0]: value inf is infinite" in info.value.message()
    finally:
        await client.close()

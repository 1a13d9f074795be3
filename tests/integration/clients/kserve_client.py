"""KServe's own clients against a guard: ``python kserve_client.py REST_URL GRPC_ADDRESS``.

Run in a process of its own: KServe registers its ``inference.*`` protobuf messages in
protobuf's default pool, as ``tritonclient.grpc`` does, and the two cannot share one.
Prints one JSON object with what each client saw; the test asserts on it.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import httpx
import numpy as np
from kserve import (
    InferenceGRPCClient,
    InferenceRESTClient,
    InferInput,
    InferRequest,
    RESTConfig,
)

from guard.models import load_samples


def request(x: np.ndarray, *, binary: bool) -> InferRequest:
    tensor = InferInput(name="input", shape=list(x.shape), datatype="FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    return InferRequest(model_name="digits", infer_inputs=[tensor], request_id="kserve-1")


async def rest_v2(url: str, x: np.ndarray) -> dict[str, Any]:
    client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0))
    try:
        seen: dict[str, Any] = {
            "live": await client.is_server_live(url),
            "ready": await client.is_server_ready(url),
            "model_ready": await client.is_model_ready(url, "digits"),
            "unknown_model_ready": await client.is_model_ready(url, "nope"),
        }
        for binary in (False, True):
            result = await client.infer(url, request(x, binary=binary), model_name="digits")
            seen[f"labels_binary_{binary}"] = result.outputs[0].as_numpy().tolist()
            seen["output_names"] = [o.name for o in result.outputs]
        bad = np.zeros((1, 63), np.float32)
        try:
            await client.infer(url, request(bad, binary=False), model_name="digits")
        except httpx.HTTPStatusError as exc:
            seen["error"] = [exc.response.status_code, exc.response.json()]
        return seen
    finally:
        await client.close()


async def rest_v1(url: str, x: np.ndarray) -> dict[str, Any]:
    client = InferenceRESTClient(RESTConfig(protocol="v1", retries=0))
    try:
        result = await client.infer(url, {"instances": x.tolist()}, model_name="digits")
        return {
            "live": await client.is_server_live(url),
            "model_ready": await client.is_model_ready(url, "digits"),
            "predictions": result["predictions"],
        }
    finally:
        await client.close()


async def over_grpc(address: str, x: np.ndarray) -> dict[str, Any]:
    client = InferenceGRPCClient(address, retries=0)
    try:
        result = await client.infer(request(x, binary=False))
        return {
            "live": await client.is_server_live(),
            "ready": await client.is_server_ready(),
            "model_ready": await client.is_model_ready("digits"),
            "labels": result.outputs[0].as_numpy().tolist(),
            "output_names": [o.name for o in result.outputs],
            "id": result.id,
        }
    finally:
        await client.close()


async def main(url: str, address: str) -> None:
    x = load_samples("digits")[0][:4].astype(np.float32)
    print(
        json.dumps(
            {
                "v2": await rest_v2(url, x),
                "v1": await rest_v1(url, x),
                "grpc": await over_grpc(address, x),
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))

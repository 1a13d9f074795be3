"""What a response stage does to an answer's format: nothing. Through a real MLServer
upstream with the privacy stage on, outputs keep MLServer's ``content_type``
parameters and its ``[N, 1]`` label shape, over REST (JSON and binary) and gRPC, and a
client's input parameters reach the upstream."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import grpc
import numpy as np
import orjson
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from guard.models import load_samples
from tests.integration.mlserver_upstream import MLServerProcess, trained_breast_cancer
from tests.integration.test_grpc import StartGrpcGuard, start_grpc_guard  # noqa: F401

OUTPUTS = [{"name": "predict"}, {"name": "predict_proba"}]


def policy(url: str, *, privacy: bool) -> dict[str, Any]:
    stages: list[dict[str, Any]] = [
        {"validate": {"shape": [30], "dtype": "FP64", "min": 0.0, "max": 10000.0}}
    ]
    if privacy:
        stages.append(
            {
                "privacy": {
                    "mechanism": "laplace",
                    "epsilon": 4.0,
                    "output": "predict_proba",
                    "label_output": "predict",
                }
            }
        )
    return {
        "version": 1,
        "models": {"breast_cancer": {"upstream": {"url": url, "timeout": 10}, "stages": stages}},
    }


@pytest.fixture(scope="module")
def rows() -> tuple[np.ndarray, np.ndarray]:
    x = load_samples("breast_cancer")[0][:6].astype(np.float64)
    return x, trained_breast_cancer().estimator.predict(x)


def v2_body(x: np.ndarray, *, binary: bool) -> tuple[bytes, dict[str, str]]:
    tensor: dict[str, Any] = {
        "name": "input",
        "shape": list(x.shape),
        "datatype": "FP64",
        "parameters": {"content_type": "np"},
    }
    if binary:
        tensor["parameters"]["binary_data_size"] = x.nbytes
        doc = {"inputs": [tensor], "outputs": OUTPUTS, "parameters": {"binary_data_output": True}}
        head = orjson.dumps(doc)
        return head + x.astype("<f8").tobytes(), {"Inference-Header-Content-Length": str(len(head))}
    tensor["data"] = x.ravel().tolist()
    return orjson.dumps({"inputs": [tensor], "outputs": OUTPUTS}), {}


def read_v2(payload: bytes, headers: Any) -> dict[str, tuple[list[int], dict[str, Any], Any]]:
    length = headers.get("Inference-Header-Content-Length")
    head = orjson.loads(payload[: int(length)] if length else payload)
    out = {}
    for entry in head["outputs"]:
        parameters = dict(entry.get("parameters", {}))
        parameters.pop("binary_data_size", None)
        out[entry["name"]] = (entry["shape"], parameters, entry.get("data"))
    return out


@pytest.mark.parametrize("privacy", [False, True], ids=["no-stage", "privacy"])
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
async def test_rest_answers_keep_parameters_and_shapes(
    start_grpc_guard: StartGrpcGuard,  # noqa: F811
    mlserver_breast_cancer: MLServerProcess,
    rows: Any,
    binary: bool,
    privacy: bool,
) -> None:
    x, labels = rows
    guard = await start_grpc_guard(policy(mlserver_breast_cancer.url, privacy=privacy))
    body, headers = v2_body(x, binary=binary)
    url = guard.rest.make_url("/v2/models/breast_cancer/infer")
    async with aiohttp.ClientSession() as http, http.post(url, data=body, headers=headers) as reply:
        payload = await reply.read()
        assert reply.status == 200, payload
        got = read_v2(payload, reply.headers)
    shape, parameters, data = got["predict"]
    assert shape == [6, 1] and parameters == {"content_type": "np"}
    assert got["predict_proba"][0] == [6, 2]
    assert got["predict_proba"][1] == {"content_type": "np"}
    if not binary:
        np.testing.assert_array_equal(np.asarray(data).reshape(-1), labels)


async def test_grpc_answers_keep_parameters_and_shapes(
    start_grpc_guard: StartGrpcGuard,  # noqa: F811
    mlserver_breast_cancer: MLServerProcess,
    rows: Any,
) -> None:
    x, labels = rows
    guard = await start_grpc_guard(policy(mlserver_breast_cancer.url, privacy=True))
    message = service_pb2.ModelInferRequest(model_name="breast_cancer")
    tensor = message.inputs.add(name="input", datatype="FP64", shape=list(x.shape))
    tensor.parameters["content_type"].string_param = "np"
    message.raw_input_contents.append(x.astype("<f8").tobytes())
    for name in ("predict", "predict_proba"):
        message.outputs.add(name=name)
    async with grpc.aio.insecure_channel(guard.grpc_url) as channel:
        reply = await service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(message)
    outputs = {o.name: o for o in reply.outputs}
    assert list(outputs["predict"].shape) == [6, 1]
    assert outputs["predict"].parameters["content_type"].string_param == "np"
    assert outputs["predict_proba"].parameters["content_type"].string_param == "np"
    label = np.frombuffer(reply.raw_output_contents[0], "<i8")
    np.testing.assert_array_equal(label, labels)


# MLServer's own codecs, in MLServer's venv: each output decoded by the codec its
# content_type names (what MLServer's clients do), over REST JSON and over gRPC
# (MLServer's converters read the guard's ModelInferResponse).
MLSERVER_DECODE = """
import base64, json, sys
from mlserver.codecs.base import find_input_codec
from mlserver.types import InferenceResponse

doc = json.loads(sys.stdin.read())
if doc["kind"] == "grpc":
    from mlserver.grpc import dataplane_pb2
    from mlserver.grpc.converters import ModelInferResponseConverter

    message = dataplane_pb2.ModelInferResponse.FromString(base64.b64decode(doc["body"]))
    response = ModelInferResponseConverter.to_types(message)
else:
    response = InferenceResponse.model_validate(doc["body"])
decoded = {}
for output in response.outputs:
    codec = find_input_codec(output.parameters.content_type if output.parameters else None)
    array = codec.decode_output(output)
    decoded[output.name] = {"shape": list(array.shape), "values": array.ravel().tolist()}
print(json.dumps(decoded))
"""


def mlserver_decode(kind: str, body: Any) -> dict[str, Any]:
    import json
    import subprocess

    from tests.integration.mlserver_upstream import mlserver_venv

    done = subprocess.run(
        [str(mlserver_venv() / "bin" / "python"), "-c", MLSERVER_DECODE],
        input=json.dumps({"kind": kind, "body": body}),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


async def test_mlserver_codecs_decode_the_guards_answers(
    start_grpc_guard: StartGrpcGuard,  # noqa: F811
    mlserver_breast_cancer: MLServerProcess,
    rows: Any,
) -> None:
    import base64

    x, labels = rows
    guard = await start_grpc_guard(policy(mlserver_breast_cancer.url, privacy=True))
    body, headers = v2_body(x, binary=False)
    url = guard.rest.make_url("/v2/models/breast_cancer/infer")
    async with aiohttp.ClientSession() as http, http.post(url, data=body, headers=headers) as reply:
        assert reply.status == 200
        rest = await reply.json()
    message = service_pb2.ModelInferRequest(model_name="breast_cancer")
    message.inputs.add(name="input", datatype="FP64", shape=list(x.shape))
    message.raw_input_contents.append(x.astype("<f8").tobytes())
    for name in ("predict", "predict_proba"):
        message.outputs.add(name=name)
    async with grpc.aio.insecure_channel(guard.grpc_url) as channel:
        reply_message = await service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(message)
    over_grpc = base64.b64encode(reply_message.SerializeToString()).decode()
    for kind, payload in (("rest", rest), ("grpc", over_grpc)):
        decoded = await asyncio.get_running_loop().run_in_executor(
            None, mlserver_decode, kind, payload
        )
        assert decoded["predict"]["shape"] == [6, 1], kind
        assert decoded["predict"]["values"] == labels.tolist(), kind
        assert decoded["predict_proba"]["shape"] == [6, 2], kind

"""One suite over both front ends: the same request refused over REST and over gRPC
gives the same message, with the HTTP status and the gRPC code that correspond."""

from __future__ import annotations

from typing import Any

import aiohttp
import grpc
import numpy as np
import orjson
import pytest
import yaml
from tritonclient.grpc import service_pb2, service_pb2_grpc

from guard.clients import key_digest
from guard.grpc_server import status_code
from tests.integration.test_grpc import Guard, StartGrpcGuard, start_grpc_guard  # noqa: F401

KEYS = {"alice": "key-alice", "bob": "key-bob"}
KEYS_FILE = yaml.safe_dump(
    {
        "clients": {
            "alice": {"key_sha256": key_digest(KEYS["alice"])},
            "bob": {"key_sha256": key_digest(KEYS["bob"]), "models": ["breast_cancer"]},
        }
    }
)
POLICY = {
    "version": 1,
    "clients": {"keys_file": "keys.yaml"},
    "models": {
        "digits": {
            "model": "builtin:digits",
            "stages": [
                {"validate": {"min": 0.0, "max": 16.0}},
                {"budget": {"limits": [{"queries": 3, "per": "1h"}]}},
            ],
        },
        "breast_cancer": {"model": "builtin:breast_cancer", "stages": []},
    },
}

# (what, model, version, shape, value, key, http status)
CASES = [
    ("wrong shape", "digits", None, [1, 63], 1.0, "alice", 400),
    ("out of range", "digits", None, [1, 64], 99.0, "alice", 400),
    ("unknown model", "nope", None, [1, 64], 1.0, "alice", 404),
    ("unknown version", "digits", "7", [1, 64], 1.0, "alice", 404),
    ("unknown key", "digits", None, [1, 64], 1.0, "mallory", 401),
    ("no key", "digits", None, [1, 64], 1.0, None, 401),
    ("model not allowed", "digits", None, [1, 64], 1.0, "bob", 403),
]


async def over_rest(
    guard: Guard, model: str, version: str | None, x: np.ndarray, key: str | None
) -> tuple[int, str]:
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32"}]}
    body["inputs"][0]["data"] = x.ravel().tolist()
    headers = {"X-API-Key": KEYS.get(key, "key-nobody")} if key else {}
    async with (
        aiohttp.ClientSession() as http,
        http.post(guard.rest.make_url(path), data=orjson.dumps(body), headers=headers) as reply,
    ):
        doc = await reply.json()
        return reply.status, doc.get("error", "")


async def over_grpc(
    guard: Guard, model: str, version: str | None, x: np.ndarray, key: str | None
) -> tuple[grpc.StatusCode, str]:
    message = service_pb2.ModelInferRequest(model_name=model, model_version=version or "")
    message.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    message.raw_input_contents.append(x.astype("<f4").tobytes())
    metadata = (("x-api-key", KEYS.get(key, "key-nobody")),) if key else ()
    async with grpc.aio.insecure_channel(guard.grpc_url) as channel:
        try:
            await service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                message, metadata=metadata
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize(
    ("what", "model", "version", "shape", "value", "key", "status"),
    CASES,
    ids=[c[0] for c in CASES],
)
async def test_refusals_agree(
    start_grpc_guard: StartGrpcGuard,  # noqa: F811
    what: str,
    model: str,
    version: str | None,
    shape: list[int],
    value: float,
    key: str | None,
    status: int,
) -> None:
    guard = await start_grpc_guard(POLICY, files={"keys.yaml": KEYS_FILE})
    x = np.full(shape, value, np.float32)
    rest_status, rest_message = await over_rest(guard, model, version, x, key)
    code, details = await over_grpc(guard, model, version, x, key)
    assert rest_status == status, rest_message
    assert code == status_code(status)
    assert details == rest_message and rest_message


async def test_a_quota_counts_both_front_ends_as_one_client(
    start_grpc_guard: StartGrpcGuard,  # noqa: F811
) -> None:
    """Budget state is shared: 3 queries per hour, spent over REST and gRPC alike."""
    guard = await start_grpc_guard(POLICY, files={"keys.yaml": KEYS_FILE})
    x = np.full((1, 64), 1.0, np.float32)
    answers: list[Any] = []
    for send in (over_rest, over_grpc, over_rest, over_grpc, over_rest):
        answers.append((await send(guard, "digits", None, x, "alice"))[0])
    assert answers[:3] == [200, grpc.StatusCode.OK, 200]
    assert answers[3:] == [grpc.StatusCode.RESOURCE_EXHAUSTED, 429]

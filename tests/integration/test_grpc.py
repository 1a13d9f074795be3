"""Unmodified Triton gRPC clients (sync and aio) against the guard's gRPC listener.

The guard serves the embedded digits model on 127.0.0.1 over REST and gRPC at once;
both front ends run the same pipeline, so answers, refusals, metrics and audit
records must agree.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import numpy as np
import orjson
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
import tritonclient.http as triton_http
import yaml
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from guard.appkeys import LIVE
from guard.clients import key_digest
from guard.config import load_policy
from guard.grpc_server import GRPC, add_grpc_listener
from guard.models import load_samples
from guard.server import create_app, create_ops_app
from tests.integration.conftest import digits_policy
from tests.integration.test_cli import free_port, wait_ready

ROOT = Path(__file__).parents[2]
KEYS = {"alice": "key-alice", "mallory": "key-mallory"}
BLACKLIGHT_KEY = "GUARD_TEST_BLACKLIGHT_KEY"


class Guard:
    """A guard serving REST (``rest``) and gRPC (``grpc_url``), with its ops listener."""

    def __init__(self, rest: TestServer, ops: TestServer) -> None:
        self.rest = rest
        self.ops = ops
        self.grpc_url = f"127.0.0.1:{rest.app[GRPC].port}"
        self.rest_url = f"{rest.host}:{rest.port}"

    def audit(self) -> list[dict[str, Any]]:
        audit = self.rest.app[LIVE].current().audit
        assert audit.flush() and audit.target is not None
        path = Path(audit.target)
        return [orjson.loads(line) for line in path.read_text().splitlines()]

    async def metric(self, name: str) -> list[str]:
        async with (
            aiohttp.ClientSession() as http,
            http.get(self.ops.make_url("/metrics")) as reply,
        ):
            text = await reply.text()
        return [line for line in text.splitlines() if line.startswith(name)]


StartGrpcGuard = Callable[..., Awaitable[Guard]]


@pytest.fixture
async def start_grpc_guard(tmp_path: Path) -> AsyncIterator[StartGrpcGuard]:
    started: list[TestServer] = []

    async def start(policy: dict[str, Any], *, files: dict[str, str] | None = None) -> Guard:
        for name, text in (files or {}).items():
            (tmp_path / name).write_text(text)
        path = tmp_path / "policy.yaml"
        path.write_text(yaml.safe_dump(policy))
        app = create_app(load_policy(path), registry=CollectorRegistry(), policy_path=path)
        add_grpc_listener(app, "127.0.0.1", 0)
        rest = TestServer(app, host="127.0.0.1")
        await rest.start_server()
        started.append(rest)
        ops = TestServer(create_ops_app(app), host="127.0.0.1")
        await ops.start_server()
        started.append(ops)
        return Guard(rest, ops)

    yield start
    for server in reversed(started):
        await server.close()


@pytest.fixture(autouse=True)
def blacklight_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BLACKLIGHT_KEY, "the deployment's secret")


def keyed_policy(stages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return digits_policy(
        model={"stages": [{"validate": {"min": 0.0, "max": 16.0}}, *stages]},
        clients={"keys_file": "keys.yaml", "header": "X-API-Key"},
        **extra,
    )


KEYS_FILE = yaml.safe_dump(
    {"clients": {name: {"key_sha256": key_digest(key)} for name, key in KEYS.items()}}
)


def samples(n: int, start: int = 0) -> np.ndarray:
    return load_samples("digits")[0][start : start + n].astype(np.float32)


def grpc_input(module: Any, x: np.ndarray) -> Any:
    tensor = module.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def rest_answer(url: str, x: np.ndarray) -> dict[str, np.ndarray]:
    client = triton_http.InferenceServerClient(url)
    try:
        tensor = triton_http.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=True)
        result = client.infer("digits", [tensor])
        return {n: result.as_numpy(n) for n in ("label", "probabilities")}
    finally:
        client.close()


def sync_session(url: str, x: np.ndarray) -> dict[str, Any]:
    """Everything a sync client checks first, then one inference."""
    client = triton.InferenceServerClient(url)
    try:
        server = client.get_server_metadata()
        model = client.get_model_metadata("digits", as_json=True)
        result = client.infer("digits", [grpc_input(triton, x)], request_id="req-17")
        return {
            "live": client.is_server_live(),
            "ready": client.is_server_ready(),
            "model_ready": client.is_model_ready("digits"),
            "server": (server.name, server.version),
            "model": model,
            "label": result.as_numpy("label"),
            "probabilities": result.as_numpy("probabilities"),
            "id": result.get_response().id,
        }
    finally:
        client.close()


async def in_thread(function: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, function, *args)


async def test_sync_client_health_metadata_and_infer_match_rest(
    start_grpc_guard: StartGrpcGuard,
) -> None:
    guard = await start_grpc_guard(digits_policy())
    x = samples(8)
    got = await in_thread(sync_session, guard.grpc_url, x)
    expected = await in_thread(rest_answer, guard.rest_url, x)
    assert got["live"] and got["ready"] and got["model_ready"]
    assert got["server"][0] == "inference-guard"
    assert got["model"]["name"] == "digits"
    assert got["model"]["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "64"]}]
    assert [o["name"] for o in got["model"]["outputs"]] == ["label", "probabilities"]
    assert got["id"] == "req-17"
    np.testing.assert_array_equal(got["label"], expected["label"])
    np.testing.assert_array_equal(got["probabilities"], expected["probabilities"])
    assert got["label"].dtype == np.int64 and got["label"].shape == (8,)


async def test_aio_client_infer_requested_output_and_errors(
    start_grpc_guard: StartGrpcGuard,
) -> None:
    guard = await start_grpc_guard(digits_policy())
    x = samples(5, start=40)
    expected = await in_thread(rest_answer, guard.rest_url, x)
    client = triton_aio.InferenceServerClient(guard.grpc_url)
    try:
        assert await client.is_server_live() and await client.is_model_ready("digits")
        result = await client.infer(
            "digits",
            [grpc_input(triton_aio, x)],
            outputs=[triton_aio.InferRequestedOutput("label")],
        )
        np.testing.assert_array_equal(result.as_numpy("label"), expected["label"])
        assert result.as_numpy("probabilities") is None  # only what was asked for

        bad = grpc_input(triton_aio, np.zeros((1, 63), np.float32))
        with pytest.raises(InferenceServerException) as info:
            await client.infer("digits", [bad])
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "inputs.input" in info.value.message() and "63" in info.value.message()

        with pytest.raises(InferenceServerException) as info:
            await client.infer("digits", [grpc_input(triton_aio, np.full((1, 64), 99, "f4"))])
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "inputs.input" in info.value.message()

        with pytest.raises(InferenceServerException) as info:
            await client.is_model_ready("nope")
        assert info.value.status() == "StatusCode.NOT_FOUND"
        assert "unknown model 'nope'" in info.value.message()

        with pytest.raises(InferenceServerException) as info:
            await client.infer("digits", [grpc_input(triton_aio, x)], model_version="7")
        assert info.value.status() == "StatusCode.NOT_FOUND"
    finally:
        await client.close()


async def test_typed_contents_and_malformed_messages(start_grpc_guard: StartGrpcGuard) -> None:
    """KServe's and MLServer's clients send typed ``contents``; Triton's generated stub
    sends them here, and malformed messages are refused naming the field."""
    guard = await start_grpc_guard(digits_policy())
    x = samples(3, start=7)
    expected = await in_thread(rest_answer, guard.rest_url, x)

    def request(**kwargs: Any) -> Any:
        message = service_pb2.ModelInferRequest(model_name="digits", **kwargs)
        tensor = message.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
        return message, tensor

    async with grpc.aio.insecure_channel(guard.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        typed, tensor = request()
        tensor.contents.fp32_contents.extend(x.ravel().tolist())
        reply = await stub.ModelInfer(typed)
        labels = np.frombuffer(reply.raw_output_contents[0], "<i8")
        assert [o.name for o in reply.outputs] == ["label", "probabilities"]
        np.testing.assert_array_equal(labels, expected["label"])

        cases = []
        short, tensor = request()
        tensor.contents.fp32_contents.extend(x.ravel().tolist()[:-1])
        cases.append((short, "inputs[0].contents.fp32_contents: shape [3, 64] needs 192"))
        wrong, tensor = request()
        tensor.contents.int_contents.extend([1] * x.size)
        cases.append((wrong, "inputs[0].contents.int_contents: set for a FP32 tensor"))
        both, tensor = request(raw_input_contents=[x.tobytes(), b""])
        cases.append((both, "raw_input_contents: has 2 entries for 1 inputs"))
        truncated, _ = request(raw_input_contents=[x.tobytes()[:-4]])
        cases.append((truncated, "raw_input_contents[0]: shape [3, 64] of FP32 needs 768 bytes"))
        for message, text in cases:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ModelInfer(message)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert text in info.value.details()


async def test_api_key_from_metadata(start_grpc_guard: StartGrpcGuard) -> None:
    guard = await start_grpc_guard(keyed_policy([]), files={"keys.yaml": KEYS_FILE})
    x = samples(2)
    client = triton_aio.InferenceServerClient(guard.grpc_url)
    try:
        ok = await client.infer(
            "digits", [grpc_input(triton_aio, x)], headers={"x-api-key": KEYS["alice"]}
        )
        assert ok.as_numpy("label").shape == (2,)
        for headers, message in [
            ({"x-api-key": "key-nobody"}, "unknown API key in the X-API-Key header"),
            ({}, "missing API key: send it in the X-API-Key header"),
        ]:
            with pytest.raises(InferenceServerException) as info:
                await client.infer("digits", [grpc_input(triton_aio, x)], headers=headers)
            assert info.value.status() == "StatusCode.UNAUTHENTICATED"
            assert info.value.message() == message
        with pytest.raises(InferenceServerException) as info:
            await client.get_model_metadata("digits", headers={"x-api-key": "key-nobody"})
        assert info.value.status() == "StatusCode.UNAUTHENTICATED"
    finally:
        await client.close()


def boundary_walk(n: int, seed: int = 0) -> np.ndarray:
    """One held-out digit nudged a little each time: a query-based attack's pattern."""
    x = load_samples("digits")[0]
    rng = np.random.default_rng(seed)
    return np.clip(x[seed] + rng.normal(0, 0.02, (n, 64)), 0, 16).astype(np.float32)


async def test_detector_denies_near_duplicates_counts_and_audits_grpc(
    start_grpc_guard: StartGrpcGuard,
) -> None:
    guard = await start_grpc_guard(
        keyed_policy([{"blacklight": {"key_env": BLACKLIGHT_KEY}}], audit={"path": "audit.jsonl"}),
        files={"keys.yaml": KEYS_FILE},
    )
    client = triton_aio.InferenceServerClient(guard.grpc_url)
    codes = []
    try:
        for row in boundary_walk(6):
            try:
                await client.infer(
                    "digits",
                    [grpc_input(triton_aio, row[None])],
                    headers={"x-api-key": KEYS["mallory"]},
                )
                codes.append("OK")
            except InferenceServerException as exc:
                codes.append(f"{exc.status()}: {exc.message()}")
        for row in samples(5, start=100):  # another client is unaffected
            await client.infer(
                "digits", [grpc_input(triton_aio, row[None])], headers={"x-api-key": KEYS["alice"]}
            )
    finally:
        await client.close()
    # The client is told it was refused, not by which stage (disclose.reasons is off).
    assert codes == ["OK"] * 3 + ["StatusCode.PERMISSION_DENIED: request refused by policy"] * 3
    records = guard.audit()
    assert [(r["client"], r["stage"], r["action"]) for r in records] == [
        ("mallory", "blacklight", "deny")
    ] * 3
    requests = await guard.metric("guard_requests_total")
    assert (
        'guard_requests_total{code="200",model="digits",protocol="grpc",verdict="allow"} 8.0'
        in requests
    )
    assert (
        'guard_requests_total{code="403",model="digits",protocol="grpc",verdict="deny"} 3.0'
        in requests
    )
    assert not [line for line in requests if 'protocol="v2"' in line]
    findings = await guard.metric("guard_findings_total")
    assert 'guard_findings_total{action="deny",model="digits",stage="blacklight"} 3.0' in findings


async def test_refusals_before_the_pipeline_are_counted(start_grpc_guard: StartGrpcGuard) -> None:
    guard = await start_grpc_guard(keyed_policy([]), files={"keys.yaml": KEYS_FILE})
    async with grpc.aio.insecure_channel(guard.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        message = service_pb2.ModelInferRequest(model_name="digits")
        message.inputs.add(name="input", datatype="FP32", shape=[1, 64])
        message.raw_input_contents.append(np.zeros(64, "<f4").tobytes())
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ModelInfer(message, metadata=(("x-api-key", "key-nobody"),))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        trailing = dict(info.value.trailing_metadata() or ())
        assert trailing["x-guard-verdict"] == "deny" and trailing["x-request-id"]
        call = stub.ModelInfer(
            message, metadata=(("x-api-key", KEYS["alice"]), ("x-request-id", "abc-1"))
        )
        reply = await call
        trailing = dict(await call.trailing_metadata())
        assert trailing["x-request-id"] == "abc-1" and trailing["x-guard-verdict"] == "allow"
        assert reply.id == "abc-1"
        garbage = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await garbage(b"\xff\xff\xff", metadata=(("x-api-key", KEYS["alice"]),))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details() == "request: not a valid ModelInferRequest message"
        assert dict(info.value.trailing_metadata() or ())["x-guard-verdict"] == "deny"
    requests = await guard.metric("guard_requests_total")
    assert (
        'guard_requests_total{code="401",model="digits",protocol="grpc",verdict="rejected"} 1.0'
        in requests
    )
    assert (
        'guard_requests_total{code="200",model="digits",protocol="grpc",verdict="allow"} 1.0'
        in requests
    )
    assert (
        'guard_requests_total{code="400",model="unknown",protocol="grpc",verdict="rejected"} 1.0'
        in requests
    )


def serve(policy: Path, port: int, grpc_port: int, loop: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "guard.cli", "serve", "--policy", str(policy)]
    command += ["--port", str(port), "--grpc-port", str(grpc_port), "--metrics-port", "off"]
    return subprocess.Popen(
        [*command, "--loop", loop],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def infer_max(url: str, value: float) -> str:
    """The gRPC status of one inference of a row of ``value``s ("OK" when answered)."""
    client = triton.InferenceServerClient(url)
    try:
        client.infer("digits", [grpc_input(triton, np.full((1, 64), value, np.float32))])
        return "OK"
    except InferenceServerException as exc:
        return str(exc.status())
    finally:
        client.close()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_guard_serve_grpc_port_reloads_and_stops(tmp_path: Path, loop: str) -> None:
    policy = digits_policy()
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    port, grpc_port = free_port(), free_port()
    url = f"127.0.0.1:{grpc_port}"
    process = serve(path, port, grpc_port, loop)
    try:
        wait_ready(f"http://127.0.0.1:{port}", process)
        client = triton.InferenceServerClient(url)
        assert client.is_server_live() and client.is_model_ready("digits")
        client.close()
        assert infer_max(url, 10.0) == "OK"
        policy["models"]["digits"]["stages"][0]["validate"]["max"] = 5.0
        path.write_text(yaml.safe_dump(policy))
        process.send_signal(signal.SIGHUP)  # the reload reaches the gRPC front end too
        deadline = time.monotonic() + 10
        while infer_max(url, 10.0) == "OK" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert infer_max(url, 10.0) == "StatusCode.INVALID_ARGUMENT"
        assert infer_max(url, 3.0) == "OK"
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=20)[0].decode()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, output
    assert f"gRPC (Open Inference Protocol) on 127.0.0.1:{grpc_port}" in output
    assert "Traceback" not in output


def test_guard_serve_grpc_port_in_use_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(digits_policy()))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        process = serve(path, free_port(), taken.getsockname()[1], "asyncio")
        output = process.communicate(timeout=60)[0].decode()
    assert process.returncode != 0
    assert "cannot listen for gRPC on 127.0.0.1:" in output
    assert "Traceback" not in output


async def test_large_typed_messages_decode_in_the_worker_and_triton_only_rpcs_are_unimplemented(
    start_grpc_guard: StartGrpcGuard,
) -> None:
    guard = await start_grpc_guard(digits_policy(limits={"offload_decode_bytes": 1}))
    x = samples(4, start=20)
    expected = await in_thread(rest_answer, guard.rest_url, x)
    async with grpc.aio.insecure_channel(guard.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        message = service_pb2.ModelInferRequest(model_name="digits")
        tensor = message.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
        tensor.contents.fp32_contents.extend(x.ravel().tolist())
        reply = await stub.ModelInfer(message)
        np.testing.assert_array_equal(
            np.frombuffer(reply.raw_output_contents[0], "<i8"), expected["label"]
        )
        tensor.contents.fp32_contents.append(1.0)  # the worker's errors come back named
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ModelInfer(message)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "inputs[0].contents.fp32_contents: shape [4, 64] needs 256" in info.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ModelStatistics(service_pb2.ModelStatisticsRequest(name="digits"))
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert guard.rest.app[LIVE].decoder._pool is not None  # it did go to the worker


async def test_quota_is_resource_exhausted_with_retry_after(
    start_grpc_guard: StartGrpcGuard,
) -> None:
    guard = await start_grpc_guard(
        keyed_policy([{"budget": {"limits": [{"queries": 2, "per": "1m"}]}}]),
        files={"keys.yaml": KEYS_FILE},
    )
    async with grpc.aio.insecure_channel(guard.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        message = service_pb2.ModelInferRequest(model_name="digits")
        message.inputs.add(name="input", datatype="FP32", shape=[1, 64])
        message.raw_input_contents.append(samples(1).astype("<f4").tobytes())
        metadata = (("x-api-key", KEYS["alice"]),)
        for _ in range(2):
            await stub.ModelInfer(message, metadata=metadata)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ModelInfer(message, metadata=metadata)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.details().startswith("quota exhausted for this model; retry in ")
    trailing = dict(info.value.trailing_metadata() or ())
    assert 1 <= int(trailing["retry-after"]) <= 60 and trailing["x-guard-verdict"] == "deny"
    requests = await guard.metric("guard_requests_total")
    assert (
        'guard_requests_total{code="429",model="digits",protocol="grpc",verdict="deny"} 1.0'
        in requests
    )

"""REST surfaces other clients expect: KServe's SDK health and V1 model status, TF Serving
model metadata, and 404 (not 405) for paths the guard does not serve (405 stays for a
path it serves with another method)."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
import tritonclient.http as triton

from tests.integration.conftest import StartGuard, digits_policy


async def get(http: aiohttp.ClientSession, url: object) -> tuple[int, object]:
    async with http.get(url) as reply:  # type: ignore[arg-type]
        return reply.status, await reply.json()


async def test_health_bodies_kserve_reads_and_triton_still_accepts(
    start_guard: StartGuard, http: aiohttp.ClientSession
) -> None:
    guard = await start_guard(digits_policy())
    # what KServe's InferenceRESTClient reads: .json().get("live") / .get("ready"),
    # and {"status": "alive"} at / for the V1 protocol
    assert await get(http, guard.make_url("/v2/health/live")) == (200, {"live": True})
    assert await get(http, guard.make_url("/v2/health/ready")) == (200, {"ready": True})
    assert await get(http, guard.make_url("/")) == (200, {"status": "alive"})
    assert await get(http, guard.make_url("/v2/models/digits/ready")) == (
        200,
        {"name": "digits", "ready": True},
    )
    url = f"{guard.host}:{guard.port}"
    assert await asyncio.get_running_loop().run_in_executor(None, triton_health, url)


def triton_health(url: str) -> bool:
    client = triton.InferenceServerClient(url)
    try:
        return (
            client.is_server_live()
            and client.is_server_ready()
            and client.is_model_ready("digits")
            and not client.is_model_ready("nope")
        )
    finally:
        client.close()


async def test_v1_model_status_serves_kserve_and_tf_serving(
    start_guard: StartGuard, http: aiohttp.ClientSession
) -> None:
    guard = await start_guard(digits_policy())
    for path, version in [("/v1/models/digits", "1"), ("/v1/models/digits/versions/1", "1")]:
        status, body = await get(http, guard.make_url(path))
        assert status == 200
        assert isinstance(body, dict)
        assert body["name"] == "digits" and body["ready"] is True  # KServe V1
        (entry,) = body["model_version_status"]  # TF Serving
        assert entry["version"] == version and entry["state"] == "AVAILABLE"
    status, body = await get(http, guard.make_url("/v1/models/nope"))
    assert status == 404 and "unknown model 'nope'" in body["error"]  # type: ignore[index]


async def test_tf_serving_model_metadata(
    start_guard: StartGuard, http: aiohttp.ClientSession
) -> None:
    guard = await start_guard(digits_policy())
    for path in ("/v1/models/digits/metadata", "/v1/models/digits/versions/1/metadata"):
        status, body = await get(http, guard.make_url(path))
        assert status == 200, body
        assert isinstance(body, dict)
        assert body["model_spec"] == {"name": "digits", "signature_name": "", "version": "1"}
        signature = body["metadata"]["signature_def"]["signature_def"]["serving_default"]
        assert signature["method_name"] == "tensorflow/serving/predict"
        tensor = signature["inputs"]["input"]
        assert tensor["dtype"] == "DT_FLOAT"
        assert [d["size"] for d in tensor["tensor_shape"]["dim"]] == ["-1", "64"]
        assert signature["outputs"]["label"]["dtype"] == "DT_INT64"
        assert set(signature["outputs"]) == {"label", "probabilities"}
    status, body = await get(http, guard.make_url("/v1/models/digits/versions/9/metadata"))
    assert status == 404 and "no version '9'" in body["error"]  # type: ignore[index]


@pytest.mark.parametrize(
    ("method", "path", "code"),
    [
        ("POST", "/v1/models/digits:classify", 501),
        ("POST", "/v1/models/digits/versions/1:regress", 501),
        ("POST", "/v1/models/digits:explode", 404),
        ("POST", "/v1/models/digits/labels/stable:predict", 404),
        ("GET", "/v1/models/digits:predict", 405),  # it exists, for POST
        ("GET", "/v1/models/digits/labels/stable", 404),
        ("GET", "/v3/anything", 404),
        ("POST", "/v2/models/digits/explain", 404),
    ],
)
async def test_paths_that_do_not_exist_are_404_with_a_json_error(
    start_guard: StartGuard, http: aiohttp.ClientSession, method: str, path: str, code: int
) -> None:
    guard = await start_guard(digits_policy())
    async with http.request(method, guard.make_url(path), data=b"{}") as reply:
        body = await reply.json()
        assert reply.status == code, body
    assert isinstance(body["error"], str) and body["error"]
    if code == 501:
        assert "use :predict" in body["error"]

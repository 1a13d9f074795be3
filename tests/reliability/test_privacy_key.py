"""The privacy stage's consistent noise is keyed on the served model, never on the URL.

The version segment of ``/v2/models/<m>/versions/<v>/infer`` is whatever the client
writes, and it does not change the model that answers. Were it part of the noise key,
each version path would be a fresh draw of noise for the same question, and averaging
the answers over many paths would strip the noise off.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson

from guard.clients import Client
from guard.config import parse_policy
from guard.inference import InferRequest, InferResponse
from guard.models import load_samples, model_path
from guard.pipeline import RequestContext
from guard.runtime import build_runtime
from guard.stages.privacy import Privacy
from tests.integration.conftest import StartGuard
from tests.reliability.conftest import v2_body

SECRET_ENV = "GUARD_TEST_PRIVACY_KEY_SECRET"
ENVIRON = {SECRET_ENV: "a-secret-of-enough-length-for-the-key"}
PRIVACY = {"mechanism": "laplace", "epsilon": 1.0, "secret_env": SECRET_ENV}


def model(**extra: Any) -> dict[str, Any]:
    stages = [{"validate": {"min": 0.0, "max": 16.0}}, {"privacy": PRIVACY}]
    return {"model": "builtin:digits", "stages": stages, **extra}


def privacy_stage(**extra: Any) -> Privacy:
    policy = parse_policy(
        {"version": 1, "models": {"digits": model(**extra)}},
        source="p.yaml",
        base=Path("."),
        environ=ENVIRON,
    )
    runtime = build_runtime(policy, session=None)
    (stage,) = [s for s in runtime.model("digits").pipeline.stages if isinstance(s, Privacy)]
    return stage


def stage_scores(x: np.ndarray) -> np.ndarray:
    from guard.backends.onnx import OnnxBackend

    local = OnnxBackend(model_path("digits"), name="digits", device="cpu")
    return np.asarray(local.run({"input": x})["probabilities"])


async def answer(stage: Privacy, x: np.ndarray, scores: np.ndarray, version: str | None) -> Any:
    """The stage's released scores for a request that named ``version`` in its URL."""
    ctx = RequestContext(
        request_id="r",
        model="digits",
        client=Client("addr:192.0.2.1"),
        request=InferRequest("digits", {"input": x}, model_version=version),
    )
    ctx.response = InferResponse(
        "digits",
        {"probabilities": scores.copy(), "label": np.argmax(scores, axis=1)},
        model_version=version,
    )
    await stage.on_response(ctx)
    return ctx.response.outputs["probabilities"]


async def test_twenty_version_paths_get_one_noisy_answer() -> None:
    x = load_samples("digits")[0][:4]
    stage = privacy_stage()
    scores = stage_scores(x)
    versions = [None, "1", *(f"v{i}" for i in range(18))]
    answers = [await answer(stage, x, scores, v) for v in versions]
    assert not np.allclose(answers[0], scores)  # noise was added
    for version, released in zip(versions[1:], answers[1:], strict=True):
        np.testing.assert_array_equal(released, answers[0], err_msg=f"version {version!r}")
    assert all(v not in stage.noise_scope(stage.mechanism) for v in versions[2:])


def test_the_key_holds_the_version_the_policy_serves() -> None:
    assert privacy_stage().version == ""
    upstream = {"upstream": {"url": "http://127.0.0.1:9", "version": "3"}}
    pinned = privacy_stage(**upstream)
    assert pinned.version == "3"
    assert "3" in pinned.noise_scope(pinned.mechanism)
    other = privacy_stage(upstream={"url": "http://127.0.0.1:9", "version": "4"})
    assert pinned.noise_scope(pinned.mechanism) != other.noise_scope(other.mechanism)


async def test_with_and_without_the_version_in_the_url_one_answer(
    start_guard: StartGuard, http: aiohttp.ClientSession
) -> None:
    guard = await start_guard({"version": 1, "models": {"digits": model()}}, environ=ENVIRON)
    x = load_samples("digits")[0][:3]
    body = v2_body(x)
    released = []
    for path in ("/v2/models/digits/infer", "/v2/models/digits/versions/1/infer"):
        async with http.post(guard.make_url(path), data=body) as reply:
            assert reply.status == 200, await reply.text()
            payload = orjson.loads(await reply.read())
        (probabilities,) = [o for o in payload["outputs"] if o["name"] == "probabilities"]
        released.append(np.asarray(probabilities["data"]))
    tf = orjson.dumps({"instances": x.tolist()})
    for path in ("/v1/models/digits:predict", "/v1/models/digits/versions/1:predict"):
        async with http.post(guard.make_url(path), data=tf) as reply:
            assert reply.status == 200, await reply.text()
            predictions = orjson.loads(await reply.read())["predictions"]
        released.append(np.asarray([p["probabilities"] for p in predictions]).ravel())
    assert not np.allclose(released[0], stage_scores(x).ravel(), atol=1e-6)  # noisy
    for other in released[1:]:
        np.testing.assert_allclose(other, released[0], rtol=0, atol=1e-6)

"""Feature squeezing through a real guard: the squeeze stage, the detector, the calibration command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import yaml

from guard import _native
from guard.backends.onnx import OnnxBackend
from guard.defenses.squeeze import Image, Squeezer, calibrate_threshold, l1_distances
from guard.models import load_samples, model_path
from tests.integration.conftest import StartGuard
from tests.integration.test_server import post, v2_body

ROOT = Path(__file__).parents[2]
SQUEEZERS = [{"bits": 2}, {"median": 3}]
RANGE = [0.0, 16.0]
IMAGE = {"height": 8, "width": 8, "channels": 1, "layout": "HWC"}


@pytest.fixture(scope="module")
def local() -> OnnxBackend:
    return OnnxBackend(model_path("digits"), name="digits", device="cpu")


def scores_fn(local: OnnxBackend) -> Any:
    return lambda batch: local.run({"input": batch})["probabilities"]


def policy(*stages: dict[str, Any]) -> dict[str, Any]:
    validate = {"validate": {"min": 0.0, "max": 16.0}}
    return {
        "version": 1,
        "models": {"digits": {"model": "builtin:digits", "stages": [validate, *stages]}},
    }


async def test_squeeze_changes_what_the_model_sees(
    start_guard: StartGuard, http: aiohttp.ClientSession, local: OnnxBackend
) -> None:
    x = load_samples("digits")[0][:32]
    guard = await start_guard(policy({"squeeze": {"bits": 1, "range": RANGE}}))
    status, body, headers = await post(http, guard.make_url("/v2/models/digits/infer"), v2_body(x))
    assert status == 200, body
    outputs = {o["name"]: o for o in body["outputs"]}
    squeezed = _native.reduce_bits(x, 1, 0.0, 16.0)
    assert outputs["label"]["data"] == local.run({"input": squeezed})["label"].tolist()
    assert headers["X-Guard-Verdict"] == "allow"


async def test_detector_flags_exactly_the_inputs_above_its_threshold(
    start_guard: StartGuard, http: aiohttp.ClientSession, local: OnnxBackend
) -> None:
    benign = load_samples("digits")[0]
    squeezers = [Squeezer(bits=2, value_range=(0, 16)), Squeezer(median=3, image=Image(8, 8))]
    threshold = calibrate_threshold(scores_fn(local), benign[:600], squeezers, 0.05)
    # Candidates: held-out digits and noisy copies; the test learns their scores offline.
    rng = np.random.default_rng(0)
    candidates = np.clip(benign[600:700] + rng.normal(0, 2, size=(100, 64)), 0, 16).astype(
        np.float32
    )
    scores = l1_distances(scores_fn(local), candidates, squeezers).max(axis=1)
    above, below = candidates[scores > threshold][:3], candidates[scores <= threshold][:3]
    assert len(above) and len(below)

    stage = {"threshold": threshold, "range": RANGE, "image": IMAGE, "squeezers": SQUEEZERS}
    guard = await start_guard(policy({"squeeze_detect": stage}))
    url = guard.make_url("/v2/models/digits/infer")
    for sample in above:
        status, body, headers = await post(http, url, v2_body(sample[None]))
        assert (status, headers["X-Guard-Verdict"]) == (200, "flag"), body
    for sample in below:
        status, body, headers = await post(http, url, v2_body(sample[None]))
        assert (status, headers["X-Guard-Verdict"]) == (200, "allow"), body
    # One flagged sample flags the whole batch.
    status, _, headers = await post(http, url, v2_body(np.vstack([below, above[:1]])))
    assert (status, headers["X-Guard-Verdict"]) == (200, "flag")

    guard = await start_guard(policy({"squeeze_detect": {**stage, "action": "deny"}}))
    status, body, _ = await post(
        http, guard.make_url("/v2/models/digits/infer"), v2_body(above[:1])
    )
    assert status == 403 and body["error"] == "request refused by policy"


async def test_a_wrong_image_shape_is_a_400_naming_the_input(
    start_guard: StartGuard, http: aiohttp.ClientSession
) -> None:
    stages = [{"squeeze": {"median": 2, "image": IMAGE}}]
    guard = await start_guard(
        {"version": 1, "models": {"digits": {"model": "builtin:digits", "stages": stages}}}
    )
    x = np.zeros((2, 63), np.float32)
    status, body, _ = await post(http, guard.make_url("/v2/models/digits/infer"), v2_body(x))
    assert status == 400
    assert body["error"].startswith(
        "inputs.input: shape [2, 63] is not a batch of 8x8x1 (HWC) images"
    )


def test_calibrate_command_prints_a_snippet_the_guard_loads(tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "guard.cli",
        "calibrate-squeeze",
        "--model",
        "digits",
        "--fpr",
        "0.05",
        "--squeezer",
        "bits=2",
        "--squeezer",
        "median=3",
        "--image",
        "8x8x1",
        "--holdout",
        "0.3",
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=120, cwd=ROOT, check=False
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    threshold = float(lines[0].split()[1])
    held_out = int(len(load_samples("digits")[0]) * 0.3)
    assert lines[1].startswith(f"false positive rate on {held_out} held-out inputs: ")
    snippet = yaml.safe_load(
        "\n".join(line for line in lines if not line.startswith(("threshold", "false", "#")))
    )
    assert snippet == [
        {
            "squeeze_detect": {
                "threshold": threshold,
                "range": RANGE,
                "image": IMAGE,
                "squeezers": SQUEEZERS,
            }
        }
    ]
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy(*snippet)))
    check = subprocess.run(
        [sys.executable, "-m", "guard.cli", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert check.returncode == 0, check.stderr
    resolved = json.loads(check.stdout[check.stdout.index("{") : check.stdout.rindex("}") + 1])
    described = resolved["models"]["digits"]["stages"][1]
    assert described["stage"] == "squeeze_detect" and described["threshold"] == threshold

"""KServe's SDK (InferenceRESTClient v1 and v2, InferenceGRPCClient) through the guard."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from guard.backends.onnx import OnnxBackend
from guard.models import load_samples, model_path
from tests.integration.conftest import digits_policy
from tests.integration.test_grpc import StartGrpcGuard, start_grpc_guard  # noqa: F401

ROOT = Path(__file__).parents[2]
SCRIPT = Path(__file__).with_name("clients") / "kserve_client.py"


def kserve_available() -> bool:
    probe = subprocess.run(
        [sys.executable, "-c", "import kserve"], capture_output=True, timeout=120
    )
    return probe.returncode == 0


async def test_kserve_clients_rest_v1_v2_and_grpc(
    start_grpc_guard: StartGrpcGuard,  # noqa: F811
) -> None:
    if not kserve_available():
        if os.environ.get("GUARD_REQUIRE_KSERVE"):
            pytest.fail("kserve is not importable (pip install -e '.[test]')")
        pytest.skip("kserve is not installed (the test extra installs it)")
    guard = await start_grpc_guard(digits_policy())
    url = f"http://{guard.rest_url}"

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(SCRIPT), url, guard.grpc_url],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )

    done = await asyncio.get_running_loop().run_in_executor(None, run)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.splitlines()[-1])
    x = load_samples("digits")[0][:4].astype(np.float32)
    labels = OnnxBackend(model_path("digits"), name="digits", device="cpu").run({"input": x})
    expected = labels["label"].tolist()

    v2 = seen["v2"]
    assert v2["live"] is True and v2["ready"] is True
    assert v2["model_ready"] is True and v2["unknown_model_ready"] is False
    assert v2["labels_binary_False"] == expected and v2["labels_binary_True"] == expected
    assert v2["output_names"] == ["label", "probabilities"]
    status, body = v2["error"]
    assert status == 400 and "inputs.input" in body["error"]

    v1 = seen["v1"]
    assert v1["live"] is True and v1["model_ready"] is True
    assert [p["label"] for p in v1["predictions"]] == expected

    over_grpc = seen["grpc"]
    assert over_grpc["live"] and over_grpc["ready"] and over_grpc["model_ready"]
    assert over_grpc["labels"] == expected and over_grpc["id"] == "kserve-1"

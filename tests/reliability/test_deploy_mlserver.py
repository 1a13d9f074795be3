"""The compose setup without Docker: the MLServer image's model folder, trained by its own
``train.py`` and served by a real MLServer, behind a guard running the compose policy
with its Redis state. Skips without the MLServer venv (``.ci/mlserver-venv.sh``) unless
``GUARD_REQUIRE_MLSERVER`` is set."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest
import yaml

from guard.models import load_samples
from tests.integration.conftest import StartGuard
from tests.integration.mlserver_upstream import (
    REQUIRE_ENV,
    mlserver_venv,
    trained_breast_cancer,
    venv_problem,
)
from tests.integration.redis_server import RedisServer
from tests.reliability.conftest import HOST, free_port, v2_body
from tests.reliability.deployfiles import DEPLOY


@pytest.fixture(scope="module")
def deployed_mlserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """MLServer serving deploy/mlserver/models as the image does; yields its base URL."""
    venv = mlserver_venv()
    if (problem := venv_problem(venv)) is not None:
        if os.environ.get(REQUIRE_ENV, "") not in ("", "0"):
            pytest.fail(f"{problem}; {REQUIRE_ENV} is set", pytrace=False)
        pytest.skip(problem)
    models = tmp_path_factory.mktemp("image") / "models"
    shutil.copytree(DEPLOY / "mlserver" / "models", models)
    python = str(venv / "bin" / "python")
    train = [python, str(DEPLOY / "mlserver" / "train.py"), str(models / "breast_cancer")]
    subprocess.run(train, check=True, timeout=120)
    port = free_port()
    # The image's settings.json leaves host and ports to MLServer's defaults, so the
    # environment sets them here, as the sidecar manifest does.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLSERVER")}
    env |= {
        "MLSERVER_HOST": HOST,
        "MLSERVER_HTTP_PORT": str(port),
        "MLSERVER_GRPC_PORT": str(free_port()),
        "MLSERVER_METRICS_PORT": str(free_port()),
    }
    log = (models.parent / "mlserver.log").open("wb")
    process = subprocess.Popen(
        [str(venv / "bin" / "mlserver"), "start", str(models)],
        cwd=models,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/v2/models/breast_cancer/ready", timeout=1):
                    break
            except (urllib.error.URLError, OSError):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        (models.parent / "mlserver.log").read_text(errors="replace")[-3000:]
                    ) from None
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def compose_policy(upstream: str) -> dict[str, Any]:
    policy = yaml.safe_load((DEPLOY / "policies" / "compose.yaml").read_text())
    policy["models"]["breast_cancer"]["upstream"]["url"] = upstream
    return policy


async def test_compose_policy_guards_the_image_model(
    deployed_mlserver: str,
    redis_server: RedisServer,
    start_guard: StartGuard,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    monkeypatch.setenv("GUARD_ADMIN_TOKEN", "admin-token-for-tests")
    monkeypatch.setenv("GUARD_BLACKLIGHT_KEY", "blacklight-key-for-tests")
    guard = await start_guard(compose_policy(deployed_mlserver))

    x = load_samples("breast_cancer")[0][:8]
    async with http.post(
        guard.make_url("/v2/models/breast_cancer/infer"), data=v2_body(x)
    ) as reply:
        assert reply.status == 200, await reply.text()
        body = orjson.loads(await reply.read())
    (predict,) = [o for o in body["outputs"] if o["name"] == "predict"]
    # train.py rebuilds the guard's own demo model: same split, same seed, same labels.
    expected = trained_breast_cancer().estimator.predict(x)
    np.testing.assert_array_equal(np.asarray(predict["data"]).reshape(-1), expected)

    tf = orjson.dumps({"instances": x[:2].tolist()})
    async with http.post(guard.make_url("/v1/models/breast_cancer:predict"), data=tf) as reply:
        assert reply.status == 200, await reply.text()
    bad = v2_body(np.full((1, 29), 1.0, np.float32))  # the guard refuses; MLServer never sees it
    async with http.post(guard.make_url("/v2/models/breast_cancer/infer"), data=bad) as reply:
        assert reply.status == 400 and "shape" in (await reply.json())["error"]
    digits = load_samples("digits")[0][:1]
    async with http.post(guard.make_url("/v2/models/digits/infer"), data=v2_body(digits)) as reply:
        assert reply.status == 200
    assert await _redis_keys(redis_server) > 0  # budgets and fingerprints live in Redis


async def _redis_keys(server: RedisServer) -> int:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(server.url)
    try:
        return len(await client.keys("guard:*"))
    finally:
        await client.aclose()

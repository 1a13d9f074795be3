"""``guard load``: the documented command against a real guard, each protocol, and the
open-loop property (a server stall shows in the latency of every request it delayed)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from guard.loadgen import LoadConfig, run_load
from tests.reliability.conftest import REPO, GuardProcess, GuardSpawner


@pytest.fixture
def guard(spawn_guard: GuardSpawner) -> GuardProcess:
    models = {
        "digits": {"model": "builtin:digits", "stages": [{"validate": {"min": 0.0, "max": 16.0}}]},
        "breast_cancer": {"model": "builtin:breast_cancer", "stages": []},
    }
    return spawn_guard({"version": 1, "models": models})


def guard_load(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "guard.cli", "load", *args],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip


def test_guard_load_reports_what_it_did(guard: GuardProcess, tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    result = guard_load(guard.url, "--model", "digits", "--rate", "200", "--duration", "3",
                        "--connections", "8", "--json", str(out))  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "throughput" in result.stdout and "p99" in result.stdout
    report = json.loads(out.read_text())
    assert report["scheduled"] == report["sent"] == report["answered"] == 600
    assert report["statuses"] == {"200": 600} and report["errors"] == {}
    lat = report["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert 180 < report["throughput"] < 220  # the target, not as fast as it can go


@pytest.mark.parametrize(("model", "protocol"), [("digits", "v2-binary"), ("breast_cancer", "tf")])
async def test_each_protocol_is_answered(guard: GuardProcess, model: str, protocol: str) -> None:
    config = LoadConfig(
        url=guard.url, model=model, rate=100, duration=1, protocol=protocol, batch=2
    )
    report = await run_load(config)
    assert report.statuses == {"200": 100} and not report.failed, report.lines()


def test_the_command_offers_what_the_engine_takes() -> None:
    import guard.commands.load as command
    import guard.loadgen as engine

    assert (command.PROTOCOLS, command.INPUTS) == (engine.PROTOCOLS, engine.INPUTS)


def test_usage_errors_exit_2(guard: GuardProcess) -> None:
    result = guard_load(guard.url, "--model", "mnist-v3")
    assert result.returncode == 2 and "--samples" in result.stderr
    result = guard_load("ftp://x", "--model", "digits")
    assert result.returncode == 2 and "http://" in result.stderr


def test_unreachable_deployment_fails_with_the_reason(tmp_path: Path) -> None:
    from tests.reliability.conftest import free_port

    result = guard_load(f"http://127.0.0.1:{free_port()}", "--model", "digits", "--rate", "20",
                        "--duration", "0.5")  # fmt: skip
    assert result.returncode == 1
    assert "connection: 10" in result.stdout and "Cannot connect" in result.stdout


async def test_a_stall_counts_against_every_request_it_delayed(aiohttp_server: Any) -> None:
    """Open loop: a 1 s stall delays the ~100 requests scheduled meanwhile, and their
    latency says so. A closed-loop generator would show only ``connections`` slow ones."""
    stall = {"from": float("inf")}
    released = asyncio.Event()

    async def infer(request: web.Request) -> web.Response:
        await request.read()
        if time.monotonic() >= stall["from"]:
            await released.wait()
        outputs = [{"name": "label", "shape": [1], "datatype": "INT64", "data": [0]}]
        return web.json_response({"model_name": "digits", "outputs": outputs})

    async def metadata(request: web.Request) -> web.Response:
        return web.json_response(
            {"name": "digits", "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]}
        )

    app = web.Application()
    app.router.add_post("/v2/models/digits/infer", infer)
    app.router.add_get("/v2/models/digits", metadata)
    server = await aiohttp_server(app)

    async def stall_once() -> None:
        await asyncio.sleep(1.0)
        stall["from"] = time.monotonic()
        await asyncio.sleep(1.0)
        released.set()

    config = LoadConfig(url=str(server.make_url("")).rstrip("/"), model="digits", rate=100,
                        duration=3, connections=4)  # fmt: skip
    report, _ = await asyncio.gather(run_load(config), stall_once())
    assert report.answered == report.scheduled == 300 and not report.failed
    # A third of the schedule fell in the stall, each late by up to a second.
    assert report.latency_ms["p90"] > 300, report.lines()
    assert report.latency_ms["max"] > 900

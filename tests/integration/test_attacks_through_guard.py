"""The attack suite through a real guard on a loopback socket.

``HttpTarget`` is synchronous, so attacks run in a worker thread while the
test's event loop serves the guard.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from guard.attacks.evasion import SimBA, SquareLinf, run_evasion
from guard.attacks.extraction import Evaluation, Knockoff
from guard.attacks.targets import HttpTarget, OnnxTarget, TargetError, TargetSpec
from guard.clients import key_digest
from guard.models import load_samples
from tests.integration.conftest import StartGuard, digits_policy

ROOT = Path(__file__).parents[2]
SPEC = TargetSpec.builtin("digits")
T = TypeVar("T")


async def in_thread(fn: Callable[[], T]) -> T:
    return await asyncio.get_running_loop().run_in_executor(None, fn)


def base_url(server: TestServer) -> str:
    return f"http://{server.host}:{server.port}"


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    x, y = load_samples("digits")
    return x[:3], y[:3]


async def test_an_attack_through_the_guard_matches_the_local_run_query_for_query(
    start_guard: StartGuard, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = digits
    guard = await start_guard(digits_policy())
    attack = SquareLinf(epsilon=2.0)
    remote = HttpTarget(base_url(guard), "digits", SPEC)
    through = await in_thread(
        lambda: run_evasion(attack, remote, x, y, budget=80, rng=np.random.default_rng(0))
    )
    remote.close()
    local = run_evasion(
        attack, OnnxTarget.builtin("digits"), x, y, budget=80, rng=np.random.default_rng(0)
    )
    assert remote.queries == sum(s.queries for s in through.samples) > len(x)
    assert set(remote.log.status) == {200} and set(remote.log.verdicts) == {"allow"}
    for a, b in zip(through.samples, local.samples, strict=True):
        assert (a.success, a.queries, a.success_query) == (b.success, b.queries, b.success_query)
    summary = through.summary(remote)
    assert summary["detected_fraction"] == 0.0 and summary["refused_fraction"] == 0.0


async def test_batched_extraction_counts_rows_not_requests(start_guard: StartGuard) -> None:
    x, y = load_samples("digits")
    guard = await start_guard(digits_policy())
    remote = HttpTarget(base_url(guard), "digits", SPEC, batch_size=16, binary=True)
    evaluation = Evaluation.of(OnnxTarget.builtin("digits"), x[400:], y[400:])
    run = await in_thread(
        lambda: Knockoff(budgets=(50, 200), steps=200).run(
            remote, x[:400], evaluation, np.random.default_rng(0)
        )
    )
    remote.close()
    assert remote.queries == 200 and len(remote.log) == 200
    assert run.curve[-1].fidelity > 0.8


async def test_validate_refusals_are_recorded_and_the_attack_keeps_going(
    start_guard: StartGuard, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    """The attacker believes the range is [-4, 20]; validate allows [0, 16]: those queries get 400."""
    x, y = digits
    guard = await start_guard(digits_policy())
    wrong = TargetSpec(64, 10, np.asarray(-4.0), np.asarray(20.0))
    remote = HttpTarget(base_url(guard), "digits", wrong)
    run = await in_thread(
        lambda: run_evasion(
            SquareLinf(epsilon=4.0), remote, x[:1], y[:1], budget=30, rng=np.random.default_rng(0)
        )
    )
    remote.close()
    (sample,) = run.samples
    assert sample.attacked and sample.refused > 0 and 400 in remote.log.status
    assert sample.queries == 30 or sample.success  # refusals did not stop it
    summary = run.summary(remote)
    assert summary["detected_fraction"] == 0.0  # a 400 is a broken rule, not a detection
    assert summary["refused_fraction"] == sample.refused / sample.queries > 0


async def test_the_api_key_names_the_client(start_guard: StartGuard) -> None:
    keys = f"clients:\n  mallory:\n    key_sha256: '{key_digest('mallory-key')}'\n"
    guard = await start_guard(
        digits_policy(clients={"keys_file": "keys.yaml"}), files={"keys.yaml": keys}
    )
    x, _ = load_samples("digits")
    keyed = HttpTarget(base_url(guard), "digits", SPEC, api_key="mallory-key")
    answers = await in_thread(lambda: keyed.query(x[:2]))
    assert answers.answered.all() and keyed.log.status == [200, 200]
    keyless = HttpTarget(base_url(guard), "digits", SPEC)
    with pytest.raises(TargetError, match="401"):
        await in_thread(lambda: keyless.query(x[:1]))
    unknown = HttpTarget(base_url(guard), "nope", SPEC, api_key="mallory-key")
    with pytest.raises(TargetError, match="404"):
        await in_thread(lambda: unknown.query(x[:1]))
    for target in (keyed, keyless, unknown):
        target.close()


async def scripted_guard(
    aiohttp_server: Any, *, flag_from: int, deny_from: int, limit_from: int
) -> TestServer:
    """A V2 endpoint that answers like a guard whose detectors fire on a script."""
    local = OnnxTarget.builtin("digits")
    seen = 0

    async def infer(request: web.Request) -> web.Response:
        nonlocal seen
        seen += 1
        body = await request.json()
        if seen >= limit_from:
            return web.json_response(
                {"error": "budget exhausted"}, status=429, headers={"Retry-After": "60"}
            )
        if seen >= deny_from:
            return web.json_response(
                {"error": "denied"}, status=403, headers={"X-Guard-Verdict": "deny"}
            )
        tensor = body["inputs"][0]
        answers = local.query(np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"]))
        outputs = [
            {
                "name": "label",
                "datatype": "INT64",
                "shape": [len(answers.labels)],
                "data": answers.labels.tolist(),
            },
            {
                "name": "probabilities",
                "datatype": "FP32",
                "shape": list(answers.scores.shape),
                "data": answers.scores.ravel().tolist(),
            },
        ]
        verdict = "flag" if seen >= flag_from else "allow"
        return web.json_response(
            {"model_name": "digits", "outputs": outputs}, headers={"X-Guard-Verdict": verdict}
        )

    app = web.Application()
    app.router.add_post("/v2/models/digits/infer", infer)
    return await aiohttp_server(app)


async def test_flags_and_denials_are_recorded_and_the_attack_keeps_going(
    aiohttp_server: Any, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = digits
    server = await scripted_guard(aiohttp_server, flag_from=4, deny_from=8, limit_from=15)
    remote = HttpTarget(base_url(server), "digits", SPEC)
    run = await in_thread(
        lambda: run_evasion(
            SimBA(epsilon=0.25), remote, x[:1], y[:1], budget=20, rng=np.random.default_rng(0)
        )
    )
    remote.close()
    (sample,) = run.samples
    assert sample.queries == 20 and sample.first_detection == 4 and sample.refused == 13
    assert remote.log.status[6:8] == [200, 403] and remote.log.status[-1] == 429
    assert remote.log.verdicts[2:4] == ["allow", "flag"] and remote.log.verdicts[-1] is None
    summary = run.summary(remote)
    assert summary["detected_fraction"] == 1.0 and summary["first_detection_query"] == 4.0
    assert summary["detected_query_fraction"] == pytest.approx(17 / 20)


async def test_guard_attack_command_against_a_url(start_guard: StartGuard, tmp_path: Path) -> None:
    guard = await start_guard(digits_policy())
    out = tmp_path / "report.json"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "guard.cli",
        "--log-level",
        "warning",
        "attack",
        "--model",
        "digits",
        "--target",
        base_url(guard),
        "--attack",
        "simba,benign",
        "--samples",
        "2",
        "--budget",
        "20",
        "--benign-clients",
        "3",
        "--report",
        str(out),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode == 0, stderr.decode()
    assert "simba" in stdout.decode()
    report = json.loads(out.read_text())
    assert report["target"] == base_url(guard)
    simba, benign = report["entries"]
    assert simba["units"] >= 1 and simba["detected_fraction"] == 0.0
    assert benign["queries"] == 3 * 20 and benign["false_positive_rate"] == 0.0

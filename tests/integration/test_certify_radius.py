"""The certify stage's sequential modes through the guard: a requested radius, adaptive, cost."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from guard.backends.onnx import OnnxBackend
from guard.defenses.sampling import labels_from_output
from guard.defenses.sequential import SequentialCertificate, SequentialSmooth
from guard.models import load_samples, model_path
from tests.integration.conftest import StartGuard
from tests.integration.test_certify_stage import (
    ALPHA,
    SIGMA,
    N,
    certify_policy,
    post,
    triton_infer,
)


@pytest.fixture(scope="module")
def local() -> OnnxBackend:
    return OnnxBackend(model_path("digits"), name="digits", device="cpu")


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return load_samples("digits")[0][:3]


def sequential(local: OnnxBackend) -> SequentialSmooth:
    def f(b: np.ndarray) -> np.ndarray:
        return labels_from_output(local.run({"input": b}, ["label"])["label"], len(b))

    return SequentialSmooth(f, SIGMA, batch=500)


def first_rng() -> np.random.Generator:
    """The noise of the stage's first request (seed 7, as certify_policy sets)."""
    return np.random.default_rng(np.random.SeedSequence(7).spawn(1)[0])


async def test_a_requested_radius_stops_early_and_says_what_it_cost(
    start_guard: StartGuard, http: aiohttp.ClientSession, local: OnnxBackend, x: np.ndarray
) -> None:
    guard = await start_guard(certify_policy())
    status, body, headers = await post(
        http, guard, x, extra={"parameters": {"certify_radius": 0.5}}
    )
    assert status == 200, body
    rng = first_rng()
    want: list[SequentialCertificate] = [
        sequential(local).certify_radius(row, 0.5, 50, N, ALPHA, rng=rng) for row in x
    ]
    params = body["parameters"]
    assert params["certified"] is True
    assert params["certified_label"] == [-1 if c.label is None else c.label for c in want]
    assert params["certified_radius"] == pytest.approx([c.radius for c in want], rel=1e-12)
    assert all(r >= 0.5 for r, c in zip(params["certified_radius"], want, strict=True) if c.label)
    assert params["certified_samples"] == [c.samples for c in want]
    assert all(s < 50 + N for s in params["certified_samples"])  # fewer than CERTIFY's n0 + n
    assert headers["X-Guard-Certified-Samples"] == ",".join(str(c.samples) for c in want)


async def test_the_radius_header_asks_too(start_guard: StartGuard, x: np.ndarray) -> None:
    guard = await start_guard(certify_policy())
    response = await triton_infer(guard, x[:1], headers={"X-Guard-Certify-Radius": "0.25"})
    params = response["parameters"]
    assert params["certified"] is True and params["certified_radius"] >= 0.25
    assert params["certified_samples"] < 50 + N


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (
            {"headers": {"X-Guard-Certify-Radius": "far"}},
            "X-Guard-Certify-Radius: must be a number",
        ),
        ({"extra": {"parameters": {"certify_radius": -1}}}, "parameters.certify_radius: must be"),
        ({"extra": {"parameters": {"certify_radius": True}}}, "parameters.certify_radius: must be"),
        (
            {"extra": {"parameters": {"certify_radius": 3.0}}},
            "parameters.certify_radius: 3 cannot be certified with sigma=0.5, n=2000",
        ),
    ],
)
async def test_a_malformed_or_hopeless_radius_is_a_400(
    start_guard: StartGuard,
    http: aiohttp.ClientSession,
    x: np.ndarray,
    kw: dict[str, Any],
    message: str,
) -> None:
    guard = await start_guard(certify_policy())
    status, body, _ = await post(http, guard, x[:1], **kw)
    assert status == 400 and message in body["error"]


async def test_adaptive_mode_and_the_samples_histogram(
    start_guard: StartGuard, http: aiohttp.ClientSession, local: OnnxBackend, x: np.ndarray
) -> None:
    guard = await start_guard(certify_policy(mode="adaptive", tolerance=0.5, when="always"))
    status, body, _ = await post(http, guard, x)
    assert status == 200, body
    rng = first_rng()
    want = [
        sequential(local).certify_adaptive(row, 50, N, ALPHA, rng=rng, tolerance=0.5) for row in x
    ]
    assert body["parameters"]["certified_samples"] == [c.samples for c in want]
    async with http.get(guard.ops_url("/metrics")) as reply:
        text = await reply.text()
    assert f'guard_certification_samples_count{{model="digits"}} {float(len(x))}' in text
    total = float(sum(c.samples for c in want))
    assert f'guard_certification_samples_sum{{model="digits"}} {total}' in text


def test_guard_certify_compares_the_modes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from guard.cli import main

    report = tmp_path / "modes.csv"
    argv = ["certify", "--model", "digits", "--sigma", "0.5", "--n", "2000", "--samples", "6"]
    assert main([*argv, "--mode", "fixed", "target", "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert "| radius | σ = 0.5 fixed | σ = 0.5 target |" in out and "| p95 samples |" in out
    with report.open() as f:
        rows = list(csv.DictReader(f))
    fixed = [r for r in rows if r["mode"] == "fixed"]
    target = [r for r in rows if r["mode"] == "target"]
    assert len(fixed) == len(target) == 6
    assert all(r["samples"] == str(100 + 2000) for r in fixed)
    assert all(int(r["samples"]) < 100 + 2000 for r in target)
    for f_row, t_row in zip(fixed, target, strict=True):  # clear digits: both certify r = σ
        assert (float(f_row["radius"]) >= 0.5) == (float(t_row["radius"]) >= 0.5)
    assert main([*argv, "--mode", "target", "--target-radius", "2"]) == 2
    assert "--n must be >= " in capsys.readouterr().err
    assert main([*argv, "--mode", "target", "--target-radius", "50"]) == 2
    assert "--n cannot be enough to certify radius 50" in capsys.readouterr().err

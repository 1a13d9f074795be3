"""The certify stage's sequential modes through the guard: a requested radius, adaptive, cost."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from guard.backends.onnx import OnnxBackend
from guard.defenses.privacy import consistent_generators
from guard.defenses.sampling import labels_from_output
from guard.defenses.sequential import SequentialCertificate, SequentialSmooth
from guard.models import load_samples, model_path
from guard.stages.capacity import Capacity
from guard.stages.certify import CertifyOptions, RadiusGrid, noise_scope, seed_key
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


def row_rngs(rows: np.ndarray) -> list[np.random.Generator]:
    """The stage's noise, keyed on each row (``seed: 7``, as certify_policy sets)."""
    options = CertifyOptions(sigma=SIGMA, n=N, n0=50, batch=500, seed=7, source="local")
    return consistent_generators(seed_key(7), noise_scope("digits", "", options), {"input": rows})


async def test_a_requested_radius_stops_early_and_says_what_it_cost(
    start_guard: StartGuard, http: aiohttp.ClientSession, local: OnnxBackend, x: np.ndarray
) -> None:
    guard = await start_guard(certify_policy())
    ask = {"parameters": {"certify_radius": 0.4}}  # rounded up to the σ/4 grid: 0.5
    status, body, headers = await post(http, guard, x, extra=ask)
    assert status == 200, body
    seq = sequential(local)
    want: list[SequentialCertificate] = [
        seq.certify_radius(row, 0.5, 50, N, ALPHA, rng=rng)
        for row, rng in zip(x, row_rngs(x), strict=True)
    ]
    assert all(c.radius >= 0.5 for c in want if not c.abstained)
    params = body["parameters"]
    assert params["certified"] is True
    assert params["certified_label"] == [-1 if c.label is None else c.label for c in want]
    assert params["certified_radius"] == [0.0 if c.abstained else 0.5 for c in want]  # no finer
    assert params["certified_samples"] == [c.samples for c in want]
    assert all(s < 50 + N for s in params["certified_samples"])  # fewer than CERTIFY's n0 + n
    assert headers["X-Guard-Certified-Samples"] == ",".join(str(c.samples) for c in want)


async def test_the_radius_header_asks_too(start_guard: StartGuard, x: np.ndarray) -> None:
    guard = await start_guard(certify_policy())
    response = await triton_infer(guard, x[:1], headers={"X-Guard-Certify-Radius": "0.25"})
    params = response["parameters"]
    assert params["certified"] is True and params["certified_radius"] == 0.25
    assert params["certified_samples"] < 50 + N


async def test_one_bit_releases_no_cost(
    start_guard: StartGuard, http: aiohttp.ClientSession, x: np.ndarray
) -> None:
    guard = await start_guard(certify_policy(release="certified"))
    status, body, headers = await post(
        http, guard, x[:1], extra={"parameters": {"certify_radius": 0.5}}
    )
    assert status == 200, body
    assert body["parameters"]["certified_radius"] == 0.125  # one step: certified, nothing finer
    assert "certified_samples" not in body["parameters"]
    assert "X-Guard-Certified-Samples" not in headers


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
    seq = sequential(local)
    want = [
        seq.certify_adaptive(row, 50, N, ALPHA, rng=rng, tolerance=0.5)
        for row, rng in zip(x, row_rngs(x), strict=True)
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


def test_a_requested_radius_is_rounded_up_to_the_grid() -> None:
    grid = RadiusGrid(0.125)
    asked = (0.0, 0.1, 0.125, 0.4, 0.5, 1.0 + 1e-13, 1.01)
    assert [grid.up(r) for r in asked] == [0.0, 0.125, 0.125, 0.5, 0.5, 1.0, 1.125]


def test_samples_not_drawn_are_refunded_up_to_the_bucket_size() -> None:
    now = [0.0]
    capacity = Capacity(
        max_concurrent=2,
        samples_per_second=1000,
        client_max_concurrent=2,
        client_samples_per_second=500,
        clock=lambda: now[0],
    )
    assert capacity.try_acquire("a", 1200) is None  # the client's bucket is 700 in debt
    assert capacity.try_acquire("a", 1) == "this client's sample share spent"
    capacity.refund("a", 1100)  # a sequential certification drew 100 of its 1200
    assert capacity.budget is not None and capacity.budget.tokens == 900
    assert capacity.try_acquire("a", 1) is None  # the client's bucket: -700 + 1100 = 400
    capacity.refund("a", 10_000)
    assert capacity.budget.tokens == 1000  # each capped at its size

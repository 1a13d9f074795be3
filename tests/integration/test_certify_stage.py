"""The certify stage through the guard: asking, answering, overload, and its policy checks."""

from __future__ import annotations

import asyncio
import csv
import importlib.util
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest
import tritonclient.http.aio as triton
from multidict import CIMultiDict

from guard.backends.onnx import OnnxBackend
from guard.clients import Client
from guard.config import parse_policy
from guard.configreader import Section
from guard.defenses.privacy import consistent_generators
from guard.defenses.sampling import labels_from_output
from guard.defenses.smoothing import Smooth, max_radius
from guard.errors import Overloaded, PolicyError, RequestError
from guard.inference import InferRequest, InferResponse
from guard.models import load_samples, model_path
from guard.pipeline import Action, RequestContext
from guard.runtime import build_runtime
from guard.stages.certify import (
    Certify,
    CertifyOptions,
    RadiusGrid,
    Released,
    SampleBudget,
    noise_scope,
    seed_key,
)
from guard.stages.env import StageEnv
from guard.stages.options import OptionError
from tests.integration.conftest import StartGuard, digits_policy

SIGMA, N, ALPHA = 0.5, 2000, 0.001


def certify_policy(**options: Any) -> dict[str, Any]:
    certify = {"sigma": SIGMA, "n": N, "n0": 50, "batch": 500, "seed": 7, **options}
    return digits_policy(
        model={"stages": [{"validate": {"min": 0.0, "max": 16.0}}, {"certify": certify}]}
    )


@pytest.fixture(scope="module")
def local() -> OnnxBackend:
    return OnnxBackend(model_path("digits"), name="digits", device="cpu")


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return load_samples("digits")[0][:3]


def expected(local: OnnxBackend, rows: np.ndarray, *, sigma: float = SIGMA) -> list[Released]:
    """What the stage must answer: the library's CERTIFY with the noise keyed on each row
    (``seed: 7`` keys the hash), released on the σ/4 grid."""
    options = CertifyOptions(sigma=sigma, n=N, n0=50, batch=500, seed=7, source="local")
    scope = noise_scope("digits", "", options)
    rngs = consistent_generators(seed_key(7), scope, {"input": rows})

    def f(b: np.ndarray) -> np.ndarray:
        return labels_from_output(local.run({"input": b}, ["label"])["label"], len(b))

    smooth = Smooth(f, sigma, batch=500)
    grid = RadiusGrid(options.step)
    return [
        grid.release(smooth.certify(row, 50, N, ALPHA, rng=rng))
        for row, rng in zip(rows, rngs, strict=True)
    ]


async def triton_infer(guard: Any, x: np.ndarray, **kw: Any) -> dict[str, Any]:
    client = triton.InferenceServerClient(f"{guard.host}:{guard.port}")
    try:
        inputs = [triton.InferInput("input", list(x.shape), "FP32")]
        inputs[0].set_data_from_numpy(x)
        result = await client.infer("digits", inputs, **kw)
        return result.get_response()
    finally:
        await client.close()


async def post(
    http: aiohttp.ClientSession, guard: Any, x: np.ndarray, **kw: Any
) -> tuple[int, Any, Any]:
    body = {
        "inputs": [
            {
                "name": "input",
                "shape": list(x.shape),
                "datatype": "FP32",
                "data": x.ravel().tolist(),
            }
        ]
    }
    body.update(kw.pop("extra", {}))
    async with http.post(
        guard.make_url("/v2/models/digits/infer"), data=orjson.dumps(body), **kw
    ) as reply:
        return reply.status, orjson.loads(await reply.read()), reply.headers


# -- end to end ---------------------------------------------------------------------------


async def test_tritonclient_asks_with_the_request_parameter(
    start_guard: StartGuard, local: OnnxBackend, x: np.ndarray
) -> None:
    guard = await start_guard(certify_policy())
    response = await triton_infer(guard, x[:1], parameters={"certify": True})
    (want,) = expected(local, x[:1])
    assert not want.abstained and 0 < want.radius <= max_radius(SIGMA, N, ALPHA)
    assert response["parameters"] == {
        "certified": True,
        "certified_label": want.label,
        "certified_radius": want.radius,
        "abstained": False,
        "certified_samples": 50 + N,
    }
    plain = await triton_infer(guard, x[:1])
    assert "parameters" not in plain  # nobody asked: nothing certified


async def test_tritonclient_asks_with_the_header(start_guard: StartGuard, x: np.ndarray) -> None:
    guard = await start_guard(certify_policy())
    response = await triton_infer(guard, x[:1], headers={"X-Guard-Certify": "1"})
    assert response["parameters"]["certified"] is True
    assert response["parameters"]["abstained"] is False


async def test_batches_get_one_value_per_row_and_the_headers(
    start_guard: StartGuard, http: aiohttp.ClientSession, local: OnnxBackend, x: np.ndarray
) -> None:
    guard = await start_guard(certify_policy())
    status, body, headers = await post(http, guard, x, headers={"x-guard-certify": "true"})
    assert status == 200, body
    want = expected(local, x)
    params = body["parameters"]
    assert params["certified"] is True
    assert params["certified_label"] == [c.label for c in want]
    assert params["certified_radius"] == [c.radius for c in want]
    assert params["abstained"] == [c.abstained for c in want]
    assert headers["X-Guard-Certified-Radius"] == ",".join(c.text for c in want)
    assert headers["X-Guard-Certified-Label"] == ",".join(str(c.label) for c in want)
    labels = next(o for o in body["outputs"] if o["name"] == "label")["data"]
    assert labels == local.run({"input": x})["label"].tolist()  # the model's answer is untouched


async def test_when_always_certifies_every_request(
    start_guard: StartGuard, http: aiohttp.ClientSession, x: np.ndarray
) -> None:
    guard = await start_guard(certify_policy(when="always"))
    status, body, headers = await post(http, guard, x[:1])
    assert status == 200 and body["parameters"]["certified"] is True
    assert float(headers["X-Guard-Certified-Radius"]) > 0


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"headers": {"X-Guard-Certify": "please"}}, "X-Guard-Certify: must be 1 or 0"),
        (
            {"extra": {"parameters": {"certify": "yes"}}},
            "parameters.certify: must be true or false",
        ),
    ],
)
async def test_a_malformed_ask_is_a_400(
    start_guard: StartGuard,
    http: aiohttp.ClientSession,
    x: np.ndarray,
    kw: dict[str, Any],
    message: str,
) -> None:
    guard = await start_guard(certify_policy())
    status, body, _ = await post(http, guard, x[:1], **kw)
    assert status == 400 and message in body["error"]


async def test_sampling_the_upstream_gives_the_local_answer(
    start_guard: StartGuard, http: aiohttp.ClientSession, local: OnnxBackend, x: np.ndarray
) -> None:
    upstream = await start_guard(digits_policy(model={"stages": []}))
    policy = certify_policy(source="upstream")
    policy["models"]["digits"]["upstream"] = f"http://{upstream.host}:{upstream.port}"
    guard = await start_guard(policy)
    status, body, _ = await post(http, guard, x[:2], extra={"parameters": {"certify": True}})
    assert status == 200, body
    want = expected(local, x[:2])  # float32 noise survives the JSON round trip exactly
    assert body["parameters"]["certified_label"] == [c.label for c in want]
    assert body["parameters"]["certified_radius"] == [c.radius for c in want]


@pytest.mark.parametrize("certify_first", [True, False], ids=["certify-first", "squeeze-first"])
async def test_certify_sees_the_input_at_its_place_in_the_policy(
    start_guard: StartGuard,
    http: aiohttp.ClientSession,
    local: OnnxBackend,
    x: np.ndarray,
    certify_first: bool,
) -> None:
    from guard.defenses.squeeze import Squeezer

    squeeze = {"squeeze": {"bits": 1, "range": [0.0, 16.0]}}
    certify = {"certify": {"sigma": 2.0, "n": N, "n0": 50, "batch": 500, "seed": 7}}
    stages = [squeeze, certify] if not certify_first else [certify, squeeze]
    policy = digits_policy(model={"stages": [{"validate": {"min": 0.0, "max": 16.0}}, *stages]})
    guard = await start_guard(policy)
    status, body, _ = await post(http, guard, x, headers={"X-Guard-Certify": "1"})
    assert status == 200, body
    squeezed = Squeezer(bits=1, value_range=(0.0, 16.0))(x)
    assert not np.array_equal(squeezed, x)
    raw, transformed = expected(local, x, sigma=2.0), expected(local, squeezed, sigma=2.0)
    assert raw != transformed  # at this σ the squeezed input gets other votes
    want = raw if certify_first else transformed
    assert body["parameters"]["certified_label"] == [c.label for c in want]
    assert body["parameters"]["certified_radius"] == [c.radius for c in want]
    served = next(o for o in body["outputs"] if o["name"] == "label")["data"]
    assert served == local.run({"input": squeezed})["label"].tolist()  # the model saw it squeezed


# -- overload ----------------------------------------------------------------------------


async def concurrent_asks(
    http: aiohttp.ClientSession, guard: Any, x: np.ndarray, k: int
) -> list[Any]:
    ask = {"extra": {"parameters": {"certify": True}}}
    return await asyncio.gather(*(post(http, guard, x[:1], **ask) for _ in range(k)))


async def test_overload_refuses_with_503(
    start_guard: StartGuard, http: aiohttp.ClientSession, x: np.ndarray
) -> None:
    guard = await start_guard(
        certify_policy(n=300_000, max_concurrent=1, on_overload=503, max_wait=0)
    )
    replies = await concurrent_asks(http, guard, x, 4)
    statuses = sorted(status for status, _, _ in replies)
    assert statuses[0] == 200 and statuses[-1] == 503, statuses
    refused = next(body for status, body, _ in replies if status == 503)
    assert "try again shortly" in refused["error"] and "certif" not in refused["error"]


async def test_overload_answers_uncertified(
    start_guard: StartGuard, http: aiohttp.ClientSession, x: np.ndarray
) -> None:
    guard = await start_guard(
        certify_policy(n=300_000, max_concurrent=1, on_overload="uncertified", max_wait=0)
    )
    replies = await concurrent_asks(http, guard, x, 4)
    assert all(status == 200 for status, _, _ in replies)
    certified = [body["parameters"]["certified"] for _, body, _ in replies]
    assert True in certified and False in certified, certified
    for _, body, headers in replies:
        if not body["parameters"]["certified"]:
            assert body["parameters"]["abstained"] is True
            assert body["parameters"]["abstain_reason"].startswith("overloaded")
            assert headers["X-Guard-Certified-Radius"] == "uncertified"
            assert "label" in {o["name"] for o in body["outputs"]}  # answered normally


async def test_a_cancelled_request_keeps_its_slot_until_sampling_stops(x: np.ndarray) -> None:
    stage = build({"sigma": SIGMA, "n": 300_000, "max_concurrent": 1, "max_wait": 0})
    first = asyncio.create_task(through(stage, context(x[:1], certify=True)))
    await asyncio.sleep(0.05)  # sampling has started in a worker thread
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    with pytest.raises(Overloaded, match="1 certifications running"):
        await through(stage, context(x[:1], certify=True))
    for _ in range(500):  # the thread finishes its rows, then frees the slot
        if stage.describe()["running"] == 0:
            break
        await asyncio.sleep(0.02)
    ctx = context(x[:1], certify=True)
    await through(stage, ctx)
    assert ctx.response is not None and ctx.response.parameters["certified"] is True


async def test_a_request_ending_before_the_answer_gives_its_slot_back(x: np.ndarray) -> None:
    stage = build({"sigma": SIGMA, "n": 200, "max_concurrent": 1})
    ctx = context(x[:1], certify=True)
    await asyncio.create_task(stage.on_request(ctx))  # admitted; then the model call failed
    await asyncio.sleep(0)  # the request's task has ended: its done callbacks ran
    assert stage.describe()["running"] == 0
    await through(stage, context(x[:1], certify=True))  # so the next one is admitted


async def test_a_misdirected_request_is_certified_on_what_the_model_saw(x: np.ndarray) -> None:
    stage = build({"sigma": SIGMA, "n": 500, "seed": 3})
    misdirected = context(x[:1], certify=True)
    misdirected.substitute = {"input": x[1:2]}  # set by a detector listed before certify
    await through(stage, misdirected)
    plain = context(x[1:2], certify=True)
    await through(stage, plain)
    assert misdirected.response is not None and plain.response is not None
    assert misdirected.response.parameters == plain.response.parameters
    assert misdirected.headers == plain.headers


def test_sample_budget_admits_while_not_in_debt() -> None:
    now = [0.0]
    budget = SampleBudget(1000.0, clock=lambda: now[0])
    assert budget.try_spend(1500)  # a full bucket admits even a large request
    assert not budget.try_spend(1)  # 500 in debt
    now[0] = 0.4
    assert not budget.try_spend(1)  # still 100 in debt
    now[0] = 0.6
    assert budget.try_spend(700)
    now[0] = 100.0
    budget.try_spend(0)
    assert budget.tokens == 1000.0  # refills to one second's worth, no more


# -- the stage on its own ------------------------------------------------------------------


def build(options: dict[str, Any], *, env: StageEnv | None = None) -> Certify:
    if env is None:
        local = OnnxBackend(model_path("digits"), name="digits", device="cpu")
        env = StageEnv(model="digits", backend=local, local=local, metadata=local.model_metadata)
    section = Section(options, source="policy.yaml", path="models.digits.stages[1].certify")
    return Certify.from_config(section, env)


def context(x: np.ndarray, **parameters: Any) -> RequestContext:
    request = InferRequest(model_name="digits", inputs={"input": x}, parameters=parameters)
    ctx = RequestContext(
        request_id="r1",
        model="digits",
        client=Client("c"),
        request=request,
        request_headers=CIMultiDict(),
    )
    ctx.response = InferResponse(model_name="digits", outputs={"label": np.zeros(len(x), np.int64)})
    return ctx


async def through(stage: Certify, ctx: RequestContext) -> None:
    """Both hooks, as the pipeline runs them around the model call."""
    await stage.on_request(ctx)
    await stage.on_response(ctx)


async def test_flagged_certifies_requests_with_findings(x: np.ndarray) -> None:
    stage = build({"sigma": SIGMA, "n": 200, "when": "flagged"})
    quiet = context(x[:1])
    await through(stage, quiet)
    assert quiet.response is not None and quiet.response.parameters == {}
    allowed = context(x[:1])
    allowed.report("other", Action.ALLOW, "seen, nothing wrong")
    await through(stage, allowed)
    assert allowed.response is not None and allowed.response.parameters == {}
    flagged = context(x[:1])
    flagged.report("blacklight", Action.FLAG, "similar queries")
    await through(stage, flagged)
    assert flagged.response is not None and flagged.response.parameters["certified"] is True
    degraded = context(x[:1])
    degraded.degraded = True
    await through(stage, degraded)
    assert degraded.response is not None and degraded.response.parameters["certified"] is True


def test_resolved_settings_are_described() -> None:
    stage = build({"sigma": 0.25, "n": 100_000, "on_overload": "uncertified"})
    described = stage.describe()
    assert described["input"] == "input" and described["output"] == "label"
    assert described["source"] == "local" and described["when"] == "on_request"
    assert described["max_radius"] == pytest.approx(max_radius(0.25, 100_000, 0.001), abs=1e-6)
    assert build({"sigma": 0.25, "output": "probabilities"}).describe()["output"] == "probabilities"


async def test_scores_output_certifies_by_argmax(x: np.ndarray) -> None:
    by_scores = build({"sigma": SIGMA, "n": 500, "output": "probabilities", "seed": 1})
    by_label = build({"sigma": SIGMA, "n": 500, "seed": 1})
    answers = []
    for stage in (by_scores, by_label):
        ctx = context(x[:2], certify=True)
        await through(stage, ctx)
        assert ctx.response is not None
        answers.append(ctx.response.parameters)
    assert answers[0] == answers[1]


async def test_a_request_with_another_input_is_refused(x: np.ndarray) -> None:
    stage = build({"sigma": SIGMA, "n": 200})
    ctx = context(x[:1], certify=True)
    ctx.request.inputs["mask"] = np.ones((1, 64), np.float32)
    with pytest.raises(RequestError, match="perturbs 'input' only"):
        await through(stage, ctx)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "certify.sigma is required"),
        ({"sigma": -0.5}, "certify.sigma must be > 0; got -0.5"),
        (
            {"sigma": 0.25, "n": 9},
            "certify.n must be >= 10 for CERTIFY to ever answer at alpha=0.001; got 9",
        ),
        ({"sigma": 0.25, "alpha": 1e-6, "n": 19}, "certify.n must be >= 20"),
        ({"sigma": 0.25, "alpha": 1.5}, "certify.alpha must be < 1"),
        (
            {"sigma": 0.25, "when": "sometimes"},
            "certify.when must be one of on_request, always, flagged",
        ),
        (
            {"sigma": 0.25, "on_overload": 500},
            "certify.on_overload must be one of 503, uncertified",
        ),
        (
            {"sigma": 0.25, "on_overload": "drop"},
            "certify.on_overload must be one of 503, uncertified",
        ),
        ({"sigma": 0.25, "output": "logits"}, "certify.output names no output of the model"),
        ({"sigma": 0.25, "input": "image"}, "certify.input names no input of the model"),
        (
            {"sigma": 0.25, "source": "upstream"},
            "certify.source is upstream, but model digits has no upstream",
        ),
        ({"sigma": 0.25, "sigmas": 1}, "has unknown key(s) sigmas"),
        (
            {"sigma": 0.25, "secret_env": "GUARD_TEST_NO_SUCH_VARIABLE"},
            "certify.secret_env names environment variable GUARD_TEST_NO_SUCH_VARIABLE, "
            "which is not set",
        ),
        ({"sigma": 0.25, "radius_step": 0.1234567}, "certify.radius_step must have at most 6"),
        ({"sigma": 0.25, "release": "score"}, "certify.release must be one of"),
    ],
)
def test_bad_settings_stop_the_load(options: dict[str, Any], message: str) -> None:
    with pytest.raises(PolicyError) as info:
        build(options)
    assert message in str(info.value)
    assert str(info.value).startswith("policy.yaml: models.digits.stages[1].certify")


def test_upstream_without_a_local_copy_needs_an_output(tmp_path: Path) -> None:
    policy = {
        "version": 1,
        "models": {
            "digits": {"upstream": "http://127.0.0.1:9", "stages": [{"certify": {"sigma": 0.5}}]}
        },
    }
    with pytest.raises(PolicyError, match=r"certify\.output is required"):
        build_runtime(parse_policy(policy, source="p.yaml", base=tmp_path), session=None)
    policy["models"]["digits"]["stages"] = [{"certify": {"sigma": 0.5, "output": "label"}}]
    runtime = build_runtime(parse_policy(policy, source="p.yaml", base=tmp_path), session=None)
    (stage,) = runtime.models["digits"].pipeline.stages
    assert stage.describe()["source"] == "upstream"  # type: ignore[attr-defined]


async def test_tf_serving_clients_read_the_headers(
    start_guard: StartGuard, http: aiohttp.ClientSession, local: OnnxBackend, x: np.ndarray
) -> None:
    guard = await start_guard(certify_policy())
    body = orjson.dumps({"instances": x[:2].tolist()})
    url = guard.make_url("/v1/models/digits:predict")
    async with http.post(url, data=body, headers={"X-Guard-Certify": "yes"}) as reply:
        assert reply.status == 200
        headers = reply.headers
    want = expected(local, x[:2])
    assert headers["X-Guard-Certified-Label"] == ",".join(str(c.label) for c in want)
    assert headers["X-Guard-Certified-Radius"] == ",".join(c.text for c in want)


# -- the offline command ---------------------------------------------------------------


def test_guard_certify_writes_the_report_and_the_curve(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from guard.cli import main

    report, plot = tmp_path / "digits.csv", tmp_path / "digits.png"
    argv = [
        "certify",
        "--model",
        "digits",
        "--sigma",
        "0.25",
        "0.5",
        "--n",
        "200",
        "--samples",
        "12",
    ]
    argv += ["--report", str(report)]
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    if has_matplotlib:
        argv += ["--plot", str(plot)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| radius | σ = 0.25 | σ = 0.5 |" in out and "| abstained |" in out
    with report.open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [
        "sigma",
        "index",
        "label",
        "predict",
        "radius",
        "correct",
        "abstained",
        "time",
        "mode",
        "samples",
    ]
    assert len(rows) == 24 and {r["sigma"] for r in rows} == {"0.25", "0.5"}
    for row in rows:
        certified = row["abstained"] == "0"
        assert (row["predict"] != "-1") == certified
        assert row["correct"] == str(int(row["predict"] == row["label"]))
        assert 0 <= float(row["radius"]) <= max_radius(float(row["sigma"]), 200, 0.001) + 1e-6
    assert plot.exists() == has_matplotlib


def test_guard_certify_refuses_hopeless_settings(capsys: pytest.CaptureFixture[str]) -> None:
    from guard.cli import main

    assert main(["certify", "--model", "digits", "--sigma", "0.25", "--n", "9"]) == 2
    assert "--n must be >= 10" in capsys.readouterr().err


async def test_certifications_are_counted_in_metrics(start_guard: Any, http: Any) -> None:
    guard = await start_guard(
        {
            "version": 1,
            "models": {
                "digits": {
                    "model": "builtin:digits",
                    "stages": [
                        {
                            "certify": {
                                "sigma": 0.5,
                                "n0": 20,
                                "n": 200,
                                "alpha": 0.01,
                                "when": "always",
                            }
                        }
                    ],
                }
            },
        }
    )
    x = load_samples("digits")[0][:3]
    body = {
        "inputs": [
            {
                "name": "input",
                "shape": list(x.shape),
                "datatype": "FP32",
                "data": x.ravel().tolist(),
            }
        ]
    }
    async with http.post(guard.make_url("/v2/models/digits/infer"), json=body) as reply:
        assert reply.status == 200
        params = (await reply.json())["parameters"]
    async with http.get(guard.ops_url("/metrics")) as reply:
        text = await reply.text()
    certified = sum(not a for a in params["abstained"])
    assert (
        f'guard_certifications_total{{model="digits",outcome="certified"}} {float(certified)}'
        in text
    )
    assert f'guard_certified_radius_count{{model="digits"}} {float(certified)}' in text


def test_sampling_parameters_are_checked_in_code_too() -> None:
    with pytest.raises(OptionError, match=r"^n must be >= 10 for CERTIFY to ever answer"):
        CertifyOptions(sigma=0.25, source="local", n=9)

"""The ``squeeze`` and ``squeeze_detect`` stages, the detector's calibration, and order warnings."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from guard import _native
from guard.backends.onnx import OnnxBackend
from guard.clients import Client
from guard.configreader import Section
from guard.defenses.squeeze import (
    TECHNIQUE,
    Image,
    Squeezer,
    calibrate_threshold,
    l1_distances,
    squeeze_warnings,
)
from guard.errors import PolicyError, RequestError
from guard.inference import InferRequest, InferResponse, ModelMetadata, TensorSpec
from guard.models import load_samples, model_path
from guard.pipeline import Action, RequestContext, Verdict
from guard.stages.env import StageEnv
from guard.stages.options import OptionError
from guard.stages.squeeze import OFFLOAD_VALUES, Squeeze, SqueezeOptions, SqueezerOptions
from guard.stages.squeeze_detect import SqueezeDetect, SqueezeDetectOptions

IMAGE = {"height": 8, "width": 8}
DIGITS_META = ModelMetadata(
    "digits",
    "onnx",
    (TensorSpec("input", "FP32", (-1, 64)),),
    (TensorSpec("label", "INT64", (-1,)), TensorSpec("probabilities", "FP32", (-1, 10))),
)


class ScoringBackend:
    """Answers ``probabilities`` from a function of the input; records every request."""

    def __init__(self, fn: Any = None, output: str = "probabilities") -> None:
        self.fn = fn or (lambda x: _softmax(x.reshape(len(x), -1)[:, :10]))
        self.output = output
        self.requests: list[InferRequest] = []

    async def infer(self, request: InferRequest, *, passthrough: bool = False) -> InferResponse:
        self.requests.append(request)
        x = next(iter(request.inputs.values()))
        return InferResponse(model_name=request.model_name, outputs={self.output: self.fn(x)})


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def env(
    *, backend: Any = None, local: Any = None, metadata: ModelMetadata | None = DIGITS_META
) -> StageEnv:
    return StageEnv(model="digits", backend=backend, local=local, metadata=metadata)


def build(cls: Any, options: dict[str, Any], stage_env: StageEnv | None = None) -> Any:
    return cls.from_config(
        Section(options, source="p.yaml", path="stages[1].s"), stage_env or env()
    )


def context(**inputs: np.ndarray) -> RequestContext:
    return RequestContext(
        request_id="r",
        model="digits",
        client=Client("c"),
        request=InferRequest(model_name="digits", inputs=inputs),
    )


def digits(n: int = 8) -> np.ndarray:
    return load_samples("digits")[0][:n]


# --- squeeze ---------------------------------------------------------------------------


async def test_squeeze_applies_clip_then_bits_then_median_whatever_the_key_order() -> None:
    x = np.random.default_rng(0).normal(8, 6, size=(4, 64)).astype(np.float32)
    stage = build(
        Squeeze, {"median": 2, "bits": 3, "clip": [1, 15], "range": [0, 16], "image": IMAGE}
    )
    ctx = context(input=x)
    assert await stage.on_request(ctx) is Verdict.CONTINUE
    want = _native.median_smooth(_native.reduce_bits(_native.clip(x, 1, 15), 3, 0, 16), 2, 8, 8)
    np.testing.assert_array_equal(ctx.request.inputs["input"], want)
    assert stage.describe()["squeezer"] == "clip=[1, 15]+bits=3+median=2x2"


@pytest.mark.parametrize("shape", [(3, 64), (3, 8, 8), (3, 8, 8, 1)])
async def test_squeeze_keeps_shape_and_dtype(shape: tuple[int, ...]) -> None:
    x = np.random.default_rng(1).uniform(0, 16, size=shape)  # float64 stays float64
    ctx = context(input=x)
    await build(Squeeze, {"bits": 2, "median": 3, "range": [0, 16], "image": IMAGE}).on_request(ctx)
    out = ctx.request.inputs["input"]
    assert out.shape == shape and out.dtype == np.float64
    assert set(np.unique(out)) <= {0.0, 16 / 3, 32 / 3, 16.0}


async def test_large_inputs_are_squeezed_off_the_loop_with_the_same_result() -> None:
    x = np.random.default_rng(2).random((OFFLOAD_VALUES // 3072 + 1, 32, 32, 3), dtype=np.float32)
    stage = build(
        Squeeze,
        {
            "bits": 5,
            "median": 2,
            "range": [0, 1],
            "image": {"height": 32, "width": 32, "channels": 3},
        },
        env(metadata=None),
    )
    ctx = context(image=x)
    await stage.on_request(ctx)
    np.testing.assert_array_equal(ctx.request.inputs["image"], stage.squeezer(x))


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (
            {"input": np.zeros((2, 63), np.float32)},
            "inputs.input: shape [2, 63] is not a batch of 8x8x1 (HWC) images; expected ['batch', 64]",
        ),
        (
            {"input": np.zeros((2, 64), np.int64)},
            "inputs.input: squeezing needs FP32 or FP64 values; got INT64",
        ),
        ({"other": np.zeros((2, 64), np.float32)}, "inputs: input 'input' is required"),
    ],
)
async def test_squeeze_refuses_bad_inputs_naming_them(
    inputs: dict[str, np.ndarray], message: str
) -> None:
    stage = build(Squeeze, {"median": 2, "image": IMAGE})
    with pytest.raises(RequestError) as info:
        await stage.on_request(context(**inputs))
    assert str(info.value).startswith(message)


async def test_squeeze_without_metadata_needs_a_single_input() -> None:
    stage = build(Squeeze, {"clip": [0, 1]}, env(metadata=None))
    with pytest.raises(RequestError, match="expected exactly one input to squeeze; got 2"):
        await stage.on_request(context(a=np.zeros((1, 2)), b=np.zeros((1, 2))))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "stages[1].s needs at least one of clip, bits, median"),
        ({"bits": 4}, "stages[1].s.bits needs range: [lo, hi]"),
        ({"bits": 0, "range": [0, 1]}, "stages[1].s.bits must be >= 1; got 0"),
        ({"median": 2}, "stages[1].s.median needs image:"),
        (
            {"median": 9, "image": IMAGE},
            "stages[1].s.median window 9x9 does not fit the image (8x8x1 HWC)",
        ),
        (
            {"median": 2, "image": {"height": 8, "width": 8, "channels": 3}},
            "stages[1].s.image holds 192 values (8x8x3 HWC), but input input of model digits has 64 per sample",
        ),
        (
            {"median": 2, "image": {"height": 8, "width": 8, "layout": "NCHW"}},
            "stages[1].s.image.layout must be one of HWC, CHW",
        ),
        ({"median": 2, "image": {"height": 8}}, "stages[1].s.image.width is required"),
        ({"bits": 4, "range": [16, 0]}, "stages[1].s.range needs lo < hi; got [16, 0]"),
        ({"bits": 4, "range": [0, "16"]}, "stages[1].s.range must be [lo, hi], two finite numbers"),
        ({"bits": 4, "range": 16}, "stages[1].s.range must be a list"),
        ({"clip": [0]}, "stages[1].s.clip must be [lo, hi]"),
        (
            {"clip": [0, 1], "input": "pixels"},
            "stages[1].s.input names no input of model digits; it has input",
        ),
        ({"clip": [0, 1], "bitz": 3}, "stages[1].s has unknown key(s) bitz"),
    ],
)
def test_squeeze_policy_errors_name_the_key(options: dict[str, Any], message: str) -> None:
    with pytest.raises(PolicyError) as info:
        build(Squeeze, options)
    assert message in str(info.value)
    assert str(info.value).startswith("p.yaml: ")


# --- squeeze_detect ---------------------------------------------------------------------

DETECT = {
    "threshold": 0.5,
    "range": [0, 16],
    "image": IMAGE,
    "squeezers": [{"bits": 2}, {"median": 2}],
}


async def test_detect_scores_original_and_squeezed_copies_in_one_call() -> None:
    backend = ScoringBackend()
    stage = build(SqueezeDetect, DETECT, env(backend=backend))
    x = digits(5)
    ctx = context(input=x)
    await stage.on_request(ctx)
    (request,) = backend.requests
    sent = request.inputs["input"]
    assert sent.shape == (15, 64)
    np.testing.assert_array_equal(sent[:5], x)
    np.testing.assert_array_equal(sent[5:10], _native.reduce_bits(x, 2, 0, 16))
    np.testing.assert_array_equal(sent[10:], _native.median_smooth(x, 2, 8, 8))
    assert [o.name for o in request.outputs] == ["probabilities"]
    assert ctx.request.inputs["input"] is x  # the request itself is forwarded unchanged


async def test_detect_reports_the_largest_distance_above_the_threshold() -> None:
    # Scores: the input's first value as a two-class split, so the L1 distance is exact.
    def fn(x: np.ndarray) -> np.ndarray:
        p = x[:, :1] / 16.0
        return np.hstack([p, 1 - p])

    stage = build(
        SqueezeDetect,
        {**DETECT, "squeezers": [{"bits": 1}], "action": "deny"},
        env(backend=ScoringBackend(fn)),
    )
    x = np.full((3, 64), 4.0, np.float32)
    x[1, 0] = 7.0  # bits=1 sends 7 to 0 (distance 2 * 7/16), 4 to 0 (2 * 4/16)
    ctx = context(input=x)
    assert await stage.on_request(ctx) is Verdict.DENY
    (finding,) = ctx.findings
    assert finding.stage == "squeeze_detect" and finding.action is Action.DENY
    assert finding.score == pytest.approx(2 * 7 / 16) and finding.threshold == 0.5
    assert finding.technique == TECHNIQUE == "AML.T0043"
    assert "squeezing (bits=1) moved probabilities of sample 1 by L1 0.875 > 0.5" in finding.message


async def test_detect_stays_quiet_at_or_below_the_threshold() -> None:
    stage = build(SqueezeDetect, {**DETECT, "threshold": 2.0}, env(backend=ScoringBackend()))
    ctx = context(input=digits())
    assert await stage.on_request(ctx) is Verdict.CONTINUE
    assert ctx.findings == []


async def test_detect_repeats_the_other_inputs_for_each_copy() -> None:
    backend = ScoringBackend()
    stage = build(SqueezeDetect, {**DETECT, "input": "input"}, env(backend=backend, metadata=None))
    mask = np.arange(6, dtype=np.float32).reshape(2, 3)
    await stage.on_request(context(input=digits(2), mask=mask))
    np.testing.assert_array_equal(backend.requests[0].inputs["mask"], np.vstack([mask] * 3))


async def test_detect_with_the_local_copy_reports_the_models_distance() -> None:
    local = OnnxBackend(model_path("digits"), name="digits", device="cpu")
    options = {**DETECT, "threshold": 0.0, "squeezers": [{"bits": 2}, {"median": 3}]}
    stage = build(
        SqueezeDetect, options, env(backend=local, local=local, metadata=local.model_metadata)
    )
    assert stage.describe()["scorer"] == "local"
    x = digits(16)
    ctx = context(input=x.astype(np.float64))  # the local copy casts to its FP32 input
    await stage.on_request(ctx)
    scores = l1_distances(lambda b: local.run({"input": b})["probabilities"], x, stage.squeezers)
    (finding,) = ctx.findings
    assert finding.score == pytest.approx(scores.max(), rel=1e-6)


async def test_a_missing_output_is_a_fault_of_the_stage() -> None:
    stage = build(
        SqueezeDetect, DETECT, env(backend=ScoringBackend(output="logits"), metadata=None)
    )
    with pytest.raises(RuntimeError, match="no output 'probabilities'"):
        await stage.on_request(context(input=digits(2)))


async def test_detect_passes_an_empty_batch() -> None:
    backend = ScoringBackend()
    stage = build(SqueezeDetect, DETECT, env(backend=backend))
    assert await stage.on_request(context(input=np.zeros((0, 64), np.float32))) is Verdict.CONTINUE
    assert backend.requests == []


@pytest.mark.parametrize(
    ("options", "stage_env", "message"),
    [
        ({**DETECT, "threshold": None}, None, "s.threshold is required"),
        ({**DETECT, "threshold": -1}, None, "s.threshold must be >= 0.0"),
        ({**DETECT, "squeezers": []}, None, "s.squeezers must list at least one squeezer"),
        (
            {**DETECT, "squeezers": [{"bits": 3}, {"median": 2, "bits": 1, "mean": 3}]},
            None,
            "s.squeezers[1] has unknown key(s) mean",
        ),
        (
            {**DETECT, "squeezers": [{}]},
            None,
            "s.squeezers[0] needs at least one of clip, bits, median",
        ),
        (
            {**DETECT, "output": "logits"},
            None,
            "s.output names no output of model digits; it has label, probabilities",
        ),
        ({**DETECT, "scorer": "local"}, None, "s.scorer local needs the policy's local model copy"),
        (DETECT, env(backend=None), "s.scorer backend needs a backend"),
        ({**DETECT, "action": "explode"}, None, "s.action must be one of"),
    ],
)
def test_detect_policy_errors(
    options: dict[str, Any], stage_env: StageEnv | None, message: str
) -> None:
    with pytest.raises(PolicyError) as info:
        build(SqueezeDetect, options, stage_env or env(backend=ScoringBackend()))
    assert message in str(info.value)


# --- calibration --------------------------------------------------------------------------


@pytest.mark.parametrize("fpr", [0.0, 0.01, 0.05, 0.2])
@pytest.mark.parametrize("n", [1, 37, 500])
def test_threshold_meets_the_target_rate_on_the_benign_inputs(fpr: float, n: int) -> None:
    rng = np.random.default_rng(n)
    benign = rng.uniform(0, 16, size=(n, 64)).astype(np.float32)
    squeezers = [Squeezer(bits=2, value_range=(0, 16)), Squeezer(median=3, image=Image(8, 8))]
    calls: list[int] = []

    def scores_fn(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        return _softmax(batch[:, :10] / 4)

    threshold = calibrate_threshold(scores_fn, benign, squeezers, fpr, batch_size=100)
    scores = l1_distances(scores_fn, benign, squeezers).max(axis=1)
    assert (scores > threshold).mean() <= fpr
    assert threshold in scores  # the smallest such threshold: one of the scores
    assert (scores >= threshold).sum() > np.floor(fpr * n)
    # One call per chunk of 100 inputs, each with the input and its 2 squeezed copies.
    assert calls[:-1] == [3 * min(100, n - start) for start in range(0, n, 100)]


def test_calibration_refuses_bad_arguments() -> None:
    squeezers = [Squeezer(bits=2, value_range=(0, 1))]
    with pytest.raises(ValueError, match="fpr must be in"):
        calibrate_threshold(lambda b: b, np.zeros((2, 2)), squeezers, 1.0)
    with pytest.raises(ValueError, match="needs benign inputs"):
        calibrate_threshold(lambda b: b, np.zeros((0, 2)), squeezers, 0.1)


def test_squeezer_needs_what_its_transforms_need() -> None:
    with pytest.raises(ValueError, match="at least one of"):
        Squeezer()
    with pytest.raises(ValueError, match="bits needs the value range"):
        Squeezer(bits=3)
    with pytest.raises(ValueError, match="median needs the image shape"):
        Squeezer(median=3)
    with pytest.raises(ValueError, match="window does not fit"):
        Squeezer(median=9, image=Image(8, 8))


# --- order warnings -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stages", "expected"),
    [
        (["validate", "squeeze", "certify"], ["squeeze runs before certify"]),
        (["validate", "certify", "squeeze"], []),
        (["validate", "squeeze", "squeeze_detect"], ["squeeze runs before squeeze_detect"]),
        (["squeeze_detect", "squeeze", "certify"], ["squeeze runs before certify"]),
        (
            ["squeeze", "squeeze_detect", "certify"],
            ["squeeze runs before certify", "squeeze runs before squeeze_detect"],
        ),
        (["validate", "squeeze_detect"], []),
        ([], []),
    ],
)
def test_squeeze_warnings(stages: list[str], expected: list[str]) -> None:
    warnings = squeeze_warnings(stages)
    assert [w.split(":")[0] for w in warnings] == expected


def test_the_rules_hold_for_options_built_in_code() -> None:
    with pytest.raises(OptionError, match=r"^bits needs range: \[lo, hi\]"):
        SqueezeOptions(bits=4)
    with pytest.raises(OptionError, match="needs at least one of clip, bits, median"):
        SqueezerOptions()
    options = SqueezeDetectOptions(
        threshold=0.1, squeezers=(SqueezerOptions(bits=2),), range=(0.0, 16.0), scorer="local"
    )
    with pytest.raises(OptionError, match=r"^squeezers\[1\]\.median needs image"):
        dataclasses.replace(options, squeezers=(*options.squeezers, SqueezerOptions(median=2)))

"""Defaults that follow the model's declared input scale, and what ``guard check`` says of
values that make no sense for it (guard/stages/scale.py)."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from guard.cli import check_warnings, main
from guard.config import StageEntry, load_policy
from guard.defenses.blacklight import Fingerprinter, FingerprintKey
from guard.errors import PolicyError
from guard.models import load_samples, model_path
from guard.runtime import Runtime, build_runtime
from guard.stages.blacklight import BlacklightOptions
from guard.stages.scale import InputScale, declared_scale
from guard.tuning.space import typed_model

ROOT = Path(__file__).parents[2]
DEFAULT = ROOT / "policies" / "default.yaml"


def image_model(path: Path, shape: tuple[int, ...] = (32, 32, 3), classes: int = 10) -> Path:
    """A small ONNX classifier of input ``input`` FP32 ``[-1, *shape]``: flatten, a seeded
    linear layer, softmax (``probabilities``) and argmax (``label``)."""
    from onnx import TensorProto, helper, numpy_helper, save_model

    size = math.prod(shape)
    weights = np.random.default_rng(0).normal(size=(size, classes)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "w"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
            helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0),
        ],
        "image",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, *shape])],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, classes]),
        ],
        initializer=[numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    save_model(model, str(path))
    return path


def policy(tmp_path: Path, model: dict[str, Any], name: str = "m") -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "models": {name: model}}))
    return path


def runtime_of(path: Path) -> Runtime:
    return build_runtime(load_policy(path), session=None)


def options(runtime: Runtime, model: str, stage: str) -> Any:
    found = [s for s in runtime.models[model].pipeline.stages if s.name == stage]
    return found[0].options  # type: ignore[attr-defined]


def scale_warnings(runtime: Runtime) -> list[str]:
    """The warnings of ``guard check`` about stage values against the declared input."""
    return [w for w in check_warnings(runtime) if ".stages[" in w]


# -- the declared scale ----------------------------------------------------------------


def test_digits_declares_its_range_and_size_from_validate_else_the_sidecar() -> None:
    runtime = runtime_of(DEFAULT)
    config = runtime.models["digits"].config
    metadata = runtime.models["digits"].local.model_metadata  # type: ignore[union-attr]
    declared = declared_scale(config.stages, config.model_file, metadata)
    assert (declared.range, declared.shape, declared.source) == (
        (0.0, 16.0),
        (64,),
        "validate min/max",
    )
    without = tuple(e for e in config.stages if e.kind != "validate")
    from_sidecar = declared_scale(without, config.model_file, metadata)
    assert from_sidecar.range == (0.0, 16.0) and "builtin:digits" in from_sidecar.source
    narrowed = (StageEntry(kind="validate", options={"min": 2, "max": 10}, path="v"), *without)
    assert declared_scale(narrowed, config.model_file, metadata).range == (2.0, 10.0)


def test_a_scale_is_unknown_without_validate_bounds_or_a_builtin(tmp_path: Path) -> None:
    onnx = image_model(tmp_path / "m.onnx")
    stages = (StageEntry(kind="validate", options={"min": 0.0}, path="v"),)  # max missing
    assert declared_scale(stages, onnx, None) == InputScale()
    shaped = (StageEntry(kind="validate", options={"shape": [4, 5]}, path="v"),)
    assert declared_scale(shaped, None, None).shape == (4, 5)
    assert declared_scale((), model_path("digits"), None).range == (0.0, 16.0)
    # a range per feature is taken whole: [0, 4254] over breast cancer's 30 features
    assert declared_scale((), model_path("breast_cancer"), None).range == (0.0, 4254.0)


# -- derived defaults ---------------------------------------------------------------------


def test_the_default_policy_derives_what_it_used_to_set_for_digits() -> None:
    """quantize 3.0, window 20, distance 6.0: the values the policy wrote by hand before."""
    runtime = runtime_of(DEFAULT)
    blacklight, provenance = (options(runtime, "digits", s) for s in ("blacklight", "provenance"))
    assert (blacklight.quantize, blacklight.window, blacklight.threshold) == (3.0, 20, 25)
    assert provenance.distance == 6.0
    written = yaml.safe_load(DEFAULT.read_text())["models"]["digits"]["stages"]
    assert not {"quantize", "window"} & set(written[3]["blacklight"])  # derived, not written
    assert "distance" not in written[4]["provenance"]
    # the same options as the hand-set ones, so the detectors behave identically
    assert blacklight == replace(blacklight, quantize=3.0, window=20)
    described = runtime.describe()["models"]["digits"]
    assert {"quantize": 3.0, "window": 20}.items() <= described["stages"][3].items()
    assert described["stages"][4]["distance"] == 6.0
    assert described["input_scale"] == {
        "range": [0.0, 16.0],
        "range_from": "validate min/max",
        "shape": [64],
    }


def test_an_image_in_0_1_gets_defaults_in_its_own_units(tmp_path: Path) -> None:
    model = {
        "model": str(image_model(tmp_path / "img.onnx")),
        "stages": [
            {"validate": {"min": 0.0, "max": 1.0}},
            {"blacklight": {}},
            {"provenance": {}},
            {"squeeze": {"bits": 5, "median": 2}},
        ],
    }
    runtime = runtime_of(policy(tmp_path, model, "shapes"))
    blacklight = options(runtime, "shapes", "blacklight")
    assert blacklight.quantize == pytest.approx(0.1875)  # ~ Blacklight's 50/255 = 0.196
    assert (blacklight.window, blacklight.threshold) == (20, 25)  # the paper's, on 3,072 values
    distance = options(runtime, "shapes", "provenance").distance
    assert distance == pytest.approx(3 / 64 * math.sqrt(32 * 32 * 3))  # 2.598
    squeeze = options(runtime, "shapes", "squeeze")
    assert squeeze.range == (0.0, 1.0)
    assert (squeeze.image.height, squeeze.image.width, squeeze.image.channels) == (32, 32, 3)
    assert squeeze.image.layout == "HWC"
    assert scale_warnings(runtime) == []
    # what the tuner reads is what the guard serves
    tuned = typed_model(load_policy(tmp_path / "policy.yaml"), "shapes")
    assert tuned.stages[1].options == blacklight


def test_distance_scales_with_range_and_root_size() -> None:
    """The same root-mean-square change per value links rows whatever the input."""
    runtime = runtime_of(DEFAULT)
    digits = options(runtime, "digits", "provenance").distance
    x, _ = load_samples("digits")
    gaps = np.linalg.norm(x[:200, None, :] - x[None, :200, :], axis=2)
    nearest = np.where(np.eye(200, dtype=bool), np.inf, gaps).min(axis=1)
    assert digits < nearest.min()  # no two distinct held-out digits are linked
    per_value = digits / math.sqrt(64) / 16.0
    assert per_value == pytest.approx(3 / 64)  # 4.7% of the range per value


def test_short_rows_get_windows_that_fit_and_a_threshold_that_can_be_met(tmp_path: Path) -> None:
    model = {
        "model": str(image_model(tmp_path / "tab.onnx", shape=(30,), classes=2)),
        "stages": [{"validate": {"min": 0.0, "max": 1.0}}, {"blacklight": {}}],
    }
    runtime = runtime_of(policy(tmp_path, model))
    o = options(runtime, "m", "blacklight")
    assert (o.window, o.threshold) == (10, 10)  # 30 values: 21 windows of 10, > 10 shared
    assert scale_warnings(runtime) == []
    rng = np.random.default_rng(0)
    rows = rng.random((40, 30))
    near = np.clip(rows + rng.normal(scale=0.005, size=rows.shape), 0.0, 1.0)
    fingerprint = Fingerprinter(FingerprintKey.derive(b"k"), o.quantize, o.window, o.stride, o.top)
    a, b = fingerprint(rows), fingerprint(near)
    shared = [len(set(x) & set(y)) for x, y in zip(a, b, strict=True)]
    assert np.mean([n > o.threshold for n in shared]) >= 0.9  # near-duplicates match
    unrelated = [len(set(x) & set(y)) for x, y in itertools.pairwise(a)]
    assert max(unrelated) <= o.threshold  # distinct rows do not
    # the fixed window of 20 would leave 11 windows: no two rows could share more than 25
    fixed = Fingerprinter(FingerprintKey.derive(b"k"), o.quantize, 20, 1, 50)
    assert max(len(f) for f in fixed(rows)) == 11


def test_an_unknown_scale_keeps_the_fixed_defaults_and_distance_stays_required(
    tmp_path: Path,
) -> None:
    model = {"upstream": {"url": "http://127.0.0.1:9"}, "stages": [{"blacklight": {}}]}
    runtime = runtime_of(policy(tmp_path, model))
    o = options(runtime, "m", "blacklight")
    assert o == BlacklightOptions(threshold=25)  # the fixed defaults: quantize 3.0, window 20
    model["stages"] = [{"provenance": {}}]
    with pytest.raises(PolicyError, match=r"stages\[0\]\.provenance\.distance is required"):
        runtime_of(policy(tmp_path, model))


def test_an_explicit_value_always_wins(tmp_path: Path) -> None:
    model = {
        "model": str(image_model(tmp_path / "img.onnx")),
        "stages": [
            {"validate": {"min": 0.0, "max": 1.0}},
            {"blacklight": {"quantize": 0.5, "window": 7, "threshold": 20}},
            {"provenance": {"distance": 1.5}},
            {"squeeze": {"bits": 4, "range": [0.0, 2.0]}},
        ],
    }
    runtime = runtime_of(policy(tmp_path, model))
    o = options(runtime, "m", "blacklight")
    assert (o.quantize, o.window, o.threshold) == (0.5, 7, 20)
    assert options(runtime, "m", "provenance").distance == 1.5
    assert options(runtime, "m", "squeeze").range == (0.0, 2.0)


# -- guard check ---------------------------------------------------------------------------


BAD = [
    (
        {"blacklight": {"quantize": 40.0}},
        "blacklight.quantize is 40, larger than the input range 16",
    ),
    ({"blacklight": {"quantize": 0.001}}, "blacklight.quantize is 0.001, below 1/1000"),
    ({"blacklight": {"window": 80}}, "blacklight.window is 80, longer than model m's rows of 64"),
    (
        {"blacklight": {"stride": 10, "threshold": 5}},
        "blacklight.threshold is 5, but a fingerprint of model m's rows of 64 values holds at "
        "most 5 hashes",
    ),
    (
        {"provenance": {"distance": 200.0}},
        "provenance.distance is 200, larger than the diameter 128",
    ),
    (
        {"squeeze": {"bits": 3, "range": [0, 1]}},
        "squeeze.range is [0, 1], but model m declares [0, 16]",
    ),
    (
        {"squeeze_detect": {"threshold": 0.5, "squeezers": [{"bits": 4}], "range": [0, 255]}},
        "squeeze_detect.range is [0, 255], but model m declares [0, 16]",
    ),
]


@pytest.mark.parametrize(("stage", "message"), BAD, ids=[m.split(" is ")[0] for _, m in BAD])
def test_check_warns_once_per_value_that_makes_no_sense(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], stage: dict[str, Any], message: str
) -> None:
    model = {"model": "builtin:digits", "stages": [{"validate": {"min": 0, "max": 16}}, stage]}
    path = policy(tmp_path, model)
    assert main(["check", str(path), "--json"]) == 0  # a warning never fails the check
    warnings = json.loads(capsys.readouterr().out)["warnings"]
    found = [w for w in warnings if ".stages[" in w]
    assert len(found) == 1, found
    assert found[0].startswith(f"models.m.stages[1].{message}"), found[0]
    assert main(["check", str(path)]) == 0
    assert f"warning: models.m.stages[1].{message}" in capsys.readouterr().out


def test_check_warns_when_a_detector_falls_back_to_fixed_defaults(tmp_path: Path) -> None:
    model = {"upstream": {"url": "http://127.0.0.1:9"}, "stages": [{"blacklight": {}}]}
    found = scale_warnings(runtime_of(policy(tmp_path, model)))
    assert [w.split(" is ")[0] for w in found] == [
        "models.m.stages[0].blacklight.quantize",
        "models.m.stages[0].blacklight.window",
    ]
    assert "declares no input range" in found[0] and "validate" in found[0]
    model["stages"] = [{"validate": {"min": 0, "max": 1, "shape": [100]}}, {"blacklight": {}}]
    assert scale_warnings(runtime_of(policy(tmp_path, model))) == []  # declared: derived


def test_check_finds_nothing_to_say_of_the_default_policy() -> None:
    assert scale_warnings(runtime_of(DEFAULT)) == []

"""Policy loading: what a good policy resolves to, and how bad ones are refused."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from guard.config import load_policy
from guard.errors import PolicyError
from guard.runtime import build_runtime

DEFAULT = Path(__file__).parents[2] / "guard" / "policies" / "default.yaml"


def write(tmp_path: Path, policy: dict) -> Path:  # type: ignore[type-arg]
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    return path


def minimal(**model: object) -> dict:  # type: ignore[type-arg]
    return {"version": 1, "models": {"digits": {"model": "builtin:digits", **model}}}


def test_default_policy_loads_and_builds() -> None:
    policy = load_policy(DEFAULT)
    runtime = build_runtime(policy, session=None)
    assert set(runtime.models) == {"digits", "breast_cancer", "shapes"}
    stages = runtime.describe()["models"]["digits"]["stages"]
    assert stages[0]["stage"] == "validate"
    # validate picked up the model's own input shape and dtype from the local copy
    assert stages[0]["shape"] == [64]
    assert stages[0]["dtype"] == "FP32"
    shapes = runtime.describe()["models"]["shapes"]["stages"]
    assert shapes[0]["shape"] == [32, 32, 3]
    assert [s["stage"] for s in shapes] == [s["stage"] for s in stages]  # parallel to digits


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ({"version": 2, "models": {}}, "version must be 1; got 2"),
        ({"models": {}}, "version is required"),
        ({"version": 1, "models": {}}, "models must name at least one model"),
        (
            {"version": 1, "mode": "audit", "models": {}},
            "mode must be one of enforce, shadow; got 'audit'",
        ),
        ({"version": 1, "modles": {}}, "models is required"),
        (minimal(), None),
        (minimal(upstream="ftp://x"), "models.digits.upstream must be an http:// or https:// URL"),
        (minimal(sha256="abc"), "models.digits.sha256 must be 64 hex digits"),
        (minimal(device="tpu"), "models.digits.device must be one of auto, cpu, cuda; got 'tpu'"),
        (
            minimal(model="builtin:imagenet"),
            "names no built-in model; built-ins: digits, breast_cancer",
        ),
        (minimal(model="missing.onnx"), "missing.onnx does not exist"),
        (
            minimal(stages=[{"validat": {}}]),
            "models.digits.stages[0] names unknown stage 'validat'; valid stages: ",
        ),
        (
            minimal(stages=[{"validate": {"mni": 0}}]),
            "models.digits.stages[0].validate has unknown key(s) mni",
        ),
        (
            minimal(stages=[{"validate": {"min": 5, "max": 1}}]),
            "stages[0].validate.min must be <= max (1); got 5",
        ),
        (
            minimal(stages=[{"validate": {"max_batch": 0}}]),
            "stages[0].validate.max_batch must be >= 1; got 0",
        ),
        (
            minimal(stages=[{"validate": {"input": "pixels"}}]),
            "validate.input names no input of model digits; it has input",
        ),
        (minimal(stages=[{"validate": {}}, {"validate": {}}]), "stages lists validate twice"),
        (minimal(stages=["validate", {"a": 1, "b": 2}]), "stages[1] must be one stage"),
        (
            {"version": 1, "models": {"m": {"stages": []}}},
            "models.m needs an upstream, a model file, or both",
        ),
        (
            {**minimal(), "limits": {"max_body_bytes": 10}},
            "limits.max_body_bytes must be >= 1024; got 10",
        ),
        (
            {**minimal(), "admin": {"token_env": "GUARD_TEST_UNSET_VAR"}},
            "token_env names environment variable",
        ),
    ],
)
def test_policies(tmp_path: Path, policy: dict, message: str | None) -> None:  # type: ignore[type-arg]
    path = write(tmp_path, policy)
    if message is None:
        build_runtime(load_policy(path), session=None)
        return
    with pytest.raises(PolicyError) as info:
        build_runtime(load_policy(path), session=None)
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_pinned_sha256_mismatch_refuses_the_model(tmp_path: Path) -> None:
    path = write(tmp_path, minimal(sha256="0" * 64))
    with pytest.raises(PolicyError, match="refusing to serve a model that does not match"):
        build_runtime(load_policy(path), session=None)


def test_pinned_sha256_match_loads(tmp_path: Path) -> None:
    from guard.backends.onnx import file_sha256
    from guard.models import model_path

    digest = file_sha256(model_path("digits"))
    build_runtime(load_policy(write(tmp_path, minimal(sha256=digest))), session=None)


def test_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read policy"):
        load_policy(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: [1\n")
    with pytest.raises(PolicyError, match="not valid YAML"):
        load_policy(bad)


def test_a_stage_whose_options_are_already_read_is_built_from_them() -> None:
    policy = load_policy(Path(__file__).parents[2] / "guard" / "policies" / "default.yaml")
    config = policy.models["digits"]
    index, entry = next((i, e) for i, e in enumerate(config.stages) if e.kind == "blacklight")
    options = build_runtime(policy, session=None).models["digits"].pipeline.stages[index].options

    def built(value: object) -> Any:
        stages = list(config.stages)
        stages[index] = dataclasses.replace(entry, options=value)
        models = {"digits": dataclasses.replace(config, stages=tuple(stages))}
        return build_runtime(dataclasses.replace(policy, models=models), session=None)

    stage = built(dataclasses.replace(options, matches=9)).models["digits"].pipeline.stages[index]
    assert stage.options.matches == 9 and stage.options.top == options.top
    with pytest.raises(PolicyError, match=r"stages\[\d\]\.blacklight\.key_env names"):
        built(dataclasses.replace(options, key_env="GUARD_TEST_UNSET_VARIABLE"))

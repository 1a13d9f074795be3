"""One ``${VAR}`` rule across the whole policy, expanded from the ``environ`` it is loaded with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from guard.config import expand_environment, load_policy
from guard.errors import PolicyError


def write(tmp_path: Path, policy: dict[str, Any]) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    return path


def base(**upstream: Any) -> dict[str, Any]:
    return {
        "version": 1,
        "models": {"m": {"upstream": {"url": "http://127.0.0.1:9", **upstream}}},
    }


def test_variables_expand_in_any_string_value_from_the_given_environ(tmp_path: Path) -> None:
    policy = base(url="http://${UP_HOST}:${UP_PORT}/base", headers={"Authorization": "Bearer ${T}"})
    policy["models"]["m"]["upstream"]["model"] = "${NAME}-v2"
    policy["audit"] = {"path": "${LOGS}/audit.jsonl"}
    policy["listen"] = {"metrics_host": "${METRICS_HOST}"}
    environ = {
        "UP_HOST": "10.0.0.7",
        "UP_PORT": "8081",
        "T": "tok-123",
        "NAME": "digits",
        "LOGS": str(tmp_path / "logs"),
        "METRICS_HOST": "0.0.0.0",
    }
    loaded = load_policy(write(tmp_path, policy), environ=environ)
    upstream = loaded.models["m"].upstream
    assert upstream is not None
    assert upstream.url == "http://10.0.0.7:8081/base"
    assert upstream.headers == {"Authorization": "Bearer tok-123"}
    assert upstream.model == "digits-v2"
    assert loaded.audit_path == str(tmp_path / "logs" / "audit.jsonl")
    assert loaded.listen.metrics_host == "0.0.0.0"


def test_whole_header_value_still_works(tmp_path: Path) -> None:
    policy = base(headers={"Authorization": "${UPSTREAM_TOKEN}"})
    loaded = load_policy(write(tmp_path, policy), environ={"UPSTREAM_TOKEN": "Bearer x"})
    assert loaded.models["m"].upstream.headers == {"Authorization": "Bearer x"}  # type: ignore[union-attr]


def test_the_process_environment_is_not_read_when_environ_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ONLY_IN_PROCESS", "x")
    with pytest.raises(PolicyError, match="ONLY_IN_PROCESS, which is not set"):
        load_policy(write(tmp_path, base(model="${ONLY_IN_PROCESS}")), environ={})


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("$${HOME}", "${HOME}"),
        ("a $${X} b ${X}", "a ${X} b 1"),
        ("cost: $5 and $ {X}", "cost: $5 and $ {X}"),
        ("${X}${X}", "11"),
    ],
)
def test_escape_and_literal_dollars(value: str, expected: str) -> None:
    assert expand_environment({"k": [value]}, {"X": "1"}, source="p.yaml") == {"k": [expected]}


def test_values_are_expanded_once_not_recursively() -> None:
    environ = {"A": "${B}", "B": "secret"}
    assert expand_environment({"k": "${A}"}, environ, source="p.yaml") == {"k": "${B}"}


def test_keys_numbers_and_booleans_are_left_alone() -> None:
    data = {"${K}": {"n": 3, "b": True, "none": None, "f": 0.5}}
    assert expand_environment(data, {}, source="p.yaml") == data


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            "${MISSING}",
            "p.yaml: models.m.stages[1].x.opt names environment variable MISSING, which is not set",
        ),
        ("${EMPTY}", "names environment variable EMPTY, which is not set"),
        ("${1BAD}", "models.m.stages[1].x.opt has a malformed ${...}"),
        ("${UNCLOSED", "has a malformed ${...}"),
        ("${}", "has a malformed ${...}"),
    ],
)
def test_errors_name_the_path(value: str, message: str) -> None:
    data = {"models": {"m": {"stages": ["validate", {"x": {"opt": value}}]}}}
    with pytest.raises(PolicyError) as error:
        expand_environment(data, {"EMPTY": ""}, source="p.yaml")
    assert message in str(error.value)


def test_a_stage_option_takes_a_variable(tmp_path: Path) -> None:
    policy = {
        "version": 1,
        "models": {
            "digits": {
                "model": "builtin:digits",
                "stages": [{"validate": {"input": "${INPUT_NAME}"}}],
            }
        },
    }
    loaded = load_policy(write(tmp_path, policy), environ={"INPUT_NAME": "input"})
    assert loaded.models["digits"].stages[0].options == {"input": "input"}

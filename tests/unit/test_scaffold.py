"""``guard init``: a first policy for a user's model, measured on the user's data.

The model is the shipped digits ONNX file named by its path (so it is a user's file to
the tools) and the data its shipped held-out rows, written to ``.npz`` as a user would;
the policy written must load, serve-ready, with its measured numbers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from guard.cli import main
from guard.config import load_policy
from guard.models import load_samples, model_path
from guard.stages.coverage import reference_radius


@pytest.fixture
def digits_data(tmp_path: Path) -> Path:
    x, y = load_samples("digits")
    path = tmp_path / "digits.npz"
    np.savez(path, x=x, y=y)
    return path


def init(tmp_path: Path, *argv: str) -> dict:  # type: ignore[type-arg]
    out = tmp_path / "policy.yaml"
    code = main(["init", *argv, "--out", str(out), "--force"])
    assert code == 0
    load_policy(out)  # loads, stages built: the derived defaults hold for the model
    return yaml.safe_load(out.read_text())


def stages(document: dict, name: str) -> dict:  # type: ignore[type-arg]
    return {k: v for stage in document["models"][name]["stages"] for k, v in stage.items()}


def test_an_image_like_model_gets_every_stage_with_measured_numbers(
    tmp_path: Path, digits_data: Path
) -> None:
    model = tmp_path / "mine.onnx"
    model.write_bytes(model_path("digits").read_bytes())
    document = init(tmp_path, "--model", str(model), "--data", str(digits_data))
    found = stages(document, "mine")
    assert list(found) == [
        *("validate", "privacy", "budget", "blacklight", "provenance", "prada", "coverage")
    ]
    assert document["models"]["mine"]["model"] == "mine.onnx"  # relative to the policy
    x, _ = load_samples("digits")
    assert (found["validate"]["min"], found["validate"]["max"]) == (x.min(), x.max())
    assert found["coverage"]["radius"] == pytest.approx(reference_radius(x), rel=1e-5)
    low, high = found["privacy"]["confidences"]
    assert 0 < low < high <= 1  # unsure answers are right less often than sure ones


def test_a_declared_range_wins_over_the_data(tmp_path: Path, digits_data: Path) -> None:
    model = tmp_path / "mine.onnx"
    model.write_bytes(model_path("digits").read_bytes())
    document = init(
        tmp_path, "--model", str(model), "--data", str(digits_data), "--input-range", "0,16"
    )
    validate = stages(document, "mine")["validate"]
    assert (validate["min"], validate["max"]) == (0, 16)


def test_short_or_unevenly_scaled_rows_get_no_near_duplicate_detectors(tmp_path: Path) -> None:
    model = tmp_path / "cancer.onnx"
    model.write_bytes(model_path("breast_cancer").read_bytes())
    x, y = load_samples("breast_cancer")  # 30 features, spans from 0.05 to 4,000
    data = tmp_path / "cancer.npz"
    np.savez(data, x=x, y=y)
    document = init(tmp_path, "--model", str(model), "--data", str(data))
    found = stages(document, "cancer")
    assert "blacklight" not in found and "provenance" not in found
    assert {"validate", "privacy", "prada", "coverage"} <= set(found)
    text = (tmp_path / "policy.yaml").read_text()
    assert "blacklight and provenance left out" in text


def test_init_refuses_a_built_in_and_an_existing_file(
    tmp_path: Path, digits_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["init", "--model", "digits", "--data", str(digits_data)]) == 2
    assert "built in" in capsys.readouterr().err
    out = tmp_path / "policy.yaml"
    out.write_text("mine\n")
    model = tmp_path / "mine.onnx"
    model.write_bytes(model_path("digits").read_bytes())
    code = main(["init", "--model", str(model), "--data", str(digits_data), "--out", str(out)])
    assert code == 2
    assert "exists" in capsys.readouterr().err
    assert out.read_text() == "mine\n"  # not overwritten

"""guard.subject and guard.datafiles: naming a model and its data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from guard.attacks.membership import membership_data
from guard.attacks.targets import OnnxTarget, TargetSpec
from guard.datafiles import read
from guard.errors import UsageError
from guard.models import MODELS, load_samples, load_split
from guard.subject import Overrides, Subject, resolve_subject, validate_interface


@pytest.mark.parametrize("name", MODELS)
def test_builtin_subject_is_what_the_builtin_helpers_give(name: str) -> None:
    subject = Subject.builtin(name)
    x, y = load_samples(name)
    split = load_split(name)
    assert np.array_equal(subject.x, x) and np.array_equal(subject.y, y)
    assert np.array_equal(subject.x_members, split.x_members)
    assert _same_spec(subject.spec, name)
    ours = subject.membership_data(np.random.default_rng(3))
    theirs = membership_data(name, np.random.default_rng(3))
    assert ours is not None
    assert np.array_equal(ours.x, theirs.x) and np.array_equal(ours.member, theirs.member)
    assert resolve_subject(name).x is not None and resolve_subject(name).name == name
    x0 = x[:5].astype(np.float32)
    assert np.array_equal(
        subject.target().query(x0).scores, OnnxTarget.builtin(name).query(x0).scores
    )


def _same_spec(spec: TargetSpec, name: str) -> bool:
    other = TargetSpec.builtin(name)
    return (
        spec.n_features == other.n_features
        and spec.n_classes == other.n_classes
        and np.array_equal(spec.lo, other.lo)
        and np.array_equal(spec.hi, other.hi)
        and spec.input_shape == other.input_shape
    )


def test_a_builtin_range_can_be_overridden() -> None:
    subject = resolve_subject("digits", overrides=Overrides(input_range=(0.0, 1.0)))
    assert float(subject.hi) == 1.0 and np.array_equal(subject.x, load_samples("digits")[0])
    per_feature = resolve_subject("digits", overrides=Overrides(input_range="data"))
    assert per_feature.lo.shape == (64,) and float(per_feature.hi.max()) == 16.0


def test_the_target_reshapes_flat_rows_to_the_input_shape() -> None:
    # digits' 64 values as an 8x8x1 input would be refused by its [N, 64] ONNX input:
    # the reshape reaches _send
    spec = TargetSpec.builtin("digits")
    target = OnnxTarget.builtin("digits")
    seen: list[tuple[int, ...]] = []
    send = target._send

    def spy(x: np.ndarray):  # type: ignore[no-untyped-def]
        seen.append(x.shape)
        return send(x.reshape(len(x), -1))

    target._send = spy  # type: ignore[method-assign]
    object.__setattr__(target, "spec", TargetSpec(64, 10, spec.lo, spec.hi, (8, 8, 1)))
    target.query(load_samples("digits")[0][:3])
    assert seen == [(3, 8, 8, 1)]


def test_csv_with_and_without_header(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("f0,f1,kind\n1,2,cat\n3,4,dog\n5,6,cat\n")
    rows = read(tmp_path / "a.csv", label_column="kind")
    assert rows.x.tolist() == [[1, 2], [3, 4], [5, 6]] and rows.y.tolist() == [0, 1, 0]
    assert "cat, dog" in rows.notes[0]
    (tmp_path / "b.csv").write_text("7,1,2\n8,3,4\n")
    rows = read(tmp_path / "b.csv", label_column="0")
    assert rows.x.tolist() == [[1, 2], [3, 4]] and rows.y.tolist() == [7, 8]
    assert read(tmp_path / "b.csv").y.tolist() == [2, 4]  # default: the last column
    with pytest.raises(UsageError, match="--label-column 'nope'"):
        read(tmp_path / "a.csv", label_column="nope")


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((3, 2))}, "no array 'y'"),
        ({"x": np.zeros((3, 2)), "y": np.zeros(3), "X_train": np.zeros(1)}, "unknown array"),
        ({"x": np.zeros((3, 2)), "y": np.zeros(2)}, "one label per row"),
        ({"x": np.zeros((3, 2)), "y": np.full(3, 0.5)}, "integer class labels"),
        ({"x": np.zeros((3, 2)), "y": np.zeros(3), "x_members": np.zeros((2, 2))}, "together"),
        ({"x": np.zeros(3), "y": np.zeros(3)}, "must hold rows"),
    ],
)
def test_npz_faults_are_named(tmp_path: Path, arrays: dict[str, Any], message: str) -> None:
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(UsageError, match=message):
        read(tmp_path / "d.npz")


def test_a_model_that_is_neither_builtin_file_nor_url() -> None:
    with pytest.raises(UsageError, match="neither a built-in"):
        resolve_subject("imagenet")
    with pytest.raises(UsageError, match="--served-name"):
        resolve_subject("http://127.0.0.1:1")


def test_a_user_model_needs_data(tmp_path: Path) -> None:
    from guard.models import model_path

    copy = tmp_path / "m.onnx"
    copy.write_bytes(model_path("digits").read_bytes())
    with pytest.raises(UsageError, match="--data is needed"):
        resolve_subject(str(copy))
    subject = resolve_subject(str(copy), data="digits")  # a built-in's rows, by name
    assert subject.n_classes == 10 and subject.input_shape == (64,)
    assert subject.has_range  # digits' data come with digits' recorded range
    per_feature = resolve_subject(str(copy), data="digits", overrides=Overrides(input_range="data"))
    everything = np.concatenate([subject.x, subject.x_members])
    assert np.array_equal(per_feature.hi, everything.max(axis=0))
    assert not per_feature.spec.scalar_range  # tabular: evasion is left out of "all"


def test_validate_stage_declares_the_interface() -> None:
    from guard.config import StageEntry

    stages = (
        StageEntry(kind="budget", options={}, path="a"),
        StageEntry(
            kind="validate",
            options={"shape": [32, 32, 3], "min": 0, "max": 1, "dtype": "FP32", "input": "img"},
            path="b",
        ),
    )
    found = validate_interface(stages)
    assert found.input_shape == (32, 32, 3) and found.input_name == "img"
    assert (float(found.lo), float(found.hi)) == (0.0, 1.0)
    assert validate_interface(()).input_shape is None


def test_extraction_draws_its_queries_from_x_train(tmp_path: Path) -> None:
    from guard.attacks.suite import SuiteConfig, run_suite
    from guard.attacks.targets import Answers
    from guard.models import model_path

    copy = tmp_path / "m.onnx"
    copy.write_bytes(model_path("digits").read_bytes())
    x, y = load_samples("digits")
    own = load_split("digits").x_members[:100]
    np.savez(tmp_path / "d.npz", x=x, y=y, x_train=own)
    range16 = Overrides(input_range=(0.0, 16.0))
    subject = resolve_subject(str(copy), data=tmp_path / "d.npz", overrides=range16)
    assert subject.x_train is not None and subject.x_train.shape == (100, 64)
    sent: list[np.ndarray] = []

    class Recording(OnnxTarget):
        def _send(self, batch: np.ndarray) -> tuple[Answers, int, str | None]:
            sent.append(batch)
            return super()._send(batch)

    config = SuiteConfig(model="m", subject=subject, budget=60, seed=0)
    report = run_suite(["knockoff"], config, lambda _: Recording(copy, subject.spec))
    assert report.entries[0]["queries"] == 60
    queried = np.concatenate(sent)
    assert len(queried) == 60
    assert all((np.abs(own - row).max(axis=1) == 0).any() for row in queried)


def test_a_policy_upstream_keyed_by_a_builtin_keeps_the_builtin_range(tmp_path: Path) -> None:
    """The MLServer example of docs/tuning.md: the upstream (down here) serves
    breast_cancer; validate's 0..10000 bounds refusals, the data keep their own range."""
    import socket

    import yaml

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    stages = [{"validate": {"shape": [30], "min": 0.0, "max": 10000.0}}]
    model = {"upstream": f"http://127.0.0.1:{port}", "stages": stages}
    policy = tmp_path / "p.yaml"
    policy.write_text(yaml.safe_dump({"version": 1, "models": {"breast_cancer": model}}))
    subject = resolve_subject(
        "breast_cancer", policy=policy, overrides=Overrides(scores_output="predict_proba")
    )
    builtin = Subject.builtin("breast_cancer")
    assert subject.url == f"http://127.0.0.1:{port}" and subject.model_file is None
    assert np.array_equal(subject.lo, builtin.lo) and np.array_equal(subject.hi, builtin.hi)
    assert np.array_equal(subject.x, builtin.x) and subject.scores_output == "predict_proba"
    assert (subject.input_name, subject.label_output) == ("input", "label")

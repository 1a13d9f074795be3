"""The ``shapes`` built-in: its image generator, the committed CNN and its sidecar, and the
attack suite on it (no retraining: torch is a training-only extra)."""

from __future__ import annotations

import hashlib

import numpy as np
import onnxruntime as ort
import pytest

from guard.models import imagegen, load_samples, load_split, model_info, model_path

TOLERANCE = 0.06  # accuracy on the 300 shipped rows vs. on the 4,000 held out (~3.5 sd)


def test_generate_is_deterministic_and_seeded() -> None:
    x1, y1 = imagegen.generate(40, np.random.default_rng(7))
    x2, y2 = imagegen.generate(40, np.random.default_rng(7))
    x3, _ = imagegen.generate(40, np.random.default_rng(8))
    assert x1.dtype == np.uint8 and x1.shape == (40, 32, 32, 3)
    assert y1.dtype == np.int64 and y1.shape == (40,)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert not np.array_equal(x1, x3)


@pytest.mark.parametrize("n", [0, 1, 10, 95, 1000])
def test_generate_balances_classes(n: int) -> None:
    _, y = imagegen.generate(n, np.random.default_rng(n))
    counts = np.bincount(y, minlength=len(imagegen.CLASS_NAMES))
    assert counts.sum() == n
    assert counts.max() - counts.min() <= 1
    if n >= 20:  # shuffled, not in class order
        assert not np.all(np.diff(y) >= 0)


def test_generate_draws_given_classes_and_varied_images() -> None:
    classes = np.full(50, 3)
    x, y = imagegen.generate(50, np.random.default_rng(0), classes=classes)
    np.testing.assert_array_equal(y, classes)
    flat = x.reshape(50, -1).astype(np.float64)
    assert flat.std(axis=0).mean() > 20  # random colours, places, backgrounds: not one picture
    assert len({row.tobytes() for row in x}) == 50
    with pytest.raises(ValueError, match=r"labels in 0\.\.9"):
        imagegen.generate(2, np.random.default_rng(0), classes=np.array([0, 10]))
    with pytest.raises(ValueError, match="n must be"):
        imagegen.generate(-1, np.random.default_rng(0))


def test_dataset_rows_come_from_their_chunks() -> None:
    x, y = imagegen.dataset(0, imagegen.CHUNK - 3, imagegen.CHUNK + 2)
    x_next, y_next = imagegen.dataset(0, imagegen.CHUNK, imagegen.CHUNK + 2)
    assert x.shape == (5, 32, 32, 3)
    np.testing.assert_array_equal(x[3:], x_next)
    np.testing.assert_array_equal(y[3:], y_next)
    with pytest.raises(ValueError, match="start <= stop"):
        imagegen.dataset(0, 5, 4)


@pytest.fixture(scope="module")
def info() -> dict:
    return model_info("shapes")


@pytest.fixture(scope="module")
def session() -> ort.InferenceSession:
    return ort.InferenceSession(str(model_path("shapes")), providers=["CPUExecutionProvider"])


def test_sidecar_describes_the_committed_file(info: dict) -> None:
    data = model_path("shapes").read_bytes()
    assert hashlib.sha256(data).hexdigest() == info["sha256"]
    assert len(data) < 500_000
    assert info["input_shape"] == [32, 32, 3]
    assert info["n_features"] == 32 * 32 * 3
    assert info["n_classes"] == len(info["class_names"]) == 10
    assert info["class_names"] == list(imagegen.CLASS_NAMES)
    assert info["input_range"] == [0.0, 1.0]
    assert info["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 32, 32, 3]}]
    # Good but not perfect, and still useful under the noise smoothing adds.
    assert 0.8 <= info["test_accuracy"] < 0.99
    noisy = info["noisy_test_accuracy"]
    assert info["test_accuracy"] >= noisy["0.25"] >= noisy["1.0"]
    assert noisy["0.5"] > 0.3  # far above chance (0.1): certification does not abstain always


def test_shipped_rows_are_the_data_sets_rows(info: dict) -> None:
    """The shipped uint8 rows are rows of :func:`imagegen.dataset` of the model's seed."""
    split = load_split("shapes")
    members, non_members = np.array(info["members"]), np.array(info["non_members"])
    assert np.intersect1d(members, non_members).size == 0
    for rows, x, y in (
        (members, split.x_members, split.y_members),
        (non_members, split.x_nonmembers, split.y_nonmembers),
    ):
        first = int(rows[0])
        assert np.array_equal(rows, np.arange(first, first + len(rows)))  # contiguous
        images, labels = imagegen.dataset(info["seed"], first, first + 40)
        np.testing.assert_array_equal(x[:40], images.reshape(40, -1) / np.float32(255))
        np.testing.assert_array_equal(y[:40], labels)
    assert split.x_members.dtype == np.float32
    assert split.x_members.shape == (len(members), 3072)
    assert split.x_members.min() >= 0.0 and split.x_members.max() <= 1.0


def test_committed_model_keeps_its_recorded_accuracy(
    session: ort.InferenceSession, info: dict
) -> None:
    x, y = load_samples("shapes")
    labels, probabilities = session.run(None, {"input": x.reshape(-1, 32, 32, 3)})
    assert labels.dtype == np.int64 and probabilities.shape == (len(x), 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(labels, probabilities.argmax(axis=1))
    accuracy = float(np.mean(labels == y))
    assert accuracy == pytest.approx(info["test_accuracy"], abs=TOLERANCE)
    split = load_split("shapes")
    (member_labels,) = session.run(["label"], {"input": split.x_members.reshape(-1, 32, 32, 3)})
    assert float(np.mean(member_labels == split.y_members)) == pytest.approx(
        info["train_accuracy"], abs=TOLERANCE
    )
    rng = np.random.default_rng(0)
    noisy = (x + rng.normal(0.0, 0.25, x.shape)).astype(np.float32)
    (noisy_labels,) = session.run(["label"], {"input": noisy.reshape(-1, 32, 32, 3)})
    assert float(np.mean(noisy_labels == y)) == pytest.approx(
        info["noisy_test_accuracy"]["0.25"], abs=2 * TOLERANCE
    )


def test_attack_suite_runs_an_evasion_attack_on_shapes() -> None:
    from guard.attacks.suite import SuiteConfig, run_suite
    from guard.attacks.targets import OnnxTarget, TargetSpec

    spec = TargetSpec.builtin("shapes")
    assert spec.input_shape == (32, 32, 3) and spec.n_features == 3072
    report = run_suite(
        ["square-linf", "oars-square-linf"],
        SuiteConfig(model="shapes", samples=2, budget=60, seed=0),
        lambda _client: OnnxTarget.builtin("shapes"),
    )
    entry, adaptive = report.entries
    assert adaptive["attack"] == "oars-square-linf"  # wrapped targets pass flat rows through
    assert adaptive["family"] == "adaptive" and adaptive["real_queries"] > 0
    assert entry["attack"] == "square-linf"
    assert entry["units"] + entry["skipped"] == 2  # misclassified samples are skipped
    assert entry["units"] >= 1
    assert 0 < entry["queries"] <= 60  # median per sample, within the budget
    assert 0.0 <= entry["success_rate"] <= 1.0

"""Train the demo models and export them to ONNX.

Run ``python -m guard.models.train [NAME ...] [--out DIR] [--seed N]`` to rewrite the
committed files of the named models (default: all). Nothing is downloaded: ``digits`` and
``breast_cancer`` ship inside scikit-learn, ``shapes`` is drawn by
:mod:`guard.models.imagegen` and trained with PyTorch (the ``train`` extra) by
:mod:`guard.models.train_shapes`, which documents its own guarantees.

Guarantees, for a given seed and the same library versions:

* the member (training) / non-member (held-out) split is a stratified 50/50 split of
  the full data set, the same on every run;
* the fitted weights, the exported ONNX bytes and every recorded accuracy are the same
  on every run;
* each ``<name>.onnx`` takes one FP32 input ``input`` of shape ``[None, F]`` in raw data
  set units (any scaling is inside the graph) and returns ``label`` (INT64, ``[None]``)
  and ``probabilities`` (FP32, ``[None, C]``);
* the accuracies in ``<name>.json`` are measured by running the exported file with
  onnxruntime, not by scikit-learn.

Models trained here, with scikit-learn:

``digits``
    ``StandardScaler`` + ``MLPClassifier(256)`` on 8x8 images with pixel values in
    [0, 16], trained on clean copies and copies with Gaussian noise of standard deviation
    0.25, 0.5, 1.0 and 2.0 (raw pixel units) so that randomized smoothing (Cohen et al.,
    ICML 2019) at sigma 0.25 or 0.5 does not abstain. Noisy accuracies add unclipped
    Gaussian noise to the non-members, as smoothing does.
``breast_cancer``
    ``RandomForestClassifier(100)`` with fully grown trees on 30 tabular features. It
    generalizes as well as a linear model (test accuracy ~0.95) but fits its members
    exactly, so membership inference has a measurable signal to find; scaled logistic
    regression and small MLPs showed none (member/non-member confidence AUC ~0.50).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import skl2onnx
import sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn import datasets
from sklearn.ensemble import RandomForestClassifier
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

INPUT_NAME = "input"
OUTPUT_NAMES = ("label", "probabilities")
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}
TEST_SIZE = 0.5
DIGITS_TRAIN_SIGMAS = (0.25, 0.5, 1.0, 2.0)
DIGITS_EVAL_SIGMAS = (0.25, 0.5, 1.0)

# Independent random streams derived from the one seed.
_AUGMENT_STREAM = 1
_EVAL_STREAM = 2


@dataclass(frozen=True, slots=True)
class TrainedModel:
    """A fitted model and the split it was fitted on.

    ``members`` and ``non_members`` are sorted, disjoint indices into the full data set
    returned by ``sklearn.datasets.<dataset>()`` and together cover it. The accuracies
    are scikit-learn's (float64); :func:`export` records the ONNX ones.
    """

    dataset: str
    seed: int
    estimator: Any
    members: np.ndarray
    non_members: np.ndarray
    train_accuracy: float
    test_accuracy: float
    input_range: tuple[Any, Any]
    train_sigmas: tuple[float, ...] = ()
    eval_sigmas: tuple[float, ...] = ()


def load_dataset(loader: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(x float32, y int64, class names)`` of a bundled scikit-learn data set."""
    bunch = getattr(datasets, loader)()
    return (
        bunch.data.astype(np.float32),
        bunch.target.astype(np.int64),
        [str(name) for name in bunch.target_names],
    )


def split_indices(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted ``(members, non_members)`` of a stratified split seeded by ``seed``."""
    members, non_members = train_test_split(
        np.arange(len(y)), test_size=TEST_SIZE, stratify=y, random_state=seed
    )
    return np.sort(members), np.sort(non_members)


def train_digits(seed: int = 0) -> TrainedModel:
    """The noise-augmented digits MLP; inputs are raw pixel values in [0, 16]."""
    x, y, _ = load_dataset("load_digits")
    members, non_members = split_indices(y, seed)
    x_train, y_train = x[members].astype(np.float64), y[members]
    rng = np.random.default_rng([seed, _AUGMENT_STREAM])
    noisy = [x_train + rng.normal(0.0, sigma, x_train.shape) for sigma in DIGITS_TRAIN_SIGMAS]
    x_aug = np.concatenate([x_train, *noisy])
    y_aug = np.tile(y_train, 1 + len(DIGITS_TRAIN_SIGMAS))
    model = make_pipeline(
        StandardScaler(),
        MLPClassifier(hidden_layer_sizes=(256,), alpha=1e-3, max_iter=300, random_state=seed),
    )
    # One BLAS thread: as fast as two on a small MLP, immune to oversubscription, and
    # the float reductions do not depend on the machine's core count.
    with threadpool_limits(1):
        model.fit(x_aug, y_aug)
    return TrainedModel(
        dataset="load_digits",
        seed=seed,
        estimator=model,
        members=members,
        non_members=non_members,
        train_accuracy=float(model.score(x_train, y_train)),
        test_accuracy=float(model.score(x[non_members], y[non_members])),
        input_range=(0.0, 16.0),
        train_sigmas=DIGITS_TRAIN_SIGMAS,
        eval_sigmas=DIGITS_EVAL_SIGMAS,
    )


def train_breast_cancer(seed: int = 0) -> TrainedModel:
    """The breast cancer random forest; inputs are the 30 raw features."""
    x, y, _ = load_dataset("load_breast_cancer")
    members, non_members = split_indices(y, seed)
    model = RandomForestClassifier(n_estimators=100, random_state=seed, n_jobs=1)
    model.fit(x[members], y[members])
    return TrainedModel(
        dataset="load_breast_cancer",
        seed=seed,
        estimator=model,
        members=members,
        non_members=non_members,
        train_accuracy=float(model.score(x[members], y[members])),
        test_accuracy=float(model.score(x[non_members], y[non_members])),
        input_range=(x.min(axis=0).tolist(), x.max(axis=0).tolist()),
    )


def to_onnx_bytes(trained: TrainedModel, name: str, n_features: int) -> bytes:
    """The serialized ONNX graph ``name`` of ``trained.estimator``, I/O as documented above."""
    estimator = trained.estimator
    classifier = estimator.steps[-1][1] if isinstance(estimator, Pipeline) else estimator
    onx = skl2onnx.convert_sklearn(
        estimator,
        name=name,  # skl2onnx names the graph with a random UUID otherwise
        initial_types=[(INPUT_NAME, FloatTensorType([None, n_features]))],
        options={id(classifier): {"zipmap": False}},
        target_opset=TARGET_OPSET,
    )
    # skl2onnx lists opset imports in set order, which varies with PYTHONHASHSEED.
    opsets = sorted((o.domain, o.version) for o in onx.opset_import)
    del onx.opset_import[:]
    onx.opset_import.extend(onnx.helper.make_opsetid(domain, version) for domain, version in opsets)
    return onx.SerializeToString()


def onnx_session(path_or_bytes: Path | bytes) -> ort.InferenceSession:
    """A CPU onnxruntime session (deterministic, the same everywhere)."""
    source = str(path_or_bytes) if isinstance(path_or_bytes, Path) else path_or_bytes
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def onnx_accuracy(session: ort.InferenceSession, x: np.ndarray, y: np.ndarray) -> float:
    """Fraction of rows of ``x`` (any row shape) whose ``label`` output equals ``y``,
    1,000 rows per run (a 32x32x3 test set stays within memory)."""
    correct = 0
    for first in range(0, len(x), 1000):
        batch = x[first : first + 1000].astype(np.float32)
        (labels,) = session.run(["label"], {INPUT_NAME: batch})
        correct += int(np.sum(labels == y[first : first + 1000]))
    return correct / len(x)


def noisy_accuracies(
    session: ort.InferenceSession,
    x: np.ndarray,
    y: np.ndarray,
    sigmas: Sequence[float],
    seed: int,
) -> dict[str, float]:
    """Accuracy under unclipped Gaussian noise per sigma (keys ``str(sigma)``).

    Noise is drawn, sigma after sigma, from one generator seeded by ``seed``.
    """
    rng = np.random.default_rng([seed, _EVAL_STREAM])
    return {
        str(sigma): onnx_accuracy(session, x + rng.normal(0.0, sigma, x.shape), y)
        for sigma in sigmas
    }


def export(trained: TrainedModel, name: str, out_dir: Path) -> dict[str, Any]:
    """Write ``<name>.onnx`` and its ``<name>.json`` sidecar into ``out_dir``; return the latter."""
    x, y, class_names = load_dataset(trained.dataset)
    onnx_bytes = to_onnx_bytes(trained, name, x.shape[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.onnx").write_bytes(onnx_bytes)

    session = onnx_session(onnx_bytes)
    x_test, y_test = x[trained.non_members], y[trained.non_members]
    info = {
        "name": name,
        "dataset": trained.dataset,
        "seed": trained.seed,
        "n_features": int(x.shape[1]),
        "n_classes": len(class_names),
        "class_names": class_names,
        "input_range": list(trained.input_range),
        "input_shape": [int(x.shape[1])],
        "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, int(x.shape[1])]}],
        "outputs": [
            {"name": "label", "datatype": "INT64", "shape": [-1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(class_names)]},
        ],
        "train_accuracy": onnx_accuracy(session, x[trained.members], y[trained.members]),
        "test_accuracy": onnx_accuracy(session, x_test, y_test),
        "train_noise_sigmas": list(trained.train_sigmas),
        "noisy_test_accuracy": noisy_accuracies(
            session, x_test, y_test, trained.eval_sigmas, trained.seed
        ),
        "sha256": hashlib.sha256(onnx_bytes).hexdigest(),
        "versions": {
            "sklearn": sklearn.__version__,
            "skl2onnx": skl2onnx.__version__,
            "onnxruntime": ort.__version__,
            "numpy": np.__version__,
        },
        "members": trained.members.tolist(),
        "non_members": trained.non_members.tolist(),
    }
    (out_dir / f"{name}.json").write_text(_dumps(info))
    write_split(out_dir, name, x, y, trained.members, trained.non_members)
    return info


def write_split(
    out_dir: Path,
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    members: np.ndarray,
    non_members: np.ndarray,
) -> None:
    """Write the split's rows beside the model, so the demo, the attacks and the tuner
    run without scikit-learn: ``<name>.samples.npz`` (the non-members, held out) and
    ``<name>.members.npz`` (the training rows), each ``x`` float32 and ``y`` int64 in
    index order."""
    for suffix, rows in (("samples", non_members), ("members", members)):
        with (out_dir / f"{name}.{suffix}.npz").open("wb") as f:
            np.savez_compressed(f, x=x[rows].astype(np.float32), y=y[rows].astype(np.int64))


def _dumps(info: dict[str, Any]) -> str:
    """JSON with one top-level key per line: readable, and index lists stay one line each."""
    lines = (f"  {json.dumps(key)}: {json.dumps(value)}" for key, value in info.items())
    return "{\n" + ",\n".join(lines) + "\n}\n"


TRAINERS = {"digits": train_digits, "breast_cancer": train_breast_cancer}
ALL = (*TRAINERS, "shapes")


def _train_shapes(out: Path, seed: int) -> dict[str, Any]:
    from guard.models import train_shapes  # torch: only when asked for

    trained = train_shapes.train_shapes(seed)
    print(f"shapes: trained in {trained.seconds:.0f} s")
    return train_shapes.export(trained, out)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m guard.models.train", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"models to train (default: all of {', '.join(ALL)})",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of split, noise and weights")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(ALL))
    if unknown:
        parser.error(f"unknown model {', '.join(unknown)}; expected some of {', '.join(ALL)}")
    for name in args.names or ALL:
        if name == "shapes":
            info = _train_shapes(args.out, args.seed)
        else:
            info = export(TRAINERS[name](args.seed), name, args.out)
        size = (args.out / f"{name}.onnx").stat().st_size
        noisy = ", ".join(f"sigma {s}: {a:.4f}" for s, a in info["noisy_test_accuracy"].items())
        print(
            f"{name}: {size} bytes, train {info['train_accuracy']:.4f}, "
            f"test {info['test_accuracy']:.4f}" + (f", {noisy}" if noisy else "")
        )


if __name__ == "__main__":
    main()

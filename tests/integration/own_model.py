"""A user's own model for the bring-your-own-model tests: a scikit-learn MLP trained in
the test on generated data, exported to ONNX with skl2onnx, and its data in every
format ``--data`` reads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

FEATURES = 12
CLASSES = 3
SIDE = 4  # image variant: SIDE x SIDE x 3 = 48 values


@dataclass(frozen=True)
class OwnModel:
    onnx: Path
    npz: Path
    x: np.ndarray  # held-out rows
    y: np.ndarray
    x_members: np.ndarray
    y_members: np.ndarray


def _data(seed: int, features: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=480,
        n_features=features,
        n_informative=min(features, 8),
        n_redundant=0,
        n_classes=CLASSES,
        class_sep=1.2,
        random_state=seed,
    )
    x = (x - x.min(axis=0)) / (x.max(axis=0) - x.min(axis=0))  # into [0, 1]
    return x.astype(np.float32), y.astype(np.int64)


def train(folder: Path, *, seed: int = 0, zipmap: bool = False, image: bool = False) -> OwnModel:
    """Train, export and save: ``folder/model.onnx``, ``folder/model.joblib`` (the
    estimator, for MLServer) and ``folder/data.npz`` (x, y, x_members, y_members).
    ``image``: the model takes ``[N, SIDE, SIDE, 3]`` (a Reshape in front of the
    scikit-learn graph)."""
    import joblib
    from skl2onnx import to_onnx
    from sklearn.neural_network import MLPClassifier

    features = SIDE * SIDE * 3 if image else FEATURES
    x, y = _data(seed, features)
    members, held = np.arange(240), np.arange(240, 480)
    model = MLPClassifier((32,), max_iter=400, random_state=seed).fit(x[members], y[members])
    onx = to_onnx(
        model,
        x[:1],
        options={id(model): {"zipmap": zipmap}},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    if image:
        onx = _image_input(onx, features)
    folder.mkdir(parents=True, exist_ok=True)
    joblib.dump(model, folder / "model.joblib")  # the same model, for MLServer
    path = folder / "model.onnx"
    path.write_bytes(onx.SerializeToString())
    shape = (-1, SIDE, SIDE, 3) if image else (-1, features)
    npz = folder / "data.npz"
    np.savez(
        npz,
        x=x[held].reshape(shape),
        y=y[held],
        x_members=x[members].reshape(shape),
        y_members=y[members],
    )
    return OwnModel(path, npz, x[held], y[held], x[members], y[members])


def _image_input(onx, features: int):  # type: ignore[no-untyped-def]
    from onnx import TensorProto, helper, numpy_helper

    graph = onx.graph
    flat = graph.input[0].name
    graph.initializer.append(numpy_helper.from_array(np.array([-1, features], np.int64), "flat"))
    graph.node.insert(0, helper.make_node("Reshape", ["image", "flat"], [flat]))
    del graph.input[:]
    graph.input.append(
        helper.make_tensor_value_info("image", TensorProto.FLOAT, [None, SIDE, SIDE, 3])
    )
    return onx


def write_csv(path: Path, x: np.ndarray, y: np.ndarray, *, header: bool, label_first: bool) -> None:
    columns = [f"f{i}" for i in range(x.shape[1])]
    lines = []
    if header:
        lines.append(",".join(["label", *columns] if label_first else [*columns, "label"]))
    for row, label in zip(x, y, strict=True):
        cells = [f"{v:.7g}" for v in row]
        lines.append(",".join([str(label), *cells] if label_first else [*cells, str(label)]))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_images(folder: Path, x: np.ndarray, y: np.ndarray, *, scale: int = 2) -> None:
    """PNG files ``folder/CLASS/i.png``, each row as an RGB image ``scale`` times larger
    than the model's input (the reader resizes them back)."""
    from PIL import Image

    for i, (row, label) in enumerate(zip(x, y, strict=True)):
        pixels = np.round(row.reshape(SIDE, SIDE, 3) * 255).astype(np.uint8)
        image = Image.fromarray(pixels, "RGB").resize(
            (SIDE * scale, SIDE * scale), Image.Resampling.NEAREST
        )
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        image.save(folder / str(label) / f"{i}.png")

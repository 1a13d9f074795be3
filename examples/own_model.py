"""Train a small scikit-learn classifier, export it to ONNX, and save its data for guard.

    python examples/own_model.py OUT_DIR [--seed 0]

Writes ``OUT_DIR/model.onnx`` (input ``input`` FP32 ``[N, 20]`` in [0, 1]; outputs
``label`` and ``probabilities``), ``OUT_DIR/model.joblib`` (the same estimator, for
MLServer) and ``OUT_DIR/data.npz``: ``x``/``y`` held-out rows and ``x_members``/
``y_members`` the rows it was trained on (for the membership attacks). Stands in for
your own model and data in the README's walk-through; needs scikit-learn and skl2onnx.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

FEATURES = 20
CLASSES = 4
ROWS = 1200


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for model.onnx, model.joblib, data.npz")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import joblib
    from skl2onnx import to_onnx
    from sklearn.datasets import make_classification
    from sklearn.neural_network import MLPClassifier

    x, y = make_classification(
        n_samples=ROWS,
        n_features=FEATURES,
        n_informative=12,
        n_redundant=4,
        n_classes=CLASSES,
        class_sep=1.5,
        random_state=args.seed,
    )
    x = ((x - x.min(axis=0)) / (x.max(axis=0) - x.min(axis=0))).astype(np.float32)  # [0, 1]
    order = np.random.default_rng(args.seed).permutation(ROWS)
    members, held_out = order[: ROWS // 2], order[ROWS // 2 :]
    model = MLPClassifier((64,), max_iter=1500, random_state=args.seed)
    model.fit(x[members], y[members])

    # zipmap off: probabilities as one [N, C] tensor, the form V2 servers answer with
    onx = to_onnx(
        model,
        x[:1],
        options={id(model): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    onx.graph.input[0].name = _rename(onx, onx.graph.input[0].name, "input")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "model.onnx").write_bytes(onx.SerializeToString())
    joblib.dump(model, args.out / "model.joblib")
    np.savez(
        args.out / "data.npz",
        x=x[held_out],
        y=y[held_out].astype(np.int64),
        x_members=x[members],
        y_members=y[members].astype(np.int64),
    )
    accuracy = float((model.predict(x[held_out]) == y[held_out]).mean())
    print(f"wrote {args.out}/model.onnx, model.joblib, data.npz (held-out accuracy {accuracy:.3f})")


def _rename(onx, old: str, new: str) -> str:  # type: ignore[no-untyped-def]
    """Rename the graph's input ``old`` to ``new`` wherever a node reads it."""
    for node in onx.graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
    return new


if __name__ == "__main__":
    main()
